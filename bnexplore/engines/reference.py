"""The reference engine: each framework's semantics from the formulas, in float64.

An oracle, not a replacement: it reads the very batches the frameworks saw
(cast to the scenario's dtype, then widened to float64) and applies the
documented rules, so a gap between a framework and its reference is the
framework's own arithmetic, and a gap between references is semantics.

Notation: statistics per channel (axis 1) over the n values of every other
axis; mean_b and var_b are the batch mean and the biased batch variance.

With loss=mse each pass also has L = mean((y − T)²) over its N elements, dy = 2(y − T)/N,
x̂ = (x − mean)/√(var + eps), and (sums per channel)::

    dL/dγ = Σ dy·x̂        dL/dβ = Σ dy
    batch statistics:   dL/dx = γ/√(var_b + eps) · (dy − Σdy/n − x̂·Σ(dy·x̂)/n)
    running statistics: dL/dx = γ/√(running_var + eps) · dy

With batch statistics Σx̂ = 0 and Σx̂² = n·var_b/(var_b + eps) exactly, so the sums are
taken from those identities: an exact zero (β's gradient with a zero target) stays 0.
Each training pass then moves γ/β by the framework's optimizer, in its own convention
(:class:`ReferenceOptimizer`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnexplore.engines import EngineResult, Session, State, history_of, parameter_history_of
from bnexplore.scenario.batches import numpy_dtype
from bnexplore.scenario.conventions import FUSED_DTYPES, onnx_training_node
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import ADAM_BETAS, resolved

VERSION = f"NumPy {np.__version__} float64"


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


PARAMETERS = ("gamma", "beta")


def mse_gradients(x, y, target, mean, var, eps, gamma, beta, batch: bool) -> dict:
    """L, dL/dx, dL/dγ, dL/dβ of L = mean((y − T)²) through y = x̂·γ + β (module docstring).

    ``mean``/``var`` are what normalized (shaped to broadcast); ``batch``: they are the
    batch's own, so the gradient also flows through them.
    """
    ndim, n_all = x.ndim, y.size
    axes = tuple(i for i in range(ndim) if i != 1)
    n = n_all // y.shape[1]
    with np.errstate(all="ignore"):
        inv_std = 1.0 / np.sqrt(var + eps)
        x_hat = (x - mean) * inv_std
        residual = y - target
        loss = float(np.mean(np.square(residual)))
        dy = residual * (2.0 / n_all)
        g = _per_channel(gamma, ndim)
        if batch:
            target_sum = target.sum(axis=axes)
            target_x_hat = (target * x_hat).sum(axis=axes)
            grad_beta = (2.0 / n_all) * (n * beta - target_sum)
            spread = (var / (var + eps)).reshape(-1)
            grad_gamma = (2.0 / n_all) * (gamma * n * spread - target_x_hat)
            grad_x = (
                g
                * inv_std
                * (
                    dy
                    - _per_channel(grad_beta, ndim) / n
                    - x_hat * _per_channel(grad_gamma, ndim) / n
                )
            )
        else:
            grad_beta = dy.sum(axis=axes)
            grad_gamma = (dy * x_hat).sum(axis=axes)
            grad_x = g * inv_std * dy
    return {"loss": loss, "x": grad_x, "gamma": grad_gamma, "beta": grad_beta}


def _float32(x: float) -> float:
    return float(np.float32(x))


def adam_step_bound(t: int) -> float:
    """The most |m̂_t|/√v̂_t can be, whatever the gradients (Cauchy–Schwarz over the
    moving averages' weights): ≈ 1 for the first steps. Adam's step is at most lr times it."""
    b1, b2 = ADAM_BETAS
    i = np.arange(1, t + 1)
    a = (1 - b1) * b1 ** (t - i) / (1 - b1**t)
    b = (1 - b2) * b2 ** (t - i) / (1 - b2**t)
    return float(np.sqrt(np.sum(a * a / b)))


class ReferenceOptimizer:
    """One optimizer in one framework's convention, in float64.

    PyTorch: SGD/Adam add weight decay to the gradient (g + wd·p); AdamW decays the weight
    (p ← p·(1 − lr·wd)); SGD momentum buf ← μ·buf + g (buf = g at the first step),
    p −= lr·buf; Adam p −= lr/(1−β₁ᵗ)·m/(√v/√(1−β₂ᵗ) + ε).
    Keras (3 and 2): every optimizer decays the weight first, p ← p − p·wd·lr; SGD momentum
    m ← μ·m − lr·g, p += m; Adam p −= lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε).

    Keras casts lr (a float32 variable), wd, μ and the bases of β₁ᵗ, β₂ᵗ to the variable's
    dtype from float32 (``ops.cast`` of a Python float makes a float32 tensor first), while
    (1 − β₁), (1 − β₂) and ε stay Python doubles. Measured: on float64 layers that puts
    Adam's step 6.6e-6 (relative) from the all-float64 formula, the float32 rounding of β₂
    in 1 − β₂ᵗ; this reference follows Keras, and then agrees to float64 rounding.
    """

    def __init__(self, convention: str, scenario: Scenario, prefix: str) -> None:
        self.convention = convention
        self.kind = scenario[f"{prefix}_optimizer"]
        self.lr = resolved(scenario, prefix, "lr")
        self.weight_decay = resolved(scenario, prefix, "weight_decay")
        self.eps = resolved(scenario, prefix, "adam_eps")
        self.momentum = scenario[f"{prefix}_opt_momentum"]
        self.beta_bases = ADAM_BETAS
        if convention == "keras":
            self.lr, self.weight_decay, self.momentum = (
                _float32(self.lr),
                _float32(self.weight_decay),
                _float32(self.momentum),
            )
            self.beta_bases = (_float32(ADAM_BETAS[0]), _float32(ADAM_BETAS[1]))
        self.slots: dict[str, dict] = {}

    @property
    def adaptive(self) -> bool:
        return self.kind != "sgd"

    def step(self, name: str, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        slot = self.slots.setdefault(name, {"t": 0, "m": np.zeros_like(p), "v": np.zeros_like(p)})
        slot["t"] += 1
        t, lr, wd = slot["t"], self.lr, self.weight_decay
        b1, b2 = ADAM_BETAS
        if self.convention == "torch":
            if self.kind == "adamw":
                p = p * (1 - lr * wd)
            elif wd:
                g = g + wd * p
            if self.kind == "sgd":
                if self.momentum:
                    slot["m"] = g if t == 1 else self.momentum * slot["m"] + g
                    g = slot["m"]
                return p - lr * g
            slot["m"] = b1 * slot["m"] + (1 - b1) * g
            slot["v"] = b2 * slot["v"] + (1 - b2) * g * g
            denom = np.sqrt(slot["v"]) / np.sqrt(1 - b2**t) + self.eps
            return p - lr / (1 - b1**t) * slot["m"] / denom
        if wd:
            p = p - p * wd * lr
        if self.kind == "sgd":
            if self.momentum:
                slot["m"] = self.momentum * slot["m"] - lr * g
                return p + slot["m"]
            return p - lr * g
        slot["m"] = slot["m"] + (g - slot["m"]) * (1 - b1)
        slot["v"] = slot["v"] + (g * g - slot["v"]) * (1 - b2)
        base1, base2 = self.beta_bases
        alpha = lr * np.sqrt(1 - base2**t) / (1 - base1**t)
        return p - alpha * slot["m"] / (np.sqrt(slot["v"]) + self.eps)

    def noise_bound(self, name: str) -> float:
        """How far one step on a zero gradient can move a parameter on rounding noise."""
        return self.lr * adam_step_bound(self.slots[name]["t"]) if self.adaptive else 0.0


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
        self.has = {"gamma": True, "beta": True}
        """The layer has this parameter (PyTorch affine, Keras scale/center)."""
        self.trains = {"gamma": True, "beta": True}
        """The framework computes its gradient and updates it."""
        self.optimizer: ReferenceOptimizer | None = None
        self.parameter_dtype = scenario["dtype"]
        self.trained_parameters: dict[str, np.ndarray | None] = {}
        self.parameters_seen: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.unpredictable: dict[str, float] = {}
        self.loss = None
        self.grads: dict[str, np.ndarray | None] = {}

    def _normalize_with_batch(
        self, k: int, x: np.ndarray, target: np.ndarray | None, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pass with the exact batch moments (returned, see _forward); with a
        fast-variance kernel, also what that kernel's error does.

        A variance off by at most δ scales y − β by √(v + eps)/√(v̂ + eps) with
        v̂ ∈ [max(v − δ, 0), v + δ]: by at most 1 + r, r = √((v + eps)/(max(v − δ, 0) + eps))
        − 1. Kept per channel: "output", r·max|y − β| for the measured pass; "running",
        the largest δ fed in (the running variance takes (1 − momentum)·δ per pass, at
        most δ in all).
        """
        mean, var = _moments(x)
        self._forward(k, x, target, mean, var, eps, batch=True)
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

    def _snapshot(self) -> None:
        """γ and β after the training steps, as the layer has them."""
        self.trained_parameters = {
            name: getattr(self, name).copy() if self.has[name] else None for name in PARAMETERS
        }

    def _forward(self, k: int, x, target, mean, var, eps: float, batch: bool) -> None:
        """y with these statistics; with a target, L and its gradients, and on a training
        pass one optimizer step on what the framework trains."""
        self.output, self.gain = _normalize(x, mean, var, eps, self.gamma, self.beta)
        if target is None:
            return
        grads = mse_gradients(
            x, self.output, target.astype(np.float64), mean, var, eps, self.gamma, self.beta, batch
        )
        if k == self.s["steps"]:
            self.loss = grads["loss"]
            self.grads = {
                "x": grads["x"],
                **{name: grads[name] if self.trains[name] else None for name in PARAMETERS},
            }
        elif self.optimizer is not None:
            for name in PARAMETERS:
                if self.trains[name]:
                    self._update(name, grads[name])
        self.parameters_seen.append((k, self.gamma, self.beta))

    def _update(self, name: str, grad: np.ndarray) -> None:
        """One optimizer step on a parameter, stored in the layer's dtype.

        Adam-like on an exact zero gradient: the framework steps on its rounding noise,
        which no formula predicts; from then on the bound on that is accumulated."""
        optimizer = self.optimizer
        with np.errstate(all="ignore"):  # ε = 0 on a zero gradient is 0/0: a result to show
            moved = optimizer.step(name, getattr(self, name), grad)
        setattr(self, name, _stored(moved, self.parameter_dtype))
        if optimizer.adaptive and (name in self.unpredictable or np.any(grad == 0)):
            self.unpredictable[name] = self.unpredictable.get(name, 0.0) + optimizer.noise_bound(
                name
            )

    def state(self) -> State | None:
        if self.running_mean is None:
            return None
        return {
            "weight": self.gamma,
            "bias": self.beta,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
        }

    def _forward_with_running(self, k: int, x: np.ndarray, target, eps: float) -> None:
        ndim = x.ndim
        mean = _per_channel(self.running_mean, ndim)
        var = _per_channel(self.running_var, ndim)
        self._forward(k, x, target, mean, var, eps, batch=False)

    def finish(self) -> EngineResult:
        seen = self.parameters_seen
        parameters = self.trained_parameters or {
            name: getattr(self, name) if self.has[name] else None for name in PARAMETERS
        }
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
            gamma=parameters["gamma"],
            beta=parameters["beta"],
            loss=self.loss,
            grad_x=self.grads.get("x"),
            grad_gamma=self.grads.get("gamma"),
            grad_beta=self.grads.get("beta"),
            parameter_history=parameter_history_of(
                [k for k, _, _ in seen],
                [g if self.has["gamma"] else None for _, g, _ in seen],
                [b if self.has["beta"] else None for _, _, b in seen],
            ),
            unpredictable=dict(self.unpredictable) or None,
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
        affine = scenario["torch_affine"]
        self.has = {"gamma": affine, "beta": affine}
        trains = affine and scenario["torch_requires_grad"]
        self.trains = {"gamma": trains, "beta": trains}
        if trains and scenario["loss"] != "none":
            self.optimizer = ReferenceOptimizer("torch", scenario, "torch")

    def port(self, state: State) -> None:
        """What load_state_dict keeps: weight and bias if affine, the running statistics
        if tracked, each rounded to the module's dtype."""
        dtype = self.s["dtype"]
        if self.s["torch_affine"]:
            self.gamma, self.beta = _stored(state["weight"], dtype), _stored(state["bias"], dtype)
        if self.track:
            self.running_mean = _stored(state["running_mean"], dtype)
            self.running_var = _stored(state["running_var"], dtype)

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        s, n = self.s, self.s.values_per_channel
        if k == s["steps"]:
            self.trained_state = self.state()
            self._snapshot()
        x = batch.astype(np.float64)
        training = k < s["steps"] or s["torch_mode"] == "train"
        if training or not self.track:
            if n == 1:
                raise ValueError("Expected more than 1 value per channel when training")
            mean, var = _moments(x)
            self._forward(k, x, target, mean, var, s["torch_eps"], batch=True)
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
            self._forward_with_running(k, x, target, s["torch_eps"])
        self._record(k)


class OnnxRules(TorchRules):
    """ONNX's rules for the PyTorch module as torch.onnx.export emits it: PyTorch's rules for
    the training passes (they run in PyTorch), then the measured pass as the ONNX node does.

    An inference node (the dynamo exporter, or eval mode): y = (x − running_mean) /
    √(running_var + ε)·γ + β. A training node (torchscript exporter, train mode): the batch
    statistics normalize, and running ← μ·running + (1 − μ)·batch with ONNX's momentum
    μ = 1 − PyTorch's (0 for momentum=None, as the exporter writes it) and the population
    (biased) batch variance. Without running statistics both exporters compute the batch's
    and normalize with them. ε and μ are the node's float32 attributes.
    """

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario, "onnx_reference")

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        s = self.s
        if k < s["steps"]:
            super().step(k, batch, target)
            return
        if s["dtype"] not in ("float32", "float64"):
            raise ValueError(
                f"ONNX Runtime's CPU BatchNormalization takes float32 and float64 only, "
                f"not {s['dtype']}"
            )
        self.trained_state = self.state()
        self._snapshot()
        x = batch.astype(np.float64)
        eps = _float32(s["torch_eps"])
        if not self.track:
            mean, var = _moments(x)
            self._forward(k, x, target, mean, var, eps, batch=True)
        elif onnx_training_node(s, "onnx"):
            mean, var = _moments(x)
            self._forward(k, x, target, mean, var, eps, batch=True)
            m = s["torch_momentum"]
            momentum = 0.0 if m is None else _float32(1.0 - m)
            self.running_mean = _stored(
                momentum * self.running_mean + (1 - momentum) * mean.ravel(), s["dtype"]
            )
            self.running_var = _stored(
                momentum * self.running_var + (1 - momentum) * var.ravel(), s["dtype"]
            )
        else:
            self._forward_with_running(k, x, target, eps)
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
        p = self.prefix
        self.has = {"gamma": scenario[f"{p}_scale"], "beta": scenario[f"{p}_center"]}
        self.trains = {name: has and scenario[f"{p}_trainable"] for name, has in self.has.items()}
        self.parameter_dtype = self.variable_dtype(scenario)
        if any(self.trains.values()) and scenario["loss"] != "none":
            self.optimizer = ReferenceOptimizer("keras", scenario, p)

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

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        s, p, n = self.s, self.prefix, self.s.values_per_channel
        if self.error:
            raise ValueError(self.error)
        if k == s["steps"]:
            self._snapshot()
        if self.ported and k < s["steps"]:
            return
        x = batch.astype(np.float64)
        training = k < s["steps"] or s[f"{p}_training"] == "true"
        if training and s[f"{p}_trainable"]:
            momentum, stored = s[f"{p}_momentum"], self.variable_dtype(s)
            mean, var = self._normalize_with_batch(k, x, target, self.eps)
            fed = var.ravel() * n / (n - 1) if self.unbiased and n > 1 else var.ravel()
            self.running_mean = _stored(
                momentum * self.running_mean + (1 - momentum) * mean.ravel(), stored
            )
            self.running_var = _stored(momentum * self.running_var + (1 - momentum) * fed, stored)
        else:
            self._forward_with_running(k, x, target, self.eps)
        self._record(k)


class LiteRTRules(KerasRules):
    """LiteRT's rules for the Keras 3 layer as the converter folds it: Keras 3's rules for the
    training passes (they run in Keras), then the measured pass as a multiply and an add.

    The converter constant-folds tf.nn.batch_normalization in float32: scale =
    rsqrt(moving_variance + ε)·γ, offset = β − moving_mean·scale, each op rounded to float32;
    with litert_quantize=float16 both constants are then rounded to float16. y = x·scale +
    offset. float32 inference only: a training measured pass or another dtype is an error.
    """

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario, "litert_reference")

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) as the converter computes and stores them, widened to float64."""
        s, f32 = self.s, np.float32
        with np.errstate(all="ignore"):
            inv = (f32(1) / np.sqrt(self.running_var.astype(f32) + f32(s["keras_eps"]))).astype(f32)
            scale = inv * self.gamma.astype(f32) if self.has["gamma"] else inv
            offset = -self.running_mean.astype(f32) * scale
            if self.has["beta"]:
                offset = self.beta.astype(f32) - self.running_mean.astype(f32) * scale
        if s["litert_quantize"] == "float16":
            scale, offset = scale.astype(np.float16), offset.astype(np.float16)
        return scale.astype(np.float64), offset.astype(np.float64)

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        s = self.s
        if k < s["steps"]:
            super().step(k, batch, target)
            return
        if s["dtype"] != "float32":
            raise ValueError(f"LiteRT runs inference only, in float32: not {s['dtype']}")
        if s["keras_training"] == "true" and s["keras_trainable"]:
            raise ValueError("LiteRT runs inference only: keras_training=true")
        self._snapshot()
        x = batch.astype(np.float64)
        scale, offset = self.folded()
        target_wide = None if target is None else target.astype(np.float64)
        # L and the gradients: the inference rule (Keras's), then y is the folded multiply-add
        self._forward_with_running(k, x, target, self.eps)
        with np.errstate(all="ignore"):
            self.output = x * _per_channel(scale, x.ndim) + _per_channel(offset, x.ndim)
        if target_wide is not None:
            self.loss = float(np.mean(np.square(self.output - target_wide)))
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
    dtype (a float16 layer's become float32) — except under a training step (loss=mse),
    where they stay float32 even in a float64 layer.
    """

    def __init__(self, scenario: Scenario) -> None:
        super().__init__("flax_reference", scenario)
        self.fast_variance = scenario["flax_use_fast_variance"]
        self.has = {"gamma": scenario["flax_use_scale"], "beta": scenario["flax_use_bias"]}
        self.trains = dict(self.has)  # Flax has no frozen flag: what the layer has, trains
        if any(self.trains.values()) and scenario["loss"] != "none":
            self.optimizer = ReferenceOptimizer("torch", scenario, "flax")  # optax's = torch's

    def port(self, state: State) -> None:
        """The state as Flax's scale, bias, mean and var keep it: in the layer's dtype."""
        s, dtype = self.s, self.s["dtype"]
        if s["flax_use_scale"]:
            self.gamma = _stored(state["weight"], dtype)
        if s["flax_use_bias"]:
            self.beta = _stored(state["bias"], dtype)
        self.running_mean = _stored(state["running_mean"], dtype)
        self.running_var = _stored(state["running_var"], dtype)

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        s = self.s
        if k == s["steps"]:
            self._snapshot()
        x = batch.astype(np.float64)
        if k < s["steps"] or not s["flax_use_running_average"]:
            momentum = s["flax_momentum"]
            # BatchStat variables start as float32; a plain call replaces them with its
            # (promoted) result, but under nnx.value_and_grad (loss=mse) they are written
            # into in place and stay float32 (measured: a float64 layer's too)
            wide = s["dtype"] == "float64" and target is None and s["loss"] == "none"
            stored = "float64" if wide else "float32"
            mean, var = self._normalize_with_batch(k, x, target, s["flax_eps"])
            self.running_mean = _stored(
                momentum * self.running_mean + (1 - momentum) * mean.ravel(), stored
            )
            self.running_var = _stored(
                momentum * self.running_var + (1 - momentum) * var.ravel(), stored
            )
        else:
            self._forward_with_running(k, x, target, s["flax_eps"])
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
    "onnx": OnnxRules,
    "litert": LiteRTRules,
}
"""Engine name → the reference session that follows that framework's rules."""
