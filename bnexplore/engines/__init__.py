"""Engines: one module per framework behind one small interface.

An engine ``start``s a :class:`Session` for a scenario: a fresh layer. The
runner then steps every session through the same batches in lock step (each
batch is made once), and ``finish`` gives an :class:`EngineResult`: the
measured pass's output (channels-first, as a NumPy array) and the running
statistics. Framework imports live only in the engine modules and happen when
an engine is loaded, so a missing framework is a result (``available: False``
with the reason), never an ImportError at start-up.

Adding a framework: a module with an engine class (``name``, ``label``,
``version``, ``start``) and its session class, and a row in
:data:`bnexplore.engines.registry.REGISTRY`: what the engine is called, whose knobs it
reads, how every chart draws it, where its class lives.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from bnexplore.engines.registry import BY_LABEL, ENGINES, LABELS, REGISTRY, EngineInfo

if TYPE_CHECKING:  # bnexplore.scenario.params reads the registry: no import of the scenario here
    from bnexplore.scenario.links import Scenario

__all__ = ["BY_LABEL", "ENGINES", "LABELS", "REGISTRY", "EngineInfo"]

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
    history: dict[str, np.ndarray] | None = None
    """Running statistics after each pass: "step" (k), "running_mean" and
    "running_var" (passes × channels, float64). None without running statistics."""
    rounding_gain: np.ndarray | None = None
    """Reference engines only: per channel, |mean|·|γ|/√(var + eps) of the measured
    pass, the factor by which rounding in the mean is amplified in the output."""
    variance_error: dict[str, np.ndarray] | None = None
    """Reference engines of kernels that take the batch variance as E[x²] − E[x]² (see
    reference.fast_variance_error), per channel: "output", the bound on how far that
    moves y in the measured pass (when it normalizes with the batch), and "running", the
    largest bound δ on a batch variance fed into the running variance."""
    gamma: np.ndarray | None = None
    """γ (PyTorch's weight) after the training steps, before the measured pass; None
    where the layer has none (affine=False, scale=False)."""
    beta: np.ndarray | None = None
    """β (PyTorch's bias) likewise; None where the layer has none."""
    loss: float | None = None
    """The measured pass's L = mean((y − T)²); None with loss=none."""
    grad_x: np.ndarray | None = None
    """dL/dx of the measured pass, channels-first, the output's dtype; None with loss=none."""
    grad_gamma: np.ndarray | None = None
    """dL/dγ of the measured pass; None where the framework computes none (frozen, absent)."""
    grad_beta: np.ndarray | None = None
    """dL/dβ of the measured pass; None where the framework computes none."""
    parameter_history: dict[str, np.ndarray] | None = None
    """γ and β after each pass: "step" (k), "gamma" and "beta" (passes × channels,
    float64; a missing parameter is absent). None with loss=none or neither parameter."""
    unpredictable: dict[str, float] | None = None
    """Reference engines only: parameters whose exact gradient was 0 on a step of an Adam-like
    optimizer, with the bound on how far rounding noise can move them (Σ over steps of
    lr·c_t, c_t ≈ 1 the most |m̂|/√v̂ can be). No float64 formula predicts that step."""


State = dict[str, np.ndarray]
"""A layer's state in PyTorch's names: weight, bias, running_mean, running_var."""


TRAINING_FIELDS = ("gamma", "beta", "loss", "grad_x", "grad_gamma", "grad_beta")
"""EngineResult fields an engine session fills from its training step (see training_fields)."""


class Session:
    """One layer of one engine, stepped through the scenario's batches.

    ``step(k, batch, target)`` runs pass k (training passes, then the measured one), or
    only begins it where ``settle`` then waits; a framework error raised in either is
    the engine's result, not a crash.
    ``state()`` is the layer's state now (a port's source); ``port(state)``
    loads one into the layer: NumPy arrays in PyTorch's names, never a path. The
    runner calls it before pass 0 for ``init=state`` (the stored layer, resolved
    in the runner's process; training steps then run from it), and before the
    measured pass for ``keras_init`` (where Keras 3 skips its own training steps).
    """

    name: str
    where: dict

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        """Pass k on ``batch``; with a target (loss=mse) also L, backward and, on a
        training pass, one optimizer step."""
        raise NotImplementedError

    def settle(self) -> None:
        """Wait for the pass ``step`` began (a session in a worker process only sends)."""

    def begin_finish(self) -> None:
        """Start finishing; ``finish`` then waits for the result."""

    def drop(self) -> None:
        """Let go of a session that will not be finished."""

    def state(self) -> State | None:
        return None

    def port(self, state: State) -> None:
        raise NotImplementedError(f"{self.name} cannot start from a ported state")

    def finish(self) -> EngineResult:
        raise NotImplementedError

    def training_fields(self) -> dict:
        """The training step's results as EngineResult fields, from the session's attributes
        of the same names (None where a session has none: loss=none, no such parameter)."""
        return {name: getattr(self, name, None) for name in TRAINING_FIELDS}

    def failed(self, exc: Exception) -> EngineResult:
        return EngineResult(
            self.name, available=True, error=str(exc) or type(exc).__name__, **self.where
        )


class Engine(Protocol):
    name: str
    label: str
    version: str

    def start(self, scenario: Scenario) -> Session | EngineResult:
        """A fresh layer for the scenario, or the reason it cannot run (no such device)."""


def parameter_history_of(
    steps: list[int], gammas: list, betas: list
) -> dict[str, np.ndarray] | None:
    """Stack per-pass γ and β (None entries: the layer has no such parameter)."""
    history: dict[str, np.ndarray] = {}
    for name, values in (("gamma", gammas), ("beta", betas)):
        if len(values) and values[0] is not None:
            history[name] = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    return {"step": np.asarray(steps), **history} if steps and history else None


def history_of(steps: list[int], means: list, variances: list) -> dict[str, np.ndarray] | None:
    """Stack per-pass running statistics (anything np.asarray reads) into a history."""
    if not steps:
        return None
    return {
        "step": np.asarray(steps),
        "running_mean": np.stack([np.asarray(m, dtype=np.float64) for m in means]),
        "running_var": np.stack([np.asarray(v, dtype=np.float64) for v in variances]),
    }


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
            info = ENGINES[name]
            module_name, class_name = info.code.split(":")
            try:
                module = importlib.import_module(module_name)
                _loaded[name] = getattr(module, class_name)()
            except Exception as exc:
                log.warning("engine %s unavailable", name, exc_info=True)
                _loaded[name] = EngineUnavailable(
                    f"{info.label} could not be loaded: {type(exc).__name__}: {exc}"
                )
        engine = _loaded[name]
    if isinstance(engine, EngineUnavailable):
        raise engine
    return engine


def start(name: str, scenario: Scenario) -> Session | EngineResult:
    """A session of engine ``name``, or why there is none; never raises."""
    try:
        engine = load(name)
    except EngineUnavailable as exc:
        return EngineResult(name=name, available=False, reason=str(exc))
    try:
        return engine.start(scenario)
    except Exception as exc:
        log.warning("engine %s failed to start on %s", name, scenario.link, exc_info=True)
        return EngineResult(
            name, available=True, version=engine.version, error=str(exc) or type(exc).__name__
        )


def infer(name: str, scenario: Scenario, state: State, batch: np.ndarray) -> EngineResult:
    """One measured pass of a fresh layer of engine ``name`` loaded with ``state``, on
    ``batch``: what the runner does for ``init=state`` with ``steps=0`` and no loss (port
    before pass 0, step, settle, finish), in one call. Never raises: a framework's error
    is the result."""
    started = start(name, scenario)
    if isinstance(started, EngineResult):
        return started
    try:
        started.port(state)
        started.step(0, batch)
        started.settle()
        started.begin_finish()
        return started.finish()
    except Exception as exc:  # a framework refusing the state or the batch is its result
        log.info("%s failed on %s", name, scenario.link, exc_info=True)
        return started.failed(exc)
