"""Words for the numbers: what each framework did on the measured pass, and the verdict."""

from __future__ import annotations

from bnexplore.engines import LABELS
from bnexplore.metrics import Divergence
from bnexplore.runner import Comparison
from bnexplore.scenario import Scenario


def normalized_with(scenario: Scenario, engine: str) -> str:
    """Which statistics normalized the measured pass: "batch" or "running"."""
    if engine == "torch":
        batch = scenario["torch_mode"] == "train" or not scenario["torch_track_running_stats"]
    else:
        batch = scenario["keras_training"] == "true" and scenario["keras_trainable"]
    return "batch" if batch else "running"


_STATS_WORDS = {
    ("torch", "batch"): "the batch statistics",
    ("torch", "running"): "its running statistics",
    ("keras", "batch"): "the batch statistics",
    ("keras", "running"): "its moving averages",
}


def verdict(d: Divergence) -> str:
    """agree | rounding | differ | not compared.

    agree: equal everywhere; rounding: within the dtype's assert_close
    tolerances; differ: beyond them.
    """
    if d.reason:
        return "not compared"
    if d.max_abs == 0:
        return "agree"
    return "rounding" if d.allclose else "differ"


VERDICT_WORDS = {
    "agree": "agree exactly",
    "rounding": "differ only by rounding",
    "differ": "differ",
    "not compared": "cannot be compared",
}


def headline(comparison: Comparison) -> str:
    """One line that answers: how far apart, and the first reason why."""
    pairs = comparison.divergence
    if not pairs:
        return "Only one engine ran: nothing to compare."
    d = pairs[0]
    a, b = LABELS.get(d.a, d.a), LABELS.get(d.b, d.b)
    if d.reason:
        return f"{a} and {b} cannot be compared: {d.reason}."
    size = "max |Δ| = " + ("—" if d.max_abs is None else f"{d.max_abs:.4g}")
    s = comparison.scenario
    how = {e: normalized_with(s, e) for e in (d.a, d.b)}
    if how[d.a] != how[d.b]:
        why = (
            f"{a} normalized with {_STATS_WORDS[d.a, how[d.a]]}, "
            f"{b} with {_STATS_WORDS[d.b, how[d.b]]}"
        )
    else:
        why = f"{a} and {b} {VERDICT_WORDS[verdict(d)]}"
    return f"{size}: {why}"
