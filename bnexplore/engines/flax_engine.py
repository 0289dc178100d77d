"""Flax engine: ``flax.nnx.BatchNorm`` on JAX, run for real (channels-last, ``axis=-1``).

Flax is a fourth convention. A fresh layer has ``use_running_average=False``:
it normalizes with the batch, like a new PyTorch module. Its momentum is
Keras's (0.99 keeps 99 % of the old value), its epsilon PyTorch's (1e-5)::

    y = (x − mean_b) / √(var_b + epsilon) · scale + bias
    mean ← momentum·mean + (1 − momentum)·mean_b
    var  ← momentum·var  + (1 − momentum)·var_b        (biased)

With ``use_fast_variance`` (the default) var_b is E[x²] − E[x]², clipped at 0,
in at least float32: it cancels when |mean| ≫ std. The layer is built with
``dtype`` and ``param_dtype`` both the scenario's dtype; statistics are
computed in at least float32 and the updated running statistics keep that
promoted dtype (a half-precision layer's statistics become float32 after its
first training pass). Training passes use the batch statistics; the measured
pass follows ``flax_use_running_average``.

With loss=mse each training pass takes L = mean((y − T)²), its gradients w.r.t. the
layer's Params by ``nnx.value_and_grad`` (the batch statistics update as in a plain
call) and one optax step through ``nnx.Optimizer``; the measured pass computes L and
the gradients w.r.t. x, scale and bias, and takes no step. optax's conventions are
PyTorch's (see bnexplore.scenario.params.TORCH_CONVENTION); it has no default learning rate.
"""

from __future__ import annotations

import os

os.environ["JAX_ENABLE_X64"] = "1"  # float64 scenarios are float64 here too

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bnexplore.engines import EngineResult, Session, State, history_of, parameter_history_of
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import ADAM_BETAS, resolved

NAMES = (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))
"""Flax variable ← PyTorch state name."""


def resolve_device(requested: str) -> tuple[jax.Device | None, str]:
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if requested == "cpu":
        return jax.devices("cpu")[0], "device=cpu asked for"
    if requested == "cuda":
        if not gpus:
            return None, "device=cuda, but JAX sees no GPU"
        return gpus[0], "device=cuda asked for"
    if gpus:
        return gpus[0], "auto: JAX sees a GPU"
    return jax.devices("cpu")[0], "auto: JAX sees no GPU, ran on CPU"


def build_optimizer(scenario: Scenario) -> optax.GradientTransformation:
    """optax's sgd, adam or adamw; weight decay for sgd and adam added to the gradient
    (add_decayed_weights), as PyTorch does; every knob resolved (optax has no defaults)."""
    kind = scenario["flax_optimizer"]
    lr, decay = resolved(scenario, "flax", "lr"), resolved(scenario, "flax", "weight_decay")
    eps = resolved(scenario, "flax", "adam_eps")
    b1, b2 = ADAM_BETAS
    if kind == "adamw":
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=decay)
    if kind == "adam":
        core = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    else:
        core = optax.sgd(lr, momentum=scenario["flax_opt_momentum"] or None)
    return optax.chain(optax.add_decayed_weights(decay), core) if decay else core


class FlaxEngine:
    name = "flax"
    label = "Flax"
    version = f"flax {flax.__version__} (JAX {jax.__version__})"

    def build(self, scenario: Scenario) -> nnx.BatchNorm:
        dtype = jnp.dtype(scenario["dtype"])
        return nnx.BatchNorm(
            scenario.channels,
            use_running_average=scenario["flax_use_running_average"],
            axis=-1,
            momentum=scenario["flax_momentum"],
            epsilon=scenario["flax_eps"],
            dtype=dtype,
            param_dtype=dtype,
            use_bias=scenario["flax_use_bias"],
            use_scale=scenario["flax_use_scale"],
            use_fast_variance=scenario["flax_use_fast_variance"],
            rngs=nnx.Rngs(0),
        )

    def start(self, scenario: Scenario) -> Session | EngineResult:
        device, note = resolve_device(scenario["device"])
        if device is None:
            return EngineResult(self.name, available=False, version=self.version, reason=note)
        where = {"version": self.version, "device": device.platform, "device_note": note}
        with jax.default_device(device):
            layer = self.build(scenario)
        return FlaxSession(self.name, where, scenario, layer, device)


class FlaxSession(Session):
    def __init__(self, name: str, where: dict, scenario: Scenario, layer, device) -> None:
        self.name, self.where, self.layer, self.device = name, where, layer, device
        self.steps = scenario["steps"]
        self.measured_running = scenario["flax_use_running_average"]
        self.recorded: list = []
        self.output = None
        self.optimizer = None
        if scenario["loss"] != "none":
            self.optimizer = nnx.Optimizer(layer, build_optimizer(scenario), wrt=nnx.Param)
        self.parameters_seen: list = []
        self.gamma = self.beta = None
        self.loss = self.grad_x = self.grad_gamma = self.grad_beta = None

    def _parameters(self) -> tuple:
        return tuple(
            None if v is None else np.array(v[...], copy=True)
            for v in (self.layer.scale, self.layer.bias)
        )

    def port(self, state: State) -> None:
        """Start from a PyTorch-named state: scale, bias, mean, var."""
        for flax_name, torch_name in NAMES:
            variable = getattr(self.layer, flax_name, None)
            if variable is not None:
                variable[...] = jnp.asarray(state[torch_name], dtype=variable[...].dtype)

    def state(self) -> State:
        layer, channels = self.layer, self.layer.num_features
        fills = {"weight": 1.0, "bias": 0.0}
        out = {}
        for flax_name, torch_name in NAMES:
            variable = getattr(layer, flax_name, None)
            out[torch_name] = (
                np.full(channels, fills[torch_name])
                if variable is None
                else np.asarray(variable[...], dtype=np.float64)
            )
        return out

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        layer = self.layer
        if k == self.steps:
            self.gamma, self.beta = self._parameters()
        running = False if k < self.steps else self.measured_running
        with jax.default_device(self.device):
            x = jnp.asarray(np.moveaxis(batch, 1, -1))
            if target is None:
                self.output = layer(x, use_running_average=running)
            else:
                self._step_with_loss(k, x, jnp.asarray(np.moveaxis(target, 1, -1)), running)
                self.parameters_seen.append(self._parameters())
            self.recorded.append(jnp.stack([layer.mean[...], layer.var[...]]))

    def _step_with_loss(self, k: int, x, target, running: bool) -> None:
        def loss_of(model, x):
            y = model(x, use_running_average=running)
            return jnp.mean(jnp.square(y - target)), y

        (loss, y), (grads, grad_x) = nnx.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
            self.layer, x
        )
        self.output = y
        if k < self.steps:
            self.optimizer.update(self.layer, grads)
            return
        self.loss = float(np.asarray(loss, dtype=np.float64))
        self.grad_x = np.ascontiguousarray(np.moveaxis(np.asarray(grad_x), -1, 1))
        by_name = dict(grads.items())
        self.grad_gamma, self.grad_beta = (
            None if name not in by_name else np.array(by_name[name][...], copy=True)
            for name in ("scale", "bias")
        )

    def finish(self) -> EngineResult:
        layer = self.layer
        records = [np.asarray(r) for r in self.recorded]
        return EngineResult(
            self.name,
            available=True,
            detail="fast variance E[x²] − E[x]²"
            if layer.use_fast_variance
            else "two-pass variance",
            output=np.ascontiguousarray(np.moveaxis(np.asarray(self.output), -1, 1)),
            running_mean=np.array(layer.mean[...]),
            running_var=np.array(layer.var[...]),
            history=history_of(
                list(range(len(records))), [r[0] for r in records], [r[1] for r in records]
            ),
            **self.training_fields(),
            parameter_history=parameter_history_of(
                list(range(len(self.parameters_seen))),
                [g for g, _ in self.parameters_seen],
                [b for _, b in self.parameters_seen],
            ),
            **self.where,
        )
