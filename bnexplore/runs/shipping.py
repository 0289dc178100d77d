"""Large arrays between processes through shared-memory files, never through a pipe.

A file under ``/dev/shm`` (the temporary directory where there is none) holds one array's
bytes. Small arrays (running statistics, states) travel inside the message itself.

Files are kept for reuse (:class:`Files`), because the kernel's cost is in a fresh file's
pages, not in the bytes: writing the seed's 12.6 MB batch into a fresh file took 21 ms
through a map and 11.5 ms with ``pwrite``, into a kept one 3.2 ms. So:

- the caller writes a run's batch into a file it takes from its kept ones (SharedBatch),
  and gives the file back after the run;
- a worker ships an output in a file of its own kept ones, lent to the caller, who copies
  the array out as the answer arrives (Worker.reply); the worker takes every lent file back
  when the caller's next request comes, since by then the caller has read them all;
- each process keeps at most KEEP_AT_REST bytes of files between runs, the most recently
  used; the rest are deleted. A worker deletes its files when it exits (its socket closed,
  or SIGTERM), and the caller deletes those of a worker it stops (their names carry the
  worker's pid). What a killed process left (SIGKILL, the OOM killer) is swept up by the
  next process that starts a worker, once an hour old (remove_orphans).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnexplore.scenario.batches import numpy_dtype

SHIP_ABOVE = 64 * 1024
"""Arrays larger than this many bytes go through a shared-memory file."""

KEEP_AT_REST = 32 << 20
"""Bytes of shared-memory files a process keeps between runs: the seed's batch and its
target, or an output and its gradient, 12.6 MB each."""

PREFIX = "bnexplore-"


def shm_dir() -> str:
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else (tempfile.gettempdir())
    )


def new_file(size: int) -> str:
    """A fresh shared-memory file of ``size`` bytes (at least one), by path; its name
    carries this process's pid."""
    fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=shm_dir())
    try:
        os.ftruncate(fd, max(size, 1))
    finally:
        os.close(fd)
    return path


def write(path: str, array: np.ndarray, offset: int = 0) -> None:
    """The array's bytes into the file at byte ``offset``, with ``pwrite`` (through a map,
    each fresh page costs a fault)."""
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    finally:
        os.close(fd)


def remove_files_of(pid: int) -> None:
    """Delete every shared-memory file a (stopped) process left."""
    for path in Path(shm_dir()).glob(f"{PREFIX}{pid}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


ORPHANS_AFTER_S = 3600.0
"""A file of a process that no longer runs is deleted once it is this old: any younger one
may be another namespace's run in flight (a /dev/shm shared by containers)."""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it runs
        return True
    return True


def remove_orphans(older_than_s: float = ORPHANS_AFTER_S) -> int:
    """Delete the shared-memory files that bnexplore processes left when they were killed
    before they could (SIGKILL, the kernel's OOM killer): those whose process no longer runs,
    untouched for ``older_than_s`` seconds. Returns how many were deleted."""
    removed, now = 0, time.time()
    for path in Path(shm_dir()).glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's
            if now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed += 1
    return removed


class Files:
    """This process's shared-memory files: taken for a run (a kept one of the same size, or
    a fresh one), then given back and kept, at most ``keep`` bytes of them, the most
    recently given first; or lent to the other side (a worker's shipped outputs) until it
    has read them (``reclaim``)."""

    def __init__(self, keep: int = KEEP_AT_REST) -> None:
        self.keep = keep
        self._kept: OrderedDict[str, int] = OrderedDict()
        self._lent: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> str:
        size = max(size, 1)
        with self._lock:
            for path, kept in reversed(self._kept.items()):
                if kept == size:
                    del self._kept[path]
                    if os.path.exists(path):  # not deleted from outside meanwhile
                        return path
                    break
        return new_file(size)

    def give(self, path: str, size: int) -> None:
        """A file back after its run: kept while the kept ones fit in ``keep`` (one larger
        than ``keep`` alone is deleted at once, and the others stay)."""
        if max(size, 1) > self.keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        with self._lock:
            self._kept[path] = max(size, 1)
            self._kept.move_to_end(path)
            gone = []
            while sum(self._kept.values()) > self.keep:
                gone.append(self._kept.popitem(last=False)[0])
        for old in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)

    def lend(self, path: str, size: int) -> None:
        with self._lock:
            self._lent[path] = size

    def reclaim(self) -> None:
        """Every lent file back: the other side has read them."""
        with self._lock:
            lent, self._lent = self._lent, {}
        for path, size in lent.items():
            self.give(path, size)

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(self._kept.values())

    def clear(self) -> None:
        with self._lock:
            paths = [*self._kept, *self._lent]
            self._kept.clear()
            self._lent.clear()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


FILES = Files()
atexit.register(FILES.clear)


@dataclass(frozen=True)
class Shipped:
    """An array in a shared-memory file lent by its sender."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    def receive(self) -> np.ndarray:
        """A copy of the array, read straight into fresh memory: the file stays the sender's,
        to be written again once this side's next request reaches it."""
        array = np.empty(self.shape, dtype=numpy_dtype(self.dtype))
        with open(self.path, "rb", buffering=0) as file:
            file.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        return array


def _ship_array(array: np.ndarray) -> np.ndarray | Shipped:
    if array.nbytes <= SHIP_ABOVE:
        return array
    path = FILES.take(array.nbytes)
    write(path, array)
    FILES.lend(path, array.nbytes)
    return Shipped(path, array.shape, array.dtype.name)


def ship(result):
    """A dataclass (an EngineResult) with its large top-level arrays left in files."""
    changes = {
        f.name: _ship_array(value)
        for f in dataclasses.fields(result)
        if isinstance(value := getattr(result, f.name), np.ndarray)
    }
    return dataclasses.replace(result, **changes)


def unship(result):
    """The dataclass with every shipped array read back."""
    changes = {
        f.name: value.receive()
        for f in dataclasses.fields(result)
        if isinstance(value := getattr(result, f.name), Shipped)
    }
    return dataclasses.replace(result, **changes) if changes else result


def received(message: tuple) -> tuple:
    """A worker's answer with its shipped arrays read at once (``result``: one result;
    ``inferred``: a list of them), so its files are free before the next request."""
    if message[0] == "result":
        return (*message[:2], unship(message[2]), *message[3:])
    if message[0] == "inferred":
        return (*message[:2], [unship(r) for r in message[2]], *message[3:])
    return message
