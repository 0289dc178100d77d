"""Is the port right? Each BatchNorm of a port matched to its source layer and checked.

Matching: by name after normalising ``.``, ``/`` and ``_`` (``layer1.0.bn1`` is
``layer1_0_bn1``), then by name without the prefix that every layer of a file shares (a
checkpoint's ``state_dict.``, ``model.module.``: ``model.module.bn1`` is ``bn1``); then,
among the layers left with the same channel count, the pair whose
statistics are closest (the distance is taken after undoing each classic mistake, so a
swapped layer still finds its source), the file order breaking ties.

The problems, each found by comparing the vectors within float32's tolerance
(torch.testing's rtol 1.3e-6, atol 1e-5):

- ``swapped_mean_var``: the port's mean is the source's variance and its variance the mean;
- ``swapped_gamma_beta``: likewise γ and β;
- ``std_for_var``: the port's variance is √(the source's variance);
- ``eps_differs``: epsilons differ after rounding both to float32 (ONNX stores 1e-5 as
  9.99999975e-06), where the port's format carries one;
- ``momentum_convention``: the port's momentum (Keras's convention, new = m·old +
  (1 − m)·batch) is the source's momentum in the other convention: m instead of 1 − m;
- ``momentum_differs``: any other momentum than the source's (a Keras port left at Keras's
  0.99 where PyTorch's 0.1 means 0.9). Momentum moves the running statistics only in
  training, so these two are TRAINING_ONLY: the port's output at inference is unchanged;
- ``channels_differ``, ``missing`` (no port layer), ``extra`` (no source layer);
- ``values_differ``: anything else beyond tolerance;
- ``ok``: none of these.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnexplore.files.formats import Layer
from bnexplore.judge.verdicts import verdict
from bnexplore.runs.metrics import TOLERANCES, Divergence

RTOL, ATOL = TOLERANCES["float32"]
TRAINING_ONLY = frozenset({"momentum_convention", "momentum_differs"})
"""Problems that change nothing at inference: they show once the port trains."""
VECTORS = ("weight", "bias", "running_mean", "running_var")
WORDS = {
    "weight": "γ",
    "bias": "β",
    "running_mean": "the running mean",
    "running_var": "the running variance",
}


@dataclass(frozen=True)
class Finding:
    """One source layer (or one extra port layer) and what is wrong with its port."""

    layer: str | None
    port_layer: str | None
    matched_by: str | None
    problems: tuple[str, ...]
    evidence: str
    gap: Divergence | None = None

    def to_dict(self) -> dict:
        gap = None
        if self.gap is not None:
            gap = {**self.gap.to_dict(), "verdict": verdict(self.gap)}
        return {
            "layer": self.layer,
            "port_layer": self.port_layer,
            "matched_by": self.matched_by,
            "problems": list(self.problems),
            "evidence": self.evidence,
            "gap": gap,
        }


@dataclass(frozen=True)
class PortCheck:
    file: str
    format: str
    findings: tuple[Finding, ...]

    def wrong(self) -> tuple[int, int]:
        """Layers wrong at inference, and layers with a TRAINING_ONLY problem (a momentum
        that is not the source's, which shows once the port trains)."""
        bad = [set(f.problems) - {"ok"} for f in self.findings]
        return sum(bool(b - TRAINING_ONLY) for b in bad), sum(bool(b & TRAINING_ONLY) for b in bad)

    def tally(self) -> str:
        """The problems that show at inference, most frequent first, with their layer
        counts ("swapped_mean_var in 1, eps_differs in 3")."""
        counts = Counter(
            p for f in self.findings for p in f.problems if p != "ok" and p not in TRAINING_ONLY
        )
        return ", ".join(f"{p} in {n}" for p, n in counts.most_common())

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "format": self.format,
            "findings": [f.to_dict() for f in self.findings],
        }


def normalised(name: str) -> str:
    return re.sub(r"[./_]+", "_", name.strip("./_").lower())


def unwrapped(names: Sequence[str]) -> list[str]:
    """Each normalised name without the leading parts that every name shares (a wrapper's
    ``state_dict_``, ``model_module_``). What is left of every name keeps a word: ``bn_1``
    and ``layer_1`` stay themselves, since a bare index is no evidence of the same layer."""
    parts = [normalised(n).split("_") for n in names]

    def worded(rest: list[str]) -> bool:
        return any(c.isalpha() for part in rest for c in part)

    shared = 0
    while (
        parts
        and all(len(p) > shared + 1 and worded(p[shared + 1 :]) for p in parts)
        and len({p[shared] for p in parts}) == 1
    ):
        shared += 1
    return ["_".join(p[shared:]) for p in parts]


def _complete(layer: Layer) -> bool:
    """Has the layer all four vectors (a layer with a problem such as a negative variance
    still has them, and is checked like any other)?"""
    return all(k in layer.state for k in VECTORS) and layer.channels > 0


def _vectors(layer: Layer) -> dict[str, np.ndarray]:
    return {k: np.asarray(layer.state[k], dtype=np.float64) for k in VECTORS}


def close(expected: np.ndarray, actual: np.ndarray) -> bool:
    return expected.shape == actual.shape and bool(
        np.allclose(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=False)
    )


def _undone(p: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The port's vectors as they are, and with each classic mistake undone."""
    mean, var, w, b = p["running_mean"], p["running_var"], p["weight"], p["bias"]
    return [
        p,
        {**p, "running_mean": var, "running_var": mean},
        {**p, "weight": b, "bias": w},
        {**p, "running_var": np.square(var)},
    ]


def distance(source: Layer, port: Layer) -> float:
    """How far two layers' statistics are: the smallest, over the port as it is and with
    each classic mistake undone, mean over the four vectors of ‖s − p‖ / (‖s‖ + 1)."""
    s = _vectors(source)
    best = np.inf
    for p in _undone(_vectors(port)):
        d = np.mean([np.linalg.norm(s[k] - p[k]) / (np.linalg.norm(s[k]) + 1.0) for k in VECTORS])
        best = min(best, float(d))
    return best


def match(
    sources: Sequence[Layer], ports: Sequence[Layer]
) -> list[tuple[Layer | None, Layer | None, str | None]]:
    """(source, port, matched_by) for every source layer in order, then each extra port
    layer as (None, port, None)."""
    paired: dict[int, tuple[int, str]] = {}
    used: set[int] = set()
    source_names = [[normalised(s.name) for s in sources], unwrapped([s.name for s in sources])]
    port_names = [[normalised(p.name) for p in ports], unwrapped([p.name for p in ports])]
    for sources_named, ports_named in zip(source_names, port_names, strict=True):
        by_name: dict[str, int] = {}
        for j, name in enumerate(ports_named):
            if j not in used:
                by_name.setdefault(name, j)
        for i, name in enumerate(sources_named):
            j = by_name.get(name)
            if i not in paired and j is not None and j not in used:
                paired[i] = (j, "name")
                used.add(j)
    candidates = []
    for i, s in enumerate(sources):
        if i in paired or not _complete(s):
            continue
        for j, p in enumerate(ports):
            if j not in used and _complete(p) and p.channels == s.channels:
                candidates.append((distance(s, p), i, j))
    for _, i, j in sorted(candidates):
        if i not in paired and j not in used:
            paired[i] = (j, "statistics")
            used.add(j)
    found: list[tuple[Layer | None, Layer | None, str | None]] = []
    for i, s in enumerate(sources):
        if i in paired:
            j, how = paired[i]
            found.append((s, ports[j], how))
        else:
            found.append((s, None, None))
    found += [(None, p, None) for j, p in enumerate(ports) if j not in used]
    return found


def _f32(x: float) -> np.float32:
    return np.float32(x)


def problems(
    source: Layer,
    port: Layer,
    eps: float,
    momentum_keras: float | None,
) -> tuple[tuple[str, ...], str]:
    """The port's problems and their evidence in words. ``eps``: the source's epsilon;
    ``momentum_keras``: the source's momentum in Keras's convention (None: unknown)."""
    if source.channels != port.channels:
        return ("channels_differ",), (
            f"{source.channels} channels in the source, {port.channels} in the port"
        )
    if not (_complete(source) and _complete(port)):
        unread = port if not _complete(port) else source
        return ("values_differ",), f"{unread.label} could not be read whole: {unread.problem}"
    s, p = _vectors(source), _vectors(port)
    found, words = [], []
    ok = {k: close(s[k], p[k]) for k in VECTORS}
    if not (ok["running_mean"] and ok["running_var"]):
        if close(s["running_mean"], p["running_var"]) and close(
            s["running_var"], p["running_mean"]
        ):
            found.append("swapped_mean_var")
            words.append("its running mean is the source's variance, its variance the mean")
        elif ok["running_mean"] and close(
            np.sqrt(np.maximum(s["running_var"], 0)), p["running_var"]
        ):
            found.append("std_for_var")
            words.append("its running variance is the square root of the source's")
        else:
            bad = [k for k in ("running_mean", "running_var") if not ok[k]]
            found.append("values_differ")
            words.append(_differ_words(s, p, bad))
    if not (ok["weight"] and ok["bias"]):
        if close(s["weight"], p["bias"]) and close(s["bias"], p["weight"]):
            found.append("swapped_gamma_beta")
            words.append("its γ is the source's β and its β the source's γ")
        else:
            if "values_differ" not in found:
                found.append("values_differ")
            words.append(_differ_words(s, p, [k for k in ("weight", "bias") if not ok[k]]))
    if port.eps is not None and _f32(port.eps) != _f32(eps):
        found.append("eps_differs")
        words.append(f"epsilon {port.eps:.6g} where the source's is {eps:.6g}")
    if port.momentum is not None and momentum_keras is not None:
        mine, theirs = _f32(port.momentum), _f32(momentum_keras)
        if mine != theirs:
            if mine == _f32(1.0 - momentum_keras):
                found.append("momentum_convention")
                words.append(
                    f"momentum {port.momentum:.6g} in Keras's convention, where the source's "
                    f"is {momentum_keras:.6g} (PyTorch's {1 - momentum_keras:.6g} written "
                    "as Keras's)"
                )
            else:
                found.append("momentum_differs")
                words.append(
                    f"momentum {port.momentum:.6g} where the source's is {momentum_keras:.6g} "
                    "(Keras's convention; a momentum moves the running statistics only while "
                    "the layer trains)"
                )
    if not found:
        return ("ok",), "γ, β and the running statistics agree within float32's tolerance"
    return tuple(found), "; ".join(words)


def _differ_words(s: dict, p: dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        if s[k].shape != p[k].shape:
            parts.append(f"{WORDS[k]} has shape {p[k].shape}, the source's {s[k].shape}")
        else:
            parts.append(f"{WORDS[k]} differs by up to {float(np.max(np.abs(s[k] - p[k]))):.3g}")
    return "; ".join(parts)
