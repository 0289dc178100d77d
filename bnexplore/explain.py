"""Attribute the gap between two engines to its causes, by aligning one knob at a time.

For the first pair (a, b) of a scenario, each cause that differs is aligned in
turn (b follows a where b has the knob), the pair is re-run for real, and the
remaining gap — max |Δ| of the measured outputs — is recorded. What is left
after every knob that can be aligned is named too (the variance estimator, or
rounding), so the steps add up to the whole gap.

Per engine, in the frameworks' own terms:

- normalizes with batch statistics: PyTorch in train mode (or without running
  statistics); Keras with training=True on a trainable layer.
- weight of a new batch in the running statistics: PyTorch m, Keras 1 − momentum.
- running variance fed with the unbiased var_b·n/(n − 1): PyTorch, and Keras 2
  on its fused path; biased var_b: Keras 3, Keras 2 non-fused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bnexplore.engines import LABELS
from bnexplore.engines.reference import FUSED_DTYPES
from bnexplore.metrics import Divergence
from bnexplore.params import knobs
from bnexplore.runner import compare
from bnexplore.scenario import Scenario

Changes = dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One cause: the gap before and after aligning it (None: no output to compare)."""

    knob: str
    cause: str
    gap_before: float | None
    gap_after: float | None
    link: str
    """The scenario after this step, as a link."""

    def to_dict(self) -> dict:
        return {
            "knob": self.knob,
            "cause": self.cause,
            "gap_before": self.gap_before,
            "gap_after": self.gap_after,
            "link": self.link,
        }


def uses_batch_statistics(s: Scenario, engine: str) -> bool:
    if knobs(engine) == "torch":
        return s["torch_mode"] == "train" or not s["torch_track_running_stats"]
    if knobs(engine) == "flax":
        return not s["flax_use_running_average"]
    return s[f"{knobs(engine)}_training"] == "true" and s[f"{knobs(engine)}_trainable"]


def new_batch_weight(s: Scenario, engine: str) -> float | None:
    """m in running ← (1 − m)·running + m·batch; None: PyTorch's cumulative average."""
    if knobs(engine) == "torch":
        return s["torch_momentum"]
    return 1.0 - s[f"{knobs(engine)}_momentum"]


def feeds_unbiased_variance(s: Scenario, engine: str) -> bool:
    if knobs(engine) == "torch":
        return True
    if knobs(engine) in ("keras", "flax"):
        return False
    fusable = len(s.shape) in (4, 5) and s["dtype"] in FUSED_DTYPES
    return s["keras2_fused"] != "false" and fusable


def fast_variance(s: Scenario, engine: str) -> bool:
    """Does the engine's kernel take the batch variance as E[x²] − E[x]²?"""
    if engine == "flax":
        return s["flax_use_fast_variance"]
    return engine == "keras_torch"


def _mode_words(s: Scenario, engine: str) -> str:
    batch = uses_batch_statistics(s, engine)
    if knobs(engine) == "torch":
        return "training mode" if batch else "eval mode"
    if knobs(engine) == "flax":
        return f"use_running_average={not batch}"
    if not batch and s[f"{knobs(engine)}_training"] == "true":
        return "inference (trainable=False)"
    return "training" if batch else "inference"


def _align_mode(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    want = uses_batch_statistics(s, a)
    if want == uses_batch_statistics(s, b):
        return None
    words = f"{LABELS[a]} ran in {_mode_words(s, a)}, {LABELS[b]} in {_mode_words(s, b)}"
    if knobs(b) == "torch":
        if not want and not s["torch_track_running_stats"]:
            return None
        return words, {"torch_mode": "train" if want else "eval"}
    if knobs(b) == "flax":
        return words, {"flax_use_running_average": not want}
    changes: Changes = {f"{knobs(b)}_training": "true" if want else "false"}
    if want and not s[f"{knobs(b)}_trainable"]:
        changes[f"{knobs(b)}_trainable"] = True
    return words, changes


def _align_eps(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    eps_a, eps_b = s[f"{knobs(a)}_eps"], s[f"{knobs(b)}_eps"]
    if eps_a == eps_b:
        return None
    return f"eps {eps_a:g} ({LABELS[a]}) vs {eps_b:g} ({LABELS[b]})", {f"{knobs(b)}_eps": eps_a}


def _align_momentum(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    w_a, w_b = new_batch_weight(s, a), new_batch_weight(s, b)
    if w_a == w_b or (w_a is not None and w_b is not None and math.isclose(w_a, w_b)):
        return None
    if w_a is None:  # cumulative average: a fixed momentum equals it for one step only
        if s["steps"] > 1:
            return None
        w_a = 1.0
    words = (
        f"momentum: a new batch weighs {_weight(w_a)} in {LABELS[a]}'s running statistics, "
        f"{_weight(w_b)} in {LABELS[b]}'s"
    )
    value = w_a if knobs(b) == "torch" else round(1.0 - w_a, 12)
    return words, {f"{knobs(b)}_momentum": value}


def _weight(w: float | None) -> str:
    return "1/steps (cumulative)" if w is None else f"{w:g}"


def _align_variance(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    unbiased = feeds_unbiased_variance(s, a)
    if unbiased == feeds_unbiased_variance(s, b):
        return None
    words = (
        f"variance estimator: {LABELS[a]} feeds the {_bias(unbiased)} batch variance into "
        f"its running variance, {LABELS[b]} the {_bias(not unbiased)}"
    )
    if b == "keras2":
        if unbiased and not feeds_unbiased_variance(s.replace(keras2_fused="true"), "keras2"):
            return None
        return words, {"keras2_fused": "true" if unbiased else "false"}
    if a == "keras2":
        return words, {"keras2_fused": "false" if unbiased else "true"}
    return None


def _bias(unbiased: bool) -> str:
    return "unbiased (n/(n − 1))" if unbiased else "biased"


def _align_trainable(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    keras_like = [e for e in (a, b) if knobs(e) in ("keras", "keras2")]
    frozen = [e for e in keras_like if not s[f"{knobs(e)}_trainable"]]
    if not frozen or (len(frozen) == 2):
        return None
    engine = frozen[0]
    return (
        f"{LABELS[engine]} trainable=False forces inference and freezes its moving statistics",
        {f"{knobs(engine)}_trainable": True},
    )


def _align_port(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    if "keras" not in (knobs(a), knobs(b)) or s["keras_init"] != "torch_swapped":
        return None
    return (
        "porting: Keras 3 got PyTorch's running mean as its moving variance and the running "
        "variance as its moving mean",
        {"keras_init": "torch"},
    )


def _align_fast_variance(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    """A kernel path, not a rule: Flax's use_fast_variance (Keras on PyTorch has no switch)."""
    if fast_variance(s, a) == fast_variance(s, b) or "flax" not in (a, b):
        return None
    fast, other = (a, b) if fast_variance(s, a) else (b, a)
    if fast != "flax":
        return None
    return (
        f"kernel path: {LABELS[fast]} takes the batch variance as E[x²] − E[x]² "
        f"(use_fast_variance), {LABELS[other]} in two passes",
        {"flax_use_fast_variance": False},
    )


ALIGNMENTS: tuple[tuple[str, Callable[[Scenario, str, str], tuple[str, Changes] | None]], ...] = (
    ("mode", _align_mode),
    ("eps", _align_eps),
    ("momentum", _align_momentum),
    ("variance estimator", _align_variance),
    ("trainable", _align_trainable),
    ("port", _align_port),
    ("fast variance", _align_fast_variance),
)
"""The knobs, in the order they are aligned."""


def _gap(s: Scenario, pair: tuple[str, str]) -> Divergence:
    return compare(s.replace(engines=pair), reference=False).divergence[0]


def aligned(scenario: Scenario) -> tuple[Scenario, list[str]]:
    """The scenario with every alignable knob of its first pair aligned, and the causes."""
    pair = tuple(scenario["engines"][:2])
    s, causes = scenario, []
    if len(pair) < 2:  # one engine: nothing to align it with
        return s, causes
    for _, align in ALIGNMENTS:
        step = align(s, *pair)
        if step:
            causes.append(step[0])
            s = s.replace(**step[1])
    return s, causes


def explain(scenario: Scenario, before: Divergence | None = None) -> list[Step]:
    """Steps from the scenario's gap to what no knob can align, each re-run for real."""
    if len(scenario["engines"]) < 2:
        return []
    pair = tuple(scenario["engines"][:2])
    gap = before or _gap(scenario, pair)
    s, steps = scenario, []
    for knob, align in ALIGNMENTS:
        step = align(s, *pair)
        if not step or gap.max_abs == 0:
            continue
        words, changes = step
        s = s.replace(**changes)
        after = _gap(s, pair)
        steps.append(Step(knob, words, gap.max_abs, after.max_abs, s.link))
        gap = after
    if gap.max_abs and not gap.allclose:
        steps.append(Step("what remains", _remaining(s, pair), gap.max_abs, None, s.link))
    return steps


def _running_statistics_matter(s: Scenario, pair: tuple[str, str]) -> bool:
    """Does an engine normalize with running statistics that its own training steps fed?"""
    own = [e for e in pair if not (knobs(e) == "keras" and s["keras_init"] != "fresh")]
    return s["steps"] > 0 and any(not uses_batch_statistics(s, e) for e in own)


def _remaining(s: Scenario, pair: tuple[str, str]) -> str:
    a, b = pair
    unbiased = [feeds_unbiased_variance(s, e) for e in pair]
    if unbiased[0] != unbiased[1] and _running_statistics_matter(s, pair):
        return (
            f"what no knob aligns: {LABELS[a]} feeds the "
            f"{_bias(feeds_unbiased_variance(s, a))} batch variance into its running variance, "
            f"{LABELS[b]} the {_bias(feeds_unbiased_variance(s, b))}"
        )
    return "what no knob aligns: the frameworks' own arithmetic (rounding, kernels)"


def summary(steps: list[Step]) -> str | None:
    """One sentence naming the largest cause and its share of the whole gap."""
    if not steps or not steps[0].gap_before:
        return None
    total = steps[0].gap_before

    def share(step: Step) -> float:
        after = 0.0 if step.gap_after is None else step.gap_after
        return (step.gap_before or 0.0) - after

    top = max(steps, key=share)
    return f"{share(top) / total:.0%} of the gap: {top.cause}"
