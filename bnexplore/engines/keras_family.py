"""What every Keras BatchNormalization engine shares, whatever runs under it.

Keras 3 on TensorFlow, JAX or PyTorch, and Keras 2 (tf_keras), run the batch
channels-last (``axis=-1``). A training pass is ``layer(x, training=True)``; the
measured pass is ``layer(x)`` (training None) or ``layer(x, training=…)`` as the
scenario's ``<prefix>_training`` says. Imports no framework: a backend module
subclasses :class:`KerasFamilyEngine` and supplies its tensors and devices.
"""

from __future__ import annotations

import contextlib

import numpy as np

from bnexplore.engines import EngineResult, Session, State, history_of
from bnexplore.scenario import Scenario

TRAINING = {"none": None, "true": True, "false": False}
PORT_ORDER = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)
"""Keras weight ← PyTorch state, the order of ``set_weights`` without its optional gaps."""


def nhwc_shape(scenario: Scenario) -> tuple[int, ...]:
    shape = scenario.shape
    return (shape[0], *shape[2:], shape[1])


class KerasFamilyEngine:
    """A Keras BatchNormalization run for real; subclasses build the layer on a backend."""

    name: str
    label: str
    version: str
    prefix: str
    """Whose knobs it reads: keras_* for every Keras 3 backend, keras2_* for tf_keras."""
    receives_port: bool = False
    """Whether keras_init (a PyTorch state ported in) applies: every Keras 3 engine."""

    layer_class: type
    """The framework's BatchNormalization class."""

    # --- the backend's hooks ------------------------------------------------------------
    def resolve_device(self, requested: str) -> tuple[object | None, str]:
        """The device to run on (None: not there), and why."""
        raise NotImplementedError

    def describe(self, device: object) -> str:
        return str(device)

    def scope(self, device: object) -> contextlib.AbstractContextManager:
        """The context in which layers and tensors land on ``device``."""
        return contextlib.nullcontext()

    def tensor(self, array: np.ndarray):
        raise NotImplementedError

    def snapshot(self, variables: tuple) -> object:
        """The moving statistics now, kept on the device until the end (np.asarray reads it)."""
        raise NotImplementedError

    def numpy(self, tensor) -> np.ndarray:
        """A tensor as NumPy, sharing its buffer where the backend allows."""
        return np.asarray(tensor)

    def assign(self, variable, values: np.ndarray) -> None:
        """Set a layer variable to float64 values, cast to the variable's dtype."""
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    def options(self, scenario: Scenario) -> dict:
        """Constructor arguments beyond the shared ones (Keras 2: fused)."""
        return {}

    def build(self, scenario: Scenario):
        """A fresh channels-last layer in the scenario's dtype and settings."""
        p = self.prefix
        layer = self.layer_class(
            axis=-1,
            momentum=scenario[f"{p}_momentum"],
            epsilon=scenario[f"{p}_eps"],
            center=scenario[f"{p}_center"],
            scale=scenario[f"{p}_scale"],
            dtype=scenario["dtype"],
            **self.options(scenario),
        )
        layer.build(nhwc_shape(scenario))
        if not scenario[f"{p}_trainable"]:  # a fresh layer is trainable already
            layer.trainable = False
        return layer

    def detail(self, layer) -> str | None:
        return None

    def start(self, scenario: Scenario) -> Session | EngineResult:
        device, note = self.resolve_device(scenario["device"])
        if device is None:
            return EngineResult(self.name, available=False, version=self.version, reason=note)
        where = {"version": self.version, "device": self.describe(device), "device_note": note}
        with self.scope(device):
            layer = self.build(scenario)
        return KerasSession(self, where, scenario, layer, device)


class KerasSession(Session):
    """Training passes are layer(x, training=True); the measured pass as the scenario says.

    A layer that starts from a ported state (``port``) runs no training passes of
    its own: the port stands for them.
    """

    def __init__(self, engine: KerasFamilyEngine, where: dict, scenario: Scenario, layer, device):
        self.engine, self.name, self.where = engine, engine.name, where
        self.layer, self.device = layer, device
        self.steps = scenario["steps"]
        self.measured_training = TRAINING[scenario[f"{engine.prefix}_training"]]
        self.ported = engine.receives_port and scenario["keras_init"] != "fresh"
        self.steps_seen: list[int] = []
        self.recorded: list = []
        self.output = None

    def port(self, state: State) -> None:
        """Copy a PyTorch state into the layer, weight by weight (a layer without γ or β,
        scale or center off, keeps none)."""
        with self.engine.scope(self.device):
            for keras_name, torch_name in PORT_ORDER:
                variable = getattr(self.layer, keras_name, None)
                if variable is not None:
                    self.engine.assign(variable, np.asarray(state[torch_name], np.float64))

    def step(self, k: int, batch: np.ndarray) -> None:
        if self.ported and k < self.steps:
            return
        layer, engine = self.layer, self.engine
        training = True if k < self.steps else self.measured_training
        with engine.scope(self.device):
            x = engine.tensor(np.moveaxis(batch, 1, -1))
            self.output = layer(x) if training is None else layer(x, training=training)
            self.recorded.append(engine.snapshot((layer.moving_mean, layer.moving_variance)))
        self.steps_seen.append(k)

    def finish(self) -> EngineResult:
        layer, engine = self.layer, self.engine
        return EngineResult(
            self.name,
            available=True,
            detail=engine.detail(layer),
            output=np.ascontiguousarray(np.moveaxis(engine.numpy(self.output), -1, 1)),
            running_mean=np.array(engine.numpy(layer.moving_mean)),
            running_var=np.array(engine.numpy(layer.moving_variance)),
            history=history_of(
                self.steps_seen,
                [engine.numpy(r)[0] for r in self.recorded],
                [engine.numpy(r)[1] for r in self.recorded],
            ),
            **self.where,
        )

    def failed(self, exc: Exception) -> EngineResult:
        result = super().failed(exc)
        detail = self.engine.detail(self.layer) if self.layer.built else None
        return EngineResult(**{**result.__dict__, "detail": detail})
