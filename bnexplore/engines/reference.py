"""The reference engine: each framework's semantics from the formulas, in float64.

An oracle, not a replacement: it reads the very batches the frameworks saw
(cast to the scenario's dtype, then widened to float64) and applies the
documented rules, so a gap between a framework and its reference is the
framework's own arithmetic, and a gap between references is semantics.

Notation: statistics per channel (axis 1) over the n values of every other
axis; mean_b and var_b are the batch mean and the biased batch variance.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnexplore.batches import numpy_dtype
from bnexplore.engines import EngineResult, Session, State, history_of
from bnexplore.scenario import Scenario

VERSION = f"NumPy {np.__version__} float64"
FUSED_DTYPES = ("float16", "bfloat16", "float32")
"""Compute dtypes tf_keras's fused kernel supports; float64 takes the non-fused path."""


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel batch mean and biased variance, shaped to broadcast."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    with np.errstate(all="ignore"):  # ±inf inputs give NaN statistics: a result to show
        mean = x.mean(axis=axes, keepdims=True)
        var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return mean, var


def unit_roundoff(dtype: str) -> float:
    """u of the dtype the statistics are computed in: at least float32 (half inputs are
    widened first), float64 for float64."""
    return 2.0**-53 if dtype == "float64" else 2.0**-24


def fast_variance_error(x: np.ndarray, dtype: str) -> np.ndarray:
    """Per channel, a bound δ on |v̂ − v| where v̂ = fl(E[x²]) − fl(E[x])² is computed in
    floating point with unit roundoff u (at least float32's) over n values.

    First order, for any summation order: |fl(E[x²]) − E[x²]| ≤ (n + 1)·u·E[x²];
    |fl(E[x]) − E[x]| ≤ (n + 1)·u·E[|x|], so squaring it errs by at most
    2·(n + 1)·u·E[|x|]² + u·E[x]²; the subtraction adds u·v. With E[|x|]², E[x]² and v
    each at most E[x²]: δ = (3n + 5)·u·E[x²]. When |E[x]| ≫ std, δ exceeds v itself:
    the fast variance has no correct digit left.
    """
    axes = tuple(i for i in range(x.ndim) if i != 1)
    n = x.size // x.shape[1]
    with np.errstate(all="ignore"):
        second_moment = np.square(x).mean(axis=axes)
    return (3 * n + 5) * unit_roundoff(dtype) * second_moment


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
    with np.errstate(all="ignore"):
        return (x - mean) * scale + _per_channel(beta, ndim), gain


class ReferenceSession(Session):
    """A float64 layer following one framework's rules; subclasses say which."""

    def __init__(self, name: str, scenario: Scenario) -> None:
        self.name, self.s = name, scenario
        self.where = {"version": VERSION, "device": "cpu"}
        channels = scenario.channels
        self.gamma, self.beta = np.ones(channels), np.zeros(channels)
        self.running_mean: np.ndarray | None = np.zeros(channels)
        self.running_var: np.ndarray | None = np.ones(channels)
        self.steps_seen: list[int] = []
        self.means: list[np.ndarray] = []
        self.variances: list[np.ndarray] = []
        self.trained_state: State | None = None
        self.output = self.gain = None
        self.fast_variance = False
        self.variance_error: dict[str, np.ndarray] = {}

    def _normalize_with_batch(
        self, k: int, x: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """y from the exact batch moments (returned); with a fast-variance kernel, also
        what that kernel's error does.

        A variance off by at most δ scales y − β by √(v + eps)/√(v̂ + eps) with
        v̂ ∈ [max(v − δ, 0), v + δ]: by at most 1 + r, r = √((v + eps)/(max(v − δ, 0) + eps))
        − 1. Kept per channel: "output", r·max|y − β| for the measured pass; "running",
        the largest δ fed in (the running variance takes (1 − momentum)·δ per pass, at
        most δ in all).
        """
        mean, var = _moments(x)
        self.output, self.gain = _normalize(x, mean, var, eps, self.gamma, self.beta)
        if self.fast_variance:
            delta = fast_variance_error(x, self.s["dtype"])
            if k == self.s["steps"]:
                v = var.ravel()
                axes = tuple(i for i in range(x.ndim) if i != 1)
                with np.errstate(all="ignore"):
                    r = np.sqrt((v + eps) / (np.maximum(v - delta, 0.0) + eps)) - 1.0
                    spread = np.abs(self.output - _per_channel(self.beta, x.ndim)).max(axis=axes)
                self.variance_error["output"] = r * spread
            fed = self.variance_error.get("running")
            self.variance_error["running"] = delta if fed is None else np.maximum(fed, delta)
        return mean, var

    def _record(self, k: int) -> None:
        if self.running_mean is not None:
            self.steps_seen.append(k)
            self.means.append(self.running_mean)
            self.variances.append(self.running_var)

    def state(self) -> State | None:
        if self.running_mean is None:
            return None
        return {
            "weight": self.gamma,
            "bias": self.beta,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
        }

    def _normalize_with_running(self, x: np.ndarray, eps: float) -> None:
        ndim = x.ndim
        self.output, self.gain = _normalize(
            x,
            _per_channel(self.running_mean, ndim),
            _per_channel(self.running_var, ndim),
            eps,
            self.gamma,
            self.beta,
        )

    def finish(self) -> EngineResult:
        return EngineResult(
            self.name,
            available=True,
            output=self.output,
            running_mean=self.running_mean,
            running_var=self.running_var,
            trained_state=self.trained_state,
            rounding_gain=self.gain,
            variance_error=self.variance_error or None,
            history=history_of(self.steps_seen, self.means, self.variances),
            **self.where,
        )


class TorchRules(ReferenceSession):
    """PyTorch's rules: unbiased variance into the running variance.

    running ← (1 − m)·running + m·batch, m = momentum or 1/num_batches_tracked;
    the batch variance fed in is var_b·n/(n − 1). Training needs n > 1.
    """

    def __init__(self, scenario: Scenario, name: str = "torch_reference") -> None:
        super().__init__(name, scenario)
        self.track = scenario["torch_track_running_stats"]
        if not self.track:
            self.running_mean = self.running_var = None
        self.tracked = 0

    def port(self, state: State) -> None:
        """What load_state_dict keeps: weight and bias if affine, the running statistics
        if tracked, each rounded to the module's dtype."""
        dtype = self.s["dtype"]
        if self.s["torch_affine"]:
            self.gamma, self.beta = _stored(state["weight"], dtype), _stored(state["bias"], dtype)
        if self.track:
            self.running_mean = _stored(state["running_mean"], dtype)
            self.running_var = _stored(state["running_var"], dtype)

    def step(self, k: int, batch: np.ndarray) -> None:
        s, n = self.s, self.s.values_per_channel
        if k == s["steps"]:
            self.trained_state = self.state()
        x = batch.astype(np.float64)
        training = k < s["steps"] or s["torch_mode"] == "train"
        if training or not self.track:
            if n == 1:
                raise ValueError("Expected more than 1 value per channel when training")
            mean, var = _moments(x)
            self.output, self.gain = _normalize(x, mean, var, s["torch_eps"], self.gamma, self.beta)
            if training and self.track:
                self.tracked += 1
                m = 1.0 / self.tracked if s["torch_momentum"] is None else s["torch_momentum"]
                self.running_mean = _stored(
                    (1 - m) * self.running_mean + m * mean.ravel(), s["dtype"]
                )
                self.running_var = _stored(
                    (1 - m) * self.running_var + m * var.ravel() * n / (n - 1), s["dtype"]
                )
        else:
            self._normalize_with_running(x, s["torch_eps"])
        self._record(k)


class KerasRules(ReferenceSession):
    """Keras 3's rules: biased variance into the moving variance.

    moving ← momentum·moving + (1 − momentum)·batch; a training pass happens
    only with training=True on a trainable layer, else the moving statistics
    normalize. One value per channel is allowed (var_b = 0, output β). A
    ported state replaces the training steps.
    """

    prefix = "keras"

    def __init__(
        self, scenario: Scenario, name: str | None = None, fast_variance: bool = False
    ) -> None:
        super().__init__(name or f"{self.prefix}_reference", scenario)
        self.fast_variance = fast_variance
        self.unbiased, self.eps, self.error = self.rules(scenario)
        self.ported = self.prefix == "keras" and scenario["keras_init"] != "fresh"

    def rules(self, scenario: Scenario) -> tuple[bool, float, str | None]:
        """(unbiased variance fed in?, epsilon, error) for this scenario."""
        return False, scenario[f"{self.prefix}_eps"], None

    def variable_dtype(self, scenario: Scenario) -> str:
        """Keras 3 keeps the moving statistics in the layer's dtype."""
        return scenario["dtype"]

    def port(self, state: State) -> None:
        """The state as Keras's four variables keep it, rounded to their dtype."""
        s, p, stored = self.s, self.prefix, self.variable_dtype(self.s)
        if s[f"{p}_scale"]:
            self.gamma = _stored(state["weight"], stored)
        if s[f"{p}_center"]:
            self.beta = _stored(state["bias"], stored)
        self.running_mean = _stored(state["running_mean"], stored)
        self.running_var = _stored(state["running_var"], stored)

    def step(self, k: int, batch: np.ndarray) -> None:
        s, p, n = self.s, self.prefix, self.s.values_per_channel
        if self.error:
            raise ValueError(self.error)
        if self.ported and k < s["steps"]:
            return
        x = batch.astype(np.float64)
        training = k < s["steps"] or s[f"{p}_training"] == "true"
        if training and s[f"{p}_trainable"]:
            momentum, stored = s[f"{p}_momentum"], self.variable_dtype(s)
            mean, var = self._normalize_with_batch(k, x, self.eps)
            fed = var.ravel() * n / (n - 1) if self.unbiased and n > 1 else var.ravel()
            self.running_mean = _stored(
                momentum * self.running_mean + (1 - momentum) * mean.ravel(), stored
            )
            self.running_var = _stored(momentum * self.running_var + (1 - momentum) * fed, stored)
        else:
            self._normalize_with_running(x, self.eps)
        self._record(k)


class Keras2Rules(KerasRules):
    """Keras 2's rules: as Keras 3, but the fused path feeds the unbiased variance
    var_b·n/(n − 1) into the moving variance.

    Fused where tf_keras fuses: 4-D or 5-D input in float16, bfloat16 or float32
    (fused=auto), or where fused=true demands it (an error elsewhere). Measured
    on TensorFlow 2.21's CPU kernel: epsilon is used as given, not raised to
    1.001e-5.
    """

    prefix = "keras2"

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

    def variable_dtype(self, scenario: Scenario) -> str:
        """tf_keras raises float16 and bfloat16 layers' variables to float32."""
        return "float32" if scenario["dtype"] in ("float16", "bfloat16") else scenario["dtype"]


class FlaxRules(ReferenceSession):
    """Flax nnx's rules: biased variance, Keras's momentum convention, no default inference.

    running ← momentum·running + (1 − momentum)·batch with the biased var_b;
    training passes always normalize with the batch; the measured pass uses the
    running statistics only with use_running_average=true. Statistics are
    computed in at least float32, and the updated running statistics keep that
    dtype (a float16 layer's become float32).
    """

    def __init__(self, scenario: Scenario) -> None:
        super().__init__("flax_reference", scenario)
        self.fast_variance = scenario["flax_use_fast_variance"]

    def port(self, state: State) -> None:
        """The state as Flax's scale, bias, mean and var keep it: in the layer's dtype."""
        s, dtype = self.s, self.s["dtype"]
        if s["flax_use_scale"]:
            self.gamma = _stored(state["weight"], dtype)
        if s["flax_use_bias"]:
            self.beta = _stored(state["bias"], dtype)
        self.running_mean = _stored(state["running_mean"], dtype)
        self.running_var = _stored(state["running_var"], dtype)

    def step(self, k: int, batch: np.ndarray) -> None:
        s = self.s
        x = batch.astype(np.float64)
        if k < s["steps"] or not s["flax_use_running_average"]:
            momentum = s["flax_momentum"]
            stored = "float64" if s["dtype"] == "float64" else "float32"
            mean, var = self._normalize_with_batch(k, x, s["flax_eps"])
            self.running_mean = _stored(
                momentum * self.running_mean + (1 - momentum) * mean.ravel(), stored
            )
            self.running_var = _stored(
                momentum * self.running_var + (1 - momentum) * var.ravel(), stored
            )
        else:
            self._normalize_with_running(x, s["flax_eps"])
        self._record(k)


REFERENCES: dict[str, Callable[[Scenario], ReferenceSession]] = {
    "torch": TorchRules,
    "keras": KerasRules,
    "keras2": Keras2Rules,
    "torch_gpu": lambda scenario: TorchRules(scenario, "torch_gpu_reference"),
    "keras_jax": lambda scenario: KerasRules(scenario, "keras_jax_reference"),
    "keras_torch": lambda scenario: KerasRules(
        scenario, "keras_torch_reference", fast_variance=True
    ),
    "flax": FlaxRules,
}
"""Engine name → the reference session that follows that framework's rules."""
