"""A link with init=state runs the file's layer: the batch takes the layer's channel count.

The link, the CLI and the API all read it through parse_link, so a link needs no shape
to run a 128-channel layer: the channel dim is replaced (N and the spatial dims kept, N
shrunk under the value cap), a notice names the layer and the shape that ran, and the
canonical link writes that shape. A batch file's shape still wins. The file here is a
real torch.save of a small model's state_dict, stored through the CLI.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

import bnexplore
from bnexplore.runs.metrics import TOLERANCES
from bnexplore.runs.runner import compare
from bnexplore.scenario.batches import batches
from bnexplore.scenario.links import parse_link, scenario_from_values, shape_for_layer
from bnexplore.scenario.params import MAX_ELEMENTS
from bnexplore.tools.cli import main

CHANNELS = 128
LAYER = "conv2_BN"
EPS = {"torch": 1e-5, "keras": 1e-3}
"""Each engine's default eps: the one a scenario without eps keys runs."""


pytestmark = pytest.mark.usefixtures("store_dir")  # the shared fixture: tests/conftest.py


@pytest.fixture
def saved(tmp_path, capsys) -> tuple[str, dict[str, np.ndarray]]:
    """A Conv2d(3, 128, 3) → BatchNorm2d(128) with trained-looking state, torch.save'd and
    stored with ``python -m bnexplore store FILE``: its digest and the layer's state."""
    torch.manual_seed(22)
    model = torch.nn.Sequential(
        OrderedDict(conv2=torch.nn.Conv2d(3, CHANNELS, 3), conv2_BN=torch.nn.BatchNorm2d(CHANNELS))
    )
    norm = model.conv2_BN
    with torch.no_grad():
        norm.weight.copy_(torch.randn(CHANNELS) * 0.5 + 1.0)
        norm.bias.copy_(torch.randn(CHANNELS))
        norm.running_mean.copy_(torch.randn(CHANNELS))
        norm.running_var.copy_(torch.rand(CHANNELS) * 4.0 + 0.01)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    assert main(["store", str(path)]) == 0
    key, digest = capsys.readouterr().out.splitlines()[0].split("=")
    assert key == "state" and len(digest) == 64
    state = {
        name: getattr(norm, name).detach().numpy().astype(np.float64)
        for name in ("weight", "bias", "running_mean", "running_var")
    }
    return digest, state


def formula(x: np.ndarray, state: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """y = (x − running_mean)/√(running_var + eps)·γ + β, in float64."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    s = {k: v.reshape(shape) for k, v in state.items()}
    return (x - s["running_mean"]) / np.sqrt(s["running_var"] + eps) * s["weight"] + s["bias"]


def assert_no_further_notice(link: str) -> None:
    """The canonical link describes the scenario that ran: reading it again notices nothing."""
    again, notices = parse_link(link)
    assert notices == [], notices
    assert again.link == link


def test_the_cli_link_without_shape_runs_the_files_128_channel_layer(saved, capsys) -> None:
    digest, state = saved
    link = f"?state={digest}&layer={LAYER}&init=state&torch_mode=eval"
    assert main(["run", "--link", link, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["scenario"]["init"] == "state" and doc["scenario"]["shape"] == [20, 128, 35, 45]
    assert doc["notices"] == [
        f"shape: follows layer {LAYER}'s 128 channels, not 100 (20,100,35,45); using 20,128,35,45"
    ]
    assert "shape=20,128,35,45" in doc["link"] and "init=state" in doc["link"]
    assert_no_further_notice(doc["link"])
    rtol, atol = TOLERANCES["float32"]
    ones = np.ones((1, CHANNELS, 1, 1))  # input=ones: each channel's output is one number
    for name, eps in EPS.items():
        engine = doc["engines"][name]
        assert engine["available"] and engine["error"] is None, (name, engine)
        for statistic in ("running_mean", "running_var"):  # eval / inference: left as loaded
            np.testing.assert_allclose(engine[statistic], state[statistic], rtol, atol)
        per_channel = formula(ones, state, eps).reshape(-1)
        for summary, want in (
            ("mean", per_channel.mean()),
            ("min", per_channel.min()),
            ("max", per_channel.max()),
        ):
            allowed = atol + rtol * np.abs(per_channel).max()
            assert abs(engine["output"][summary] - want) <= allowed, (name, summary)


def test_a_shape_with_other_channels_keeps_its_batch_and_spatial_dims(saved) -> None:
    digest, state = saved
    link = f"?state={digest}&layer={LAYER}&init=state&shape=4,16,5,6&input=normal&seed=3"
    scenario, notices = parse_link(link + "&torch_mode=eval&engines=torch")
    assert scenario.shape == (4, 128, 5, 6) and scenario["init"] == "state"
    assert notices == [
        f"shape: follows layer {LAYER}'s 128 channels, not 16 (4,16,5,6); using 4,128,5,6"
    ]
    assert_no_further_notice(scenario.link)
    comparison = compare(scenario, reference=False)
    torch_result = comparison.results["torch"]
    x = next(batches(scenario)).astype(np.float64)  # steps=0: the measured pass's batch
    rtol, atol = TOLERANCES["float32"]
    want = formula(x, state, EPS["torch"])
    # float32's rounding of x − running_mean, amplified by |γ|/√(var + eps), bounds the gap
    gain = np.abs(state["weight"]) / np.sqrt(state["running_var"] + EPS["torch"])
    rounded = (np.abs(x) + np.abs(state["running_mean"]).reshape(1, -1, 1, 1)) * gain.reshape(
        1, -1, 1, 1
    )
    allowed = atol + rtol * (np.abs(want) + rounded)
    assert np.all(np.abs(np.asarray(torch_result.output, np.float64) - want) <= allowed)
    np.testing.assert_allclose(torch_result.running_var, state["running_var"], rtol, atol)


def test_a_shape_that_would_pass_the_cap_shrinks_its_batch(saved) -> None:
    digest, _ = saved
    scenario, notices = parse_link(f"?state={digest}&init=state&shape=100,8,250,250")
    per_sample = 128 * 250 * 250  # 8,000,000 values: 6 samples fit under 50,000,000
    assert scenario.shape == (MAX_ELEMENTS // per_sample, 128, 250, 250) == (6, 128, 250, 250)
    assert scenario["init"] == "state"
    assert notices == [
        f"shape: follows layer {LAYER}'s 128 channels, not 8 (100,8,250,250); "
        "100,128,250,250 would hold 800,000,000 values, over the limit of 50,000,000, "
        "so the batch shrinks to 6; using 6,128,250,250"
    ]
    assert "shape=6,128,250,250" in scenario.link
    assert_no_further_notice(scenario.link)


def test_a_layer_too_wide_for_even_one_sample_is_refused(saved) -> None:
    digest, _ = saved
    scenario, notices = parse_link(f"?state={digest}&init=state&shape=2,1,400000")
    assert scenario["init"] == "fresh" and scenario.shape == (2, 1, 400000)
    assert notices == [
        f"init: state layer {LAYER} has 128 channels, the batch 1 (shape 2,1,400000): "
        "even 1,128,400000 holds 51,200,000 values, over the limit of 50,000,000; "
        "using fresh"
    ]
    assert shape_for_layer((2, 1, 400000), 128) is None
    assert_no_further_notice(scenario.link)


def test_with_input_file_the_batch_files_shape_wins(saved, tmp_path) -> None:
    digest, _ = saved
    np.save(tmp_path / "narrow.npy", np.ones((4, 16, 3, 3)))
    narrow = bnexplore.store_file(tmp_path / "narrow.npy")
    scenario, notices = parse_link(f"?state={digest}&init=state&input=file&file={narrow}")
    assert scenario.shape == (4, 16, 3, 3) and scenario["init"] == "fresh"
    assert notices == [
        f"init: state layer {LAYER} has 128 channels, the batch 16 (shape 4,16,3,3); using fresh"
    ]
    np.save(tmp_path / "wide.npy", np.ones((2, 128, 3, 3)))
    wide = bnexplore.store_file(tmp_path / "wide.npy")
    scenario, notices = parse_link(f"?state={digest}&init=state&input=file&file={wide}&shape=9,7,5")
    assert scenario.shape == (2, 128, 3, 3) and scenario["init"] == "state"
    assert notices == ["shape: follows the batch file, 2,128,3,3; 9,7,5 ignored"]
    assert_no_further_notice(scenario.link)


def test_the_apps_values_get_the_layers_channels_through_the_same_codec(saved) -> None:
    digest, _ = saved
    scenario, notices = scenario_from_values({"state": digest, "init": "state"})
    assert scenario.shape == (20, 128, 35, 45) and scenario["init"] == "state"
    assert [n.split(":", 1)[0] for n in notices] == ["shape"]
    assert shape_for_layer((20, 100, 35, 45), 128) == (20, 128, 35, 45)
    assert math.prod(shape_for_layer((100, 8, 250, 250), 128)) <= MAX_ELEMENTS
