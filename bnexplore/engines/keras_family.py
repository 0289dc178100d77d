"""What every Keras BatchNormalization engine shares, whatever runs under it.

Keras 3 on TensorFlow, JAX or PyTorch, and Keras 2 (tf_keras), run the batch
channels-last (``axis=-1``). A training pass is ``layer(x, training=True)``; the
measured pass is ``layer(x)`` (training None) or ``layer(x, training=…)`` as the
scenario's ``<prefix>_training`` says. Imports no framework: a backend module
subclasses :class:`KerasFamilyEngine` and supplies its tensors and devices.

With loss=mse a training pass also computes ``L = mean((y − T)²)``, its gradients
w.r.t. ``layer.trainable_variables`` (none on a ``trainable=False`` layer, which runs
inference) and one ``optimizer.apply_gradients``; the measured pass computes L and the
gradients w.r.t. x and the trainable variables, and applies none. The gradients come
from ONE hook, :meth:`KerasFamilyEngine.forward_and_gradients`: ``tf.GradientTape`` on
TensorFlow, ``jax.value_and_grad`` over ``stateless_call`` on JAX, autograd on PyTorch.
"""

from __future__ import annotations

import contextlib

import numpy as np

from bnexplore.engines import EngineResult, Session, State, history_of, parameter_history_of
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import ADAM_BETAS

TRAINING = {"none": None, "true": True, "false": False}
PORT_ORDER = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)
"""Keras weight ← PyTorch state, the order of ``set_weights`` without its optional gaps."""


def nhwc_shape(scenario: Scenario) -> tuple[int, ...]:
    shape = scenario.shape
    return (shape[0], *shape[2:], shape[1])


class KerasFamilyEngine:
    """A Keras BatchNormalization run for real; subclasses build the layer on a backend."""

    name: str
    label: str
    version: str
    prefix: str
    """Whose knobs it reads: keras_* for every Keras 3 backend, keras2_* for tf_keras."""
    receives_port: bool = False
    """Whether keras_init (a PyTorch state ported in) applies: every Keras 3 engine."""

    layer_class: type
    """The framework's BatchNormalization class."""
    optimizers: object
    """The framework's optimizers module (keras.optimizers, tf_keras.optimizers)."""

    # --- the backend's hooks ------------------------------------------------------------
    def resolve_device(self, requested: str) -> tuple[object | None, str]:
        """The device to run on (None: not there), and why."""
        raise NotImplementedError

    def describe(self, device: object) -> str:
        return str(device)

    def scope(self, device: object) -> contextlib.AbstractContextManager:
        """The context in which layers and tensors land on ``device``."""
        return contextlib.nullcontext()

    def tensor(self, array: np.ndarray):
        raise NotImplementedError

    def snapshot(self, variables: tuple) -> object:
        """The moving statistics now, kept on the device until the end (np.asarray reads it)."""
        raise NotImplementedError

    def numpy(self, tensor) -> np.ndarray:
        """A tensor as NumPy, sharing its buffer where the backend allows."""
        return np.asarray(tensor)

    def assign(self, variable, values: np.ndarray) -> None:
        """Set a layer variable to float64 values, cast to the variable's dtype."""
        raise NotImplementedError

    def forward_and_gradients(self, session: KerasSession, x, target, training, wrt_x: bool):
        """(y, L, dL/dx or None, {id(variable): dL/dvariable}) of one pass, the moving
        statistics updated as the call does; the variables are the layer's trainable ones
        (none on a frozen layer). The one place the Keras family computes gradients."""
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    def build_optimizer(self, scenario: Scenario):
        """The scenario's optimizer; a knob left at ``default`` is not passed, so the
        library's own default applies."""
        p = self.prefix
        kind = scenario[f"{p}_optimizer"]
        kwargs: dict = {}
        if scenario[f"{p}_lr"] is not None:
            kwargs["learning_rate"] = scenario[f"{p}_lr"]
        if scenario[f"{p}_weight_decay"] is not None:
            kwargs["weight_decay"] = scenario[f"{p}_weight_decay"]
        if kind == "sgd":
            return self.optimizers.SGD(momentum=scenario[f"{p}_opt_momentum"], **kwargs)
        if scenario[f"{p}_adam_eps"] is not None:
            kwargs["epsilon"] = scenario[f"{p}_adam_eps"]
        adam = self.optimizers.Adam if kind == "adam" else self.optimizers.AdamW
        return adam(beta_1=ADAM_BETAS[0], beta_2=ADAM_BETAS[1], **kwargs)

    def options(self, scenario: Scenario) -> dict:
        """Constructor arguments beyond the shared ones (Keras 2: fused)."""
        return {}

    def build(self, scenario: Scenario):
        """A fresh channels-last layer in the scenario's dtype and settings."""
        p = self.prefix
        layer = self.layer_class(
            axis=-1,
            momentum=scenario[f"{p}_momentum"],
            epsilon=scenario[f"{p}_eps"],
            center=scenario[f"{p}_center"],
            scale=scenario[f"{p}_scale"],
            dtype=scenario["dtype"],
            **self.options(scenario),
        )
        layer.build(nhwc_shape(scenario))
        if not scenario[f"{p}_trainable"]:  # a fresh layer is trainable already
            layer.trainable = False
        return layer

    def detail(self, layer) -> str | None:
        return None

    def start(self, scenario: Scenario) -> Session | EngineResult:
        device, note = self.resolve_device(scenario["device"])
        if device is None:
            return EngineResult(self.name, available=False, version=self.version, reason=note)
        where = {"version": self.version, "device": self.describe(device), "device_note": note}
        with self.scope(device):
            layer = self.build(scenario)
        return KerasSession(self, where, scenario, layer, device)


class KerasSession(Session):
    """Training passes are layer(x, training=True); the measured pass as the scenario says.

    A layer that starts from a ported state (``port``) runs no training passes of
    its own: the port stands for them.
    """

    def __init__(self, engine: KerasFamilyEngine, where: dict, scenario: Scenario, layer, device):
        self.engine, self.name, self.where = engine, engine.name, where
        self.layer, self.device = layer, device
        self.steps = scenario["steps"]
        self.measured_training = TRAINING[scenario[f"{engine.prefix}_training"]]
        self.ported = engine.receives_port and scenario["keras_init"] != "fresh"
        self.steps_seen: list[int] = []
        self.recorded: list = []
        self.output = None
        self.optimizer = None
        if scenario["loss"] != "none":
            with engine.scope(device):
                self.optimizer = engine.build_optimizer(scenario)
        self.parameters_seen: list = []  # (γ or None, β or None) per pass with a loss
        self.gamma = self.beta = None
        self.loss = self.grad_x = self.grad_gamma = self.grad_beta = None

    def _parameters(self) -> tuple:
        layer, numpy = self.layer, self.engine.numpy
        return tuple(
            None if v is None else np.array(numpy(v), copy=True) for v in (layer.gamma, layer.beta)
        )

    def call(self, x, training: bool | None):
        return self.layer(x) if training is None else self.layer(x, training=training)

    def port(self, state: State) -> None:
        """Copy a PyTorch state into the layer, weight by weight (a layer without γ or β,
        scale or center off, keeps none)."""
        with self.engine.scope(self.device):
            for keras_name, torch_name in PORT_ORDER:
                variable = getattr(self.layer, keras_name, None)
                if variable is not None:
                    self.engine.assign(variable, np.asarray(state[torch_name], np.float64))

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        if k == self.steps:
            self.gamma, self.beta = self._parameters()
        if self.ported and k < self.steps:
            return
        layer, engine = self.layer, self.engine
        training = True if k < self.steps else self.measured_training
        with engine.scope(self.device):
            x = engine.tensor(np.moveaxis(batch, 1, -1))
            if target is None:
                self.output = self.call(x, training)
            else:
                t = engine.tensor(np.moveaxis(target, 1, -1))
                self._step_with_loss(k, x, t, training)
            self.recorded.append(engine.snapshot((layer.moving_mean, layer.moving_variance)))
        self.steps_seen.append(k)
        if target is not None:
            self.parameters_seen.append(self._parameters())

    def _step_with_loss(self, k: int, x, target, training: bool | None) -> None:
        layer, engine = self.layer, self.engine
        measured = k == self.steps
        y, loss, grad_x, grads = engine.forward_and_gradients(
            self, x, target, training, wrt_x=measured
        )
        self.output = y
        if not measured:
            pairs = [(grads.get(id(v)), v) for v in layer.trainable_variables]
            pairs = [(g, v) for g, v in pairs if g is not None]
            if pairs:
                self.optimizer.apply_gradients(pairs)
            return
        self.loss = float(np.asarray(engine.numpy(loss), dtype=np.float64))
        self.grad_x = np.ascontiguousarray(np.moveaxis(engine.numpy(grad_x), -1, 1))

        def grad_of(variable):
            g = grads.get(id(variable)) if variable is not None else None
            return None if g is None else np.array(engine.numpy(g), copy=True)

        self.grad_gamma, self.grad_beta = grad_of(layer.gamma), grad_of(layer.beta)

    def finish(self) -> EngineResult:
        layer, engine = self.layer, self.engine
        return EngineResult(
            self.name,
            available=True,
            detail=engine.detail(layer),
            output=np.ascontiguousarray(np.moveaxis(engine.numpy(self.output), -1, 1)),
            running_mean=np.array(engine.numpy(layer.moving_mean)),
            running_var=np.array(engine.numpy(layer.moving_variance)),
            history=history_of(
                self.steps_seen,
                [engine.numpy(r)[0] for r in self.recorded],
                [engine.numpy(r)[1] for r in self.recorded],
            ),
            **self.training_fields(),
            parameter_history=parameter_history_of(
                self.steps_seen if self.parameters_seen else [],
                [g for g, _ in self.parameters_seen],
                [b for _, b in self.parameters_seen],
            ),
            **self.where,
        )

    def failed(self, exc: Exception) -> EngineResult:
        result = super().failed(exc)
        detail = self.engine.detail(self.layer) if self.layer.built else None
        return EngineResult(**{**result.__dict__, "detail": detail})
