"""Words for the numbers: what each framework did on the measured pass, and the verdict."""

from __future__ import annotations

from bnexplore.engines import LABELS
from bnexplore.explain import uses_batch_statistics
from bnexplore.metrics import Divergence
from bnexplore.params import knobs
from bnexplore.runner import Comparison
from bnexplore.scenario import Scenario


def _statistics_words(scenario: Scenario, engine: str) -> str:
    """What normalized the measured pass, in the engine's own words."""
    if uses_batch_statistics(scenario, engine):
        return "the batch statistics"
    return "its running statistics" if knobs(engine) == "torch" else "its moving averages"


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
    if uses_batch_statistics(s, d.a) != uses_batch_statistics(s, d.b):
        how_a, how_b = _statistics_words(s, d.a), _statistics_words(s, d.b)
        why = f"{a} normalized with {how_a}, {b} with {how_b}"
    else:
        why = f"{a} and {b} {VERDICT_WORDS[verdict(d)]}"
    return f"{size}: {why}{_training_words(d)}"


def _training_words(d: Divergence) -> str:
    """With a loss: which of γ, β and the gradients part beyond the dtype's tolerance."""
    if not d.grad:
        return ""
    checked = {"γ": d.state.get("gamma"), "β": d.state.get("beta"), "dL/dx": d.grad["x"]}
    parted = [what for what, gap in checked.items() if gap is not None and not gap.allclose]
    if not parted:
        return "; γ, β and dL/dx agree to rounding"
    return f"; {', '.join(parted)} differ beyond rounding"
