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


@dataclass(frozen=True)
class OutputStats:
    """Mean, std (ddof=0), min and max over every element, in float64.

    None where undefined (a NaN in the output); ``nonfinite`` counts the NaN
    and ±inf elements.
    """

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nonfinite: int

    @classmethod
    def of(cls, output: np.ndarray) -> OutputStats:
        x = np.asarray(output, dtype=np.float64)
        with np.errstate(all="ignore"):
            return cls(
                mean=_finite_or_none(x.mean()),
                std=_finite_or_none(x.std()),
                min=_finite_or_none(x.min()),
                max=_finite_or_none(x.max()),
                nonfinite=int(x.size - np.count_nonzero(np.isfinite(x))),
            )

    def to_dict(self) -> dict:
        return asdict(self)


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
        rtol, atol = TOLERANCES[dtype]
        e = np.asarray(expected, dtype=np.float64)
        x = np.asarray(actual, dtype=np.float64)
        with np.errstate(all="ignore"):
            diff = np.abs(e - x)
            both_inf_equal = np.isinf(e) & (e == x)
            diff[both_inf_equal] = 0.0
            scale = np.maximum(np.abs(e), np.abs(x))
            nonzero = scale > 0
            max_rel = (diff[nonzero] / scale[nonzero]).max() if nonzero.any() else math.nan
            close = bool(np.all(diff <= atol + rtol * np.abs(e)))
            return cls(
                a=a,
                b=b,
                max_abs=_finite_or_none(diff.max()),
                mean_abs=_finite_or_none(diff.mean()),
                rmse=_finite_or_none(math.sqrt(np.square(diff).mean())),
                max_rel=_finite_or_none(max_rel),
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
