"""The bench's bare side of the whole-model audit: one engine's passes, the framework called
directly, in a process of its own.

``python -m bnexplore.tools.bare_audit ENGINE PLAN.npz [--outputs OUT.npz]``

PLAN.npz (written by :func:`bnexplore.tools.bench.write_audit_plan` from the audit's own
planning) holds per pass its engine, epsilon, channels and batch number, the layers'
states side by side (weight, bias, running_mean, running_var, float64) and the batches
(``x0``, ``x1``, …, channels-first). For each of ENGINE's passes this builds a fresh layer
in inference, loads the state, runs the batch and fetches the output to the host as a
channels-first NumPy array, as the engines return it; nothing else.

Timed mode (no ``--outputs``): one full round over the passes to warm, then ``ready`` on
stdout; each ``go`` line on stdin runs one round and answers ``done SECONDS``; anything
else (or the end of stdin) ends the process. With ``--outputs`` it runs one round and
writes each output as ``p<index>``, index the pass's number in the plan.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np

STATE = ("weight", "bias", "running_mean", "running_var")
BACKENDS = {"keras": "tensorflow", "keras_jax": "jax"}
"""Keras 3's backend per engine: chosen once per process, before keras is imported."""

Run = Callable[[float, dict, np.ndarray], np.ndarray]


def torch_pass() -> Run:
    import torch

    def run(eps: float, state: dict, x: np.ndarray) -> np.ndarray:
        bn = torch.nn.BatchNorm2d(x.shape[1], eps=eps).eval()
        with torch.no_grad():
            for name in STATE:
                getattr(bn, name).copy_(torch.from_numpy(state[name]))
            return bn(torch.from_numpy(x)).numpy()

    return run


def keras_pass() -> Run:
    import keras

    def run(eps: float, state: dict, x: np.ndarray) -> np.ndarray:
        layer = keras.layers.BatchNormalization(axis=-1, epsilon=eps, dtype=x.dtype.name)
        layer.build((x.shape[0], *x.shape[2:], x.shape[1]))
        layer.set_weights([state[name].astype(x.dtype) for name in STATE])
        y = layer(keras.ops.convert_to_tensor(np.moveaxis(x, 1, -1)), training=False)
        return np.ascontiguousarray(np.moveaxis(keras.ops.convert_to_numpy(y), -1, 1))

    return run


def flax_pass() -> Run:
    import jax.numpy as jnp
    from flax import nnx

    def run(eps: float, state: dict, x: np.ndarray) -> np.ndarray:
        dtype = jnp.dtype(x.dtype.name)
        layer = nnx.BatchNorm(
            x.shape[1],
            epsilon=eps,
            use_running_average=True,
            axis=-1,
            dtype=dtype,
            param_dtype=dtype,
            rngs=nnx.Rngs(0),
        )
        for flax_name, name in zip(("scale", "bias", "mean", "var"), STATE, strict=True):
            getattr(layer, flax_name)[...] = jnp.asarray(state[name], dtype=dtype)
        y = layer(jnp.asarray(np.moveaxis(x, 1, -1)))
        return np.ascontiguousarray(np.moveaxis(np.asarray(y), -1, 1))

    return run


def runner(engine: str) -> Run:
    """The bare pass of ``engine``, its framework imported (Keras's backend chosen first)."""
    if engine in ("keras_jax", "flax"):
        os.environ["JAX_ENABLE_X64"] = "1"  # as the engines run JAX
    if engine in BACKENDS:
        os.environ["KERAS_BACKEND"] = BACKENDS[engine]
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return keras_pass()
    if engine == "torch":
        return torch_pass()
    if engine == "flax":
        return flax_pass()
    raise SystemExit(f"bare_audit: no bare pass for engine {engine!r}")


def load_plan(path: str, engine: str) -> list[tuple[int, float, dict, np.ndarray]]:
    """``engine``'s passes of the plan: (index, eps, state, batch)."""
    with np.load(path, allow_pickle=False) as plan:
        engines, eps, channels = plan["engine"], plan["eps"], plan["channels"]
        numbers = plan["batch"]
        states = {name: plan[name] for name in STATE}
        offsets = np.concatenate([[0], np.cumsum(channels)])
        batches: dict[int, np.ndarray] = {}
        passes = []
        for i in np.flatnonzero(engines == engine):
            a, b = offsets[i], offsets[i + 1]
            k = int(numbers[i])
            if k not in batches:
                batches[k] = plan[f"x{k}"]
            state = {name: np.ascontiguousarray(states[name][a:b]) for name in STATE}
            passes.append((int(i), float(eps[i]), state, batches[k]))
    return passes


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--outputs"):
        print(__doc__, file=sys.stderr)
        return 2
    engine, path = argv[0], argv[1]
    run = runner(engine)
    passes = load_plan(path, engine)

    def one_round() -> list[np.ndarray]:
        return [run(eps, state, x) for _, eps, state, x in passes]

    if len(argv) == 4:
        outputs = one_round()
        np.savez(argv[3], **{f"p{i}": y for (i, *_), y in zip(passes, outputs, strict=True)})
        return 0
    one_round()  # warm: kernels, dispatch caches, allocator
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        one_round()
        print(f"done {time.perf_counter() - start:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
