"""Divergence metrics: definitions, and agreement with torch.testing.assert_close."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bnexplore.runs import metrics
from bnexplore.runs.metrics import TOLERANCES, Divergence, Figures, measure, output_summary
from bnexplore.runs.runner import strict_json

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


def test_output_summary_in_float64_with_nan_reported() -> None:
    s = output_summary(np.array([1.0, 3.0], dtype=np.float32))
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "nonfinite": 0}
    s = output_summary(np.array([1.0, np.nan, np.inf]))
    assert s["mean"] is None and s["min"] is None and s["nonfinite"] == 2
    s = output_summary(np.array([1.0, np.inf]))
    assert s["max"] is None and s["min"] == 1.0 and s["nonfinite"] == 1


def test_chunked_figures_equal_whole_array_numpy_on_large_arrays() -> None:
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((3, 5, 400, 401)) * 3 + 1).astype(np.float32)  # > 2**21 values
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * 1e-3).astype(np.float32)
    s = output_summary(a)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for key, want in (
        ("mean", a64.mean()),
        ("std", a64.std()),
        ("min", a64.min()),
        ("max", a64.max()),
    ):
        assert s[key] == pytest.approx(want, rel=1e-12, abs=1e-12), key
    d = Divergence.between("a", "b", a, b, "float32")
    diff = np.abs(a64 - b64)
    assert d.max_abs == diff.max()
    assert d.mean_abs == pytest.approx(diff.mean(), rel=1e-12)
    assert d.rmse == pytest.approx(np.sqrt(np.square(diff).mean()), rel=1e-12)
    assert d.max_rel == pytest.approx((diff / np.maximum(np.abs(a64), np.abs(b64))).max())
    assert d.allclose is False


@pytest.mark.parametrize(
    ("expected_dtype", "actual_dtype"),
    [("float32", "float64"), ("float64", "float32"), ("float16", "float16"), ("float64",) * 2],
)
def test_each_chunks_figures_are_its_own_in_mixed_dtypes(
    expected_dtype: str, actual_dtype: str
) -> None:
    """A gap reuses its working arrays from chunk to chunk: over two and a half chunks, one
    pair that is close and one that is not, every figure is the whole arrays' own."""
    rng = np.random.default_rng(11)
    size = 2 * metrics.CHUNK + metrics.CHUNK // 2
    e = (rng.standard_normal(size) * 100).astype(expected_dtype)
    close = e.astype(np.float64) * (1 + rng.uniform(-1, 1, size) * 1e-7)  # past atol, in rtol
    apart = close.copy()
    apart[-5:] += 1  # ...but in the last, shorter chunk
    for other, want_close in ((close, True), (apart, False)):
        x = other.astype(actual_dtype)
        d = Divergence.between("a", "b", e, x, "float32")
        e64, x64 = e.astype(np.float64), x.astype(np.float64)
        diff = np.abs(e64 - x64)
        assert d.max_abs == diff.max()
        assert d.mean_abs == pytest.approx(diff.mean(), rel=1e-12)
        assert d.max_rel == (diff / np.maximum(np.abs(e64), np.abs(x64))).max()
        rtol, atol = TOLERANCES["float32"]
        within = torch.isclose(torch.from_numpy(x64), torch.from_numpy(e64), rtol, atol)
        assert d.allclose is bool(within.all()) is want_close


def test_strict_json_has_no_nan_or_infinity() -> None:
    doc = strict_json({"a": [1.0, math.nan, {"b": math.inf}], "c": (2, -math.inf)})
    assert json.dumps(doc, allow_nan=False) == '{"a": [1.0, null, {"b": null}], "c": [2, null]}'


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_one_pass_measure_gives_output_summary_bit_for_bit(dtype: str) -> None:
    """Reproducer scripts embed output_summary; the app's one-pass figures must equal it."""
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((7, 3, 211, 300)) * 2 + 5).astype(dtype)
    b = (a + rng.standard_normal(a.shape) * 1e-2).astype(dtype)
    summaries, (gap,) = measure({"a": a, "b": b}, [("a", "b")], dtype)
    assert summaries == {"a": output_summary(a), "b": output_summary(b)}
    assert gap == Divergence.between("a", "b", a, b, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_figures_begun_early_are_those_measured_at_the_end_bit_for_bit(dtype: str) -> None:
    """A run begins a result's figures as it arrives (on the measuring threads, in any order);
    they must be measure's figures, NaN and infinities included."""
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((6, 4, 160, 160)) * 3 - 1).astype(dtype)
    b = (a + rng.standard_normal(a.shape) * 1e-2).astype(dtype)
    c = b.copy()
    a.reshape(-1)[[7, 600_000]] = [np.nan, np.inf]
    c.reshape(-1)[[3, 600_000]] = [-np.inf, np.inf]
    small = rng.standard_normal(16).astype(dtype)
    figures = Figures(dtype)
    figures.add("a", a)
    figures.start(["a"])
    for name, array in (("b", b), ("c", c), ("small", small)):
        figures.add(name, array)
    figures.start([("a", "c"), "c", "small"])
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    summaries, gaps = measure({"a": a, "b": b, "c": c, "small": small}, pairs, dtype)
    assert figures.summaries(["a", "b", "c", "small"]) == summaries
    assert list(figures.gaps(pairs).values()) == gaps
    assert summaries["a"]["nonfinite"] == 2 and gaps[1].nonfinite == 3
