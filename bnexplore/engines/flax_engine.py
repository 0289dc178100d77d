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
"""

from __future__ import annotations

import os

os.environ["JAX_ENABLE_X64"] = "1"  # float64 scenarios are float64 here too

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bnexplore.engines import EngineResult, Session, State, history_of
from bnexplore.scenario import Scenario

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

    def step(self, k: int, batch: np.ndarray) -> None:
        layer = self.layer
        running = False if k < self.steps else self.measured_running
        with jax.default_device(self.device):
            x = jnp.asarray(np.moveaxis(batch, 1, -1))
            self.output = layer(x, use_running_average=running)
            self.recorded.append(jnp.stack([layer.mean[...], layer.var[...]]))

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
            **self.where,
        )
