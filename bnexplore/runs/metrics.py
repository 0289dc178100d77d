"""Divergence between two outputs, and summary statistics of one.

All figures are computed in float64. Sums of squares are ``np.einsum("i,i->", x, x)``, NumPy's
own loop on one thread, not ``np.dot``: OpenBLAS's dot splits a long vector over its threads,
so its last bits depend on the machine's thread count, and on a busy 2-core server its threads
waited on each other (measuring the seed took 35–184 ms there instead of 34–54 ms). Tolerances are
``torch.testing.assert_close``'s defaults for the dtype; two outputs are
*close* when, elementwise, |actual − expected| ≤ atol + rtol·|expected| with
the expected side being PyTorch's (NaN is never close; equal infinities are).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
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
            squares += float(np.einsum("i,i->", part, part))
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
    diff: np.ndarray,
    worst: float,
    abs_expected: np.ndarray,
    rtol: float,
    atol: float,
    scratch: _Scratch | None = None,
) -> bool:
    """|actual − expected| ≤ atol + rtol·|expected| everywhere (NaN never is); worst = max diff.
    The bound is computed in float64 whatever the dtype of ``abs_expected`` (in the
    figure's ``scratch`` where given)."""
    if worst <= atol:  # within atol alone: no need to look element by element
        return True
    if not math.isfinite(worst) or worst > atol + rtol * float(abs_expected.max()):
        return False
    out = None if scratch is None else scratch.get("bound", np.dtype(np.float64), diff.size)
    bound = np.multiply(abs_expected, rtol, dtype=np.float64, out=out)
    bound += atol
    return bool(np.all(diff <= bound))


CHUNK = 1 << 17
"""Elements widened to float64 at a time: a chunk stays in cache, no whole-array copies."""


class _Scratch:
    """A figure's working arrays, one per role, made at its first chunk and written again for
    every chunk after it (``out=``): the same operations, so the same bits, without a
    fresh megabyte per chunk. glibc hands a freed buffer of that size back to the system
    where its thresholds are its defaults (as in a process that only imports bnexplore),
    and each fresh one then faults its pages in afresh: a large tensor's gap took 0.45 s
    instead of 0.12 s that way."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, role: str, dtype: np.dtype, size: int) -> np.ndarray:
        array = self._arrays.get(role)
        if array is None or array.dtype != dtype or array.size < size:
            array = self._arrays[role] = np.empty(size, dtype)  # the first chunk is the largest
        return array[:size]


class _Summary:
    """output_summary's accumulation, fed float64 chunks (bit for bit the same figures)."""

    def __init__(self, flat: np.ndarray) -> None:
        self.flat = flat
        first = float(flat[0])
        self.shift = first if math.isfinite(first) else 0.0
        self.total = self.squares = 0.0
        self.scratch = _Scratch()

    def add(self, part: np.ndarray) -> None:
        """A chunk of the array, in its own dtype: shifted in float64."""
        shifted = self.scratch.get("shifted", np.dtype(np.float64), part.size)
        np.subtract(part, self.shift, dtype=np.float64, out=shifted)
        self.total += float(shifted.sum())
        self.squares += float(np.einsum("i,i->", shifted, shifted))

    def result(self) -> dict:
        flat, n = self.flat, self.flat.size
        total, squares = self.total, self.squares
        low, high = float(flat.min()), float(flat.max())
        nonfinite = (
            0 if math.isfinite(total + squares) else int(n - np.count_nonzero(np.isfinite(flat)))
        )
        mean = self.shift + total / n
        variance = max(squares - total * total / n, 0.0) / n
        return {
            "mean": _finite_or_none(mean),
            "std": _finite_or_none(math.sqrt(variance)) if math.isfinite(variance) else None,
            "min": _finite_or_none(low),
            "max": _finite_or_none(high),
            "nonfinite": nonfinite,
        }


_NATIVE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _tiny(dtype: np.dtype) -> np.floating:
    if dtype == np.float64:
        return np.finfo(np.float64).tiny
    return np.finfo(dtype).smallest_subnormal


class _Gap:
    """Divergence figures accumulated over chunks of (expected, actual), in float64."""

    def __init__(self, size: int, rtol: float, atol: float) -> None:
        self.size, self.rtol, self.atol = size, rtol, atol
        self.worst = self.worst_rel = np.float64(-np.inf)  # numpy maxima: a NaN propagates
        self.total = self.squares = 0.0
        self.close, self.any_nonzero = True, False
        self.nonfinite = 0
        self.scratch = _Scratch()

    def add(self, e: np.ndarray, x: np.ndarray) -> None:
        """A chunk of each array, in their own dtypes. The differences are taken in float64;
        |e| and max(|e|, |x|) stay in the arrays' dtype where both share one (exact, half
        the memory traffic of float32 widened), and widen where they meet float64. Other
        dtypes (bfloat16, from ml_dtypes) are widened first."""
        if not (e.dtype in _NATIVE and x.dtype in _NATIVE):
            e, x = e.astype(np.float64), x.astype(np.float64)
        scratch, size = self.scratch, e.size
        diff = scratch.get("diff", np.dtype(np.float64), size)
        np.subtract(e, x, dtype=np.float64, out=diff)
        np.abs(diff, out=diff)
        part_sum = float(diff.sum())
        if not math.isfinite(part_sum):
            self.nonfinite += int(np.count_nonzero(~(np.isfinite(e) & np.isfinite(x))))
            diff[np.isinf(e) & (e == x)] = 0.0  # equal infinities are equal
            part_sum = float(diff.sum())
        part_max = diff.max()
        self.worst = np.maximum(self.worst, part_max)
        self.total += part_sum
        self.squares += float(np.einsum("i,i->", diff, diff))
        abs_e = np.abs(e, out=scratch.get("abs_e", e.dtype, size))
        self.close = self.close and _within(
            diff, float(part_max), abs_e, self.rtol, self.atol, scratch
        )
        # max(|e|, |x|) in the dtype the two promote to, as np.maximum would make it
        scale = np.abs(x, out=scratch.get("scale", np.result_type(e.dtype, x.dtype), size))
        np.maximum(abs_e, scale, out=scale)
        if self.any_nonzero or scale.max() > 0 or np.isnan(scale).any():
            self.any_nonzero = True
            # where both are zero, diff is 0 too: 0/tiny keeps that element's ratio at 0.
            # Below float64, every positive value is above float64's tiny, so the dtype's
            # smallest positive value does the same; float64 keeps its tiny
            np.maximum(scale, _tiny(scale.dtype), out=scale)
            self.worst_rel = np.maximum(self.worst_rel, np.divide(diff, scale, out=diff).max())

    def result(self, a: str, b: str) -> Divergence:
        n = self.size
        squares = self.squares
        return Divergence(
            a=a,
            b=b,
            max_abs=_finite_or_none(self.worst),
            mean_abs=_finite_or_none(self.total / n),
            rmse=_finite_or_none(math.sqrt(squares / n) if math.isfinite(squares) else math.nan),
            max_rel=_finite_or_none(self.worst_rel) if self.any_nonzero else None,
            allclose=self.close,
            rtol=self.rtol,
            atol=self.atol,
            nonfinite=self.nonfinite,
        )


PARALLEL_ABOVE = 1 << 20
"""Elements in all (summed over the figures' arrays) above which the figures are measured
on several threads; below, one thread is quicker."""
THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads that measure at once: the machine's cores, at most four."""
_THREADS = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="bnexplore measure")


def measure(
    outputs: dict[str, np.ndarray], pairs: list[tuple[str, str]], dtype: str
) -> tuple[dict[str, dict], list[Divergence]]:
    """Every array's summary and every pair's divergence; the first of a pair is the
    expected side. Arrays may differ in size (outputs and gradients w.r.t. x beside
    per-channel parameters); the two of a pair may not.

    Each figure goes over its arrays a chunk at a time, in order, each chunk widened to
    float64 for it. The figures are independent of each other, so they are shared out over
    a few threads (NumPy lets go of the GIL inside its loops): every figure still adds up
    the same chunks in the same order, so its bits do not depend on the threads.
    """
    figures = Figures(dtype)
    for name, output in outputs.items():
        figures.add(name, output)
    measured = figures.results([*outputs, *pairs])
    summaries = dict(zip(outputs, measured[: len(outputs)], strict=True))
    gaps = [gap.renamed(*pair) for pair, gap in zip(pairs, measured[len(outputs) :], strict=True)]
    return summaries, gaps


def _flat(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1)


def _summary_of(flat: np.ndarray) -> dict:
    """One array's summary, a chunk at a time (output_summary's figures, bit for bit)."""
    summary = _Summary(flat)
    with np.errstate(all="ignore"):
        for start in range(0, flat.size, CHUNK):
            summary.add(flat[start : start + CHUNK])
        return summary.result()


def _gap_of(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> Divergence:
    """One pair's divergence (a expected), a chunk at a time; named "a" and "b"."""
    gap = _Gap(a.size, rtol, atol)
    with np.errstate(all="ignore"):
        for start in range(0, a.size, CHUNK):
            stop = start + CHUNK
            gap.add(a[start:stop], b[start:stop])
        return gap.result("a", "b")


class Figures:
    """The summaries and gaps of named arrays, each measured once: started as soon as its
    arrays are here (``start``, on the measuring threads, while a run still waits on its
    other engines), or measured when first read.

    The same per-figure loops as ``measure``: a figure's bits do not depend on when, or on
    which thread, it was measured.
    """

    def __init__(self, dtype: str) -> None:
        self.rtol, self.atol = TOLERANCES[dtype]
        self._flats: dict[str, np.ndarray] = {}
        self._started: dict[object, Future] = {}
        self._lock = threading.Lock()

    def add(self, name: str, array: np.ndarray) -> None:
        """An array arrived (the first one given under a name is kept)."""
        with self._lock:
            self._flats.setdefault(name, _flat(array))

    def __contains__(self, name: str) -> bool:
        return name in self._flats

    def start(self, figures: list[str | tuple[str, str]]) -> None:
        """Begin measuring large figures on the threads (an array's name: its summary; a
        pair of names: their gap); small ones are measured when read."""
        with self._lock:
            for figure in figures:
                if figure not in self._started and self._cost(figure) > PARALLEL_ABOVE // 4:
                    self._started[figure] = _THREADS.submit(self._measure, figure)

    def summaries(self, names: list[str]) -> dict[str, dict]:
        return dict(zip(names, self.results(names), strict=True))

    def gaps(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], Divergence]:
        return {
            pair: gap.renamed(*pair) for pair, gap in zip(pairs, self.results(pairs), strict=True)
        }

    def results(self, figures: list) -> list:
        """Each figure's summary (an array's name) or gap (a pair), in order: those begun
        are waited for; the rest are measured now, shared out over the threads in lanes of
        about equal cost where they add up to more than PARALLEL_ABOVE elements (a gap
        costs about twice a summary: two arrays widened, a dozen passes over each chunk)."""
        with self._lock:
            started = {f: self._started[f] for f in figures if f in self._started}
        missing = list(dict.fromkeys(f for f in figures if f not in started))
        lanes = _share_out([(self._cost(f), f) for f in missing], THREADS)
        measured: dict = {}

        def run(lane: list) -> None:
            for figure in lane:
                measured[figure] = self._measure(figure)

        if len(lanes) > 1 and sum(self._cost(f) for f in missing) > PARALLEL_ABOVE:
            list(_THREADS.map(run, lanes))
        else:
            run(missing)
        return [started[f].result() if f in started else measured[f] for f in figures]

    def _cost(self, figure: str | tuple[str, str]) -> int:
        if isinstance(figure, tuple):
            return 2 * self._flats[figure[0]].size
        return self._flats[figure].size

    def _measure(self, figure: str | tuple[str, str]):
        if isinstance(figure, tuple):
            a, b = self._flats[figure[0]], self._flats[figure[1]]
            return _gap_of(a, b, self.rtol, self.atol)
        return _summary_of(self._flats[figure])


def _share_out(figures: list[tuple[int, object]], count: int) -> list[list]:
    """The figures in ``count`` lanes of about equal cost (the costliest first, each to the
    lane with the least so far); empty lanes left out."""
    lanes: list[tuple[int, list]] = [(0, []) for _ in range(max(count, 1))]
    for cost, figure in sorted(figures, key=lambda f: -f[0]):
        lightest = min(range(len(lanes)), key=lambda i: lanes[i][0])
        total, lane = lanes[lightest]
        lane.append(figure)
        lanes[lightest] = (total + cost, lane)
    return [lane for _, lane in lanes if lane]


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
    nonfinite: int = 0
    """Elements where either output is NaN or ±inf: counted, never dropped."""
    grad: dict[str, Divergence | None] | None = None
    """With a loss: the same figures for dL/dx, dL/dγ and dL/dβ of the measured pass
    ("x", "gamma", "beta"; None where a side computes no such gradient)."""
    state: dict[str, Divergence | None] | None = None
    """The layers' γ and β after the training steps and the running statistics after the
    measured pass ("gamma", "beta", "running_mean", "running_var"; None where a side has none)."""

    @classmethod
    def between(
        cls, a: str, b: str, expected: np.ndarray, actual: np.ndarray, dtype: str
    ) -> Divergence:
        """Elementwise in float64, a chunk at a time (no whole-array copies)."""
        return measure({"expected": expected, "actual": actual}, [("expected", "actual")], dtype)[
            1
        ][0].renamed(a, b)

    def renamed(self, a: str, b: str) -> Divergence:
        return dataclasses.replace(self, a=a, b=b)

    @classmethod
    def missing(cls, a: str, b: str, dtype: str, reason: str) -> Divergence:
        rtol, atol = TOLERANCES[dtype]
        return cls(a, b, None, None, None, None, None, rtol, atol, reason)

    @classmethod
    def from_dict(cls, d: dict) -> Divergence:
        """A gap's figures back from a document (its nested gaps left out)."""
        fields = ("max_abs", "mean_abs", "rmse", "max_rel", "allclose", "rtol", "atol")
        return cls(d.get("a", ""), d.get("b", ""), *(d[f] for f in fields), d.get("reason"))

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["reason"] is None:
            del d["reason"]
        for part in ("grad", "state"):
            if d[part] is not None:
                d[part] = {k: v and _without_names(v) for k, v in d[part].items()}
        return d


def _without_names(d: dict) -> dict:
    """A nested divergence: its pair is its parent's, so a and b are left out."""
    return {k: v for k, v in d.items() if k not in ("a", "b", "grad", "state", "reason")}
