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

from bnexplore.batches import batches, numpy_dtype
from bnexplore.engines import EngineResult, State
from bnexplore.scenario import Scenario

VERSION = f"NumPy {np.__version__} float64"
FUSED_DTYPES = ("float16", "bfloat16", "float32")
"""Compute dtypes tf_keras's fused kernel supports; float64 takes the non-fused path."""


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel batch mean and biased variance, shaped to broadcast."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return mean, var


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """Running statistics as a layer keeps them: rounded to its variables' dtype."""
    return values.astype(numpy_dtype(dtype)).astype(np.float64)


def _per_channel(stat: np.ndarray, ndim: int) -> np.ndarray:
    return stat.reshape((1, -1) + (1,) * (ndim - 2))


def _normalize(x, mean, var, eps, gamma, beta) -> tuple[np.ndarray, np.ndarray]:
    """y = (x − mean) / √(var + eps) · γ + β, and each channel's rounding gain.

    The gain |mean|·|γ| / √(var + eps) is how much a relative rounding error in
    the mean (or in x) is amplified in y: large for constant inputs and for
    inputs far from zero, where low precision shows.
    """
    ndim = x.ndim
    scale = _per_channel(gamma, ndim) / np.sqrt(var + eps)
    gain = np.abs(mean * scale).reshape(-1)
    return (x - mean) * scale + _per_channel(beta, ndim), gain


class TorchReference:
    """PyTorch's rules: unbiased variance into the running variance.

    running ← (1 − m)·running + m·batch, m = momentum or 1/num_batches_tracked;
    the batch variance fed in is var_b·n/(n − 1). Training needs n > 1.
    """

    name = "torch_reference"
    label = "PyTorch rules"
    version = VERSION

    def run(self, scenario: Scenario, initial_state: State | None = None) -> EngineResult:
        s = scenario
        channels, n, ndim = s.channels, s.values_per_channel, len(s.shape)
        track = s["torch_track_running_stats"]
        running_mean = np.zeros(channels) if track else None
        running_var = np.ones(channels) if track else None
        ones, zeros = np.ones(channels), np.zeros(channels)
        tracked = 0
        trained_state = None
        for k, batch in enumerate(batches(s)):
            if k == s["steps"] and track:
                trained_state = {
                    "weight": ones,
                    "bias": zeros,
                    "running_mean": running_mean,
                    "running_var": running_var,
                }
            x = batch.astype(np.float64)
            training = k < s["steps"] or s["torch_mode"] == "train"
            if training or not track:
                if n == 1:
                    return self._result(
                        error="Expected more than 1 value per channel when training"
                    )
                mean, var = _moments(x)
                output, gain = _normalize(x, mean, var, s["torch_eps"], ones, zeros)
                if training and track:
                    tracked += 1
                    m = 1.0 / tracked if s["torch_momentum"] is None else s["torch_momentum"]
                    running_mean = _stored((1 - m) * running_mean + m * mean.ravel(), s["dtype"])
                    running_var = _stored(
                        (1 - m) * running_var + m * var.ravel() * n / (n - 1), s["dtype"]
                    )
            else:
                output, gain = _normalize(
                    x,
                    _per_channel(running_mean, ndim),
                    _per_channel(running_var, ndim),
                    s["torch_eps"],
                    ones,
                    zeros,
                )
        return self._result(
            output=output,
            running_mean=running_mean,
            running_var=running_var,
            trained_state=trained_state,
            rounding_gain=gain,
        )

    def _result(self, **fields) -> EngineResult:
        return EngineResult(self.name, available=True, version=self.version, device="cpu", **fields)


class KerasReference(TorchReference):
    """Keras 3's rules: biased variance into the moving variance.

    moving ← momentum·moving + (1 − momentum)·batch; a training pass happens
    only with training=True on a trainable layer, else the moving statistics
    normalize. One value per channel is allowed (var_b = 0, output β). A
    ported state replaces the training steps.
    """

    name = "keras_reference"
    label = "Keras 3 rules"
    prefix = "keras"

    def rules(self, scenario: Scenario) -> tuple[bool, float, str | None]:
        """(unbiased variance fed in?, effective epsilon, error) for this scenario."""
        return False, scenario[f"{self.prefix}_eps"], None

    def variable_dtype(self, scenario: Scenario) -> str:
        """Keras 3 keeps the moving statistics in the layer's dtype."""
        return scenario["dtype"]

    def run(self, scenario: Scenario, initial_state: State | None = None) -> EngineResult:
        s, p = scenario, self.prefix
        ndim, n = len(s.shape), s.values_per_channel
        unbiased, eps, error = self.rules(s)
        if error:
            return self._result(error=error)
        momentum = s[f"{p}_momentum"]
        state = initial_state or {
            "weight": np.ones(s.channels),
            "bias": np.zeros(s.channels),
            "running_mean": np.zeros(s.channels),
            "running_var": np.ones(s.channels),
        }
        gamma = state["weight"] if s[f"{p}_scale"] else np.ones(s.channels)
        beta = state["bias"] if s[f"{p}_center"] else np.zeros(s.channels)
        moving_mean, moving_var = state["running_mean"], state["running_var"]
        measured_training = s[f"{p}_training"] == "true"
        for k, batch in enumerate(batches(s)):
            if initial_state is not None and k < s["steps"]:
                continue
            x = batch.astype(np.float64)
            training = k < s["steps"] or measured_training
            if training and s[f"{p}_trainable"]:
                mean, var = _moments(x)
                output, gain = _normalize(x, mean, var, eps, gamma, beta)
                fed = var.ravel() * n / (n - 1) if unbiased and n > 1 else var.ravel()
                stored = self.variable_dtype(s)
                moving_mean = _stored(
                    momentum * moving_mean + (1 - momentum) * mean.ravel(), stored
                )
                moving_var = _stored(momentum * moving_var + (1 - momentum) * fed, stored)
            else:
                output, gain = _normalize(
                    x,
                    _per_channel(moving_mean, ndim),
                    _per_channel(moving_var, ndim),
                    eps,
                    gamma,
                    beta,
                )
        return self._result(
            output=output, running_mean=moving_mean, running_var=moving_var, rounding_gain=gain
        )


class Keras2Reference(KerasReference):
    """Keras 2's rules: as Keras 3, but the fused path feeds the unbiased variance
    var_b·n/(n − 1) into the moving variance.

    Fused where tf_keras fuses: 4-D or 5-D input in float16, bfloat16 or float32
    (fused=auto), or where fused=true demands it (an error elsewhere). Measured
    on TensorFlow 2.21's CPU kernel: epsilon is used as given, not raised to
    1.001e-5.
    """

    name = "keras2_reference"
    label = "Keras 2 rules"
    prefix = "keras2"

    def variable_dtype(self, scenario: Scenario) -> str:
        """tf_keras raises float16 and bfloat16 layers' variables to float32."""
        return "float32" if scenario["dtype"] in ("float16", "bfloat16") else scenario["dtype"]

    def rules(self, scenario: Scenario) -> tuple[bool, float, str | None]:
        eps, choice = scenario["keras2_eps"], scenario["keras2_fused"]
        rank_ok = len(scenario.shape) in (4, 5)
        dtype_ok = scenario["dtype"] in FUSED_DTYPES
        if choice == "true" and not rank_ok:
            return True, eps, "fused=True needs 4-D or 5-D input"
        if choice == "true" and not dtype_ok:
            return True, eps, "fused=True needs float16, bfloat16 or float32"
        fused = choice != "false" and rank_ok and dtype_ok
        return fused, eps, None


REFERENCES = {"torch": TorchReference(), "keras": KerasReference(), "keras2": Keras2Reference()}
"""Engine name → the reference that follows that framework's rules."""
