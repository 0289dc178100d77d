"""What the page draws for one scenario, and a small thread-safe cache of it by link.

The app computes a view once per canonical link; a revisited link answers from
the cache without running the frameworks again. Views are small: the document,
the words and the binned chart data, never whole tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import pandas as pd

from bnexplore import charts, sweep
from bnexplore.explain import explain, summary
from bnexplore.runner import Comparison, Report, compare, strict_json
from bnexplore.scenario import Scenario
from bnexplore.story import headline, verdict


@dataclass(frozen=True)
class View:
    document: dict
    """bnexplore.run's document, with "explain"."""
    headline: str
    verdicts: tuple[str, ...]
    explain_summary: str | None
    histogram: pd.DataFrame
    channel_outputs: pd.DataFrame
    running: pd.DataFrame
    history: pd.DataFrame
    step_gaps: pd.DataFrame
    heatmap: pd.DataFrame
    explain: pd.DataFrame
    grad_histogram: pd.DataFrame
    parameters: pd.DataFrame
    parameter_history: pd.DataFrame


@dataclass(frozen=True)
class SweepView:
    key: str
    log_x: bool
    document: dict
    table: pd.DataFrame


def build_view(comparison: Comparison, report: Report | None = None) -> View:
    pairs = comparison.divergence
    if report:
        report(0.95, "Explaining the gap: Shapley values over the knobs that differ")
    steps = explain(comparison.scenario, pairs[0] if pairs else None)
    document = comparison.document()
    document["explain"] = strict_json([step.to_dict() for step in steps])
    return View(
        document=document,
        headline=headline(comparison),
        verdicts=tuple(verdict(d) for d in pairs),
        explain_summary=summary(steps),
        histogram=charts.output_histogram(comparison),
        channel_outputs=charts.channel_output_stats(comparison),
        running=charts.running_statistics(comparison),
        history=charts.running_history(comparison),
        step_gaps=charts.step_gaps(comparison),
        heatmap=charts.gap_heatmap(comparison),
        explain=charts.explain_steps(steps),
        grad_histogram=charts.output_histogram(comparison, quantity="grad_x"),
        parameters=charts.parameters(comparison),
        parameter_history=charts.parameter_history(comparison),
    )


class ViewCache:
    """Views (and sweeps) by link, least recently used dropped first; safe across threads.

    Two sessions asking for the same new link at once both compute it; the
    frameworks' results are deterministic, so either answer is the answer.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self._views: OrderedDict[str, View | SweepView] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, link: str) -> View | SweepView | None:
        with self._lock:
            view = self._views.get(link)
            if view is not None:
                self._views.move_to_end(link)
            return view

    def put(self, link: str, view: View | SweepView) -> None:
        with self._lock:
            self._views[link] = view
            self._views.move_to_end(link)
            while len(self._views) > self.max_entries:
                self._views.popitem(last=False)

    def view(
        self,
        scenario: Scenario,
        report: Report | None = None,
    ) -> View:
        """The view of a scenario: from the cache, or run for real and kept."""
        cached = self.get(scenario.run_link)
        if cached is not None:
            return cached
        scaled = (lambda done, text: report(0.9 * done, text)) if report else None
        view = build_view(compare(scenario, report=scaled), report)
        self.put(scenario.run_link, view)
        return view

    def sweep(self, scenario: Scenario, report: Report | None = None) -> SweepView:
        """The scenario's sweep (its sweep_* settings): from the cache, or run and kept."""
        key = "sweep:" + scenario.link
        cached = self.get(key)
        if cached is not None:
            return cached
        param = scenario["sweep"]
        points = sweep.run_sweep(scenario, param, sweep.values(scenario), report)
        view = SweepView(
            key=param,
            log_x=scenario["sweep_scale"] == "log",
            document=sweep.sweep_document(scenario, param, points),
            table=charts.sweep_table(points, param),
        )
        self.put(key, view)
        return view
