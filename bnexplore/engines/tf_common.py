"""What the Keras 3 and Keras 2 engines share: TensorFlow devices and the run loop.

Both run the batch channels-last (``axis=-1``). A training pass is
``layer(x, training=True)``; the measured pass is ``layer(x)`` (training None)
or ``layer(x, training=…)`` as the scenario's ``<prefix>_training`` says.

With loss=mse a training pass also computes ``L = mean((y − T)²)``, its gradients
w.r.t. ``layer.trainable_variables`` (none on a ``trainable=False`` layer, which runs
inference) and one ``optimizer.apply_gradients``; the measured pass computes L and the
gradients w.r.t. x and the trainable variables, and applies none. The gradients come
from ONE method, :meth:`KerasSession.forward_and_gradients` (``tf.GradientTape`` here),
which a session on another Keras backend overrides.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from bnexplore.engines import (
    EngineResult,
    Session,
    State,
    history_of,
    parameter_history_of,
)
from bnexplore.params import ADAM_BETAS
from bnexplore.scenario import Scenario

TRAINING = {"none": None, "true": True, "false": False}
PORT_ORDER = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)
"""Keras weight ← PyTorch state, the order of ``set_weights`` without its optional gaps."""


def resolve_device(requested: str) -> tuple[str | None, str]:
    """The TensorFlow device to run on (None: not there), and why."""
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if requested == "cpu":
        return "/CPU:0", "device=cpu asked for"
    if requested == "cuda":
        if not has_gpu:
            return None, "device=cuda, but TensorFlow sees no GPU"
        return "/GPU:0", "device=cuda asked for"
    if has_gpu:
        return "/GPU:0", "auto: TensorFlow sees a GPU"
    return "/CPU:0", "auto: TensorFlow sees no GPU, ran on CPU"


def nhwc_shape(scenario: Scenario) -> tuple[int, ...]:
    shape = scenario.shape
    return (shape[0], *shape[2:], shape[1])


class KerasFamilyEngine:
    """A Keras BatchNormalization run for real; subclasses build the layer."""

    name: str
    label: str
    version: str
    prefix: str

    layer_class: type
    """The framework's BatchNormalization class."""
    optimizers: object
    """The framework's optimizers module (keras.optimizers, tf_keras.optimizers)."""

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
        layer.trainable = scenario[f"{p}_trainable"]
        return layer

    def detail(self, layer) -> str | None:
        return None

    def start(self, scenario: Scenario) -> Session | EngineResult:
        device, note = resolve_device(scenario["device"])
        if device is None:
            return EngineResult(self.name, available=False, version=self.version, reason=note)
        where = {
            "version": self.version,
            "device": "cpu" if device == "/CPU:0" else "gpu:0",
            "device_note": note,
        }
        with tf.device(device):
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
        self.ported = engine.prefix == "keras" and scenario["keras_init"] != "fresh"
        self.steps_seen: list[int] = []
        self.recorded: list = []
        self.output = None
        self.optimizer = engine.build_optimizer(scenario) if scenario["loss"] != "none" else None
        self.parameters_seen: list = []  # (γ or None, β or None) per pass with a loss
        self.gamma = self.beta = None
        self.loss = self.grad_x = self.grad_gamma = self.grad_beta = None

    def _parameters(self) -> tuple:
        layer = self.layer
        return tuple(
            None if v is None else np.array(v.numpy(), copy=True) for v in (layer.gamma, layer.beta)
        )

    def call(self, x, training: bool | None):
        return self.layer(x) if training is None else self.layer(x, training=training)

    def forward_and_gradients(self, x, target, training: bool | None, wrt_x: bool):
        """(y, L, dL/dx or None, {id(variable): dL/dvariable}) of one pass, by tf.GradientTape.

        The variables are ``layer.trainable_variables``: none on a frozen layer. The one
        place the Keras family computes gradients: a session on Keras's JAX or PyTorch
        backend overrides this method and keeps the rest (``apply_gradients`` takes its
        gradients as they are)."""
        variables = list(self.layer.trainable_variables)
        with tf.GradientTape() as tape:
            if wrt_x:
                tape.watch(x)
            y = self.call(x, training)
            loss = tf.reduce_mean(tf.square(y - target))
        sources = ([x] if wrt_x else []) + variables
        grads = tape.gradient(loss, sources) if sources else []
        grad_x = grads[0] if wrt_x else None
        by_variable = grads[len(sources) - len(variables) :]
        return y, loss, grad_x, dict(zip(map(id, variables), by_variable, strict=True))

    def port(self, state: State) -> None:
        """Copy a PyTorch state into the layer, weight by weight."""
        with tf.device(self.device):
            for keras_name, torch_name in PORT_ORDER:
                variable = getattr(self.layer, keras_name, None)
                if variable is not None:
                    variable.assign(state[torch_name].astype(variable.dtype))

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        if k == self.steps:
            self.gamma, self.beta = self._parameters()
        if self.ported and k < self.steps:
            return
        layer = self.layer
        training = True if k < self.steps else self.measured_training
        with tf.device(self.device):
            x = tf.convert_to_tensor(np.moveaxis(batch, 1, -1))
            if target is None:
                self.output = self.call(x, training)
            else:
                t = tf.convert_to_tensor(np.moveaxis(target, 1, -1))
                self._step_with_loss(k, x, t, training)
            moving = (layer.moving_mean, layer.moving_variance)
            self.recorded.append(tf.stack([tf.convert_to_tensor(v) for v in moving]))
        self.steps_seen.append(k)
        if target is not None:
            self.parameters_seen.append(self._parameters())

    def _step_with_loss(self, k: int, x, target, training: bool | None) -> None:
        layer = self.layer
        measured = k == self.steps
        y, loss, grad_x, grads = self.forward_and_gradients(x, target, training, wrt_x=measured)
        self.output = y
        if not measured:
            pairs = [(grads[id(v)], v) for v in layer.trainable_variables]
            pairs = [(g, v) for g, v in pairs if g is not None]
            if pairs:
                self.optimizer.apply_gradients(pairs)
            return
        self.loss = float(np.asarray(loss, dtype=np.float64))
        self.grad_x = np.ascontiguousarray(np.moveaxis(np.asarray(grad_x), -1, 1))

        def grad_of(variable):
            g = grads.get(id(variable)) if variable is not None else None
            return None if g is None else np.array(g, copy=True)

        self.grad_gamma, self.grad_beta = grad_of(layer.gamma), grad_of(layer.beta)

    def finish(self) -> EngineResult:
        layer = self.layer
        return EngineResult(
            self.name,
            available=True,
            detail=self.engine.detail(layer),
            # np.asarray shares the tensor's buffer (.numpy() would copy it first)
            output=np.ascontiguousarray(np.moveaxis(np.asarray(self.output), -1, 1)),
            running_mean=layer.moving_mean.numpy().copy(),
            running_var=layer.moving_variance.numpy().copy(),
            history=history_of(
                self.steps_seen, [r[0] for r in self.recorded], [r[1] for r in self.recorded]
            ),
            gamma=self.gamma,
            beta=self.beta,
            loss=self.loss,
            grad_x=self.grad_x,
            grad_gamma=self.grad_gamma,
            grad_beta=self.grad_beta,
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
