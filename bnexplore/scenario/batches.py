"""The scenario's input batches, identical in every engine and on every machine.

Batch k, for k = 0 … steps, is drawn from ONE ``numpy.random.default_rng(seed)``
in order, in float64, then cast to the scenario's dtype:

- ``normal``: ``rng.standard_normal(shape) * std + mean``
- ``uniform``: ``rng.uniform(low, high, shape)``
- ``ones`` and ``constant``: ``value`` everywhere (ones: 1); nothing is drawn.
- ``file``: the stored file's arrays (bnexplore.files.store): an ``.npy`` for every pass,
  an ``.npz``'s ``batch_k`` for pass k (its last for any pass beyond), widened to
  float64, then cast. The scenario's shape is the file's (the link codec sees to it).

Batches are channels-first (N, C, …), PyTorch's layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bnexplore.files import store
from bnexplore.scenario.links import Scenario


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a scenario dtype; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def batches(scenario: Scenario) -> Iterator[np.ndarray]:
    """Yield the steps + 1 batches: training batches first, the measured one last.

    A constant batch is made once and yielded each time; callers must not
    write into a batch.
    """
    shape = scenario.shape
    dtype = numpy_dtype(scenario["dtype"])
    kind = scenario["input"]
    count = scenario["steps"] + 1
    if kind in ("ones", "constant"):
        # the float64 value cast once is what casting a float64 batch gives each element
        with np.errstate(over="ignore"):  # beyond the dtype's range is ±inf: a result to show
            value = np.array(1.0 if kind == "ones" else scenario["value"]).astype(dtype)
        batch = np.full(shape, value, dtype=dtype)
        for _ in range(count):
            yield batch
        return
    if kind == "file":
        # the stored arrays, each cast once (to float64 first, like drawn batches)
        stored = store.batches(scenario["file"])
        cast: dict[int, np.ndarray] = {}
        for k in range(count):
            index = min(k, len(stored) - 1)
            if index not in cast:
                with np.errstate(over="ignore"):
                    cast[index] = stored[index].astype(np.float64).astype(dtype)
            yield cast[index]
        return
    rng = np.random.default_rng(scenario["seed"])
    if kind == "running":
        yield from _running_batches(scenario, rng, count, dtype)
        return
    for _ in range(count):
        if kind == "normal":
            batch = rng.standard_normal(shape) * scenario["std"] + scenario["mean"]
        else:
            batch = rng.uniform(scenario["low"], scenario["high"], shape)
        with np.errstate(over="ignore"):
            batch = batch.astype(dtype, copy=False)
        yield batch


def running_batch(
    mean: np.ndarray, var: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """A float64 batch drawn from a layer's own statistics: x[:, c] = mean[c] + √var[c]·z,
    z = rng.standard_normal(shape) (channels-first)."""
    expand = (1, -1, *([1] * (len(shape) - 2)))
    z = rng.standard_normal(shape)
    z *= np.sqrt(np.asarray(var, dtype=np.float64)).reshape(expand)
    z += np.asarray(mean, dtype=np.float64).reshape(expand)
    return z


def _running_batches(scenario: Scenario, rng, count: int, dtype) -> Iterator[np.ndarray]:
    """input=running: each batch from the chosen layer's running statistics (state=…,
    layer=…), one default_rng(seed) in step order, then cast."""
    layer = store.find_layer(scenario["state"], scenario["layer"])
    for _ in range(count):
        batch = running_batch(
            layer.state["running_mean"], layer.state["running_var"], scenario.shape, rng
        )
        with np.errstate(over="ignore"):
            yield batch.astype(dtype, copy=False)


def targets(scenario: Scenario) -> Iterator[np.ndarray | None]:
    """Yield the steps + 1 targets T_k of the loss, in step order (None with loss=none).

    ``zeros``: zeros; ``normal``: ONE ``numpy.random.default_rng(seed + 1)``,
    ``rng.standard_normal(shape)`` per pass, float64 then cast. Channels-first like the
    batches; callers must not write into a target.
    """
    count = scenario["steps"] + 1
    if scenario["loss"] == "none":
        for _ in range(count):
            yield None
        return
    shape, dtype = scenario.shape, numpy_dtype(scenario["dtype"])
    if scenario["target"] == "zeros":
        zeros = np.zeros(shape, dtype=dtype)
        for _ in range(count):
            yield zeros
        return
    rng = np.random.default_rng(scenario["seed"] + 1)
    for _ in range(count):
        yield rng.standard_normal(shape).astype(dtype, copy=False)
