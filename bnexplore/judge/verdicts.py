"""Words for the numbers: each pair's verdict on its output and its state, and the headline.

A pair has gaps: its outputs, its state after the measured pass (running mean, running
variance, γ, β) and, with a loss, dL/dx. Each gap's verdict is

- agree: equal everywhere;
- rounding: within the dtype's assert_close tolerances (|Δ| ≤ atol + rtol·|expected|);
- differ: beyond them;
- not compared: a side has no such array.

The state's verdict is the worst of its statistics'. The headline is about the first
pair whose output or state differs (else the first pair): its output gap when the
outputs differ, else its largest state gap by max_rel, else that the engines agree.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from bnexplore.engines import LABELS
from bnexplore.runs.metrics import Divergence
from bnexplore.scenario.conventions import uses_batch_statistics
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import knobs

if TYPE_CHECKING:
    from bnexplore.runs.runner import Comparison

STATE = ("running_mean", "running_var", "gamma", "beta")
GAPS = ("output", *STATE, "grad_x")
"""What a pair can differ in, in the order the page explains them."""
GAP_NAMES = {
    "output": "output",
    "running_mean": "running mean",
    "running_var": "running variance",
    "gamma": "γ",
    "beta": "β",
    "grad_x": "dL/dx",
}
VERDICTS = ("agree", "rounding", "differ", "not compared")
VERDICT_WORDS = {
    "agree": "agree exactly",
    "rounding": "differ only by rounding",
    "differ": "differ",
    "not compared": "cannot be compared",
}


def part(d: Divergence | dict, of: str) -> Divergence | dict | None:
    """One gap of a pair: the output's, a state statistic's or dL/dx's (None: not
    measured). ``d`` is a measured Divergence, or a pair as the document writes it."""
    field = d.get if isinstance(d, dict) else lambda name: getattr(d, name)
    if of == "output":
        return None if field("reason") else d
    if of == "grad_x":
        return (field("grad") or {}).get("x")
    return (field("state") or {}).get(of)


def verdict(d: Divergence | dict | None) -> str:
    """agree | rounding | differ | not compared, for one gap (measured, or as a document
    writes it)."""
    if isinstance(d, dict):
        d = None if d.get("reason") else Divergence.from_dict(d)
    if d is None or d.reason:
        return "not compared"
    if d.max_abs == 0:
        return "agree"
    return "rounding" if d.allclose else "differ"


def state_verdict(d: Divergence) -> str:
    """The worst verdict over the state's statistics ("not compared" if none is measured)."""
    measured = [verdict(part(d, of)) for of in STATE if part(d, of) is not None]
    rank = {"agree": 0, "rounding": 1, "differ": 2}
    return max(measured, key=rank.__getitem__) if measured else "not compared"


def verdicts(d: Divergence) -> dict[str, str]:
    """The pair's ``{"output": V, "state": V}``."""
    return {"output": verdict(part(d, "output")), "state": state_verdict(d)}


def real_gaps(d: Divergence) -> list[str]:
    """The pair's gaps beyond the dtype's tolerance, in GAPS order."""
    return [of for of in GAPS if verdict(part(d, of)) == "differ"]


def headline_pair(pairs: list[Divergence]) -> int | None:
    """The index of the pair the headline is about: the first whose output or state
    differs, else the first (None without pairs)."""
    for i, d in enumerate(pairs):
        if "differ" in verdicts(d).values():
            return i
    return 0 if pairs else None


def headline_gap(d: Divergence) -> str | None:
    """What the headline names: the output when it differs, else the state statistic
    with the largest max_rel among those that differ, else None (the pair agrees)."""
    if verdict(part(d, "output")) == "differ":
        return "output"
    parted = [of for of in STATE if verdict(part(d, of)) == "differ"]
    if not parted:
        return None
    return max(parted, key=lambda of: _rel(part(d, of)))


def _rel(d: Divergence) -> float:
    return float("inf") if d.max_rel is None else d.max_rel


def _statistics_words(scenario: Scenario, engine: str) -> str:
    """What normalized the measured pass, in the engine's own words."""
    if uses_batch_statistics(scenario, engine):
        return "the batch statistics"
    return "its running statistics" if knobs(engine) == "torch" else "its moving averages"


def percent(share: float) -> str:
    """A share for people: never "0%" for a share that is not zero, never "100%" for one
    that is less (0.9996 reads 99.9%)."""
    if share >= 1 or share == 0:
        return f"{share:.0%}"
    if share >= 0.995:
        return f"{math.floor(share * 1000) / 10:.1f}%"
    if share >= 0.01:
        return f"{share:.0%}"
    return f"{share:.1%}" if share >= 0.001 else "<0.1%"


def headline(comparison: Comparison) -> tuple[str, dict | None]:
    """One line that answers: how far apart, and the first reason why; and what it is
    about (``{"a", "b", "of"}``, ``of`` None where the pair agrees)."""
    pairs = comparison.divergence
    refusals = {r.reason for r in comparison.results.values() if not r.available}
    if len(refusals) == 1 and not any(r.available for r in comparison.results.values()):
        (why,) = refusals  # one refusal for every engine: the memory guard, a bad file
        if why:
            return f"Nothing ran: {why[0].upper()}{why[1:]}.", None
    index = headline_pair(pairs)
    if index is None:
        return "Only one engine ran: nothing to compare.", None
    d = pairs[index]
    a, b = LABELS.get(d.a, d.a), LABELS.get(d.b, d.b)
    if d.reason:
        return f"{a} and {b} cannot be compared: {d.reason}.", None
    of = headline_gap(d)
    about = {"a": d.a, "b": d.b, "of": of}
    size = "max |Δ| = " + ("—" if d.max_abs is None else f"{d.max_abs:.4g}")
    if d.nonfinite:
        size += f" ({d.nonfinite} values NaN or ±inf)"
    s = comparison.scenario
    output = verdict(d)
    if of == "output":
        if uses_batch_statistics(s, d.a) != uses_batch_statistics(s, d.b):
            how_a, how_b = _statistics_words(s, d.a), _statistics_words(s, d.b)
            why = f"{a} normalized with {how_a}, {b} with {how_b}"
        else:
            why = f"{a} and {b} differ"
        return f"{size}: {why}{_training_words(d)}", about
    if of is not None:
        words = _state_words(comparison, d, of)
        return f"{size}: the outputs {VERDICT_WORDS[output]}, but {words}", about
    state = state_verdict(d)
    also = {
        "agree": "; so do their running statistics, γ and β",
        "rounding": "; their running statistics, γ and β agree to rounding",
        "not compared": "",
    }[state]
    return f"{size}: {a} and {b} {VERDICT_WORDS[output]}{also}{_training_words(d)}", about


def _state_words(comparison: Comparison, d: Divergence, of: str) -> str:
    """The state gap by name, with its worst channel's values on each side."""
    gap = part(d, of)
    name = GAP_NAMES[of]
    where = ""
    sides = [getattr(comparison.results[e], of) for e in (d.a, d.b)]
    if all(side is not None for side in sides):
        x, y = (np.asarray(side, dtype=np.float64).reshape(-1) for side in sides)
        with np.errstate(all="ignore"):
            scale = np.maximum(np.maximum(np.abs(x), np.abs(y)), np.finfo(np.float64).tiny)
            rel = np.abs(x - y) / scale
        c = int(np.nanargmax(rel)) if np.isfinite(rel).any() else 0
        a, b = LABELS.get(d.a, d.a), LABELS.get(d.b, d.b)
        where = f" (channel {c}: {x[c]:.6g} in {a}, {y[c]:.6g} in {b})"
    size = "" if gap.max_rel is None else f" by up to {100 * gap.max_rel:.2g} %"
    return f"the {name} differs{size}{where}"


def _training_words(d: Divergence) -> str:
    """With a loss: which of γ, β and the gradients part beyond the dtype's tolerance."""
    if not d.grad:
        return ""
    checked = {
        "γ": part(d, "gamma"),
        "β": part(d, "beta"),
        "dL/dx": part(d, "grad_x"),
        "dL/dγ": (d.grad or {}).get("gamma"),
        "dL/dβ": (d.grad or {}).get("beta"),
    }
    parted = [what for what, gap in checked.items() if verdict(gap) == "differ"]
    if not parted:
        return "; γ, β and the gradients agree to rounding"
    return f"; {', '.join(parted)} {'differs' if len(parted) == 1 else 'differ'} beyond rounding"
