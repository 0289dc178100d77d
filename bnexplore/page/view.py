"""What the page draws for one scenario, and a small thread-safe cache of it by link.

The app computes a view once per canonical link; a revisited link answers from
the cache without running the frameworks again. Views are small: the typed figures
the page reads (each engine's summary, each pair's Divergence, explain's Steps), the
words, the binned chart data and the document for the download, never whole tensors.

A view holds the parts its tab draws, and no more (PARTS_OF_TAB): the headline,
the engines' figures, the per-channel state and the Overview's sampled output
distributions always; the output distributions,
the float64 references and explain's re-runs only where a tab shows them. A tab
that needs a part the cached view lacks runs the link again with both sets of parts.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import pandas as pd
from cachetools import LRUCache

from bnexplore.engines import LABELS, EngineResult
from bnexplore.files import store
from bnexplore.files.formats import Layer
from bnexplore.judge.document import document as make_document
from bnexplore.judge.document import headline_pair
from bnexplore.judge.explain import Step, differing_knobs, explain, summary
from bnexplore.judge.verdicts import headline_gap, verdicts
from bnexplore.page import charts
from bnexplore.runs import admission, memory, sweep
from bnexplore.runs import pool as workers
from bnexplore.runs.metrics import Divergence
from bnexplore.runs.runner import (
    Comparison,
    Report,
    Reuse,
    admitted_need,
    array_key,
    compare,
    strict_json,
)
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import knobs

log = logging.getLogger(__name__)


OUTPUTS, REFERENCES, EXPLAIN = "output distributions", "references", "explain"
PARTS = (OUTPUTS, REFERENCES, EXPLAIN)
"""What a view may leave out until a tab asks for it:

- output distributions: the histograms and per-channel figures of each engine's output
  and dL/dx, binned from the whole tensors;
- references: each engine's float64 reference run beside it, and its gap from it;
- explain: the headline pair's gaps cause by cause, 2^k scenarios re-run for real."""

PARTS_OF_TAB: dict[str, frozenset[str]] = {
    "overview": frozenset(),
    "outputs": frozenset({OUTPUTS}),
    "running": frozenset({REFERENCES}),
    "training": frozenset({OUTPUTS, REFERENCES}),
    "layer": frozenset(),
    "sweep": frozenset(),
    "explain": frozenset({REFERENCES, EXPLAIN}),
    "code": frozenset(),
    "model": frozenset(),
}
"""The parts each tab draws (by the link's ``tab`` slug); the rest stays off its path."""
EVERYTHING = frozenset(PARTS)
"""What the downloaded JSON document holds: the CLI's ``run --reference --explain``."""


def _finite(x: float | None) -> float | None:
    """A figure as the document writes it: None where it is NaN or ±inf (strict JSON)."""
    return None if x is None or not math.isfinite(x) else x


class Summary(NamedTuple):
    """An array's summary (metrics.output_summary), in float64; None where undefined."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nonfinite: int = 0


@dataclass(frozen=True)
class EngineFigures:
    """One engine as the page shows it, without its tensors: what ran, where, and the
    summaries of its output and (with a loss) of dL/dx."""

    name: str
    available: bool
    reason: str | None = None
    version: str | None = None
    device: str | None = None
    device_note: str | None = None
    detail: str | None = None
    error: str | None = None
    output: Summary | None = None
    loss: float | None = None
    """The measured pass's L (None with loss=none, or where it is not finite)."""
    grad_x: Summary | None = None
    """dL/dx's summary, with a loss and an output."""

    @classmethod
    def of(cls, r: EngineResult, summaries: dict[str, dict], scenario: Scenario) -> EngineFigures:
        """From a run's result and the comparison's summaries (as the document's entry)."""
        if not r.available:
            return cls(r.name, False, reason=r.reason, version=r.version)
        output = summaries.get(r.name)
        grad_x = None
        if scenario["loss"] != "none" and r.output is not None:
            grad_x = summaries.get(array_key(r.name, "grad_x"))
        return cls(
            r.name,
            True,
            version=r.version,
            device=r.device,
            device_note=r.device_note,
            detail=r.detail,
            error=r.error,
            output=output and Summary(**output),
            loss=_finite(r.loss),
            grad_x=grad_x and Summary(**grad_x),
        )


@dataclass(frozen=True)
class ReferenceFigures:
    """An engine's float64 reference: its gap from the engine, and what no formula predicts
    (EngineResult.unpredictable: parameter → the bound on how far rounding noise moves it)."""

    gap: Divergence
    unpredictable: dict[str, float | None]


@dataclass(frozen=True)
class View:
    document: dict
    """bnexplore.run's document, for the download: with "reference" and "explain" where
    ``parts`` has them (the page itself reads the typed fields)."""
    parts: frozenset[str]
    """Which of PARTS this view holds."""
    notices: tuple[str, ...]
    """The run's notices (the link's among them)."""
    engines: dict[str, EngineFigures]
    """Each engine's figures, in the scenario's order."""
    divergence: tuple[Divergence, ...]
    """Each pair of engines, in the scenario's order (Comparison.divergence)."""
    references: dict[str, ReferenceFigures]
    """Each engine's float64 reference (with REFERENCES), else empty."""
    about: Divergence | None
    """The pair the headline is about, where it can be compared (else None)."""
    steps: tuple[Step, ...]
    """Explain's steps for that pair (with EXPLAIN), figures as the document writes them."""
    headline: str
    verdict: dict[str, str]
    """The headline pair's {"output": V, "state": V} (story.verdicts)."""
    explain_summary: str | None
    """The headline gap's largest cause and its share (with EXPLAIN), else None."""
    differing: tuple[str, ...]
    """The knobs that differ between the headline pair (explain's names), run or not."""
    histogram: pd.DataFrame
    overview_histogram: pd.DataFrame
    """The Overview's: each engine's output binned from a sample of its values (cheap)."""
    channel_outputs: pd.DataFrame
    running: pd.DataFrame
    history: pd.DataFrame
    step_gaps: pd.DataFrame
    heatmap: pd.DataFrame
    explain: pd.DataFrame
    grad_histogram: pd.DataFrame
    parameters: pd.DataFrame
    parameter_history: pd.DataFrame
    predicted: frozenset[str] = frozenset()
    """Engines whose figures are a prediction (their worker was still importing): a first
    answer, never cached, replaced by the real run (ViewCache.view's ``preview``)."""
    specs: dict[str, dict] = field(default_factory=dict, compare=False, repr=False)
    """Vega-Lite specs of this view's charts, by name: each validated once, then reused by
    every rerun and every session (see chart_spec)."""


def chart_spec(
    memo: dict[str, dict],
    name: str,
    build: Callable[[], object],
    spec: Callable[[], dict] | None = None,
) -> dict:
    """The chart's Vega-Lite spec: built and validated by Altair the first time (or made by
    ``spec``, a faster way to the same), then from ``memo`` (Altair's JSON-schema
    validation costs more than drawing)."""
    made = memo.get(name)
    if made is None:
        made = memo[name] = spec() if spec else build().to_dict()
    return made


NO_DATA = pd.DataFrame()
"""A chart's data where the view leaves its part out (no tab of the view draws it)."""


@dataclass(frozen=True)
class SweepView:
    key: str
    log_x: bool
    document: dict
    table: pd.DataFrame
    specs: dict[str, dict] = field(default_factory=dict, compare=False, repr=False)


def build_view(
    comparison: Comparison, parts: frozenset[str] = EVERYTHING, report: Report | None = None
) -> View:
    """The view of a run (its references in it where ``parts`` has REFERENCES)."""
    pair = headline_pair(comparison)
    steps = []
    if EXPLAIN in parts:
        if report:
            report(0.95, "Explaining the gaps: Shapley values over the knobs that differ")
        reuse = Reuse()  # the run's own results start explain's re-runs
        for result in comparison.results.values():
            reuse.keep(comparison.scenario, result)
        steps = explain(comparison.scenario, pair, reuse)
    document = make_document(comparison)
    if EXPLAIN in parts:
        document["explain"] = strict_json([step.to_dict() for step in steps])
    about = None if pair is None or pair.reason else pair  # as the headline's about
    outputs = OUTPUTS in parts
    scenario, summaries = comparison.scenario, comparison.summaries
    references = {
        name: ReferenceFigures(
            gap=comparison.reference_gap(name),
            unpredictable={k: _finite(v) for k, v in (ref.unpredictable or {}).items()},
        )
        for name, ref in comparison.references.items()
    }
    headline = document["headline"]
    if comparison.predicted:
        verb = "import" if len(comparison.predicted) > 1 else "imports"
        headline = f"Prediction while {_names(comparison.predicted)} {verb}: {headline}"
    return View(
        document=document,
        parts=parts,
        notices=tuple(comparison.notices),
        engines={
            name: EngineFigures.of(r, summaries, scenario) for name, r in comparison.results.items()
        },
        divergence=tuple(comparison.divergence),
        references=references,
        about=about,
        steps=tuple(_written(step) for step in steps),
        headline=headline,
        predicted=comparison.predicted,
        verdict=verdicts(pair) if pair else {"output": "not compared", "state": "not compared"},
        explain_summary=summary(steps, about and headline_gap(about)),
        differing=tuple(differing_knobs(comparison.scenario, (pair.a, pair.b))) if pair else (),
        histogram=charts.output_histogram(comparison) if outputs else NO_DATA,
        overview_histogram=charts.output_histogram(comparison, sample=charts.OVERVIEW_SAMPLE),
        channel_outputs=charts.channel_output_stats(comparison) if outputs else NO_DATA,
        running=charts.running_statistics(comparison),
        history=charts.running_history(comparison),
        step_gaps=charts.step_gaps(comparison),
        heatmap=charts.gap_heatmap(comparison),
        explain=charts.explain_steps(steps),
        grad_histogram=(
            charts.output_histogram(comparison, quantity="grad_x") if outputs else NO_DATA
        ),
        parameters=charts.parameters(comparison),
        parameter_history=charts.parameter_history(comparison),
    )


def _names(engines) -> str:
    """Engines by label, in a stable order: "Keras 3 (TensorFlow) and PyTorch"."""
    labels = sorted(LABELS.get(e, e) for e in engines)
    return ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else labels[0]


def _written(step: Step) -> Step:
    """The step with its figures as the document writes them (None where not finite)."""
    figures = ("gap_before", "gap_after", "shapley", "share", "widens")
    return dataclasses.replace(step, **{f: _finite(getattr(step, f)) for f in figures})


@dataclass(frozen=True)
class LayerView:
    """The stored layer a scenario names, and what its chart draws."""

    layer: Layer
    eps: dict[str, float]
    """Engine label → its eps in this scenario."""
    statistics: pd.DataFrame


def layer_view(scenario: Scenario) -> LayerView | None:
    """The scenario's stored layer (state= and layer=), or None without a usable one."""
    if scenario["state"] is None:
        return None
    try:
        layer = store.find_layer(scenario["state"], scenario["layer"])
    except store.FileProblem:
        return None
    if not layer.state:
        return None
    eps = {LABELS[e]: scenario[f"{knobs(e)}_eps"] for e in scenario["engines"]}
    return LayerView(layer, eps, charts.layer_statistics(dict(layer.state), eps))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's mallopt parameter numbers for the trim and mmap thresholds."""
MMAP_ABOVE = 2 << 20
"""Bytes above which this process maps a buffer of its own: 2 MiB, over the 1 MiB float64
chunks that metrics.measure works in, which the heap then reuses. At 1 MiB each chunk was
mapped and faulted in afresh, and measuring the seed took 85 ms instead of 33 ms."""
TRIM_ABOVE = 8 << 20
"""Free bytes at the top of a heap above which glibc hands them back at once. A fixed mmap
threshold leaves glibc's trim threshold at its 128 KiB default (the adaptive one would
have raised it too): each freed 1 MiB chunk was then handed back and faulted in afresh
for the next, on every measuring thread's heap, and the figures of the seed with its
references took 80–150 ms instead of 33–40 ms. At 8 MiB the chunks stay; the server
trims its heaps after every run anyway (memory.release_freed_memory)."""


def hand_big_buffers_back() -> None:
    """Fix glibc's mmap threshold at MMAP_ABOVE in this process (the workers have their own,
    pool.MMAP_ABOVE): every big buffer is mapped on its own and returned to
    the system when freed, instead of staying on a heap that the adaptive threshold let it
    grow into. The trim threshold goes with it (TRIM_ABOVE)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE)


class Flight:
    """One computation of one link in a thread of its own, shared by every session that
    waits for it, cancelled when the last of them stops waiting."""

    def __init__(self, key: str, work: Callable[[Report, Callable[[View], None]], object]) -> None:
        self.key, self.waiters = key, 0
        self.context = admission.RunContext(on_wait=self._waiting)
        self.progress, self.status = 0.0, "Starting the engines…"
        self.prediction: View | None = None
        """A first answer while engines import (ViewCache.view), until the result comes."""
        self._done = threading.Event()
        self._result: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(work,), name=f"bnexplore {key}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _waiting(self, ahead: int, flying: int) -> None:
        self.status = admission.waiting_words(ahead, flying)

    def _report(self, done: float, text: str) -> None:
        self.progress, self.status = done, text

    def _predicted(self, view: View) -> None:
        log.info("predicted %s while %s import", self.key, ", ".join(sorted(view.predicted)))
        self.prediction = view

    def _run(self, work: Callable[[Report, Callable[[View], None]], object]) -> None:
        log.info("computing %s", self.key)
        began = time.monotonic()
        try:
            with admission.running(self.context):
                self._result = work(self._report, self._predicted)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            # without its frames: they hold the run's arrays in a cycle with this flight
            traceback.clear_frames(exc.__traceback__)
            self._error = exc
        finally:
            log.info("computed %s in %.2f s", self.key, time.monotonic() - began)
            self._done.set()
            if self._error is not None:
                # a run cut short (cancelled) leaves its arrays in reference cycles of
                # interrupted frames and generators: collect them before trimming the heap
                gc.collect()
            memory.release_freed_memory()

    @property
    def cancelled(self) -> bool:
        return self.context.ticket.cancelled

    def wait(
        self,
        report: Report | None,
        poll: float = 0.1,
        preview: Callable[[View], None] | None = None,
    ) -> object:
        """The result, reporting progress meanwhile, and handing ``preview`` the flight's
        prediction once, when there is one before the result; ``report`` may raise (the
        session stopped or reran) and the caller then leaves the flight."""
        shown = None
        while not self._done.wait(poll):
            if preview and self.prediction is not None and shown is None:
                shown = self.prediction
                preview(shown)
            if report:
                report(min(self.progress, 1.0), self.status)
        if self._error is not None:
            raise self._error
        return self._result


class ViewCache:
    """Views (and sweeps) by link, least recently used dropped first; safe across threads.

    A link not in the cache is computed once, in a flight that every session asking for
    it joins; when the last session leaves (it changed its scenario, reloaded, closed
    the tab), the flight is cancelled and its memory let go within a pass or two.
    """

    def __init__(self, max_entries: int = 32) -> None:
        hand_big_buffers_back()  # the server's share of "memory goes back"
        self._views: LRUCache[str, View | SweepView] = LRUCache(maxsize=max_entries)
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()

    @property
    def max_entries(self) -> int:
        return int(self._views.maxsize)

    def get(self, link: str) -> View | SweepView | None:
        with self._lock:
            return self._views.get(link)

    def put(self, link: str, view: View | SweepView) -> None:
        """Keep ``view``, unless the link's cached view already holds every part of it (a
        run with more parts finished first)."""
        with self._lock:
            kept = self._views.get(link)
            if not (isinstance(kept, View) and isinstance(view, View) and view.parts <= kept.parts):
                kept = view
            self._views[link] = kept

    def flights(self) -> int:
        """Computations under way (for tests and the operator)."""
        with self._lock:
            return len(self._flights)

    def _fly(
        self,
        key: str,
        work: Callable[[Report, Callable[[View], None]], object],
        report: Report | None,
        flight_key: str | None = None,
        enough: Callable[[object], bool] = lambda cached: True,
        preview: Callable[[View], None] | None = None,
    ):
        """The cached value of ``key`` where it is ``enough``, or the shared flight's
        (``flight_key``: the key and what it computes), waited for."""
        flight_key = flight_key or key
        with self._lock:
            cached = self._views.get(key)
            if cached is not None and enough(cached):
                return cached
            flight = self._flights.get(flight_key)
            if flight is None or flight.cancelled:
                flight = self._flights[flight_key] = Flight(flight_key, work)
                flight.start()
            flight.waiters += 1
        try:
            value = flight.wait(report, preview=preview)
        finally:
            with self._lock:
                flight.waiters -= 1
                if flight.waiters == 0 and self._flights.get(flight_key) is flight:
                    del self._flights[flight_key]
                    flight.context.ticket.cancel()  # nobody waits: it stops, or it was done
        self.put(key, value)
        return value

    def view(
        self,
        scenario: Scenario,
        report: Report | None = None,
        parts: frozenset[str] = EVERYTHING,
        preview: Callable[[View], None] | None = None,
    ) -> View:
        """The view of a scenario with at least ``parts``: from the cache, or run for real
        (once, with the cached view's parts too, so it replaces it) and kept.

        Where some of its engines' workers are still importing their framework, the run
        first makes a prediction: the ready engines run for real, the others' rules in
        float64 NumPy stand in (runner.Predicted). ``preview`` gets that view (labelled:
        View.predicted, and its headline says so) while the real run goes on; only the
        real view is returned and cached."""
        key = scenario.run_link
        cached = self.get(key)
        if isinstance(cached, View):
            parts = parts | cached.parts
        references = REFERENCES in parts

        def work(progress: Report, predicted: Callable[[View], None]) -> View:
            starting = workers.POOL.starting(workers.engines_of(scenario))
            if memory.estimate(scenario, True) > memory.limit():
                starting = set()  # the float64 stand-ins would not fit: no prediction
            # one admission for the whole view: the run, its charts and explain's re-runs,
            # so the budget holds the memory until the results are let go
            context = admission.current()
            need = admitted_need(scenario, references or bool(starting))
            with admission.BUDGET.admit(need, context):
                inside = dataclasses.replace(context, admitted=True)
                with admission.running(inside):
                    reuse = Reuse(per_engine=1) if starting else None  # the prediction's real runs
                    if starting:
                        workers.POOL.warm(starting)  # their imports go on meanwhile
                        progress(0.0, f"{_names(starting)} still importing: predicting meanwhile")
                        first = compare(scenario, reference=False, reuse=reuse, predict=starting)
                        predicted(build_view(first, frozenset()))
                        del first
                        where = "their workers" if len(starting) > 1 else "its worker"
                        progress(0.05, f"Waiting for {_names(starting)} to import in {where}")
                    comparison = compare(
                        scenario,
                        reference=references,
                        report=lambda done, text: progress(0.9 * done, text),
                        reuse=reuse,
                    )
                    del reuse
                # explain's re-runs share one time limit, and the run's ticket
                limit = time.monotonic() + workers.time_limit()
                with admission.running(dataclasses.replace(inside, deadline=limit)):
                    return build_view(comparison, parts, progress)

        return self._fly(
            key,
            work,
            report,
            flight_key=key + "#" + ",".join(sorted(parts)),
            enough=lambda cached: parts <= cached.parts,
            preview=preview,
        )

    def sweep(self, scenario: Scenario, report: Report | None = None) -> SweepView:
        """The scenario's sweep (its sweep_* settings): from the cache, or run and kept."""
        param = scenario["sweep"]

        def work(progress: Report, _predicted: Callable[[View], None]) -> SweepView:
            points = sweep.run_sweep(scenario, param, sweep.values(scenario), progress)
            return SweepView(
                key=param,
                log_x=scenario["sweep_scale"] == "log",
                document=sweep.sweep_document(scenario, param, points),
                table=charts.sweep_table(points, param),
            )

        return self._fly("sweep:" + scenario.link, work, report)
