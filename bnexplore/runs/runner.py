"""Run a scenario in every engine and measure how they diverge: the typed results
(:class:`Comparison`) behind the app, the CLI and the API; the judging reads them."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from cachetools import FIFOCache

from bnexplore.engines import LABELS, EngineResult, Session, State, start
from bnexplore.engines.reference import REFERENCES
from bnexplore.files import store
from bnexplore.runs import admission, memory
from bnexplore.runs import pool as workers
from bnexplore.runs.metrics import Divergence, Figures
from bnexplore.scenario.batches import batches, targets
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import knobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """One scenario's results in memory: the engines' arrays and their measured gaps
    (the document, its JSON, is made from it at the edge: bnexplore.judge.document)."""

    scenario: Scenario
    notices: tuple[str, ...]
    results: dict[str, EngineResult]
    references: dict[str, EngineResult] = field(default_factory=dict)
    predicted: frozenset[str] = frozenset()
    """Engines whose results are a prediction (Predicted), not the framework's own run."""

    figures: Figures | None = field(default=None, compare=False, repr=False)
    """The run's figures, some begun while it waited on its other engines (the runner's);
    None: all are measured when first read."""

    @cached_property
    def _figures(self) -> Figures:
        """Every array of the results and references, keyed ``name`` (the output) or
        ``name:quantity`` (grad_x, gamma, …)."""
        figures = self.figures if self.figures is not None else Figures(self.scenario["dtype"])
        for r in [*self.results.values(), *self.references.values()]:
            add_arrays(figures, r)
        return figures

    @cached_property
    def summaries(self) -> dict[str, dict]:
        """Each engine's (and reference's) output summary, by result name; its gradient
        w.r.t. x under ``name:grad_x`` (and every other array's, under its key)."""
        keys = [
            array_key(r.name, q)
            for r in [*self.results.values(), *self.references.values()]
            for q in QUANTITIES
            if getattr(r, q) is not None
        ]
        return self._figures.summaries(keys)

    @cached_property
    def _gaps(self) -> dict[tuple[str, str], Divergence]:
        """Each pair of engines, and each engine against its reference, on the outputs,
        the gradients and the layers' parameters and statistics: measured once (a
        divergence never waits on the summaries)."""
        figures = self._figures
        pairs = array_pairs(figures, self._engine_pairs(), QUANTITIES)
        return {
            pair: gap.renamed(*(key.split(":")[0] for key in pair))
            for pair, gap in figures.gaps(pairs).items()
        }

    def _engine_pairs(self) -> list[tuple[str, str]]:
        pairs = list(itertools.combinations(self.results, 2))
        return pairs + [
            (ref.name, name) for name, ref in self.references.items() if name in self.results
        ]

    @cached_property
    def divergence(self) -> list[Divergence]:
        """Each pair of engines, in the scenario's order (the first is the expected side)."""
        return [
            self._gap(self.results[a], self.results[b])
            for a, b in itertools.combinations(self.results, 2)
        ]

    def reference_gap(self, name: str) -> Divergence | None:
        """An engine against the float64 computation of its own framework's rules."""
        if name not in self.references:
            return None
        return self._gap(self.references[name], self.results[name])

    def _gap(self, a: EngineResult, b: EngineResult) -> Divergence:
        """The measured divergence of a pair (with its gradients and state), or why it
        could not be measured."""
        measured = self._gaps
        output = measured.get((a.name, b.name))
        if output is None:
            missing = a if a.output is None else b
            label = LABELS.get(missing.name.removesuffix("_reference"), missing.name)
            why = "did not run" if not missing.available else "raised an error"
            return Divergence.missing(
                a.name, b.name, self.scenario["dtype"], f"{label} {why}, no output"
            )

        def part(quantity: str) -> Divergence | None:
            return measured.get((array_key(a.name, quantity), array_key(b.name, quantity)))

        grad = None
        if self.scenario["loss"] != "none":
            grad = {"x": part("grad_x"), "gamma": part("grad_gamma"), "beta": part("grad_beta")}
        state = {q: part(q) for q in STATE}
        return dataclasses.replace(output, grad=grad, state=state)


QUANTITIES = (
    "output",
    "grad_x",
    "grad_gamma",
    "grad_beta",
    "gamma",
    "beta",
    "running_mean",
    "running_var",
)
"""The arrays of an EngineResult that pairs are compared on."""
STATE = ("gamma", "beta", "running_mean", "running_var")


def add_arrays(figures: Figures, result: EngineResult) -> None:
    """A result's arrays into the figures, under array_key."""
    for quantity in QUANTITIES:
        value = getattr(result, quantity)
        if value is not None:
            figures.add(array_key(result.name, quantity), value)


LARGE = ("output", "grad_x")
"""The quantities as large as the batch: the figures worth beginning early."""


def array_pairs(
    figures: Figures, engine_pairs: list[tuple[str, str]], quantities: Sequence[str]
) -> list[tuple[str, str]]:
    """The array-key pairs of ``engine_pairs`` on ``quantities``, where both arrays exist."""
    return [
        (array_key(a, q), array_key(b, q))
        for a, b in engine_pairs
        for q in quantities
        if array_key(a, q) in figures and array_key(b, q) in figures
    ]


def array_key(name: str, quantity: str) -> str:
    """An array's key in the summaries: ``name`` (the output) or ``name:quantity``."""
    return name if quantity == "output" else f"{name}:{quantity}"


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


def _swapped_if_asked(scenario: Scenario, state: State) -> State:
    """The state handed to Keras 3: PyTorch's, or with mean and variance swapped."""
    if scenario["keras_init"] != "torch_swapped":
        return state
    return {**state, "running_mean": state["running_var"], "running_var": state["running_mean"]}


PORT_SOURCE = "torch (port source)"


class Reuse:
    """Engine results kept across the runs of one explanation or one sweep: an engine whose
    own knobs and shared inputs a run does not change (Scenario.engine_link) is not run
    again. Only complete results are kept, the latest ``per_engine`` of each engine, so it
    holds at most that many runs' results beside the run under way."""

    def __init__(self, per_engine: int = 2) -> None:
        self.per_engine = per_engine
        # first in, first out: keeping a result again makes it the latest; a hit does not
        self._kept: dict[str, FIFOCache[str, EngineResult]] = {}
        self.hits = 0

    def get(self, scenario: Scenario, name: str) -> EngineResult | None:
        if scenario.ports:
            return None
        result = self._kept.get(name, {}).get(scenario.engine_link(name))
        self.hits += result is not None
        return result

    def keep(self, scenario: Scenario, result: EngineResult) -> None:
        """Keep a run's result (not a refusal, an error — a lost worker, a time limit —, or
        one of a run that ports PyTorch's state into Keras 3)."""
        if scenario.ports or not result.available or result.error is not None:
            return
        if self.per_engine < 1:  # keeps nothing
            return
        kept = self._kept.setdefault(result.name, FIFOCache(maxsize=self.per_engine))
        kept[scenario.engine_link(result.name)] = result


PREDICTION_NOTE = (
    "a prediction, not this framework's number: its worker is still importing the framework, "
    "so the float64 NumPy reference of its rules stands in until the real run arrives"
)


class Predicted(Session):
    """An engine whose worker is still importing its framework, stood in for by the float64
    reference session that follows its rules (bnexplore.engines.reference), under the
    engine's own name. Its result says so (PREDICTION_NOTE), and the runner never keeps it
    for reuse: it is a first answer, never the framework's."""

    def __init__(self, lane: str, engine: str, scenario: Scenario) -> None:
        self.name, self.rules = lane, REFERENCES[engine](scenario)
        self.where = {
            "version": "prediction: its rules in NumPy float64",
            "device": "not run yet",
            "device_note": PREDICTION_NOTE,
        }

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        self.rules.step(k, batch, target)

    def state(self) -> State | None:
        return self.rules.state()

    def port(self, state: State) -> None:
        self.rules.port(state)

    def finish(self) -> EngineResult:
        result = self.rules.finish()
        return dataclasses.replace(
            result,
            name=self.name,
            rounding_gain=None,
            variance_error=None,
            unpredictable=None,
            **self.where,
        )


class EarlyFigures:
    """A run's figures begun as its results arrive, on the measuring threads, while the run
    still waits on its other engines: each pair's gaps once both sides are here, and each
    result's summaries where the caller reads them (``summaries``). The Comparison reads
    them (the same figures, bit for bit, as measured at the end)."""

    def __init__(self, scenario: Scenario, reference: bool, summaries: bool) -> None:
        self.figures = Figures(scenario["dtype"])
        names = scenario["engines"]
        self.pairs = list(itertools.combinations(names, 2))
        if reference:
            self.pairs += [(f"{name}_reference", name) for name in names]
        self.wanted = {name for pair in self.pairs for name in pair} | set(names)
        self.summaries = summaries
        self.here: set[str] = set()

    def arrived(self, result: EngineResult) -> None:
        if result.name not in self.wanted:  # the port's source lane: nobody measures it
            return
        add_arrays(self.figures, result)
        self.here.add(result.name)
        figures = self.figures
        begun: list = []
        if self.summaries:
            begun += [k for q in LARGE if (k := array_key(result.name, q)) in figures]
        whole = [pair for pair in self.pairs if result.name in pair and set(pair) <= self.here]
        begun += array_pairs(figures, whole, LARGE)
        figures.start(begun)


def compare(
    scenario: Scenario,
    notices: Sequence[str] = (),
    reference: bool = True,
    report: Report | None = None,
    reuse: Reuse | None = None,
    predict: frozenset[str] = frozenset(),
    summaries: bool = True,
) -> Comparison:
    """Run ``scenario`` for real in each of its engines, and their references if asked.

    Every engine's layer (and every reference) steps through the same batches in
    lock step, so each batch is made once. Where Keras 3 starts from a port,
    PyTorch's state is taken after the training passes, just before the measured
    one (from a PyTorch layer run for the purpose if torch is not compared).
    The memory guard runs first: a scenario whose estimate exceeds the limit is
    refused before anything is allocated, or run without its references where
    those alone would pass it (a notice says so). Then the run waits for its share
    of the process's one budget (bnexplore.runs.admission); its time limit counts from
    its admission. With ``reuse``, an engine whose result it holds for this scenario is
    not run again (never where Keras 3 starts from a port of PyTorch's state). The engines
    in ``predict`` do not run: their rules' float64 reference stands in (Predicted), and the
    comparison names them (Comparison.predicted). The figures begin as results arrive
    (EarlyFigures); ``summaries=False`` where the caller reads only the divergences.
    """
    names = scenario["engines"]
    notices = list(notices)
    need, most = memory.estimate(scenario, reference), memory.limit()
    if need > most and reference and memory.estimate(scenario, False) <= most:
        notices.append(
            f"reference: the float64 reference engine would bring the need to about "
            f"{memory.words(need)}, over the memory limit of {memory.words(most)}; skipped"
        )
        reference, need = False, memory.estimate(scenario, False)
    if need > most:
        why = (
            f"refused before allocating: this scenario needs about {memory.words(need)}, "
            f"over the memory limit of {memory.words(most)} (BNEXPLORE_MEMORY_LIMIT)"
        )
        refused = {name: EngineResult(name, available=False, reason=why) for name in names}
        return Comparison(scenario, (*notices, why), refused, {})
    try:
        state = initial_state(scenario)
        if scenario["input"] == "file":
            store.batches(scenario["file"])
    except store.FileProblem as problem:
        why = f"refused: {problem}"
        refused = {name: EngineResult(name, available=False, reason=why) for name in names}
        return Comparison(scenario, (*notices, why), refused, {})
    context = admission.current()
    with admission.BUDGET.admit(need, context):
        comparison = _admitted(
            scenario, notices, reference, report, state, context, reuse, predict, summaries
        )
    return comparison


def admitted_need(scenario: Scenario, reference: bool = True) -> int:
    """The bytes ``compare`` would hold the budget for: the estimate with the references
    where they fit the limit, else without; 0 where the run is refused at once."""
    most = memory.limit()
    for with_references in (reference, False):
        need = memory.estimate(scenario, with_references)
        if need <= most:
            return need
    return 0


def _admitted(
    scenario: Scenario,
    notices: list[str],
    reference: bool,
    report: Report | None,
    state: State | None,
    context: admission.RunContext,
    reuse: Reuse | None = None,
    predict: frozenset[str] = frozenset(),
    summaries: bool = True,
) -> Comparison:
    """The run, once the budget holds its memory: its time limit counts from here."""
    names = scenario["engines"]
    deadline = time.monotonic() + workers.time_limit()
    if context.deadline is not None:
        deadline = min(deadline, context.deadline)
    porting = scenario.ports
    reused = {}
    if reuse is not None:
        reused = {n: r for n in names if (r := reuse.get(scenario, n)) is not None}
    to_run = {name: name for name in names if name not in reused}  # lane → its engine
    if porting and "torch" not in names:
        to_run[PORT_SOURCE] = "torch"
    predicted_lanes = {lane: e for lane, e in to_run.items() if e in predict}
    engine_of_lane = {lane: e for lane, e in to_run.items() if e not in predict}
    predict = frozenset(predicted_lanes) & set(names)
    in_process = workers.workers_per_engine() == 0
    taken = {} if in_process else workers.POOL.acquire(engine_of_lane.values())
    shared = workers.SharedBatch()
    ticket = context.ticket
    early = EarlyFigures(scenario, reference, summaries)
    passes = _Passes(scenario)
    try:
        if in_process:
            started = {lane: start(e, scenario) for lane, e in engine_of_lane.items()}
        else:
            # the first pass is drawn and written to shared memory while the workers
            # build their layers
            started = workers.start_sessions(
                engine_of_lane, scenario, taken, shared, deadline, ticket, passes.publish_first
            )
        done = {lane: s for lane, s in started.items() if isinstance(s, EngineResult)}
        done.update(reused)
        for result in done.values():
            early.arrived(result)
        lanes = {lane: s for lane, s in started.items() if not isinstance(s, EngineResult)}
        lanes.update({lane: Predicted(lane, e, scenario) for lane, e in predicted_lanes.items()})
        if reference:  # every engine that could be loaded, even one whose layer refused to build
            for name in names:
                if name in lanes or done[name].available:
                    lanes[f"{name}_reference"] = REFERENCES[name](scenario)
        if state is not None:
            _start_from(state, scenario, lanes, done)
        if lanes and not _run_passes(
            scenario, passes, lanes, done, porting, report, deadline, ticket, early
        ):
            notices.append(str(workers.TimeLimitReached()) + "; what had not finished stopped")
    finally:
        shared.close()
        workers.POOL.release(taken.values())
    results = {name: done[name] for name in names}
    if reuse is not None:
        for name in names:
            if name not in reused and name not in predict:  # a prediction is never kept
                reuse.keep(scenario, results[name])
    references = {name: done[f"{name}_reference"] for name in names if f"{name}_reference" in done}
    return Comparison(scenario, tuple(notices), results, references, predict, early.figures)


class _Passes:
    """The scenario's passes, (batch, target) each, drawn one at a time; the first can be
    drawn and written to the workers' shared memory ahead (``publish_first``)."""

    def __init__(self, scenario: Scenario) -> None:
        self._passes = zip(batches(scenario), targets(scenario), strict=True)
        self._first: list = []

    def publish_first(self, shared: workers.SharedBatch) -> None:
        if not self._first:
            self._first.append(next(self._passes, None))
        if self._first[0] is not None:
            shared.publish_pass(*self._first[0])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        yield from (p for p in self._first if p is not None)
        self._first = []
        yield from self._passes


def _run_passes(
    scenario: Scenario,
    passes: _Passes,
    lanes: dict[str, Session],
    done: dict[str, EngineResult],
    porting: bool,
    report: Report | None,
    deadline: float,
    ticket: admission.Ticket,
    early: EarlyFigures,
) -> bool:
    """Step every lane through the same batches in lock step, then finish each.

    A lane in a worker only begins its pass in ``step``; ``settle`` waits, so every
    worker works on a pass at once while the references step here. Lanes in this
    process finish first, and each result's figures begin as it arrives (``early``),
    while the workers still finish theirs. Past the deadline, the lanes still running
    stop (False is returned).
    """

    def attempt(name: str, action) -> None:
        try:
            action(lanes[name])
        except Exception as exc:  # a framework error, or a lost worker, is its result
            log.info("%s failed on %s", name, scenario.link, exc_info=True)
            done[name] = lanes.pop(name).failed(exc)

    steps = scenario["steps"]
    source = "torch" if "torch" in scenario["engines"] else PORT_SOURCE
    passes = iter(passes)
    try:
        upcoming, k = next(passes, None), -1
        while upcoming is not None:
            batch, target = upcoming
            k += 1
            ticket.check()  # a cancelled run stops at the next pass
            if lanes and time.monotonic() > deadline:
                stopped = workers.TimeLimitReached()
                for name in list(lanes):
                    done[name] = lanes[name].failed(stopped)
                return False
            if porting and k == steps:
                _port(scenario, lanes, done, source)
            for name in list(lanes):
                attempt(
                    name,
                    lambda lane, k=k, batch=batch, target=target: (
                        lane.step(k, batch) if target is None else lane.step(k, batch, target)
                    ),
                )
            # the next pass's batch is drawn while the workers work on this one (the
            # loop held it beside this one before, too: no more memory at once)
            upcoming = next(passes, None)
            for name in list(lanes):
                attempt(name, lambda lane: lane.settle())
            if report:
                report((k + 1) / (steps + 1), f"pass {k + 1} of {steps + 1}")
        for name in list(lanes):
            attempt(name, lambda lane: lane.begin_finish())
        for name in sorted(lanes, key=lambda name: isinstance(lanes[name], workers.WorkerSession)):
            try:
                done[name] = lanes[name].finish()
            except Exception as exc:
                log.info("%s failed to finish on %s", name, scenario.link, exc_info=True)
                done[name] = lanes[name].failed(exc)
            del lanes[name]
            early.arrived(done[name])
    finally:
        for lane in lanes.values():  # stopped, or left by an interruption: nothing finishes them
            lane.drop()
    return True


def initial_state(scenario: Scenario) -> State | None:
    """init=state: the chosen layer's state from the store, float64 arrays in PyTorch's
    names (None for a fresh start). Resolved here, so a session only ever gets arrays.
    Raises store.FileProblem when the file or layer cannot be used."""
    if scenario["init"] != "state":
        return None
    layer = store.find_layer(scenario["state"], scenario["layer"])
    if layer.problem:
        raise store.FileProblem(f"layer {layer.label}: {layer.problem}")
    if layer.channels != scenario.channels:
        raise store.FileProblem(
            f"layer {layer.label} has {layer.channels} channels, the batch {scenario.channels}"
        )
    return {key: np.array(value, dtype=np.float64) for key, value in layer.state.items()}


def _start_from(state: State, scenario: Scenario, lanes: dict, done: dict) -> None:
    """init=state: every lane (worker sessions and references) loads the state before pass 0."""
    for name, lane in list(lanes.items()):
        try:
            lane.port(state)
        except Exception as exc:  # a framework refusing the state is its result
            log.info("%s refused the state of %s", name, scenario.link, exc_info=True)
            done[name] = lane.failed(exc)
            del lanes[name]


def _port(scenario: Scenario, lanes: dict, done: dict, source: str) -> None:
    """Hand PyTorch's state to every Keras 3 engine (and reference) before the measured pass."""
    state = lanes[source].state() if source in lanes else None
    why = None
    if state is None:
        failed = done.get(source)
        cause = (failed.reason or failed.error) if failed else "no running statistics"
        why = f"keras_init={scenario['keras_init']}: PyTorch has no state to port ({cause})"
    receivers = [n for n in scenario["engines"] if knobs(n) == "keras"]
    for name in [*receivers, *(f"{n}_reference" for n in receivers)]:
        if name not in lanes:
            continue
        try:
            if why:
                raise ValueError(why)
            lanes[name].port(_swapped_if_asked(scenario, state))
        except Exception as exc:  # noqa: BLE001 - no state to port, or a lost worker: a result
            done[name] = lanes.pop(name).failed(exc)


def run_engine(name: str, scenario: Scenario) -> EngineResult:
    """One engine alone on a scenario (a port still takes PyTorch's state)."""
    return compare(scenario.replace(engines=(name,)), reference=False).results[name]
