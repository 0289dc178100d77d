"""The document: a comparison as strict JSON, made once, at the edge.

The run layer measures (:class:`bnexplore.runs.runner.Comparison`); this module reads its
typed results with the verdicts and the headline (:mod:`bnexplore.judge.verdicts`) and writes
the document of ``bnexplore.run``, the CLI's ``--json`` and the page's download.
"""

from __future__ import annotations

import numpy as np

from bnexplore.engines import EngineResult
from bnexplore.judge import verdicts as story
from bnexplore.runs.metrics import Divergence
from bnexplore.runs.runner import Comparison, array_key, strict_json
from bnexplore.scenario.links import Scenario


def headline_pair(comparison: Comparison) -> Divergence | None:
    """The pair the headline is about (see story.headline_pair)."""
    index = story.headline_pair(comparison.divergence)
    return None if index is None else comparison.divergence[index]


def document(comparison: Comparison) -> dict:
    """The strict-JSON document of ``bnexplore.run``."""
    headline, about = story.headline(comparison)
    scenario, summaries = comparison.scenario, comparison.summaries
    doc = {
        "link": scenario.link,
        "scenario": scenario.to_dict(),
        "notices": list(comparison.notices),
        "headline": headline,
        "headline_about": about,
        "engines": {
            name: engine_document(r, summaries, scenario) for name, r in comparison.results.items()
        },
        "divergence": [
            {**d.to_dict(), "verdict": story.verdicts(d)} for d in comparison.divergence
        ],
    }
    if comparison.references:
        doc["reference"] = {
            name: {
                **engine_document(ref, summaries, scenario),
                "unpredictable": ref.unpredictable,
                "vs_engine": _to_dict(comparison.reference_gap(name)),
            }
            for name, ref in comparison.references.items()
        }
    return strict_json(doc)


def _to_dict(d: Divergence | None) -> dict | None:
    return None if d is None else d.to_dict()


def engine_document(r: EngineResult, summaries: dict[str, dict], scenario: Scenario) -> dict:
    """One engine's entry: E in the README's document format (summaries: by array key)."""
    if not r.available:
        return {"available": False, "reason": r.reason, "version": r.version}
    grad = None
    if scenario["loss"] != "none" and r.output is not None:
        x = summaries.get(array_key(r.name, "grad_x"))
        grad = {
            "x": x and {k: x[k] for k in ("mean", "std", "min", "max")},
            "gamma": _floats(r.grad_gamma),
            "beta": _floats(r.grad_beta),
        }
    return {
        "available": True,
        "version": r.version,
        "device": r.device,
        "device_note": r.device_note,
        "detail": r.detail,
        "error": r.error,
        "output": summaries.get(r.name),
        "running_mean": _floats(r.running_mean),
        "running_var": _floats(r.running_var),
        "gamma": _floats(r.gamma),
        "beta": _floats(r.beta),
        "loss": r.loss,
        "grad": grad,
    }


def _floats(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else [float(v) for v in np.asarray(a, dtype=np.float64)]
