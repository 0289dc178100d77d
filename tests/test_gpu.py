"""CUDA: PyTorch runs on the GPU where there is one, and agrees with its CPU kernel.

Skipped where PyTorch sees no CUDA device (CI, this project's machines); run by
scripts/gpu_check.sh on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnexplore.runs.metrics import TOLERANCES
from bnexplore.runs.runner import run_engine
from bnexplore.scenario.links import parse_link

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA device")

LINKS = [
    "?v=1",
    "?input=normal&steps=10&torch_mode=eval",
    "?shape=32,256,56,56&input=normal",
    "?shape=64,16&input=uniform&steps=5&torch_momentum=none",
    "?shape=8,4,6,6,6&input=normal&dtype=float64",
]


def test_device_auto_runs_pytorch_on_cuda() -> None:
    result = run_engine("torch", parse_link("?shape=4,3")[0])
    assert result.device.startswith("cuda:"), result.device
    assert "sees a CUDA device" in result.device_note


@pytest.mark.parametrize("link", LINKS)
def test_cuda_agrees_with_cpu_within_the_dtypes_tolerance(link: str) -> None:
    scenario, _ = parse_link(link)
    gpu = run_engine("torch", scenario.replace(device="cuda"))
    cpu = run_engine("torch", scenario.replace(device="cpu"))
    rtol, atol = TOLERANCES[scenario["dtype"]]
    for what in ("output", "running_mean", "running_var"):
        torch.testing.assert_close(
            torch.from_numpy(np.asarray(getattr(gpu, what), dtype=np.float64)),
            torch.from_numpy(np.asarray(getattr(cpu, what), dtype=np.float64)),
            rtol=rtol,
            atol=atol,
        )


def test_cpu_vs_gpu_preset_differs_only_by_rounding() -> None:
    import bnexplore

    doc = bnexplore.run("?preset=cpu-vs-gpu")
    assert doc["engines"]["torch_gpu"]["device"].startswith("cuda")
    assert doc["divergence"][0]["allclose"] is True
