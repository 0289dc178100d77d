"""Keras 3 engine: ``keras.layers.BatchNormalization`` on TensorFlow, run for real.

Training pass (``training=True`` on a trainable layer)::

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

import keras

from bnexplore.engines.tf_common import TensorFlowKerasEngine, tf

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"Keras runs on {keras.backend.backend()!r} in this process "
        "(KERAS_BACKEND); this engine needs TensorFlow"
    )


class KerasEngine(TensorFlowKerasEngine):
    name = "keras"
    label = "Keras 3"
    version = f"keras {keras.__version__} (TensorFlow {tf.__version__})"
    prefix = "keras"
    receives_port = True

    optimizers = keras.optimizers
    layer_class = keras.layers.BatchNormalization
