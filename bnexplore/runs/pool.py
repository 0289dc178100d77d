"""Engines in worker processes: one framework (or Keras backend) per long-lived process.

A Keras 3 backend is fixed once per process, and a framework that crashes, runs
out of memory or hangs must not take the caller with it. So every engine runs in
worker processes of its own (``python -m bnexplore.runs.worker ENGINE FD``):

- started on first use, all of a run's at once, so their imports overlap; then
  reused across runs. ``BNEXPLORE_WORKERS`` (default 1) is the number of workers
  per engine: runs for the same engine queue for its workers, first come first
  served, each holding its workers for the whole run.
- batches reach a worker through one shared-memory file per run, rewritten for
  each pass; outputs come back the same way (see :mod:`bnexplore.runs.shipping`).
- a worker that dies, or does not answer within ``BNEXPLORE_TIME_LIMIT`` seconds
  (default 120) of the run's start, is stopped: the engine's result is an error
  that starts with "worker", and the next run starts a fresh worker.

``BNEXPLORE_WORKERS=0`` runs every engine inside the calling process instead
(for debugging; Keras 3 on JAX or PyTorch and Flax then cannot load beside
Keras on TensorFlow).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from bnexplore.engines import LABELS, EngineResult, Session, State
from bnexplore.runs.admission import Ticket
from bnexplore.runs.shipping import (
    FILES,
    received,
    remove_files_of,
    remove_orphans,
    write,
)
from bnexplore.scenario.links import Scenario, from_pairs

log = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT = 120.0
POLL_S = 0.2
"""How often a wait for a worker looks at its run's ticket."""
CANCEL_GRACE_S = 1.0
"""How long a cancelled run's worker may take to finish its pass before it is stopped."""
MMAP_ABOVE = 32 << 20
"""Bytes above which a worker's buffer is mapped on its own (glibc's largest adaptive mmap
threshold); below, freed buffers stay on its heap until it is idle."""
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def time_limit() -> float:
    """Seconds a run may take: BNEXPLORE_TIME_LIMIT, or 120 (also when it is unreadable)."""
    try:
        value = float(os.environ.get("BNEXPLORE_TIME_LIMIT", DEFAULT_TIME_LIMIT))
    except ValueError:
        return DEFAULT_TIME_LIMIT
    return value if value > 0 and value == value else DEFAULT_TIME_LIMIT


def workers_per_engine() -> int:
    """BNEXPLORE_WORKERS: workers per engine (0: engines run in this process)."""
    try:
        return max(0, int(os.environ.get("BNEXPLORE_WORKERS", "1")))
    except ValueError:
        return 1


class WorkerLost(RuntimeError):
    """The worker died or was stopped; the message is the engine's error."""


class StepFailed(RuntimeError):
    """The framework raised in the worker; ``result`` is the session's failed result."""

    def __init__(self, result: EngineResult) -> None:
        super().__init__(result.error)
        self.result = result


def _death(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"died (killed by signal {signal.Signals(-code).name})"
        except ValueError:
            return f"died (signal {-code})"
    return f"died (exit code {code})"


class Worker:
    """One worker process and its end of the socket; used by one run at a time."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        ours, theirs = socket.socketpair()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        env.pop("KERAS_BACKEND", None)  # each engine module sets its own
        # glibc's heap keeps freed buffers of up to 32 MiB for the next pass, and hands them
        # back once the worker is idle (worker.IDLE_TRIM_S): with a fixed 1 MiB mmap
        # threshold, every buffer was mapped afresh and faulted in page by page, and the
        # ResNet-50-shaped audit took 3.45 s instead of 2.47 (the seed's run 92 ms, not 83)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_ABOVE))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2 * MMAP_ABOVE))
        # and its buffers in transparent huge pages (glibc 2.35+; older ones ignore it): fresh
        # memory faults in 2 MiB at a time, not 4 KiB
        env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bnexplore.runs.worker", engine, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.pid = self.process.pid
        self.info: dict | None = None
        """What the worker said once its framework was imported (pid, version, threads),
        or why it cannot load it."""
        self.ready = threading.Event()
        """Set when the worker has said it is ready, or died before it could."""
        self.started = time.time()
        self.import_s: float | None = None
        """Seconds from the worker's start to its "ready": Python and its framework's import."""
        self._stash: dict[int, tuple] = {}
        self.lost: str | None = None
        threading.Thread(
            target=self._await_ready, name=f"bnexplore worker {engine} start", daemon=True
        ).start()

    def _await_ready(self) -> None:
        """Read the worker's first message, its "ready", as soon as it comes: until then
        nobody else reads the socket (``reply`` waits for this), so the page can tell an
        engine that is still importing from one that is running (Pool.starting)."""
        try:
            message = self.conn.recv()
            if message[0] == "ready":
                self.info, self.import_s = message[2], time.time() - self.started
                log.info(
                    "worker %s (pid %d) ready: imported in %.2f s, at %.3f",
                    self.engine,
                    self.pid,
                    self.import_s,
                    time.time(),
                )
            else:  # not expected: kept for whoever waits on it
                self._stash[message[1]] = message
        except (EOFError, OSError):
            pass  # died while importing: reply finds it lost
        finally:
            self.ready.set()

    @property
    def alive(self) -> bool:
        return self.lost is None and self.process.poll() is None

    def send(self, message: tuple) -> None:
        if self.lost:
            raise WorkerLost(self.lost)
        try:
            self.conn.send(message)
        except OSError:
            self._lose(_death(self._exit_code()))

    def reply(self, sid: int, deadline: float, ticket: Ticket | None = None) -> tuple:
        """The next answer for session ``sid`` (answers for others are kept for them).

        Past the deadline the worker is stopped. If the run is cancelled meanwhile, the
        worker gets a second to answer, then is stopped (it runs nothing else: a worker
        serves one run at a time), and Cancelled is raised.
        """
        cancelled_at = None
        while sid not in self._stash:
            if not self.ready.is_set():  # still importing: the socket is its start's to read
                self._wait_ready(deadline, ticket)
                continue
            if self.lost:
                raise WorkerLost(self.lost)
            if ticket is not None and ticket.cancelled and cancelled_at is None:
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                self.stop()
                self.lost = f"worker for {self.engine} (pid {self.pid}) stopped: run cancelled"
                ticket.check()
            remaining = deadline - time.monotonic()
            try:
                # an answer already here counts, however late
                ready = self.conn.poll(min(max(remaining, 0.0), POLL_S))
                if not ready and remaining <= 0:
                    self.stop()
                    self._lose(
                        f"did not answer within the time limit of {time_limit():g} s "
                        "(BNEXPLORE_TIME_LIMIT); it was stopped"
                    )
                if not ready:
                    continue
                message = received(self.conn.recv())  # its files read before the next request
            except (EOFError, OSError):
                self._lose(_death(self._exit_code()))
            self._stash[message[1]] = message  # "ready" was _await_ready's to read
        return self._stash.pop(sid)

    def _wait_ready(self, deadline: float, ticket: Ticket | None) -> None:
        """Wait (a poll's length at most) for the worker's import; past the deadline it is
        stopped, and a cancelled run stops waiting for it (the worker goes on importing)."""
        if ticket is not None:
            ticket.check()
        remaining = deadline - time.monotonic()
        if not self.ready.wait(min(max(remaining, 0.0), POLL_S)) and remaining <= 0:
            self.stop()
            self._lose(
                f"did not start within the time limit of {time_limit():g} s "
                "(BNEXPLORE_TIME_LIMIT); it was stopped"
            )

    def forget_answers(self) -> None:
        """Drop answers nobody will read (a run that stopped early)."""
        self._stash.clear()

    def _exit_code(self) -> int | None:
        try:
            return self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return None

    def _lose(self, why: str) -> None:
        self.lost = (
            f"worker for {LABELS.get(self.engine, self.engine)} (pid {self.pid}) {why}; "
            "a new one starts for the next run"
        )
        self.stop()
        raise WorkerLost(self.lost)

    def stop(self) -> None:
        """Kill the process (its memory goes with it) and close the socket."""
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("worker %s (pid %d) did not exit after SIGKILL", self.engine, self.pid)
        if self.process.poll() is not None:
            remove_files_of(self.pid)  # its kept and lent shared-memory files
        self.conn.close()


class Pool:
    """Workers by engine; a run takes one of each engine it needs, in name order."""

    def __init__(self) -> None:
        self._all: dict[str, list[Worker]] = {}
        self._free: dict[str, list[Worker]] = {}
        self._cond = threading.Condition()
        self._swept = False

    def _spawn(self, engine: str) -> Worker:
        """A new worker (the first one also sweeps up killed processes' files)."""
        if not self._swept:
            self._swept = True
            removed = remove_orphans()
            if removed:
                log.info("removed %d shared-memory files of killed processes", removed)
        return Worker(engine)

    def acquire(self, engines: Iterable[str]) -> dict[str, Worker]:
        """One worker per engine, waiting for a free one; spawns up to BNEXPLORE_WORKERS.

        Engines are taken in name order, so two runs never wait on each other in a cycle.
        """
        most = max(1, workers_per_engine())
        taken: dict[str, Worker] = {}
        with self._cond:
            for engine in sorted(set(engines)):
                while True:
                    self._prune(engine)
                    free = self._free.setdefault(engine, [])
                    if free:
                        taken[engine] = free.pop()
                        break
                    if len(self._all.setdefault(engine, [])) < most:
                        worker = self._spawn(engine)
                        self._all[engine].append(worker)
                        taken[engine] = worker
                        break
                    self._cond.wait()
        return taken

    def release(self, workers: Iterable[Worker]) -> None:
        with self._cond:
            for worker in workers:
                worker.forget_answers()
                if worker.alive:
                    self._free.setdefault(worker.engine, []).append(worker)
                else:
                    worker.stop()
                    self._prune(worker.engine)
            self._cond.notify_all()

    def _prune(self, engine: str) -> None:
        """Forget workers that died while idle (killed from outside, say)."""
        for worker in [w for w in self._all.get(engine, []) if not w.alive]:
            worker.stop()
            self._all[engine].remove(worker)
            if worker in self._free.get(engine, []):
                self._free[engine].remove(worker)

    def warm(self, engines: Iterable[str]) -> None:
        """Start a worker for each engine that has none yet; never waits (a busy engine
        already has its workers)."""
        if workers_per_engine() == 0:
            return
        with self._cond:
            for engine in sorted(set(engines)):
                self._prune(engine)
                if not self._all.get(engine):
                    worker = self._spawn(engine)
                    self._all[engine] = [worker]
                    self._free.setdefault(engine, []).append(worker)
            self._cond.notify_all()

    def starting(self, engines: Iterable[str]) -> set[str]:
        """The engines, of ``engines``, that no live worker is ready to run yet: their
        framework is still importing, or no worker has been started for them."""
        if workers_per_engine() == 0:
            return set()
        with self._cond:
            return {
                engine
                for engine in engines
                if not any(w.ready.is_set() and w.alive for w in self._all.get(engine, []))
            }

    def stop(self, engines: Iterable[str]) -> None:
        """Stop the idle workers of ``engines`` (the next run starts fresh ones)."""
        with self._cond:
            for engine in set(engines):
                for worker in self._free.pop(engine, []):
                    worker.stop()
                self._prune(engine)

    def processes(self) -> dict[str, list[int]]:
        """Engine → pids of its live workers."""
        with self._cond:
            return {e: [w.pid for w in ws if w.alive] for e, ws in self._all.items()}

    def shutdown(self) -> None:
        with self._cond:
            for workers in self._all.values():
                for worker in workers:
                    worker.stop()
            self._all.clear()
            self._free.clear()


POOL = Pool()
atexit.register(POOL.shutdown)


def start_early(pairs: Iterable[tuple[str, str]]) -> None:
    """Start the workers of a link's engines (and PyTorch's where Keras 3 starts from its
    state) before anything else is imported: their frameworks' imports, seconds long,
    overlap the page's own. ``pairs``: the link's raw (key, value) pairs."""
    POOL.warm(engines_of(from_pairs(pairs)[0]))


def engines_of(scenario: Scenario) -> set[str]:
    """The engines whose workers a run of ``scenario`` uses (PyTorch's for a port's source)."""
    return {*scenario["engines"], *(["torch"] if scenario.ports else [])}


_session_ids = itertools.count(1)


class SharedBatch:
    """One run's batch, in one shared-memory file rewritten for each pass (and its
    companion, the same for the pass's target); the file is one this process keeps
    between runs (shipping.FILES) where one of the size is kept."""

    def __init__(self, with_companion: bool = True) -> None:
        self.path: str | None = None
        self._size = 0
        self._current: tuple[int, int] | None = None
        self.companion = SharedBatch(False) if with_companion else None
        """The pass's target (loss=mse), in a file of its own."""

    def publish(self, batch: np.ndarray) -> tuple[str, tuple[int, ...], str]:
        if self.path is None:
            self.path, self._size = FILES.take(batch.nbytes), batch.nbytes
        if self._current != (id(batch), batch.ctypes.data):  # constant batches: written once
            write(self.path, batch)
            self._current = (id(batch), batch.ctypes.data)
        return self.path, batch.shape, batch.dtype.name

    def publish_pass(self, batch: np.ndarray, target: np.ndarray | None) -> None:
        """Write a pass ahead of its steps (which then find it written)."""
        self.publish(batch)
        if target is not None and self.companion is not None:
            self.companion.publish(target)

    def close(self) -> None:
        if self.companion is not None:
            self.companion.close()
        if self.path:
            FILES.give(self.path, self._size)
            self.path = None


class WorkerSession(Session):
    """A session that lives in a worker: the same interface, answered over the socket.

    ``step`` and ``begin_finish`` only send; ``settle`` and ``finish`` wait, so the
    runner can let every worker work on a pass at once.
    """

    def __init__(
        self,
        name: str,
        engine: str,
        worker: Worker,
        batch: SharedBatch,
        deadline: float,
        ticket: Ticket | None = None,
    ):
        self.name, self.engine, self.worker, self.batch = name, engine, worker, batch
        self.target = batch.companion
        self.deadline, self.ticket = deadline, ticket
        self.sid = next(_session_ids)
        self.where: dict = {}
        self._pending = False

    def begin_start(self, scenario: Scenario) -> None:
        self.worker.send(("start", self.sid, dict(scenario.values)))

    def settle_start(self) -> Session | EngineResult:
        answer = self.worker.reply(self.sid, self.deadline, self.ticket)
        if answer[0] == "result":
            return self._named(answer[2])
        self.where = answer[2]
        return self

    def _named(self, result: EngineResult) -> EngineResult:
        import dataclasses

        return result if result.name == self.name else dataclasses.replace(result, name=self.name)

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        shipped_target = None if target is None else self.target.publish(target)
        self.worker.send(("step", self.sid, k, *self.batch.publish(batch), shipped_target))
        self._pending = True

    def settle(self) -> None:
        if not self._pending:
            return
        self._pending = False
        answer = self.worker.reply(self.sid, self.deadline, self.ticket)
        if answer[0] == "result":
            raise StepFailed(self._named(answer[2]))

    def state(self) -> State | None:
        self.worker.send(("state", self.sid))
        return self.worker.reply(self.sid, self.deadline, self.ticket)[2]

    def port(self, state: State) -> None:
        self.worker.send(("port", self.sid, state))
        answer = self.worker.reply(self.sid, self.deadline, self.ticket)
        if answer[0] == "result":
            raise StepFailed(self._named(answer[2]))

    def begin_finish(self) -> None:
        self.worker.send(("finish", self.sid))

    def finish(self) -> EngineResult:
        answer = self.worker.reply(self.sid, self.deadline, self.ticket)
        if answer[0] != "result":
            raise WorkerLost(f"worker for {self.engine}: unexpected answer {answer[0]!r}")
        return self._named(answer[2])

    def failed(self, exc: Exception) -> EngineResult:
        if isinstance(exc, StepFailed):
            return exc.result
        return EngineResult(
            self.name, available=True, error=str(exc) or type(exc).__name__, **self.where
        )

    def drop(self) -> None:
        """Forget the session in its worker (after a failure elsewhere in the run)."""
        if self.worker.alive:
            with contextlib.suppress(WorkerLost):
                self.worker.send(("drop", self.sid))


class TimeLimitReached(RuntimeError):
    """The run is past BNEXPLORE_TIME_LIMIT: what has not finished stops."""

    def __init__(self) -> None:
        super().__init__(
            f"stopped: the run reached its time limit of {time_limit():g} s (BNEXPLORE_TIME_LIMIT)"
        )


def start_sessions(
    lanes: dict[str, str],
    scenario: Scenario,
    workers: dict[str, Worker],
    batch: SharedBatch,
    deadline: float,
    ticket: Ticket | None = None,
    meanwhile: Callable[[SharedBatch], None] | None = None,
) -> dict[str, Session | EngineResult]:
    """Start each lane (lane name → engine) in its engine's worker, all at once; while the
    workers build their layers, ``meanwhile(batch)`` (the runner writes the first pass)."""
    sessions = {}
    for lane, engine in lanes.items():
        session = WorkerSession(lane, engine, workers[engine], batch, deadline, ticket)
        try:
            session.begin_start(scenario)
        except WorkerLost as lost:
            sessions[lane] = EngineResult(lane, available=True, error=str(lost))
            continue
        sessions[lane] = session
    started = {}
    try:
        if meanwhile is not None and any(isinstance(s, WorkerSession) for s in sessions.values()):
            meanwhile(batch)
        for lane, session in sessions.items():
            if isinstance(session, EngineResult):
                started[lane] = session
                continue
            try:
                started[lane] = session.settle_start()
            except WorkerLost as lost:
                started[lane] = EngineResult(lane, available=True, error=str(lost))
    except BaseException:  # cancelled while a worker imports: it forgets the session after
        for session in sessions.values():
            if isinstance(session, WorkerSession):
                session.drop()
        raise
    return started
