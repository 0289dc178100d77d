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

os.environ["JAX_ENABLE_X64"] = "1"  # float64 scenarios are float64 here too

import jax
import jax.numpy as jnp
import keras

if keras.backend.backend() != "jax":
    raise ImportError(
        f"Keras runs on {keras.backend.backend()!r} in this process "
        "(KERAS_BACKEND); this engine needs JAX: it runs in a worker process of its own"
    )

from bnexplore.engines.keras3_common import Keras3BackendEngine


class KerasJaxEngine(Keras3BackendEngine):
    name = "keras_jax"
    label = "Keras 3 (JAX)"
    version = f"keras {keras.__version__} (JAX {jax.__version__})"
    backend = "JAX"

    def gpu_count(self) -> int:
        return sum(d.platform == "gpu" for d in jax.devices())

    def forward_and_gradients(self, session, x, target, training, wrt_x: bool):
        """jax.value_and_grad over the layer's ``stateless_call``; the moving statistics it
        returns are assigned back, as a stateful call would."""
        layer = session.layer
        trainable, frozen = layer.trainable_variables, layer.non_trainable_variables
        values = [v.value for v in trainable]
        fixed = [v.value for v in frozen]
        kwargs = {} if training is None else {"training": training}

        def loss_of(values, x):
            y, updated = layer.stateless_call(values, fixed, x, **kwargs)
            return jnp.mean(jnp.square(y - target)), (y, updated)

        (loss, (y, updated)), (by_value, grad_x) = jax.value_and_grad(
            loss_of, argnums=(0, 1), has_aux=True
        )(values, x)
        for variable, value in zip(frozen, updated, strict=True):
            variable.assign(value)
        grads = dict(zip(map(id, trainable), by_value, strict=True))
        return y, loss, grad_x if wrt_x else None, grads
