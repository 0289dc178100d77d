"""What the Keras 3 and Keras 2 engines share: TensorFlow devices and the run loop.

Both run the batch channels-last (``axis=-1``). A training pass is
``layer(x, training=True)``; the measured pass is ``layer(x)`` (training None)
or ``layer(x, training=…)`` as the scenario's ``<prefix>_training`` says.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

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


def resolve_device(requested: str) -> tuple[str | None, str]:
    """The TensorFlow device to run on (None: not there), and why."""
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if requested == "cpu":
        return "/CPU:0", "device=cpu asked for"
    if requested == "cuda":
        if not has_gpu:
            return None, "device=cuda, but TensorFlow sees no GPU"
        return "/GPU:0", "device=cuda asked for"
    if has_gpu:
        return "/GPU:0", "auto: TensorFlow sees a GPU"
    return "/CPU:0", "auto: TensorFlow sees no GPU, ran on CPU"


def nhwc_shape(scenario: Scenario) -> tuple[int, ...]:
    shape = scenario.shape
    return (shape[0], *shape[2:], shape[1])


class KerasFamilyEngine:
    """A Keras BatchNormalization run for real; subclasses build the layer."""

    name: str
    label: str
    version: str
    prefix: str

    layer_class: type
    """The framework's BatchNormalization class."""

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
        layer.trainable = scenario[f"{p}_trainable"]
        return layer

    def detail(self, layer) -> str | None:
        return None

    def start(self, scenario: Scenario) -> Session | EngineResult:
        device, note = resolve_device(scenario["device"])
        if device is None:
            return EngineResult(self.name, available=False, version=self.version, reason=note)
        where = {
            "version": self.version,
            "device": "cpu" if device == "/CPU:0" else "gpu:0",
            "device_note": note,
        }
        with tf.device(device):
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
        self.ported = engine.prefix == "keras" and scenario["keras_init"] != "fresh"
        self.steps_seen: list[int] = []
        self.recorded: list = []
        self.output = None

    def port(self, state: State) -> None:
        """Copy a PyTorch state into the layer, weight by weight (a layer without γ or β,
        scale or center off, keeps none)."""
        with tf.device(self.device):
            for keras_name, torch_name in PORT_ORDER:
                variable = getattr(self.layer, keras_name, None)
                if variable is not None:
                    value = tf.constant(np.asarray(state[torch_name], np.float64))
                    variable.assign(tf.cast(value, variable.dtype))

    def step(self, k: int, batch: np.ndarray) -> None:
        if self.ported and k < self.steps:
            return
        layer = self.layer
        training = True if k < self.steps else self.measured_training
        with tf.device(self.device):
            x = tf.convert_to_tensor(np.moveaxis(batch, 1, -1))
            self.output = layer(x) if training is None else layer(x, training=training)
            moving = (layer.moving_mean, layer.moving_variance)
            self.recorded.append(tf.stack([tf.convert_to_tensor(v) for v in moving]))
        self.steps_seen.append(k)

    def finish(self) -> EngineResult:
        layer = self.layer
        return EngineResult(
            self.name,
            available=True,
            detail=self.engine.detail(layer),
            # np.asarray shares the tensor's buffer (.numpy() would copy it first)
            output=np.ascontiguousarray(np.moveaxis(np.asarray(self.output), -1, 1)),
            running_mean=layer.moving_mean.numpy().copy(),
            running_var=layer.moving_variance.numpy().copy(),
            history=history_of(
                self.steps_seen, [r[0] for r in self.recorded], [r[1] for r in self.recorded]
            ),
            **self.where,
        )

    def failed(self, exc: Exception) -> EngineResult:
        result = super().failed(exc)
        detail = self.engine.detail(self.layer) if self.layer.built else None
        return EngineResult(**{**result.__dict__, "detail": detail})
