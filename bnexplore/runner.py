"""Run a scenario in every engine and compare: the document behind app, CLI and API."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnexplore.engines import LABELS, EngineResult, State, run_engine
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
        "detail": r.detail,
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


def port_source(scenario: Scenario, results: dict[str, EngineResult]) -> EngineResult | None:
    """PyTorch's run whose trained state Keras 3 starts from, when keras_init asks."""
    if "keras" not in scenario["engines"] or scenario["keras_init"] == "fresh":
        return None
    return results.get("torch") or run_engine("torch", scenario)


def ported_state(scenario: Scenario, source: EngineResult) -> State | None:
    """The state handed to Keras 3: PyTorch's, or with mean and variance swapped."""
    state = source.trained_state
    if state is None or scenario["keras_init"] != "torch_swapped":
        return state
    return {**state, "running_mean": state["running_var"], "running_var": state["running_mean"]}


def compare(
    scenario: Scenario,
    notices: Sequence[str] = (),
    reference: bool = True,
    report: Report | None = None,
) -> Comparison:
    """Run ``scenario`` for real in each of its engines, and their references if asked."""
    engines = scenario["engines"]
    results: dict[str, EngineResult] = {}
    initial: dict[str, State | None] = {}
    for i, name in enumerate(engines):

        def progress(done: int, total: int, i: int = i, name: str = name) -> None:
            if report:
                report((i + done / total) / len(engines), f"{LABELS[name]}: pass {done} of {total}")

        if name == "keras" and (source := port_source(scenario, results)) is not None:
            initial[name] = ported_state(scenario, source)
            if initial[name] is None:
                results[name] = EngineResult(
                    name,
                    available=True,
                    error=f"keras_init={scenario['keras_init']}: PyTorch has no state to port "
                    f"({source.reason or source.error or 'no running statistics'})",
                )
                continue
        results[name] = run_engine(name, scenario, progress, initial.get(name))
    unported = {name for name, state in initial.items() if state is None}
    references = {}
    if reference:
        references = {
            name: REFERENCES[name].run(scenario, initial.get(name))
            for name in engines
            if results[name].available and name not in unported
        }
    return Comparison(scenario, tuple(notices), results, references)


def run(link: str = "", reference: bool = True, explain: bool = False) -> dict:
    """Run the scenario a link describes and return the document (strict JSON).

    ``link`` is a full URL of the app or only its query string (``?a=1&b=2``).
    With ``explain``, the document's "explain" lists the first pair's gap
    cause by cause (see bnexplore.explain), each step re-run for real.
    """
    scenario, notices = parse_link(link)
    comparison = compare(scenario, notices, reference)
    doc = comparison.document()
    if explain:
        from bnexplore.explain import explain as explain_steps

        pairs = comparison.divergence
        steps = explain_steps(scenario, pairs[0] if pairs else None)
        doc["explain"] = strict_json([step.to_dict() for step in steps])
    return doc
