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

from bnexplore.batches import batches
from bnexplore.engines import EngineResult, Progress, State
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

    def build(self, scenario: Scenario):
        raise NotImplementedError

    def detail(self, layer) -> str | None:
        return None

    def run(
        self,
        scenario: Scenario,
        progress: Progress | None = None,
        initial_state: State | None = None,
    ) -> EngineResult:
        device, note = resolve_device(scenario["device"])
        if device is None:
            return EngineResult(self.name, available=False, version=self.version, reason=note)
        where = {
            "version": self.version,
            "device": "cpu" if device == "/CPU:0" else "gpu:0",
            "device_note": note,
        }
        steps = scenario["steps"]
        measured_training = TRAINING[scenario[f"{self.prefix}_training"]]
        layer = None
        try:
            with tf.device(device):
                layer = self.build(scenario)
                if initial_state is not None:
                    port(layer, initial_state)
                for k, batch in enumerate(batches(scenario)):
                    if initial_state is not None and k < steps:
                        continue  # the ported state stands for the training steps
                    x = tf.convert_to_tensor(np.moveaxis(batch, 1, -1))
                    training = True if k < steps else measured_training
                    output = layer(x) if training is None else layer(x, training=training)
                    if progress:
                        progress(k + 1, steps + 1)
        except (ValueError, tf.errors.OpError) as exc:
            detail = self.detail(layer) if layer is not None and layer.built else None
            return EngineResult(self.name, available=True, error=str(exc), detail=detail, **where)
        return EngineResult(
            self.name,
            available=True,
            detail=self.detail(layer),
            output=np.moveaxis(output.numpy(), -1, 1),
            running_mean=layer.moving_mean.numpy().copy(),
            running_var=layer.moving_variance.numpy().copy(),
            **where,
        )


def port(layer, state: State) -> None:
    """Copy a PyTorch state into a built Keras layer, weight by weight."""
    for keras_name, torch_name in PORT_ORDER:
        variable = getattr(layer, keras_name, None)
        if variable is not None:
            variable.assign(state[torch_name].astype(variable.dtype))
