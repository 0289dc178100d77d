"""Keras 3 on PyTorch: ``keras.layers.BatchNormalization`` with ``KERAS_BACKEND=torch``.

The rules are Keras 3's (see keras_engine); the kernel is the backend's: its
``moments`` computes the batch variance as E[x²] − E[x]² in float32, which
cancels catastrophically when |mean| ≫ std (a mean of 1000 with std 1 loses
every digit of the variance). Keras on PyTorch places tensors on CUDA when
PyTorch sees it.

Found here (Keras 3.15): a layer built under ``keras.device(…)`` holds plain
tensors instead of leaf Parameters, and ``trainable = False`` then raises
"you can only change requires_grad flags of leaf variables". So layers are
built without a device scope where the device is the backend's default (always
on a machine without CUDA); elsewhere that error is the engine's result.
"""

from __future__ import annotations

import contextlib
import os
import sys

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "torch"

import keras
import numpy as np
import torch

if keras.backend.backend() != "torch":
    raise ImportError(
        f"Keras runs on {keras.backend.backend()!r} in this process "
        "(KERAS_BACKEND); this engine needs PyTorch: it runs in a worker process of its own"
    )

from bnexplore.engines.keras3_common import Keras3BackendEngine


class KerasTorchEngine(Keras3BackendEngine):
    name = "keras_torch"
    label = "Keras 3 (PyTorch)"
    version = f"keras {keras.__version__} (torch {torch.__version__})"
    backend = "PyTorch"

    def gpu_count(self) -> int:
        return torch.cuda.device_count()

    def scope(self, device: str):
        default = "cpu" if keras.src.backend.torch.core.DEFAULT_DEVICE == "cpu" else "gpu"
        return contextlib.nullcontext() if device.startswith(default) else super().scope(device)

    def forward_and_gradients(self, session, x, target, training, wrt_x: bool):
        """torch autograd: the layer's variables are leaf Parameters."""
        trainable = list(session.layer.trainable_variables)
        for variable in trainable:
            variable.value.grad = None
        x = x.detach().requires_grad_(wrt_x)
        y = session.call(x, training)
        loss = torch.mean(torch.square(y - target))
        if loss.requires_grad:
            loss.backward()
        grads = {id(v): v.value.grad for v in trainable}
        return y.detach(), loss.detach(), x.grad if wrt_x else None, grads

    def numpy(self, tensor) -> np.ndarray:
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach()
        return keras.ops.convert_to_numpy(tensor)

    def describe(self, device: str) -> str:
        if device.startswith("cpu"):
            return "cpu"
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
