"""The memory guard: a scenario's memory need, estimated before anything is allocated.

Host bytes, with E values per batch of itemsize s (float64 batches are drawn,
then cast):

    batch      8E (ones, constant) or 16E (random: draw and scale), + sE cast
    PyTorch    sE  (its output; the input is shared with NumPy on the CPU)
    Keras      4sE (channels-last copy, output, NumPy output, channels-first copy)
    reference  16E (float64 input and output; measured here: about 13E)

plus, with a loss (loss=mse): the target, 16E drawn (normal) + sE cast; per framework
3sE (its gradient w.r.t. x, kept, and the copies the backward makes); per reference
32E (x̂, dy and dL/dx in float64); plus the per-pass running statistics, 16·C bytes
per pass per engine. Metrics
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


def limit() -> int:
    """The limit in bytes: BNEXPLORE_MEMORY_LIMIT, or 2 GiB (also when it is unreadable)."""
    text = os.environ.get("BNEXPLORE_MEMORY_LIMIT", "").strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", text)
    if not match:
        return DEFAULT_LIMIT
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def estimate(scenario: Scenario, reference: bool) -> int:
    """Bytes the scenario needs at its peak (see the module docstring)."""
    values = scenario.values_per_channel * scenario.channels
    itemsize = numpy_dtype(scenario["dtype"]).itemsize
    engines = scenario["engines"]
    batch = (8 if scenario["input"] in ("ones", "constant") else 16) * values + itemsize * values
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
    training = 0
    if scenario["loss"] != "none":
        target = (16 * values if scenario["target"] == "normal" else 0) + itemsize * values
        gradients = 3 * itemsize * values * len(engines)
        training = target + gradients + (32 * values * len(engines) if reference else 0)
    return batch + frameworks + references + history + training


def words(size: int) -> str:
    """Bytes for people: '2.7 GiB', '310 MiB'."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} B"
