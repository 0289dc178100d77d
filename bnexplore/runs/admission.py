"""One memory budget for every run in this process, a first-come queue, and cancellation.

A run is admitted when its estimated need (bnexplore.runs.memory.estimate, which
counts the engines' worker processes too) fits beside the runs in flight, under
``BNEXPLORE_MEMORY_LIMIT``; the others wait in arrival order (no run overtakes
one that arrived before it), told their place and what is in flight. A run
larger than the whole budget is refused at once by the runner.

Who runs is described by the current :class:`RunContext` (a context variable,
so explain's and a sweep's re-runs inherit it): its :class:`Ticket` can be
cancelled from another thread (the session went away), and its deadline, when
set, bounds the re-runs of one run by that run's time limit.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bnexplore.runs import memory

Waiting = Callable[[int, int], None]
"""Called while a run waits: (runs ahead of it, bytes in flight)."""


class Cancelled(BaseException):
    """Nobody waits for this run any more: it stopped, and its memory is let go.

    A BaseException, so that no ``except Exception`` that turns a framework's error
    into a result swallows it on the way out."""


@dataclass
class Ticket:
    """Cancels a run from anywhere: checked while it waits and at every pass."""

    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled: nobody waits for this run any more")


@dataclass(frozen=True)
class RunContext:
    ticket: Ticket = field(default_factory=Ticket)
    on_wait: Waiting | None = None
    deadline: float | None = None
    """monotonic() time by which every run of this context must end (None: each its own)."""
    admitted: bool = False
    """The budget already holds this context's memory (a view: its run, the charts and
    explain's re-runs under one admission): runs inside do not queue again."""


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "bnexplore_run", default=None
)


def current() -> RunContext:
    return _current.get() or RunContext()


@contextlib.contextmanager
def running(context: RunContext) -> Iterator[RunContext]:
    """Runs started inside use this ticket, waiting report and deadline."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


class Budget:
    """Bytes admitted across every run in flight, and the queue of those waiting."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._in_flight: dict[int, int] = {}

    def in_flight_bytes(self) -> int:
        with self._cond:
            return sum(self._in_flight.values())

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @contextlib.contextmanager
    def admit(self, need: int, context: RunContext) -> Iterator[None]:
        """Hold ``need`` bytes of the budget for the block, waiting for them first-come.

        Raises Cancelled if the context's ticket is cancelled while waiting.
        """
        if context.admitted:
            yield
            return
        ticket, key = context.ticket, object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while True:
                    ticket.check()
                    first = self._queue[0] is ticket
                    flying = sum(self._in_flight.values())
                    if first and (flying + need <= memory.limit() or not self._in_flight):
                        break
                    if context.on_wait:
                        ahead = list(self._queue).index(ticket)
                        self._cond.release()
                        try:
                            context.on_wait(ahead, flying)
                        finally:
                            self._cond.acquire()
                    self._cond.wait(0.2)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            self._in_flight[id(key)] = need
        try:
            yield
        finally:
            with self._cond:
                del self._in_flight[id(key)]
                self._cond.notify_all()


BUDGET = Budget()


def waiting_words(ahead: int, flying: int) -> str:
    """What a waiting page says: 'Waiting: 2 runs ahead, 3.1 GiB in flight'."""
    runs = f"{ahead} run{'s' if ahead != 1 else ''} ahead" if ahead else "next in line"
    return f"Waiting: {runs}, {memory.words(flying)} in flight (BNEXPLORE_MEMORY_LIMIT)"


def remaining(deadline: float) -> float:
    return deadline - time.monotonic()
