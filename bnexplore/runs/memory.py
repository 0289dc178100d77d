"""The memory guard: a scenario's memory need, estimated before anything is allocated.

Host bytes over the caller and the engines' worker processes, with E values per
batch of itemsize s (float64 batches are drawn, then cast):

    batch      8E (ones, constant) or 16E (random: draw and scale), + sE cast;
               a batch file: its arrays as stored, 8E widening, sE per distinct pass;
               + sE for the shared-memory file the workers read it from
    each engine, its output shipped back: sE in a shared-memory file, sE read here
    PyTorch    sE  (its output; the input is the shared batch itself)
    Keras, Flax  4sE (channels-last copy, output, NumPy output, channels-first copy)
    reference  16E (float64 input and output; measured here: about 13E)

plus, with a loss (loss=mse): the target, 16E drawn (normal) + sE cast; per framework
3sE (its gradient w.r.t. x, kept, and the copies the backward makes) and 2sE to ship
dL/dx back; the target's shared-memory file sE; per reference
32E (x̂, dy and dL/dx in float64); plus the per-pass running statistics, 16·C bytes
per pass per engine. Metrics work in fixed chunks and add nothing that grows with E.

What grows with the channels C alone, for R = engines × (1 + reference) runs over
P = steps + 1 passes: R·C·(256 + 32·P) bytes, for the per-channel figures of each
run (statistics, γ, β, per-channel metrics and gaps) as arrays, as the document's
lists of Python floats, their JSON text and the page's chart tables (which sample
past a few thousand channels).

The limit is 2 GiB unless ``BNEXPLORE_MEMORY_LIMIT`` says otherwise (bytes, or
a number with KiB, MiB or GiB).
"""

from __future__ import annotations

import contextlib
import ctypes

from bnexplore import settings
from bnexplore.scenario.batches import numpy_dtype
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import knobs

DEFAULT_LIMIT = settings.DEFAULT_MEMORY_LIMIT
PER_CHANNEL = 256
PER_CHANNEL_PASS = 32
"""Bytes per channel per run, and per channel per run per pass (see the docstring)."""


def limit() -> int:
    """The limit in bytes: BNEXPLORE_MEMORY_LIMIT, or 2 GiB (also when it is unreadable)."""
    return settings.memory_limit()


def estimate(scenario: Scenario, reference: bool) -> int:
    """Bytes the scenario needs at its peak (see the module docstring)."""
    values = scenario.values_per_channel * scenario.channels
    itemsize = numpy_dtype(scenario["dtype"]).itemsize
    engines = scenario["engines"]
    drawn = 8 if scenario["input"] in ("ones", "constant") else 16
    batch = drawn * values + 2 * itemsize * values
    if scenario["input"] == "file":
        batch = _file_batches(scenario, values, itemsize) + itemsize * values

    def per_engine(engine: str) -> int:
        own = 1 if knobs(engine) == "torch" else 4
        return (own + 2) * itemsize * values

    porting = scenario.ports and "torch" not in engines
    frameworks = sum(per_engine(e) for e in engines) + (per_engine("torch") if porting else 0)
    references = 16 * values * len(engines) if reference else 0
    history = 16 * scenario.channels * (scenario["steps"] + 1) * len(engines) * (1 + reference)
    training = 0
    if scenario["loss"] != "none":
        target = (16 * values if scenario["target"] == "normal" else 0) + 2 * itemsize * values
        gradients = 5 * itemsize * values * len(engines)  # 3sE in the worker, 2sE shipped
        training = target + gradients + (32 * values * len(engines) if reference else 0)
    runs = len(engines) * (1 + reference)
    per_channel = (
        runs * scenario.channels * (PER_CHANNEL + PER_CHANNEL_PASS * (scenario["steps"] + 1))
    )
    return batch + frameworks + references + history + training + per_channel


def _file_batches(scenario: Scenario, values: int, itemsize: int) -> int:
    """A batch file: its arrays as stored, a float64 widening, and each pass's cast kept."""
    from bnexplore.files import store

    try:
        info = store.batches_info(scenario["file"])
    except store.FileProblem:  # the run refuses it with the reason
        return 0
    kept = min(info.count, scenario["steps"] + 1)
    return info.nbytes + 8 * values + kept * itemsize * values


words = settings.words


def release_freed_memory() -> None:
    """Hand the memory this process has freed back to the system (glibc's malloc_trim;
    elsewhere nothing to do): the server after each run, a worker once it is idle."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
