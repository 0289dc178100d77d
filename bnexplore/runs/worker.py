"""A worker process: one engine's framework, imported once, serving sessions over a socket.

Started by :mod:`bnexplore.runs.pool` as ``python -m bnexplore.runs.worker ENGINE FD``, so
``ps`` shows which engine a process serves. It imports the framework, says it is
ready (or why it cannot be), then answers requests until the socket closes:

- ``("start", sid, values)`` → ``("started", sid, where)`` or ``("result", sid, result)``
- ``("step", sid, k, path, shape, dtype, target)`` → ``("ok", sid)`` or ``("result", sid,
  failed)``; the batch is read in place from the shared-memory file ``path``, the target
  (loss=mse; else None) likewise from its (path, shape, dtype)
- ``("state", sid)`` → ``("state", sid, state)``; ``("port", sid, state)`` → ``("ok", sid)``
- ``("finish", sid)`` → ``("result", sid, result)``, large arrays in shared-memory files
- ``("infer", sid, jobs)`` → ``("inferred", sid, results)``: many layers in one message, each
  job ``(values, state, (path, offset, shape, dtype))`` one measured pass from a state
  (bnexplore.engines.infer), its batch read in place at ``offset`` of the shared file
- ``("drop", sid)``: forget a session (no answer); ``("ping", sid)`` → ``("pong", sid, info)``
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import sys
from multiprocessing.connection import Connection

import numpy as np

from bnexplore import engines
from bnexplore.runs import memory
from bnexplore.runs.shipping import FILES, ship
from bnexplore.scenario.batches import numpy_dtype
from bnexplore.scenario.links import Scenario

log = logging.getLogger("bnexplore.runs.worker")

IDLE_TRIM_S = 0.2
"""Seconds without a request after which a worker hands its freed memory back (glibc's
malloc_trim): between one page's runs, not between one run's passes or a sweep's points."""

MADV_POPULATE_READ = 22
"""Linux's madvise advice that maps a range's pages for reading, all in one call (5.14)."""


class BatchViews:
    """Shared-memory batch files mapped once per session, copy-on-write (never written back)."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, path: str) -> mmap.mmap:
        mapped = self._maps.get(path)
        if mapped is None:
            with open(path, "rb") as file:
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            with contextlib.suppress(OSError):  # an older kernel: the pages fault in one by one
                mapped.madvise(MADV_POPULATE_READ)  # the page table in one call
            self._maps[path] = mapped
        return mapped

    def view(self, path: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.frombuffer(self._map(path), dtype=numpy_dtype(dtype)).reshape(shape)

    def view_at(self, path: str, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """One of several batches laid out in one file, from byte ``offset``."""
        count = int(np.prod(shape))
        flat = np.frombuffer(self._map(path), numpy_dtype(dtype), count=count, offset=offset)
        return flat.reshape(shape)

    def close(self) -> None:
        for mapped in self._maps.values():
            # a framework may still hold a view: then the map goes with the view
            with contextlib.suppress(BufferError):
                mapped.close()
        self._maps.clear()


def thread_counts() -> dict[str, int]:
    """The intra- and inter-op thread counts of the frameworks this process imported."""
    counts = {}
    torch, tf = sys.modules.get("torch"), sys.modules.get("tensorflow")
    if torch is not None:
        counts["torch_intra_op"] = torch.get_num_threads()
    if tf is not None:
        threading = tf.config.threading
        counts["tf_intra_op"] = threading.get_intra_op_parallelism_threads()
        counts["tf_inter_op"] = threading.get_inter_op_parallelism_threads()
    return counts


def serve(name: str, conn: Connection) -> None:
    info: dict = {"pid": os.getpid()}
    try:
        info["version"] = engines.load(name).version
    except engines.EngineUnavailable as missing:
        info["reason"] = str(missing)
    conn.send(("ready", None, {**info, "threads": thread_counts()}))
    sessions: dict[int, engines.Session] = {}
    views: dict[int, BatchViews] = {}
    while True:
        try:
            if not conn.poll(IDLE_TRIM_S):
                memory.release_freed_memory()  # then wait as long as it takes
            op, sid, *args = conn.recv()
        except (EOFError, OSError):
            FILES.clear()
            return
        FILES.reclaim()  # the caller read every answer before asking again
        if op == "drop":
            sessions.pop(sid, None)
            views.pop(sid, BatchViews()).close()
            continue
        conn.send(handle(name, op, sid, args, sessions, views))


def handle(name: str, op: str, sid: int, args: list, sessions: dict, views: dict) -> tuple:
    """One request's answer; a framework's exception is the session's failed result."""
    if op == "ping":
        return ("pong", sid, {"pid": os.getpid(), "sessions": len(sessions), **thread_counts()})
    if op == "infer":
        batches = BatchViews()
        try:
            results = [
                ship(engines.infer(name, Scenario(values), state, batches.view_at(*where)))
                for values, state, where in args[0]
            ]
        finally:
            batches.close()
        return ("inferred", sid, results)
    if op == "start":
        started = engines.start(name, Scenario(args[0]))
        if isinstance(started, engines.EngineResult):
            return ("result", sid, ship(started))
        sessions[sid], views[sid] = started, BatchViews()
        return ("started", sid, started.where)
    session = sessions[sid]
    try:
        if op == "step":
            k, path, shape, dtype, target = args
            batch = views[sid].view(path, shape, dtype)
            if target is None:
                session.step(k, batch)
            else:
                session.step(k, batch, views[sid].view(*target))
            return ("ok", sid)
        if op == "state":
            return ("state", sid, session.state())
        if op == "port":
            session.port(args[0])
            return ("ok", sid)
        if op == "finish":
            result = session.finish()
            del sessions[sid]
            views.pop(sid).close()
            return ("result", sid, ship(result))
    except Exception as exc:  # a framework error is the session's result
        log.info("%s raised on %s", name, op, exc_info=True)
        sessions.pop(sid, None)
        views.pop(sid, BatchViews()).close()
        return ("result", sid, ship(session.failed(exc)))
    raise ValueError(f"unknown request {op!r}")


TENSORFLOW_UNUSED = ("jax", "pandas", "IPython")
UNUSED_IMPORTS = {
    "keras": TENSORFLOW_UNUSED,
    "keras2": TENSORFLOW_UNUSED,
    "litert": TENSORFLOW_UNUSED,  # TFLiteConverter converts a Keras model without jax
}
"""Packages a framework imports when they are installed, which its engine never uses:
TensorFlow imports jax for TFLite, Keras pandas for its data adapters and IPython for its
saving's notebook check. Hidden from that engine's worker (an import of them fails, which each
catches), they save its start-up about 0.75 s of CPU (0.5 s for jax and pandas, 0.2–0.3 s
for IPython where it is installed), a sixth, while the other engines and the page start on the
same cores."""


def main(argv: list[str]) -> None:
    name, fd = argv[0], int(argv[1])
    # stopped from outside (a process group's SIGTERM): exit through atexit, which deletes
    # this worker's shared-memory files (shipping.FILES)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    for module in UNUSED_IMPORTS.get(name, ()):
        sys.modules.setdefault(module, None)  # type: ignore[assignment]
    logging.basicConfig(level=logging.WARNING, format=f"bnexplore.runs.worker[{name}] %(message)s")
    serve(name, Connection(fd))


if __name__ == "__main__":
    main(sys.argv[1:])
