"""Divergence between two outputs, and summary statistics of one.

All figures are computed in float64. Tolerances are
``torch.testing.assert_close``'s defaults for the dtype; two outputs are
*close* when, elementwise, |actual − expected| ≤ atol + rtol·|expected| with
the expected side being PyTorch's (NaN is never close; equal infinities are).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}
"""dtype → (rtol, atol), as torch.testing.assert_close defaults them."""


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def output_summary(output: np.ndarray) -> dict:
    """mean, std (ddof=0), min and max of all elements in float64; how many are NaN or ±inf.

    One pass over 2**17 elements at a time (a chunk stays in cache), widened to
    float64 chunk by chunk (no float64 copy of a whole output), with the
    shifted-data formula for the
    variance: with K the first element, var = (Σ(x − K)² − (Σ(x − K))²/n)/n,
    exact enough in float64 wherever K is near the data. A figure a NaN makes
    undefined is None. Self-contained (numpy and math only): reproducer scripts
    embed this very function.
    """
    chunk = 1 << 17
    flat = np.ascontiguousarray(output).reshape(-1)
    n = flat.size
    shift = float(flat[0]) if math.isfinite(float(flat[0])) else 0.0
    total = squares = 0.0
    with np.errstate(all="ignore"):
        for start in range(0, n, chunk):
            part = flat[start : start + chunk].astype(np.float64)
            part -= shift
            total += float(part.sum())
            squares += float(np.dot(part, part))
        low, high = float(flat.min()), float(flat.max())
        nonfinite = (
            0 if math.isfinite(total + squares) else int(n - np.count_nonzero(np.isfinite(flat)))
        )
        mean = shift + total / n
        variance = max(squares - total * total / n, 0.0) / n

    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return {
        "mean": finite(mean),
        "std": finite(math.sqrt(variance)) if math.isfinite(variance) else None,
        "min": finite(low),
        "max": finite(high),
        "nonfinite": nonfinite,
    }


def _within(
    diff: np.ndarray, worst: float, abs_expected: np.ndarray, rtol: float, atol: float
) -> bool:
    """|actual − expected| ≤ atol + rtol·|expected| everywhere (NaN never is); worst = max diff."""
    if worst <= atol:  # within atol alone: no need to look element by element
        return True
    if not math.isfinite(worst) or worst > atol + rtol * float(abs_expected.max()):
        return False
    return bool(np.all(diff <= atol + rtol * abs_expected))


@dataclass(frozen=True)
class Divergence:
    """How far output b is from output a, elementwise.

    max_rel = max |a − b| / max(|a|, |b|) over elements where either is
    non-zero (None when both are zero everywhere). ``allclose`` applies the
    dtype's tolerances with a as the expected side.
    """

    a: str
    b: str
    max_abs: float | None
    mean_abs: float | None
    rmse: float | None
    max_rel: float | None
    allclose: bool | None
    rtol: float
    atol: float
    reason: str | None = None

    @classmethod
    def between(
        cls, a: str, b: str, expected: np.ndarray, actual: np.ndarray, dtype: str
    ) -> Divergence:
        """Elementwise in float64, 2**17 elements at a time (no whole-array copies)."""
        rtol, atol = TOLERANCES[dtype]
        e_flat = np.ascontiguousarray(expected).reshape(-1)
        x_flat = np.ascontiguousarray(actual).reshape(-1)
        chunk = 1 << 17
        worst = worst_rel = np.float64(-np.inf)  # numpy maxima: a NaN propagates
        total = squares = 0.0
        close, any_nonzero = True, False
        with np.errstate(all="ignore"):
            for start in range(0, e_flat.size, chunk):
                e = e_flat[start : start + chunk].astype(np.float64)
                x = x_flat[start : start + chunk].astype(np.float64)
                diff = np.subtract(e, x)
                np.abs(diff, out=diff)
                part_sum = float(diff.sum())
                if not math.isfinite(part_sum):
                    diff[np.isinf(e) & (e == x)] = 0.0  # equal infinities are equal
                    part_sum = float(diff.sum())
                part_max = diff.max()
                worst = np.maximum(worst, part_max)
                total += part_sum
                squares += float(np.dot(diff, diff))
                np.abs(e, out=e)
                np.abs(x, out=x)
                close = close and _within(diff, float(part_max), e, rtol, atol)
                scale = np.maximum(e, x, out=x)
                if scale.max() > 0 or np.isnan(scale).any():
                    any_nonzero = True
                    scale[scale == 0] = 1.0  # both zero: diff is 0 there, so is its ratio
                    worst_rel = np.maximum(worst_rel, np.divide(diff, scale, out=scale).max())
        n = e_flat.size
        return cls(
            a=a,
            b=b,
            max_abs=_finite_or_none(worst),
            mean_abs=_finite_or_none(total / n),
            rmse=_finite_or_none(math.sqrt(squares / n) if math.isfinite(squares) else math.nan),
            max_rel=_finite_or_none(worst_rel) if any_nonzero else None,
            allclose=close,
            rtol=rtol,
            atol=atol,
        )

    @classmethod
    def missing(cls, a: str, b: str, dtype: str, reason: str) -> Divergence:
        rtol, atol = TOLERANCES[dtype]
        return cls(a, b, None, None, None, None, None, rtol, atol, reason)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["reason"] is None:
            del d["reason"]
        return d
