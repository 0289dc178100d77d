"""Attribute each real gap between two engines to its causes: Shapley values over the knobs.

The pair explained is the one the headline is about (story.headline_pair). Its real
gaps are those beyond the dtype's tolerance (story.real_gaps): the output, the running
mean and variance, γ and β after the measured pass, and with a loss dL/dx. Each knob
that differs can be aligned (b follows a where b has the knob); every set S of aligned
knobs is run for real once (runs cached by link), and every gap is read off the same
runs. For a gap g with v_g(S) its max |Δ| with S aligned, a knob's Shapley value is its
marginal effect v_g(S) − v_g(S ∪ {knob}) averaged over every order of aligning the
knobs: order-independent, and the values add up to v_g(∅) − v_g(all). Exact up to 6
differing knobs (at most 64 runs); above that, estimated from 64 random orders drawn
with a fixed seed (the output says so).

A knob's share of g is its positive value over the sum of the positive values, times
the fraction f of g that aligning every knob closes: shares lie in [0, 1] and add up to
f ≤ 1; "what remains" is named with the rest. Where what remains is within the dtype's
tolerance it is rounding, not a gap: f = 1. A knob with a negative value widens g and
gets no share ("widens": by how much); one with a zero value is not a cause of g. A
gap within tolerance gets no causes at all.

A knob whose alignment changes only the kernel that computes a gap, not the rule
(Keras 2's fused path where its variance estimator cannot reach the gap; PyTorch's
device between CPU and CUDA; Flax's fast variance), is named "kernel path".

The frameworks' conventions the knobs select are in bnexplore.scenario.conventions.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from math import factorial
from typing import Any

import numpy as np
from cachetools import LRUCache

from bnexplore.engines import LABELS
from bnexplore.judge.verdicts import GAP_NAMES, part, percent, real_gaps, verdict
from bnexplore.runs.metrics import Divergence
from bnexplore.runs.runner import Reuse, compare
from bnexplore.scenario.conventions import (
    decay_coupling,
    exported_as_inference,
    fast_variance,
    feeds_unbiased_variance,
    new_batch_weight,
    trains_parameters,
    uses_batch_statistics,
)
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import knobs, resolved

Changes = dict[str, Any]


EXACT_UP_TO = 6
"""Differing knobs up to which Shapley values are exact (2⁶ = 64 runs at most)."""
SAMPLED_ORDERS, SAMPLING_SEED = 64, 0
"""Above that: this many random orders of the knobs, from numpy.random.default_rng(0)."""


@dataclass(frozen=True)
class Step:
    """One cause and its part of one gap (``of``: "output", "running_mean",
    "running_var", "gamma", "beta" or "grad_x").

    For a knob: ``gap_before`` is the scenario's gap, ``gap_after`` the gap with this knob
    alone aligned (``link``), ``shapley`` its Shapley value (max |Δ| it closes, averaged
    over the orders of aligning), ``share`` its share of the gap, or ``widens`` (how much
    it widens the gap, averaged likewise) with no share. For "what remains":
    ``gap_before`` is the gap with every knob aligned (``link``), ``gap_after`` None, and
    ``share`` the rest of the gap (None: no share could be computed).
    """

    knob: str
    cause: str
    gap_before: float | None
    gap_after: float | None
    link: str
    shapley: float | None = None
    share: float | None = None
    widens: float | None = None
    method: str = ""
    of: str = "output"

    def to_dict(self) -> dict:
        return {
            "of": self.of,
            "knob": self.knob,
            "cause": self.cause,
            "gap_before": self.gap_before,
            "gap_after": self.gap_after,
            "link": self.link,
            "shapley": self.shapley,
            "share": self.share,
            "widens": self.widens,
            "method": self.method,
        }


def _mode_words(s: Scenario, engine: str) -> str:
    batch = uses_batch_statistics(s, engine)
    if knobs(engine) == "torch":
        if not s["torch_track_running_stats"]:
            return f"{s['torch_mode']} mode with no running statistics (batch statistics)"
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
    if any(exported_as_inference(s, e) for e in (a, b)):
        trained = s.replace(onnx_exporter="torchscript")
        if uses_batch_statistics(trained, a) == uses_batch_statistics(trained, b):
            return None  # the export's mode, not the module's: _align_export's
    words = f"{LABELS[a]} ran in {_mode_words(s, a)}, {LABELS[b]} in {_mode_words(s, b)}"
    if knobs(b) == "torch":
        if not want and not s["torch_track_running_stats"]:
            return None
        return words, {"torch_mode": "train" if want else "eval"}
    if knobs(b) == "flax":
        return words, {"flax_use_running_average": not want}
    if want and s[f"{knobs(b)}_training"] == "true":
        return None  # asked to train, infers only because frozen: the trainable knob's
    changes: Changes = {f"{knobs(b)}_training": "true" if want else "false"}
    if want and not s[f"{knobs(b)}_trainable"]:
        changes[f"{knobs(b)}_trainable"] = True
    return words, changes


def _align_export(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    """The onnx engine's default export of a train-mode module is an inference node; aligning
    the exporter's mode means a training export (the torchscript exporter)."""
    exported = [e for e in (a, b) if exported_as_inference(s, e)]
    if len(exported) != 1:
        return None
    engine = exported[0]
    other = b if engine == a else a
    if not uses_batch_statistics(s, other):
        return None
    return (
        f"exported as inference: torch.onnx.export(dynamo=True) emits an inference "
        f"BatchNormalization node (training_mode=0) from the train-mode module, so "
        f"{LABELS[engine]} normalizes with the running statistics, {LABELS[other]} with the "
        "batch's",
        {"onnx_exporter": "torchscript"},
    )


def _align_quantize(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    """LiteRT's float16 constants: rounding, aligned by converting without quantization."""
    if "litert" not in (a, b) or s["litert_quantize"] == "none":
        return None
    return (
        f"quantized to float16: {LABELS['litert']}'s converter stores the folded scale "
        "γ/√(moving_variance + ε) and offset β − moving_mean·scale as float16 constants "
        "(plus Dequantize)",
        {"litert_quantize": "none"},
    )


def _follow(
    a: str, b: str, knob: str, name: str, value_a: float, value_b: float
) -> tuple[str, Changes] | None:
    """b takes a's value of a knob both frameworks have, where the two differ."""
    if value_a == value_b:
        return None
    words = f"{name} {value_a:g} ({LABELS[a]}) vs {value_b:g} ({LABELS[b]})"
    return words, {f"{knobs(b)}_{knob}": value_a}


def _align_eps(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    return _follow(a, b, "eps", "eps", s[f"{knobs(a)}_eps"], s[f"{knobs(b)}_eps"])


def _align_momentum(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    if not (_has_running_statistics(s, a) and _has_running_statistics(s, b)):
        return None
    w_a, w_b = new_batch_weight(s, a), new_batch_weight(s, b)
    if w_a == w_b or (w_a is not None and w_b is not None and math.isclose(w_a, w_b)):
        return None
    if w_a is None and s["steps"] > 1:
        # PyTorch's cumulative average has no Keras equivalent: PyTorch follows b instead
        words = (
            f"averaging: {LABELS[a]} (momentum=None) keeps the cumulative average of the "
            f"batches, {LABELS[b]} a moving average in which a new batch weighs {_weight(w_b)}"
        )
        return words, {"torch_momentum": w_b}
    if w_a is None:  # cumulative average: a fixed momentum equals it for one step only
        w_a = 1.0
    words = (
        f"momentum: a new batch weighs {_weight(w_a)} in {LABELS[a]}'s running statistics, "
        f"{_weight(w_b)} in {LABELS[b]}'s"
    )
    value = w_a if knobs(b) == "torch" else round(1.0 - w_a, 12)
    return words, {f"{knobs(b)}_momentum": value}


def _has_running_statistics(s: Scenario, engine: str) -> bool:
    return knobs(engine) != "torch" or s["torch_track_running_stats"]


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


def _align_device(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    """A kernel path, not a rule: PyTorch on the CPU against PyTorch on CUDA."""
    if {a, b} != {"torch", "torch_gpu"} or s["device"] != "cpu":
        return None
    return (
        f"kernel path: {LABELS['torch']} ran on the CPU (device=cpu), {LABELS['torch_gpu']} "
        "on the GPU: the same rules, computed by different kernels",
        {"device": "cuda"},
    )


def _training(s: Scenario) -> bool:
    return s["loss"] != "none" and s["steps"] > 0


def _both_train(s: Scenario, a: str, b: str) -> bool:
    """Optimizer settings matter only where both sides' optimizers move γ/β."""
    return _training(s) and trains_parameters(s, a) and trains_parameters(s, b)


def _optimizer_words(s: Scenario, engine: str) -> str:
    return f"{LABELS[engine]} {s[f'{knobs(engine)}_optimizer']}"


def _align_optimizer(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    if not _both_train(s, a, b):
        return None
    kind_a, kind_b = s[f"{knobs(a)}_optimizer"], s[f"{knobs(b)}_optimizer"]
    if (kind_a == "sgd") == (kind_b == "sgd"):
        return None
    words = f"optimizer: {_optimizer_words(s, a)}, {_optimizer_words(s, b)}"
    return words, {f"{knobs(b)}_optimizer": kind_a}


def _align_lr(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    if not _both_train(s, a, b):
        return None
    lr_a, lr_b = resolved(s, knobs(a), "lr"), resolved(s, knobs(b), "lr")
    return _follow(a, b, "lr", "learning rate", lr_a, lr_b)


def _align_weight_decay(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    if not _both_train(s, a, b):
        return None
    wd_a, wd_b = resolved(s, knobs(a), "weight_decay"), resolved(s, knobs(b), "weight_decay")
    coupling_a, coupling_b = decay_coupling(s, a), decay_coupling(s, b)
    if wd_a == wd_b and (wd_a == 0 or coupling_a == coupling_b):
        return None
    words = (
        f"weight decay: {wd_a:g} {coupling_a} ({LABELS[a]}) vs {wd_b:g} {coupling_b} ({LABELS[b]})"
    )
    changes: Changes = {f"{knobs(b)}_weight_decay": wd_a}
    if coupling_a != coupling_b and wd_a:
        l2 = knobs(a) if coupling_a == "L2" else knobs(b)
        if s[f"{l2}_optimizer"] != "adam":  # PyTorch's (and optax's) SGD: no decoupled decay
            return None if wd_a == wd_b else (words, changes)
        changes[f"{l2}_optimizer"] = "adamw"
        changes[f"{l2}_weight_decay"] = wd_a  # explicit: AdamW's default differs
    return words, changes


def _align_adam_eps(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    kinds = (s[f"{knobs(a)}_optimizer"], s[f"{knobs(b)}_optimizer"])
    if not _both_train(s, a, b) or "sgd" in kinds:
        return None
    eps_a, eps_b = resolved(s, knobs(a), "adam_eps"), resolved(s, knobs(b), "adam_eps")
    return _follow(a, b, "adam_eps", "Adam ε", eps_a, eps_b)


def _align_sgd_momentum(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    kinds = {s[f"{knobs(a)}_optimizer"], s[f"{knobs(b)}_optimizer"]}
    if not _both_train(s, a, b) or kinds != {"sgd"}:
        return None
    m_a, m_b = s[f"{knobs(a)}_opt_momentum"], s[f"{knobs(b)}_opt_momentum"]
    return _follow(a, b, "opt_momentum", "SGD momentum", m_a, m_b)


def _align_requires_grad(s: Scenario, a: str, b: str) -> tuple[str, Changes] | None:
    """PyTorch's requires_grad_(False) freezes γ/β while the other side trains them."""
    if not _training(s) or "torch" not in (knobs(a), knobs(b)):
        return None
    torch_side, other = (a, b) if knobs(a) == "torch" else (b, a)
    if s["torch_requires_grad"] or not s["torch_affine"] or not trains_parameters(s, other):
        return None
    return (
        f"{LABELS[torch_side]} requires_grad_(False): no γ/β update, while "
        f"{LABELS[other]} trains them",
        {"torch_requires_grad": True},
    )


ALIGNMENTS: tuple[tuple[str, Callable[[Scenario, str, str], tuple[str, Changes] | None]], ...] = (
    ("mode", _align_mode),
    ("export", _align_export),
    ("eps", _align_eps),
    ("momentum", _align_momentum),
    ("variance estimator", _align_variance),
    ("trainable", _align_trainable),
    ("requires_grad", _align_requires_grad),
    ("port", _align_port),
    ("fast variance", _align_fast_variance),
    ("device", _align_device),
    ("quantize", _align_quantize),
    ("optimizer", _align_optimizer),
    ("learning rate", _align_lr),
    ("weight decay", _align_weight_decay),
    ("Adam ε", _align_adam_eps),
    ("SGD momentum", _align_sgd_momentum),
)
"""The knobs. A set of them is aligned in this order (a knob's alignment may depend on
an earlier one's), so every set of knobs is one scenario."""


class GapCache:
    """A pair's divergence by canonical link, each link run once (thread-safe, bounded)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._gaps: LRUCache[str, Divergence] = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()

    @property
    def max_entries(self) -> int:
        return int(self._gaps.maxsize)

    def gap(self, s: Scenario, pair: tuple[str, str], reuse: Reuse | None = None) -> Divergence:
        s = s.replace(engines=pair)
        with self._lock:
            known = self._gaps.get(s.run_link)
            if known is not None:
                return known
        measured = compare(s, reference=False, reuse=reuse, summaries=False).divergence[0]
        self.put(s, measured)
        return measured

    def put(self, s: Scenario, gap: Divergence) -> None:
        with self._lock:
            self._gaps[s.run_link] = gap


_ALL = frozenset(name for name, _ in ALIGNMENTS)

GAPS = GapCache()
"""Runs shared by every explanation in this process."""


def _with_aligned(
    scenario: Scenario, pair: tuple[str, str], names: frozenset[str]
) -> tuple[Scenario, list[str]]:
    """The scenario with the named knobs aligned (in ALIGNMENTS order), and their causes."""
    s, causes = scenario, []
    if len(pair) < 2:  # one engine: nothing to align it with
        return s, causes
    for name, align in ALIGNMENTS:
        if name not in names:
            continue
        step = align(s, *pair)
        if step:
            causes.append(step[0])
            s = s.replace(**step[1])
    return s, causes


def aligned(scenario: Scenario) -> tuple[Scenario, list[str]]:
    """The scenario with every alignable knob of its first pair aligned, and the causes."""
    pair = tuple(scenario["engines"][:2])
    if len(pair) < 2:
        return scenario, []
    return _with_aligned(scenario, pair, _ALL)


def shapley(
    knob_names: list[str], closed: Callable[[frozenset[str]], float]
) -> tuple[dict[str, float], str]:
    """Each knob's Shapley value of ``closed`` (the gap a set of aligned knobs closes),
    and how it was computed: exactly up to EXACT_UP_TO knobs, else from sampled orders.

    φ_k = Σ_S |S|!·(n − |S| − 1)!/n! · (closed(S ∪ {k}) − closed(S)), S over the sets
    without k: the marginal effect of k averaged over every order of aligning the knobs.
    """
    n = len(knob_names)
    phi = dict.fromkeys(knob_names, 0.0)
    if n <= EXACT_UP_TO:
        for knob in knob_names:
            others = [k for k in knob_names if k != knob]
            for size in range(n):
                weight = factorial(size) * factorial(n - size - 1) / factorial(n)
                for subset in itertools.combinations(others, size):
                    before = frozenset(subset)
                    phi[knob] += weight * (closed(before | {knob}) - closed(before))
        plural = "s" * (n != 1)
        return phi, f"exact Shapley values over {n} knob{plural} ({2**n} scenarios run for real)"
    rng = np.random.default_rng(SAMPLING_SEED)
    for _ in range(SAMPLED_ORDERS):
        coalition: frozenset[str] = frozenset()
        for index in rng.permutation(n):
            grown = coalition | {knob_names[index]}
            phi[knob_names[index]] += (closed(grown) - closed(coalition)) / SAMPLED_ORDERS
            coalition = grown
    return phi, (
        f"Shapley values estimated from {SAMPLED_ORDERS} random orders of the {n} knobs "
        f"(numpy.random.default_rng({SAMPLING_SEED})): more than {EXACT_UP_TO} knobs differ"
    )


class _NoOutput(ValueError):
    """An aligned scenario in which a gap could not be measured: no share to compute."""


def explain(
    scenario: Scenario, before: Divergence | None = None, reuse: Reuse | None = None
) -> list[Step]:
    """Each real gap of the pair, cause by cause: every differing knob's Shapley share,
    then what remains; all real runs.

    ``before`` is the pair's measured divergence (its a and b name the pair; it saves
    re-running the scenario); without it, the scenario's first two engines. The re-runs
    share ``reuse`` (a new one without it): aligning one framework's knob runs that
    framework alone again.
    """
    reuse = reuse or Reuse()
    if len(scenario["engines"]) < 2:
        return []
    pair = (before.a, before.b) if before is not None else tuple(scenario["engines"][:2])
    if before is not None:
        GAPS.put(scenario.replace(engines=pair), before)
    start = GAPS.gap(scenario, pair)
    gaps = real_gaps(start)
    if not gaps:
        return []
    differing = differing_knobs(scenario, pair)
    runs: dict[frozenset[str], Divergence] = {}

    def run(names: frozenset[str]) -> Divergence:
        if names not in runs:
            runs[names] = GAPS.gap(_with_aligned(scenario, pair, names)[0], pair, reuse)
        return runs[names]

    steps: list[Step] = []
    for of in gaps:
        steps += _attribute(scenario, pair, of, part(start, of), differing, run)
    return steps


def differing_knobs(scenario: Scenario, pair: tuple[str, str]) -> list[str]:
    """The knobs that differ, and those that come to differ once others are aligned
    (Keras trainable=True makes PyTorch's requires_grad_(False) matter), in ALIGNMENTS
    order. A knob that does not differ in some set of aligned knobs leaves it as it is."""
    names = {name for name, align in ALIGNMENTS if align(scenario, *pair)}
    while True:
        everything = _with_aligned(scenario, pair, frozenset(names))[0]
        more = {name for name, align in ALIGNMENTS if align(everything, *pair)} - names
        if not more:
            return [name for name, _ in ALIGNMENTS if name in names]
        names |= more


def _attribute(
    scenario: Scenario,
    pair: tuple[str, str],
    of: str,
    start: Divergence,
    differing: list[str],
    run: Callable[[frozenset[str]], Divergence],
) -> list[Step]:
    """One gap's causes (see the module's docstring), largest share first."""
    gap = start.max_abs
    everything = frozenset(differing)
    final = _with_aligned(scenario, pair, everything)[0]
    if gap is None:  # NaN or inf: max |Δ| cannot be split
        why = "not computed: max |Δ| is not finite, so it cannot be split"
        the = "the " if of in ("output", "running_mean", "running_var") else ""
        words = f"not finite: {start.nonfinite} values of {the}{GAP_NAMES[of]} are NaN or ±inf"
        return [Step("what remains", words, None, None, final.link, method=why, of=of)]

    def after(names: frozenset[str]) -> float:
        measured = part(run(names), of)
        if measured is None or measured.max_abs is None:
            raise _NoOutput
        return measured.max_abs

    def closed(names: frozenset[str]) -> float:
        return gap - after(names)

    phi: dict[str, float] = {}
    method = "nothing to align: no knob differs between the two engines"
    if differing:
        try:
            phi, method = shapley(differing, closed)
        except _NoOutput:
            phi, method = {}, "not computed: an aligned scenario has no such gap to measure"
    remaining = part(run(everything), of) if phi or not differing else None
    within = verdict(remaining) in ("agree", "rounding")
    # a knob that moves the gap by less than the dtype's atol moves it by rounding only
    phi = {name: (0.0 if abs(value) < start.atol else value) for name, value in phi.items()}
    positive = sum(v for v in phi.values() if v > 0)
    fraction = 0.0
    if positive > 0:
        fraction = 1.0 if within else min(1.0, max(0.0, closed(everything) / gap))
    steps = []
    for name in differing:
        value = phi.get(name)
        if value is None or value == 0:
            continue  # not computed, or moves this gap in no order of aligning (or by rounding)
        knob, words = _cause(scenario, pair, name, of, differing)
        share = value / positive * fraction if value > 0 else None
        widens = -value if value < 0 else None
        alone = frozenset({name})
        link = _with_aligned(scenario, pair, alone)[0].link
        step = Step(knob, words, gap, after(alone), link, value, share, widens, method, of)
        steps.append(step)
    _at_most(steps, fraction)
    steps.sort(key=lambda step: -(step.share or 0.0))
    if remaining is None or not within:
        rest = None
        if remaining is not None:
            rest = max(0.0, 1.0 - math.fsum(step.share or 0.0 for step in steps))
        left = None if remaining is None else remaining.max_abs
        words = _remaining(final, pair, of)
        steps.append(
            Step("what remains", words, left, None, final.link, None, rest, None, method, of)
        )
        _at_most(steps, 1.0)
    return steps


def _at_most(steps: list[Step], limit: float) -> None:
    """Shares that add up (exactly, math.fsum) to at most ``limit``: floating point may
    put a sum of normalized shares an ulp above it; the largest share gives it back."""
    if not any(step.share for step in steps):
        return
    top = max(range(len(steps)), key=lambda i: steps[i].share or 0.0)
    while (excess := math.fsum(step.share or 0.0 for step in steps) - limit) > 0:
        share = steps[top].share
        smaller = max(0.0, min(share - excess, math.nextafter(share, 0.0)))
        steps[top] = dataclasses.replace(steps[top], share=smaller)


def _cause(
    scenario: Scenario, pair: tuple[str, str], name: str, of: str, differing: list[str]
) -> tuple[str, str]:
    """The knob's name and words for this gap: a switch that also picks a kernel is named
    as the kernel path where its rule cannot reach the gap. ``differing``: the knobs being
    aligned (differing_knobs), among which those that make this one matter are named."""
    align = dict(ALIGNMENTS)[name]
    step = align(scenario, *pair)
    if step is None:  # it comes to differ once others are aligned: say which
        words = align(_with_aligned(scenario, pair, _ALL - {name})[0], *pair)[0]
        others = [other for other in differing if other != name]
        enablers = next(
            (
                list(subset)
                for size in (1, 2, 3)
                for subset in itertools.combinations(others, size)
                if align(_with_aligned(scenario, pair, frozenset(subset))[0], *pair)
            ),
            [],
        )
        once = " and ".join(enablers) if enablers else "the other knobs"
        verb = "is" if len(enablers) == 1 else "are"
        return name, f"{words} — this matters only once {once} {verb} aligned"
    words = step[0]
    if name == "variance estimator" and not _estimator_reaches(scenario, pair, of):
        side = LABELS["keras2"]
        fused = feeds_unbiased_variance(scenario, "keras2")
        return "kernel path", (
            f"kernel path: {side} ran its {'fused' if fused else 'non-fused'} kernel "
            f"(fused={scenario['keras2_fused']}); aligning it changes the kernel that computes "
            f"the {GAP_NAMES[of]}, not a rule: the variance estimator it also switches feeds "
            "only the running variance"
        )
    return name, words


def _estimator_reaches(s: Scenario, pair: tuple[str, str], of: str) -> bool:
    """Can the batch variance fed to the running variance move this gap?"""
    if of == "running_var":
        return True
    return of != "running_mean" and _running_statistics_matter(s, pair)


def _running_statistics_matter(s: Scenario, pair: tuple[str, str]) -> bool:
    """Does an engine normalize with running statistics that its own training steps fed?"""
    own = [e for e in pair if not (knobs(e) == "keras" and s["keras_init"] != "fresh")]
    return s["steps"] > 0 and any(not uses_batch_statistics(s, e) for e in own)


def _remaining(s: Scenario, pair: tuple[str, str], of: str = "output") -> str:
    """What no knob aligns, for this gap, in the frameworks' terms (every such difference
    that can reach the gap, else the frameworks' own arithmetic)."""
    a, b = pair
    reasons = []
    unbiased = [feeds_unbiased_variance(s, e) for e in pair]
    if unbiased[0] != unbiased[1] and _estimator_reaches(s, pair, of):
        reasons.append(
            f"the variance estimator — {LABELS[a]} feeds the {_bias(unbiased[0])} batch "
            f"variance into its running variance, {LABELS[b]} the {_bias(unbiased[1])}"
        )
    if fast_variance(s, a) != fast_variance(s, b) and of != "running_mean":
        fast, other = (a, b) if fast_variance(s, a) else (b, a)
        reasons.append(
            f"a kernel path — {LABELS[fast]} takes the batch variance as E[x²] − E[x]², "
            f"{LABELS[other]} in two passes"
        )
    narrowed = [e for e in pair if e in ("keras_jax", "keras_torch")]
    if s["dtype"] == "float64" and len(narrowed) == 1:
        reasons.append(
            f"precision — {LABELS[narrowed[0]]} computes a float64 layer in float32 (Keras's "
            "result_type('float64', 'float32') is float32 on JAX and PyTorch)"
        )
    if _both_train(s, a, b) and of not in ("running_mean", "running_var"):
        adam = [s[f"{knobs(e)}_optimizer"] != "sgd" for e in pair]
        conventions = {knobs(e) == "torch" for e in pair}
        if all(adam) and len(conventions) == 2:
            reasons.append(
                "where Adam adds ε — PyTorch to the bias-corrected √v̂, Keras to √v "
                "(ε̂ = ε·√(1 − β₂ᵗ) in PyTorch's terms)"
            )
        couplings = {decay_coupling(s, e) for e in pair}
        if len(couplings) == 2 and resolved(s, knobs(a), "weight_decay"):
            reasons.append(
                "weight decay — PyTorch's SGD adds it to the gradient (L2); Keras decays the "
                "weight itself"
            )
    if not reasons and "litert" in pair:
        reasons.append(
            f"a kernel path — {LABELS['litert']}'s converter folds the layer into a multiply "
            "and an add, its scale and offset computed at conversion in float32"
        )
    if not reasons and knobs(a) == knobs(b):
        reasons.append(
            f"a kernel path — the same rules, computed by {LABELS[a]}'s kernels and "
            f"{LABELS[b]}'s (rounding in a different order)"
        )
    if not reasons:
        reasons.append("the frameworks' own arithmetic (rounding, kernels)")
    return "what no knob aligns: " + "; ".join(reasons)


def summary(steps: list[Step], of: str | None = "output") -> str | None:
    """One sentence naming the cause with the largest share of the gap ``of``."""
    ranked = [step for step in steps if step.of == of and step.share]
    if not ranked:
        return None
    top = max(ranked, key=lambda step: step.share)
    gap = "gap" if of == "output" else f"{GAP_NAMES[of]} gap"
    return f"{percent(top.share)} of the {gap}: {top.cause}"
