"""Engines: one module per framework behind one small interface.

Each engine runs a scenario for real and returns an :class:`EngineResult`:
the measured pass's output (channels-first, as a NumPy array) and the running
statistics afterwards. Framework imports live only in the engine modules and
happen when an engine is loaded, so a missing framework is a result
(``available: False`` with the reason), never an ImportError at start-up.

Adding a framework: a module with a class that has ``name``, ``label``,
``version`` and ``run(scenario) -> EngineResult``, and a row in :data:`ENGINES`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bnexplore.scenario import Scenario

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResult:
    """What one engine made of a scenario.

    ``available`` is False when the framework could not be loaded or the
    requested device does not exist (``reason`` says why). ``error`` holds the
    framework's own message when it raised on the scenario: a result, not a
    crash. ``device_note`` says why that device ran.
    """

    name: str
    available: bool
    version: str | None = None
    device: str | None = None
    device_note: str | None = None
    reason: str | None = None
    error: str | None = None
    detail: str | None = None
    output: np.ndarray | None = None
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    trained_state: dict[str, np.ndarray] | None = None
    """The layer's state after the training steps, before the measured pass:
    weight, bias, running_mean, running_var (a port's source)."""
    rounding_gain: np.ndarray | None = None
    """Reference engines only: per channel, |mean|·|γ|/√(var + eps) of the measured
    pass, the factor by which rounding in the mean is amplified in the output."""


State = dict[str, np.ndarray]
"""A layer's state in PyTorch's names: weight, bias, running_mean, running_var."""

Progress = Callable[[int, int], None]
"""Called after each pass with (passes done, passes in all)."""


class Engine(Protocol):
    name: str
    label: str
    version: str

    def run(
        self,
        scenario: Scenario,
        progress: Progress | None = None,
        initial_state: State | None = None,
    ) -> EngineResult: ...


ENGINES: dict[str, tuple[str, str, str]] = {
    "torch": ("PyTorch", "bnexplore.engines.torch_engine", "TorchEngine"),
    "keras": ("Keras 3", "bnexplore.engines.keras_engine", "KerasEngine"),
    "keras2": ("Keras 2", "bnexplore.engines.keras2_engine", "Keras2Engine"),
}
"""name → (label, module, class). The order is the order of comparison."""

LABELS: dict[str, str] = {name: row[0] for name, row in ENGINES.items()}


class EngineUnavailable(RuntimeError):
    """The framework behind an engine cannot be loaded here."""


_loaded: dict[str, Engine | EngineUnavailable] = {}
_lock = threading.Lock()


def load(name: str) -> Engine:
    """The engine called ``name``, loaded once per process (thread-safe).

    Raises EngineUnavailable with the reason when its framework is missing or
    fails to import; the failure is remembered, like a success.
    """
    with _lock:
        if name not in _loaded:
            label, module_name, class_name = ENGINES[name]
            try:
                module = importlib.import_module(module_name)
                _loaded[name] = getattr(module, class_name)()
            except Exception as exc:
                log.warning("engine %s unavailable", name, exc_info=True)
                _loaded[name] = EngineUnavailable(
                    f"{label} could not be loaded: {type(exc).__name__}: {exc}"
                )
        engine = _loaded[name]
    if isinstance(engine, EngineUnavailable):
        raise engine
    return engine


def run_engine(
    name: str,
    scenario: Scenario,
    progress: Progress | None = None,
    initial_state: State | None = None,
) -> EngineResult:
    """Run one engine on a scenario; never raises."""
    try:
        engine = load(name)
    except EngineUnavailable as exc:
        return EngineResult(name=name, available=False, reason=str(exc))
    try:
        return engine.run(scenario, progress, initial_state)
    except Exception as exc:
        log.warning("engine %s raised on %s", name, scenario.link, exc_info=True)
        return EngineResult(
            name=name,
            available=True,
            version=engine.version,
            error=str(exc) or type(exc).__name__,
        )
