"""LiteRT engine: the Keras 3 layer converted to a LiteRT (TFLite) flatbuffer and interpreted.

The layer is Keras 3's own on TensorFlow (the keras_* knobs, :class:`KerasEngine`'s layer and
session). Training passes run in Keras; before the measured pass the layer, with its trained
state, is converted by ``tf.lite.TFLiteConverter.from_keras_model`` (builtin ops only:
``keras.Model.export(format="litert")`` enables SELECT_TF_OPS, whose Flex ops the interpreter
may not run) and the pass runs in ``ai_edge_litert.interpreter.Interpreter`` (TensorFlow's
deprecated ``tf.lite.Interpreter`` where ai-edge-litert is missing; the detail says which).

The converter folds inference BatchNorm into a multiply and an add, with constants computed at
conversion in float32::

    scale = γ / √(moving_variance + ε)       offset = β − moving_mean·scale
    y = x·scale + offset

``litert_quantize=float16`` stores the two constants as float16 (plus Dequantize ops).
LiteRT runs float32 inference only: a training measured pass, or another dtype, is an error
result that says so. With loss=mse, L is taken from LiteRT's output and the gradients from the
Keras layer in inference (the rule the flatbuffer computes). Conversions are cached (a small
LRU) by everything that shapes them: the knobs, the shape and the layer's weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading

import numpy as np
from cachetools import LRUCache

from bnexplore.engines import EngineResult, Session
from bnexplore.engines.keras_engine import KerasEngine, keras
from bnexplore.engines.keras_family import KerasSession, nhwc_shape
from bnexplore.engines.tf_common import tf
from bnexplore.scenario.links import Scenario

try:
    from ai_edge_litert import __version__ as _LITERT_VERSION
    from ai_edge_litert.interpreter import Interpreter

    INTERPRETER = f"ai_edge_litert.interpreter.Interpreter (ai-edge-litert {_LITERT_VERSION})"
except ImportError:  # the fallback: TensorFlow's own, deprecated
    Interpreter = tf.lite.Interpreter
    INTERPRETER = f"tf.lite.Interpreter (TensorFlow {tf.__version__}; ai-edge-litert missing)"

INFERENCE_ONLY = "LiteRT runs inference only"

_CACHE: LRUCache = LRUCache(maxsize=8)
_CACHE_LOCK = threading.Lock()


class Converted:
    """One conversion: its interpreter, the flatbuffer's ops, and words for the document."""

    def __init__(self, flatbuffer: bytes, quantize: str) -> None:
        self.interpreter = Interpreter(model_content=flatbuffer)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        ops = [op["op_name"] for op in self.interpreter._get_ops_details()]
        self.detail = (
            "converted by tf.lite.TFLiteConverter.from_keras_model (TFLITE_BUILTINS"
            + (", float16 constants" if quantize == "float16" else "")
            + f"), {len(flatbuffer):,} bytes; ops {', '.join(ops)}; run by {INTERPRETER}"
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output), copy=True)


def convert(layer, shape: tuple[int, ...], quantize: str) -> bytes:
    """The layer (inference) as a LiteRT flatbuffer, builtin ops only."""
    inputs = keras.Input(batch_shape=shape, dtype="float32")
    model = keras.Model(inputs, layer(inputs, training=False))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the traced function
        return converter.convert()


def converted(scenario: Scenario, layer) -> Converted:
    """The layer's conversion, from the cache where it was converted before."""
    digest = hashlib.sha256()
    shape = nhwc_shape(scenario)
    quantize = scenario["litert_quantize"]
    settings = (quantize, shape, scenario["keras_eps"], scenario["keras_center"])
    digest.update(repr((*settings, scenario["keras_scale"])).encode())
    for weight in layer.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    key = digest.hexdigest()
    with _CACHE_LOCK:
        found = _CACHE.get(key)
    if found is None:
        found = Converted(convert(layer, shape, quantize), quantize)
        with _CACHE_LOCK:
            _CACHE[key] = found
    return found


class LiteRTEngine(KerasEngine):
    name = "litert"
    label = "LiteRT"
    version = f"{INTERPRETER}, converted by TensorFlow {tf.__version__} (keras {keras.__version__})"

    def start(self, scenario: Scenario) -> Session | EngineResult:
        if scenario["device"] == "cuda":
            return EngineResult(
                self.name,
                available=False,
                version=self.version,
                reason="device=cuda, but the LiteRT interpreter runs on the CPU here",
            )
        dtype = scenario["dtype"]
        if dtype != "float32":
            return EngineResult(
                self.name,
                available=True,
                version=self.version,
                device="cpu",
                error=f"{INFERENCE_ONLY}, in float32: not {dtype}",
            )
        device = "/CPU:0"
        where = {
            "version": self.version,
            "device": "cpu",
            "device_note": "the LiteRT interpreter on the CPU; training passes in Keras 3 "
            "(TensorFlow) on the CPU",
        }
        with self.scope(device):
            layer = self.build(scenario)
        return LiteRTSession(self, where, scenario, layer, device)


class LiteRTSession(KerasSession):
    """Training passes in Keras (KerasSession's); the measured pass converted and in LiteRT."""

    def __init__(self, engine, where, scenario: Scenario, layer, device) -> None:
        super().__init__(engine, where, scenario, layer, device)
        self.scenario = scenario
        self.detail: str | None = None

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        if k < self.steps:
            super().step(k, batch, target)
            return
        if self.measured_training and self.scenario["keras_trainable"]:
            raise ValueError(
                f"{INFERENCE_ONLY}: keras_training=true asks for a training pass, which a "
                "converted LiteRT model cannot run"
            )
        self.gamma, self.beta = self._parameters()
        layer, engine = self.layer, self.engine
        deployed = converted(self.scenario, layer)
        self.detail = deployed.detail
        x_last = np.ascontiguousarray(np.moveaxis(batch, 1, -1))
        y = deployed.run(x_last)
        with engine.scope(self.device):
            if target is not None:
                x, t = engine.tensor(x_last), engine.tensor(np.moveaxis(target, 1, -1))
                self._step_with_loss(k, x, t, False)  # gradients of the inference rule
                self.loss = float(np.mean(np.square(y - np.moveaxis(target, 1, -1))))
            self.output = y
            self.recorded.append(engine.snapshot((layer.moving_mean, layer.moving_variance)))
        self.steps_seen.append(k)
        if target is not None:
            self.parameters_seen.append(self._parameters())

    def finish(self) -> EngineResult:
        result = super().finish()
        return EngineResult(**{**result.__dict__, "detail": self.detail})

    def failed(self, exc: Exception) -> EngineResult:
        result = super().failed(exc)
        return EngineResult(**{**result.__dict__, "detail": self.detail})
