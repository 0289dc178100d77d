"""The memory guard: a scenario's memory need, estimated before anything is allocated.

Host bytes, with E values per batch of itemsize s (float64 batches are drawn,
then cast):

    batch      8E (ones, constant) or 16E (random: draw and scale), + sE cast;
               a batch file: its arrays as stored, 8E widening, sE per distinct pass
    PyTorch    sE  (its output; the input is shared with NumPy on the CPU)
    Keras      4sE (channels-last copy, output, NumPy output, channels-first copy)
    reference  16E (float64 input and output; measured here: about 13E)

plus the per-pass running statistics, 16·C bytes per pass per engine. Metrics
work in fixed chunks and add nothing that grows with E. Measured peaks here
were 70 % of the estimate (the seed with normal input: 85 MiB for 120 MiB;
32×256×56×56: 687 MiB for 980 MiB).

The limit is 2 GiB unless ``BNEXPLORE_MEMORY_LIMIT`` says otherwise (bytes, or
a number with KiB, MiB or GiB).
"""

from __future__ import annotations

import os
import re

from bnexplore.batches import numpy_dtype
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
    batch = (8 if scenario["input"] in ("ones", "constant") else 16) * values + itemsize * values
    if scenario["input"] == "file":
        batch = _file_batches(scenario, values, itemsize)
    per_engine = {
        "torch": itemsize * values,
        "torch_gpu": itemsize * values,
        "keras": 4 * itemsize * values,
        "keras2": 4 * itemsize * values,
    }
    porting = "keras" in engines and scenario["keras_init"] != "fresh" and "torch" not in engines
    frameworks = sum(per_engine[e] for e in engines) + (per_engine["torch"] if porting else 0)
    references = 16 * values * len(engines) if reference else 0
    history = 16 * scenario.channels * (scenario["steps"] + 1) * len(engines) * (1 + reference)
    return batch + frameworks + references + history


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
