"""Run a scenario in every engine and compare: the document behind app, CLI and API."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnexplore.engines import ENGINES, LABELS, EngineResult, run_engine
from bnexplore.engines.reference import REFERENCES
from bnexplore.metrics import Divergence, OutputStats
from bnexplore.scenario import Scenario, parse_link


@dataclass(frozen=True)
class Comparison:
    """One scenario's results in memory: arrays for charts, the document for JSON."""

    scenario: Scenario
    notices: tuple[str, ...]
    results: dict[str, EngineResult]
    references: dict[str, EngineResult] = field(default_factory=dict)

    @property
    def divergence(self) -> list[Divergence]:
        """Each pair of engines, in ENGINES order (the first is the expected side)."""
        return [
            self._diverge(self.results[a], self.results[b])
            for a, b in itertools.combinations(self.results, 2)
        ]

    def reference_gap(self, name: str) -> Divergence | None:
        """An engine against the float64 computation of its own framework's rules."""
        if name not in self.references:
            return None
        return self._diverge(self.references[name], self.results[name])

    def _diverge(self, a: EngineResult, b: EngineResult) -> Divergence:
        dtype = self.scenario["dtype"]
        for r in (a, b):
            if r.output is None:
                why = r.reason if not r.available else f"raised: {r.error}"
                return Divergence.missing(a.name, b.name, dtype, f"{r.name} has no output ({why})")
        return Divergence.between(a.name, b.name, a.output, b.output, dtype)

    def document(self) -> dict:
        """The strict-JSON document of ``bnexplore.run``."""
        doc = {
            "link": self.scenario.link,
            "scenario": self.scenario.to_dict(),
            "notices": list(self.notices),
            "engines": {name: engine_document(r) for name, r in self.results.items()},
            "divergence": [d.to_dict() for d in self.divergence],
        }
        if self.references:
            doc["reference"] = {
                name: {**engine_document(ref), "vs_engine": _to_dict(self.reference_gap(name))}
                for name, ref in self.references.items()
            }
        return strict_json(doc)


def _to_dict(d: Divergence | None) -> dict | None:
    return None if d is None else d.to_dict()


def engine_document(r: EngineResult) -> dict:
    """One engine's entry: E in the README's document format."""
    if not r.available:
        return {"available": False, "reason": r.reason, "version": r.version}
    return {
        "available": True,
        "version": r.version,
        "device": r.device,
        "device_note": r.device_note,
        "error": r.error,
        "output": None if r.output is None else OutputStats.of(r.output).to_dict(),
        "running_mean": _floats(r.running_mean),
        "running_var": _floats(r.running_var),
    }


def _floats(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else [float(v) for v in np.asarray(a, dtype=np.float64)]


def strict_json(value):
    """Replace NaN and ±inf anywhere in nested lists/dicts with None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


Report = Callable[[float, str], None]
"""Called with (fraction done, what is running) while a comparison runs."""


def compare(
    scenario: Scenario,
    notices: Sequence[str] = (),
    engines: Sequence[str] = tuple(ENGINES),
    reference: bool = True,
    report: Report | None = None,
) -> Comparison:
    """Run ``scenario`` for real in each engine, and its reference if asked."""
    results = {}
    for i, name in enumerate(engines):

        def progress(done: int, total: int, i: int = i, name: str = name) -> None:
            if report:
                report((i + done / total) / len(engines), f"{LABELS[name]}: pass {done} of {total}")

        results[name] = run_engine(name, scenario, progress)
    references = {}
    if reference:
        references = {
            name: REFERENCES[name].run(scenario)
            for name in engines
            if results[name].available and name in REFERENCES
        }
    return Comparison(scenario, tuple(notices), results, references)


def run(link: str = "", engines: Sequence[str] = tuple(ENGINES), reference: bool = True) -> dict:
    """Run the scenario a link describes and return the document (strict JSON).

    ``link`` is a full URL of the app or only its query string (``?a=1&b=2``).
    """
    scenario, notices = parse_link(link)
    return compare(scenario, notices, engines, reference).document()
