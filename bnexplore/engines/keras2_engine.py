"""Keras 2 engine: ``tf_keras.layers.BatchNormalization``, the Keras of TensorFlow ≤ 2.15.

Same rules as Keras 3 except on the fused path (4-D or 5-D input in float16,
bfloat16 or float32; fused=None or True): TensorFlow's fused kernel feeds the
*unbiased* batch variance var_b·n/(n − 1) into the moving variance, like
PyTorch. The non-fused path feeds the biased var_b, like Keras 3.
"""

from __future__ import annotations

import tf_keras

from bnexplore.engines.tf_common import KerasFamilyEngine, nhwc_shape, tf
from bnexplore.scenario import Scenario

_FUSED = {"auto": None, "true": True, "false": False}


class Keras2Engine(KerasFamilyEngine):
    name = "keras2"
    label = "Keras 2"
    version = f"tf_keras {tf_keras.__version__} (TensorFlow {tf.__version__})"
    prefix = "keras2"

    def build(self, scenario: Scenario) -> tf_keras.layers.BatchNormalization:
        layer = tf_keras.layers.BatchNormalization(
            axis=-1,
            momentum=scenario["keras2_momentum"],
            epsilon=scenario["keras2_eps"],
            center=scenario["keras2_center"],
            scale=scenario["keras2_scale"],
            fused=_FUSED[scenario["keras2_fused"]],
            dtype=scenario["dtype"],
        )
        layer.build(nhwc_shape(scenario))
        layer.trainable = scenario["keras2_trainable"]
        return layer

    def detail(self, layer) -> str:
        return "fused path" if layer.fused else "non-fused path"
