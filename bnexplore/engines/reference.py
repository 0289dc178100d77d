"""The reference engine: each framework's semantics from the formulas, in float64.

An oracle, not a replacement: it reads the very batches the frameworks saw
(cast to the scenario's dtype, then widened to float64) and applies the
documented rules, so a gap between a framework and its reference is the
framework's own arithmetic, and a gap between references is semantics.

Notation: statistics per channel (axis 1) over the n values of every other
axis; mean_b and var_b are the batch mean and the biased batch variance.
"""

from __future__ import annotations

import numpy as np

from bnexplore.batches import batches
from bnexplore.engines import EngineResult
from bnexplore.scenario import Scenario

VERSION = f"NumPy {np.__version__} float64"


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel batch mean and biased variance, shaped to broadcast."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return mean, var


def _per_channel(stat: np.ndarray, ndim: int) -> np.ndarray:
    return stat.reshape((1, -1) + (1,) * (ndim - 2))


def _normalize(x, mean, var, eps) -> np.ndarray:
    """y = (x − mean) / √(var + eps), with γ = 1 and β = 0 (fresh layers)."""
    return (x - mean) / np.sqrt(var + eps)


class TorchReference:
    """PyTorch's rules: unbiased variance into the running variance.

    running ← (1 − m)·running + m·batch, m = momentum or 1/num_batches_tracked;
    the batch variance fed in is var_b·n/(n − 1). Training needs n > 1.
    """

    name = "torch_reference"
    label = "PyTorch rules"
    version = VERSION

    def run(self, scenario: Scenario) -> EngineResult:
        s = scenario
        channels, n, ndim = s.channels, s.values_per_channel, len(s.shape)
        track = s["torch_track_running_stats"]
        running_mean = np.zeros(channels) if track else None
        running_var = np.ones(channels) if track else None
        tracked = 0
        for k, batch in enumerate(batches(s)):
            x = batch.astype(np.float64)
            training = k < s["steps"] or s["torch_mode"] == "train"
            if training or not track:
                if n == 1:
                    return self._result(
                        error="Expected more than 1 value per channel when training"
                    )
                mean, var = _moments(x)
                output = _normalize(x, mean, var, s["torch_eps"])
                if training and track:
                    tracked += 1
                    m = 1.0 / tracked if s["torch_momentum"] is None else s["torch_momentum"]
                    running_mean = (1 - m) * running_mean + m * mean.ravel()
                    running_var = (1 - m) * running_var + m * var.ravel() * n / (n - 1)
            else:
                output = _normalize(
                    x,
                    _per_channel(running_mean, ndim),
                    _per_channel(running_var, ndim),
                    s["torch_eps"],
                )
        return self._result(output=output, running_mean=running_mean, running_var=running_var)

    def _result(self, **fields) -> EngineResult:
        return EngineResult(self.name, available=True, version=self.version, device="cpu", **fields)


class KerasReference(TorchReference):
    """Keras 3's rules: biased variance into the moving variance.

    moving ← momentum·moving + (1 − momentum)·batch; a training pass happens
    only with training=True on a trainable layer, else the moving statistics
    normalize. One value per channel is allowed (var_b = 0, output β).
    """

    name = "keras_reference"
    label = "Keras 3 rules"

    def run(self, scenario: Scenario) -> EngineResult:
        s = scenario
        ndim = len(s.shape)
        momentum, eps = s["keras_momentum"], s["keras_eps"]
        moving_mean, moving_var = np.zeros(s.channels), np.ones(s.channels)
        measured_training = s["keras_training"] == "true"
        for k, batch in enumerate(batches(s)):
            x = batch.astype(np.float64)
            training = k < s["steps"] or measured_training
            if training and s["keras_trainable"]:
                mean, var = _moments(x)
                output = _normalize(x, mean, var, eps)
                moving_mean = momentum * moving_mean + (1 - momentum) * mean.ravel()
                moving_var = momentum * moving_var + (1 - momentum) * var.ravel()
            else:
                output = _normalize(
                    x, _per_channel(moving_mean, ndim), _per_channel(moving_var, ndim), eps
                )
        return self._result(output=output, running_mean=moving_mean, running_var=moving_var)


REFERENCES = {"torch": TorchReference(), "keras": KerasReference()}
"""Engine name → the reference that follows that framework's rules."""
