"""Keras 2 engine: ``tf_keras.layers.BatchNormalization``, the Keras of TensorFlow ≤ 2.15.

Same rules as Keras 3 except on the fused path (4-D or 5-D input in float16,
bfloat16 or float32; fused=None or True): TensorFlow's fused kernel feeds the
*unbiased* batch variance var_b·n/(n − 1) into the moving variance, like
PyTorch. The non-fused path feeds the biased var_b, like Keras 3.
"""

from __future__ import annotations

import tf_keras

from bnexplore.engines.tf_common import TensorFlowKerasEngine, tf
from bnexplore.scenario.links import Scenario

_FUSED = {"auto": None, "true": True, "false": False}


class Keras2Engine(TensorFlowKerasEngine):
    name = "keras2"
    label = "Keras 2"
    version = f"tf_keras {tf_keras.__version__} (TensorFlow {tf.__version__})"
    prefix = "keras2"

    optimizers = tf_keras.optimizers
    layer_class = tf_keras.layers.BatchNormalization

    def options(self, scenario: Scenario) -> dict:
        return {"fused": _FUSED[scenario["keras2_fused"]]}

    def detail(self, layer) -> str:
        return "fused path" if layer.fused else "non-fused path"
