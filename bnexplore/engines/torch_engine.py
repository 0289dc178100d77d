"""PyTorch engine: ``torch.nn.BatchNorm1d/2d/3d`` run for real.

Training pass (``.train()``, or always when track_running_stats is false)::

    y = (x − mean_b) / √(var_b + eps) · weight + bias
    running_mean ← (1 − m)·running_mean + m·mean_b
    running_var  ← (1 − m)·running_var  + m·var_b·n/(n − 1)     (unbiased!)

with m = momentum, or 1/num_batches_tracked when momentum is None. Eval pass:
the same normalization with the running statistics. Statistics are per
channel (axis 1) over the n values of every other axis.
"""

from __future__ import annotations

import numpy as np
import torch

from bnexplore.batches import batches
from bnexplore.engines import EngineResult, Progress
from bnexplore.scenario import Scenario

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_MODULES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


class DeviceMissing(RuntimeError):
    pass


def resolve_device(requested: str) -> tuple[torch.device, str]:
    """The device to run on, and why."""
    has_cuda = torch.cuda.is_available()
    if requested == "cpu":
        return torch.device("cpu"), "device=cpu asked for"
    if requested == "cuda":
        if not has_cuda:
            raise DeviceMissing("device=cuda, but PyTorch sees no CUDA device")
        return torch.device("cuda"), "device=cuda asked for"
    if has_cuda:
        return torch.device("cuda"), "auto: PyTorch sees a CUDA device"
    return torch.device("cpu"), "auto: PyTorch sees no CUDA device, ran on CPU"


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


class TorchEngine:
    name = "torch"
    label = "PyTorch"
    version = f"torch {torch.__version__}"

    def build(self, scenario: Scenario, device: torch.device) -> torch.nn.Module:
        """A fresh BatchNorm module of the scenario's rank, dtype and settings."""
        module_class = _MODULES[len(scenario.shape)]
        return module_class(
            scenario.channels,
            eps=scenario["torch_eps"],
            momentum=scenario["torch_momentum"],
            affine=scenario["torch_affine"],
            track_running_stats=scenario["torch_track_running_stats"],
            device=device,
            dtype=_DTYPES[scenario["dtype"]],
        )

    def run(self, scenario: Scenario, progress: Progress | None = None) -> EngineResult:
        try:
            device, note = resolve_device(scenario["device"])
        except DeviceMissing as missing:
            return EngineResult(
                self.name, available=False, version=self.version, reason=str(missing)
            )
        where = {"version": self.version, "device": describe(device), "device_note": note}
        module = self.build(scenario, device)
        steps = scenario["steps"]
        try:
            with torch.no_grad():
                for k, batch in enumerate(batches(scenario)):
                    module.train(k < steps or scenario["torch_mode"] == "train")
                    output = module(torch.from_numpy(batch).to(device))
                    if progress:
                        progress(k + 1, steps + 1)
        except (ValueError, RuntimeError) as exc:
            return EngineResult(self.name, available=True, error=str(exc), **where)
        return EngineResult(
            self.name,
            available=True,
            output=output.cpu().numpy(),
            running_mean=_numpy(module.running_mean),
            running_var=_numpy(module.running_var),
            **where,
        )


def _numpy(buffer: torch.Tensor | None) -> np.ndarray | None:
    return None if buffer is None else buffer.detach().cpu().numpy().copy()
