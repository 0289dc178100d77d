"""Sweeps: one parameter over a range, the scenario run for real at each point.

The sweep is part of the link (``sweep``, ``sweep_from``, ``sweep_to``,
``sweep_points``, ``sweep_scale``). Each point is the scenario with one value
changed, validated through the link codec like any link, run in every engine,
and reduced to each pair's gap. Values: ``points`` evenly spaced from ``from``
to ``to`` on a linear scale, or evenly in log10 on a log scale (both ends > 0);
integer parameters are rounded and repeats dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnexplore.runs.runner import Report, Reuse, compare, strict_json
from bnexplore.scenario.links import Scenario, format_value, scenario_from_values
from bnexplore.scenario.params import BY_KEY, DEFAULTS, SWEEP_KEYS, SWEEPABLE

SWEEP_RANGES: dict[str, tuple[float, float, str]] = {
    "batch_size": (1, 64, "linear"),
    "steps": (0, 100, "linear"),
    "torch_eps": (1e-7, 1e-1, "log"),
    "keras_eps": (1e-7, 1e-1, "log"),
    "keras2_eps": (1e-7, 1e-1, "log"),
    "torch_momentum": (0.01, 1.0, "linear"),
    "keras_momentum": (0.5, 0.999, "linear"),
    "keras2_momentum": (0.5, 0.999, "linear"),
    "mean": (0.0, 1000.0, "linear"),
    "std": (1e-3, 10.0, "log"),
}
"""A sensible range to start from when a parameter is picked for sweeping."""


def start_range(key: str) -> tuple[float, float, str]:
    """(from, to, scale) to offer first for a parameter."""
    if key in SWEEP_RANGES:
        return SWEEP_RANGES[key]
    param = BY_KEY[key]
    low = param.low if param.low is not None else 0.0
    high = param.high if param.high is not None else low + 1.0
    return low, high, "linear"


def values(scenario: Scenario) -> list[float]:
    """The sweep's values, from the scenario's sweep_* settings."""
    key = scenario["sweep"]
    start, stop, points = scenario["sweep_from"], scenario["sweep_to"], scenario["sweep_points"]
    if scenario["sweep_scale"] == "log" and start > 0 and stop > 0:
        grid = np.logspace(math.log10(start), math.log10(stop), points)
    else:
        grid = np.linspace(start, stop, points)
    if key == "batch_size" or BY_KEY[key].kind == "int":
        return list(dict.fromkeys(round(float(v)) for v in grid))
    return [float(v) for v in grid]


def at(scenario: Scenario, key: str, value: float) -> tuple[Scenario, list[str]]:
    """The scenario with one parameter set, through the codec (clamped, or refused)."""
    base = dict(scenario.values)
    if key == "batch_size":
        base["shape"] = (int(value), *scenario.shape[1:])
    else:
        base[key] = value
    for sweep_key in SWEEP_KEYS:
        base[sweep_key] = DEFAULTS[sweep_key]
    return scenario_from_values(base)


@dataclass(frozen=True)
class SweepPoint:
    value: float
    link: str
    divergence: list[dict]
    notices: list[str]

    def to_dict(self) -> dict:
        return {
            "value": self.value,
            "link": self.link,
            "divergence": self.divergence,
            "notices": self.notices,
        }


def run_sweep(
    scenario: Scenario, key: str, points: Sequence[float], report: Report | None = None
) -> list[SweepPoint]:
    """Run the scenario at each value of ``key``; each pair's gap per point. An engine
    whose result the swept key cannot change (another framework's knob) runs once."""
    results, reuse = [], Reuse()
    for i, value in enumerate(points):
        if report:
            shown = format_value(BY_KEY[key], value) if key in BY_KEY else str(value)
            report(i / len(points), f"Sweep point {i + 1} of {len(points)}: {key} = {shown}")
        point, notices = at(scenario, key, value)
        comparison = compare(point, reference=False, reuse=reuse, summaries=False)
        results.append(
            SweepPoint(
                value=value,
                link=point.link,
                divergence=[d.to_dict() for d in comparison.divergence],
                notices=notices,
            )
        )
    if report:
        report(1.0, f"Sweep done: {len(points)} points")
    return results


def sweep_document(scenario: Scenario, key: str, points: list[SweepPoint]) -> dict:
    """The sweep as strict JSON: the base link, the parameter and each point."""
    return strict_json(
        {"link": scenario.link, "param": key, "points": [p.to_dict() for p in points]}
    )


def sweep_link(
    link: str,
    param: str | None = None,
    points: Sequence[float] | None = None,
    report: Report | None = None,
) -> dict:
    """The sweep a link describes (or ``param`` over ``points``), as its JSON document."""
    from bnexplore.scenario.links import parse_link

    scenario, _ = parse_link(link)
    key = param or scenario["sweep"]
    if key not in SWEEPABLE:
        raise ValueError(f"sweep: {key!r} is not one of {', '.join(SWEEPABLE)}")
    chosen = list(points) if points is not None else values(scenario.replace(sweep=key))
    return sweep_document(scenario, key, run_sweep(scenario, key, chosen, report))
