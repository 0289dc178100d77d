"""Keras 3 on a backend other than TensorFlow: tensors through ``keras.ops``.

Imported only by a backend's engine module, after it has set ``KERAS_BACKEND``
(a Keras backend is fixed once per process, so each runs in its own worker).
The layer and its rules are Keras 3's own: the same ``keras_*`` knobs as the
TensorFlow engine, so a gap between them is the backend's kernel.
"""

from __future__ import annotations

import keras
import numpy as np

from bnexplore.engines.keras_family import KerasFamilyEngine


class Keras3BackendEngine(KerasFamilyEngine):
    prefix = "keras"
    receives_port = True
    layer_class = keras.layers.BatchNormalization
    optimizers = keras.optimizers
    backend: str

    def gpu_count(self) -> int:
        raise NotImplementedError

    def resolve_device(self, requested: str) -> tuple[str | None, str]:
        has_gpu = self.gpu_count() > 0
        who = f"Keras on {self.backend}"
        if requested == "cpu":
            return "cpu:0", "device=cpu asked for"
        if requested == "cuda":
            if not has_gpu:
                return None, f"device=cuda, but {who} sees no GPU"
            return "gpu:0", "device=cuda asked for"
        if has_gpu:
            return "gpu:0", f"auto: {who} sees a GPU"
        return "cpu:0", f"auto: {who} sees no GPU, ran on CPU"

    def describe(self, device: str) -> str:
        return "cpu" if device.startswith("cpu") else device

    def scope(self, device: str):
        return keras.device(device)

    def tensor(self, array: np.ndarray):
        return keras.ops.convert_to_tensor(array)

    def snapshot(self, variables: tuple):
        return keras.ops.stack([keras.ops.convert_to_tensor(v) for v in variables])

    def numpy(self, tensor) -> np.ndarray:
        return keras.ops.convert_to_numpy(tensor)

    def assign(self, variable, values: np.ndarray) -> None:
        variable.assign(keras.ops.cast(keras.ops.convert_to_tensor(values), variable.dtype))
