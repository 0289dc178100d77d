"""Keras 3 engine: ``keras.layers.BatchNormalization`` on TensorFlow, run for real.

The batch is moved to channels-last (``axis=-1``). Training pass
(``training=True`` on a trainable layer)::

    y = (x − mean_b) / √(var_b + epsilon) · gamma + beta
    moving_mean     ← momentum·moving_mean     + (1 − momentum)·mean_b
    moving_variance ← momentum·moving_variance + (1 − momentum)·var_b   (biased)

Otherwise (a direct call ``layer(x)``, ``training=False``, or
``trainable=False`` whatever ``training`` says) the moving statistics
normalize and nothing is updated.
"""

from __future__ import annotations

import os
import sys

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from bnexplore.batches import batches
from bnexplore.engines import EngineResult, Progress
from bnexplore.scenario import Scenario

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"Keras runs on {keras.backend.backend()!r} in this process "
        "(KERAS_BACKEND); this engine needs TensorFlow"
    )

_TRAINING = {"none": None, "true": True, "false": False}


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


class KerasEngine:
    name = "keras"
    label = "Keras 3"
    version = f"keras {keras.__version__} (TensorFlow {tf.__version__})"

    def build(self, scenario: Scenario) -> keras.layers.BatchNormalization:
        """A fresh channels-last layer in the scenario's dtype and settings."""
        layer = keras.layers.BatchNormalization(
            axis=-1,
            momentum=scenario["keras_momentum"],
            epsilon=scenario["keras_eps"],
            center=scenario["keras_center"],
            scale=scenario["keras_scale"],
            dtype=scenario["dtype"],
        )
        shape = scenario.shape
        layer.build((shape[0], *shape[2:], shape[1]))
        layer.trainable = scenario["keras_trainable"]
        return layer

    def run(self, scenario: Scenario, progress: Progress | None = None) -> EngineResult:
        device, note = resolve_device(scenario["device"])
        if device is None:
            return EngineResult(self.name, available=False, version=self.version, reason=note)
        where = {
            "version": self.version,
            "device": "cpu" if device == "/CPU:0" else "gpu:0",
            "device_note": note,
        }
        steps = scenario["steps"]
        measured_training = _TRAINING[scenario["keras_training"]]
        try:
            with tf.device(device):
                layer = self.build(scenario)
                for k, batch in enumerate(batches(scenario)):
                    x = tf.convert_to_tensor(np.moveaxis(batch, 1, -1))
                    training = True if k < steps else measured_training
                    output = layer(x) if training is None else layer(x, training=training)
                    if progress:
                        progress(k + 1, steps + 1)
        except (ValueError, tf.errors.OpError) as exc:
            return EngineResult(self.name, available=True, error=str(exc), **where)
        return EngineResult(
            self.name,
            available=True,
            output=np.moveaxis(output.numpy(), -1, 1),
            running_mean=layer.moving_mean.numpy().copy(),
            running_var=layer.moving_variance.numpy().copy(),
            **where,
        )
