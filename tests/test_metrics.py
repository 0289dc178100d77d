"""Divergence metrics: definitions, and agreement with torch.testing.assert_close."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bnexplore.metrics import TOLERANCES, Divergence, OutputStats
from bnexplore.runner import strict_json

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@pytest.mark.parametrize("dtype", sorted(TOLERANCES))
def test_tolerances_are_torch_testing_defaults(dtype: str) -> None:
    from torch.testing._comparison import default_tolerances

    assert TOLERANCES[dtype] == default_tolerances(TORCH_DTYPES[dtype])


def _torch_allclose(expected: np.ndarray, actual: np.ndarray) -> bool:
    try:
        torch.testing.assert_close(torch.from_numpy(actual), torch.from_numpy(expected))
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", range(40))
def test_allclose_agrees_with_assert_close(dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    expected = (rng.standard_normal(50) * 10 ** rng.uniform(-6, 2)).astype(dtype)
    rtol, atol = TOLERANCES[dtype]
    noise = rng.standard_normal(50) * (atol + rtol * np.abs(expected)) * rng.uniform(0, 2)
    actual = (expected + noise).astype(dtype)
    if seed % 7 == 0:
        actual[seed % 50] = np.nan
    if seed % 11 == 0:
        expected[3] = actual[3] = np.inf
    d = Divergence.between("a", "b", expected, actual, dtype)
    assert d.allclose == _torch_allclose(expected, actual)


def test_divergence_definitions() -> None:
    a = np.array([0.0, 1.0, -2.0, 0.0])
    b = np.array([0.0, 1.5, -2.0, 0.25])
    d = Divergence.between("a", "b", a, b, "float64")
    assert d.max_abs == 0.5
    assert d.mean_abs == pytest.approx(0.75 / 4)
    assert d.rmse == pytest.approx(math.sqrt((0.25 + 0.0625) / 4))
    assert d.max_rel == 1.0  # |0 − 0.25| / 0.25
    assert d.allclose is False


def test_max_rel_is_undefined_when_both_are_zero_everywhere() -> None:
    zeros = np.zeros(5)
    d = Divergence.between("a", "b", zeros, zeros, "float32")
    assert d.max_rel is None and d.max_abs == 0.0 and d.allclose is True


def test_output_stats_in_float64_with_nan_reported() -> None:
    s = OutputStats.of(np.array([1.0, 3.0], dtype=np.float32))
    assert (s.mean, s.std, s.min, s.max, s.nonfinite) == (2.0, 1.0, 1.0, 3.0, 0)
    s = OutputStats.of(np.array([1.0, np.nan, np.inf]))
    assert s.mean is None and s.nonfinite == 2


def test_strict_json_has_no_nan_or_infinity() -> None:
    doc = strict_json({"a": [1.0, math.nan, {"b": math.inf}], "c": (2, -math.inf)})
    assert json.dumps(doc, allow_nan=False) == '{"a": [1.0, null, {"b": null}], "c": [2, null]}'
