"""Keras 3 on JAX: ``keras.layers.BatchNormalization`` with ``KERAS_BACKEND=jax``, run for real.

The rules are Keras 3's (see keras_engine); the kernel is JAX's: batch
statistics by ``jnp.mean`` and ``jnp.var`` (two passes), so large means keep
their precision. JAX computes float64 only with x64 enabled: this engine
enables it, so a float64 scenario is float64 here too.
"""

from __future__ import annotations

import os
import sys

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "jax"

import jax

jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402

if keras.backend.backend() != "jax":
    raise ImportError(
        f"Keras runs on {keras.backend.backend()!r} in this process "
        "(KERAS_BACKEND); this engine needs JAX: it runs in a worker process of its own"
    )

from bnexplore.engines.keras3_common import Keras3BackendEngine  # noqa: E402


class KerasJaxEngine(Keras3BackendEngine):
    name = "keras_jax"
    label = "Keras 3 (JAX)"
    version = f"keras {keras.__version__} (JAX {jax.__version__})"
    backend = "JAX"

    def gpu_count(self) -> int:
        return sum(d.platform == "gpu" for d in jax.devices())
