"""Each framework, run for real, against the float64 computation of its own rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnexplore.engines import run_engine
from bnexplore.engines.reference import REFERENCES
from bnexplore.metrics import TOLERANCES
from bnexplore.scenario import parse_link
from tests.scenarios import random_links

RANDOM_LINKS = random_links(60, seed=2026)


def assert_matches_reference(actual, expected, dtype: str, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        torch.from_numpy(np.asarray(actual, dtype=np.float64)),
        torch.from_numpy(np.asarray(expected, dtype=np.float64)),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


@pytest.mark.parametrize("engine", ["torch", "keras"])
@pytest.mark.parametrize("link", RANDOM_LINKS)
def test_engine_follows_its_frameworks_rules(engine: str, link: str) -> None:
    scenario, notices = parse_link(link)
    assert notices == []
    result = run_engine(engine, scenario)
    reference = REFERENCES[engine].run(scenario)
    assert result.available, result.reason
    assert (result.error is None) == (reference.error is None), (result.error, reference.error)
    if reference.error:
        return
    dtype = scenario["dtype"]
    assert result.output.dtype == np.dtype(dtype)
    assert result.output.shape == scenario.shape
    assert_matches_reference(result.output, reference.output, dtype, "output")
    for stat in ("running_mean", "running_var"):
        got, want = getattr(result, stat), getattr(reference, stat)
        assert (got is None) == (want is None), stat
        if want is not None:
            assert_matches_reference(got, want, dtype, stat)
