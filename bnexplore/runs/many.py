"""Many small runs at once: every layer of a model, one message per engine.

A whole-model audit runs hundreds of single-layer passes (each layer, each engine, each
port). Sent one by one, as :mod:`bnexplore.runs.runner` runs a scenario, each would cost
a round trip per step; here every engine gets all its passes in one ``infer`` message
(bnexplore.runs.worker) and answers with all its results, while the other engines work on
theirs. The batches are written once, side by side, into one shared-memory file that every
worker maps.

Each pass is :func:`bnexplore.engines.infer`: a fresh layer, the state loaded, one
measured pass. It is what the runner does for the same scenario (``init=state``,
``steps=0``, no loss), so a layer's link reproduces its audit figures.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnexplore import engines
from bnexplore.engines import EngineResult, State
from bnexplore.runs import admission
from bnexplore.runs import pool as workers
from bnexplore.runs.shipping import FILES, write
from bnexplore.scenario.links import Scenario

ALIGN = 64
"""Each batch starts at a multiple of this many bytes of the shared file."""


@dataclass(frozen=True)
class Pass:
    """One measured pass to run: ``engine`` on ``scenario``'s layer, loaded with ``state``,
    on batch number ``batch`` of the run's batches."""

    engine: str
    scenario: Scenario
    state: State
    batch: int


Report = Callable[[float, str], None]
_ids = itertools.count(1)


def need_bytes(passes: list[Pass], batches: list[np.ndarray]) -> int:
    """What a run holds at once, for the admission budget: the shared batches, and per
    pass the output (received here, one copy in the worker while it ships) and the
    framework's own copies of the batch (about two)."""
    shared = sum(b.nbytes for b in batches)
    return shared + sum(4 * batches[p.batch].nbytes for p in passes)


def infer_all(
    passes: list[Pass],
    batches: list[np.ndarray],
    report: Report | None = None,
) -> list[EngineResult]:
    """Every pass's result, in the order given; never raises for a framework's error or a
    lost worker (that engine's passes get the error). Admitted against the process's one
    memory budget, with the run's time limit counted from the admission."""
    context = admission.current()
    with admission.BUDGET.admit(need_bytes(passes, batches), context):
        deadline = time.monotonic() + workers.time_limit()
        if context.deadline is not None:
            deadline = min(deadline, context.deadline)
        return _admitted(passes, batches, report, deadline, context.ticket)


def _admitted(passes, batches, report, deadline, ticket) -> list[EngineResult]:
    by_engine: dict[str, list[int]] = {}
    for i, p in enumerate(passes):
        by_engine.setdefault(p.engine, []).append(i)
    results: list[EngineResult | None] = [None] * len(passes)
    done = 0

    def finished(engine: str) -> None:
        nonlocal done
        done += 1
        if report:
            report(done / len(by_engine), f"{engine}: {len(by_engine[engine])} passes run")

    if workers.workers_per_engine() == 0:
        for engine, indices in by_engine.items():
            for i in indices:
                p = passes[i]
                results[i] = engines.infer(engine, p.scenario, p.state, batches[p.batch])
            finished(engine)
        return results  # type: ignore[return-value]

    path, offsets, size = _lay_out(batches)
    taken = workers.POOL.acquire(by_engine)
    try:
        sids = {}
        for engine, indices in by_engine.items():
            jobs = [
                (
                    dict(passes[i].scenario.values),
                    passes[i].state,
                    (
                        path,
                        offsets[passes[i].batch],
                        batches[passes[i].batch].shape,
                        batches[passes[i].batch].dtype.name,
                    ),
                )
                for i in indices
            ]
            sids[engine] = next(_ids)
            try:
                taken[engine].send(("infer", sids[engine], jobs))
            except workers.WorkerLost as lost:
                for i in indices:
                    results[i] = _lost(passes[i], lost)
                del sids[engine]
        for engine, sid in sids.items():
            indices = by_engine[engine]
            try:
                answer = taken[engine].reply(sid, deadline, ticket)
            except workers.WorkerLost as lost:
                for i in indices:
                    results[i] = _lost(passes[i], lost)
                continue
            for i, result in zip(indices, answer[2], strict=True):  # received: arrays read
                results[i] = result
            finished(engine)
    finally:
        FILES.give(path, size)
        workers.POOL.release(taken.values())
    return results  # type: ignore[return-value]


def _lost(p: Pass, lost: Exception) -> EngineResult:
    return EngineResult(p.engine, available=True, error=str(lost) or type(lost).__name__)


def _lay_out(batches: list[np.ndarray]) -> tuple[str, list[int], int]:
    """Write every batch into one shared-memory file (shipping.FILES); the file, the
    batches' byte offsets in it, and its size."""
    offsets, size = [], 0
    for b in batches:
        size = -(-size // ALIGN) * ALIGN
        offsets.append(size)
        size += b.nbytes
    path = FILES.take(size)
    for b, offset in zip(batches, offsets, strict=True):
        write(path, b, offset)
    return path, offsets, size


def renamed(result: EngineResult, name: str) -> EngineResult:
    return result if result.name == name else dataclasses.replace(result, name=name)
