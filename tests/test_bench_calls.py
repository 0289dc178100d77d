"""The bench's bare calls (bench.bare_calls) do the work bnexplore does for each row: the
same outputs and, with a loss, the same gradients, within the dtype's tolerance. A ratio
against calls that did less work would flatter bnexplore. Not a timing test."""

from __future__ import annotations

import pytest
import torch

from bnexplore.runs.runner import compare
from bnexplore.scenario.links import parse_link
from bnexplore.tools import bench

LINKS = [
    *(link for _, link in bench.SCENARIOS if "56,56" not in link),
    "?shape=8,4&input=normal&steps=2&loss=mse&target=normal&keras_training=false",
    "?shape=4,3,5,6&input=normal&steps=3&loss=mse&torch_optimizer=adam&keras_optimizer=adamw"
    "&torch_mode=eval",
    "?shape=4,3,5,6&input=normal&steps=1&loss=mse&engines=torch",
]


@pytest.mark.parametrize("link", LINKS)
def test_the_bare_calls_compute_what_bnexplore_computes(link: str) -> None:
    scenario, _ = parse_link(link)
    bare = bench.bare_calls(link)()
    results = compare(scenario, reference=False).results
    assert sorted(bare) == sorted(results)
    for engine, arrays in bare.items():
        quantities = ["output"] + (list(bench.GRADIENTS) if scenario["loss"] == "mse" else [])
        assert sorted(arrays) == sorted(quantities), engine
        for quantity in quantities:
            mine = getattr(results[engine], quantity)
            assert mine is not None, (engine, quantity)
            torch.testing.assert_close(
                torch.from_numpy(arrays[quantity]),
                torch.from_numpy(mine),
                msg=lambda m, e=engine, q=quantity: f"{e} {q}: {m}",
            )
