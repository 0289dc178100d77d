"""Large arrays between processes through shared-memory files, never through a pipe.

A file under ``/dev/shm`` (the temporary directory where there is none) holds
one array's bytes; the other side maps or reads it and the receiver deletes it.
Small arrays (running statistics, states) travel inside the message itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from bnexplore.scenario.batches import numpy_dtype

SHIP_ABOVE = 64 * 1024
"""Arrays larger than this many bytes go through a shared-memory file."""

PREFIX = "bnexplore-"
MADV_POPULATE_READ = 22
"""Linux's madvise advice that maps a range's pages for reading, all in one call."""


def shm_dir() -> str:
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else (tempfile.gettempdir())
    )


def new_file(size: int) -> str:
    """A fresh shared-memory file of ``size`` bytes (at least one), by path."""
    fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=shm_dir())
    try:
        os.ftruncate(fd, max(size, 1))
    finally:
        os.close(fd)
    return path


@dataclass(frozen=True)
class Shipped:
    """An array left in a shared-memory file for the receiver."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    def receive(self) -> np.ndarray:
        """The array, mapped in place instead of copied; the file's name is deleted at once
        and its memory goes with the array.

        The map is private (a write stays in this process's copy of the page) and its page
        table filled in one call (MADV_POPULATE_READ, Linux 5.14) rather than a fault per
        page: receiving and reading the seed's output took 17 ms as a copy, 5 ms so."""
        dtype = numpy_dtype(self.dtype)
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: a copy
            try:
                return np.fromfile(self.path, dtype=dtype).reshape(self.shape)
            finally:
                os.unlink(self.path)
        try:
            with open(self.path, "rb") as file:
                mapped = mmap.mmap(
                    file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
        finally:
            os.unlink(self.path)
        with contextlib.suppress(OSError):  # an older kernel: the pages fault in as read
            mapped.madvise(MADV_POPULATE_READ)
        return np.frombuffer(mapped, dtype=dtype).reshape(self.shape)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _ship_array(array: np.ndarray) -> np.ndarray | Shipped:
    if array.nbytes <= SHIP_ABOVE:
        return array
    path = new_file(array.nbytes)
    np.ascontiguousarray(array).tofile(path)
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
    """The dataclass with every shipped array read back (and its file deleted)."""
    changes = {
        f.name: value.receive()
        for f in dataclasses.fields(result)
        if isinstance(value := getattr(result, f.name), Shipped)
    }
    return dataclasses.replace(result, **changes) if changes else result


def discard_shipped(result) -> None:
    """Delete the files of a shipped result that will never be received."""
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Shipped):
            value.discard()
