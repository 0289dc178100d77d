"""TensorFlow's side of the Keras 3 (TensorFlow backend) and Keras 2 engines: devices, tensors."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from bnexplore.engines.keras_family import KerasFamilyEngine


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


class TensorFlowKerasEngine(KerasFamilyEngine):
    """A Keras layer on TensorFlow: tensors made and kept under ``tf.device``."""

    def resolve_device(self, requested: str) -> tuple[str | None, str]:
        return resolve_device(requested)

    def describe(self, device: str) -> str:
        return "cpu" if device == "/CPU:0" else "gpu:0"

    def scope(self, device: str):
        return tf.device(device)

    def tensor(self, array: np.ndarray):
        return tf.convert_to_tensor(array)

    def snapshot(self, variables: tuple):
        return tf.stack([tf.convert_to_tensor(v) for v in variables])

    def numpy(self, tensor) -> np.ndarray:
        # np.asarray shares an eager tensor's buffer (.numpy() would copy it first)
        return np.asarray(tensor)

    def assign(self, variable, values: np.ndarray) -> None:
        variable.assign(tf.cast(tf.constant(values), variable.dtype))

    def forward_and_gradients(self, session, x, target, training, wrt_x: bool):
        variables = list(session.layer.trainable_variables)
        with tf.GradientTape() as tape:
            if wrt_x:
                tape.watch(x)
            y = session.call(x, training)
            loss = tf.reduce_mean(tf.square(y - target))
        sources = ([x] if wrt_x else []) + variables
        grads = tape.gradient(loss, sources) if sources else []
        grad_x = grads[0] if wrt_x else None
        by_variable = grads[len(sources) - len(variables) :]
        return y, loss, grad_x, dict(zip(map(id, variables), by_variable, strict=True))
