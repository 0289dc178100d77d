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

The limit is 2 GiB unless ``BNEXPLORE_MEMORY_LIMIT`` says otherwise (bytes, or
a number with KiB, MiB or GiB).
"""

from __future__ import annotations

import os
import re

from bnexplore.batches import numpy_dtype
from bnexplore.params import knobs
from bnexplore.scenario import Scenario

DEFAULT_LIMIT = 2 * 1024**3
_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def size_from_env(name: str, default: int) -> int:
    """A size in bytes from an environment variable (bytes, or a number with KiB, MiB,
    GiB, kB, MB or GB), or ``default`` when it is unset or unreadable."""
    text = os.environ.get(name, "").strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", text)
    if not match:
        return default
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def limit() -> int:
    """The limit in bytes: BNEXPLORE_MEMORY_LIMIT, or 2 GiB (also when it is unreadable)."""
    return size_from_env("BNEXPLORE_MEMORY_LIMIT", DEFAULT_LIMIT)


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
    return batch + frameworks + references + history + training


def _file_batches(scenario: Scenario, values: int, itemsize: int) -> int:
    """A batch file: its arrays as stored, a float64 widening, and each pass's cast kept."""
    from bnexplore import store

    try:
        info = store.batches_info(scenario["file"])
    except store.FileProblem:  # the run refuses it with the reason
        return 0
    kept = min(info.count, scenario["steps"] + 1)
    return info.nbytes + 8 * values + kept * itemsize * values


def words(size: int) -> str:
    """Bytes for people: '2.7 GiB', '310 MiB'."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} B"
