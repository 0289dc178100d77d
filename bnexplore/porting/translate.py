"""The translator: one framework's BatchNorm configuration as another's, in code.

Four conventions: PyTorch, Keras (3 on any backend, and 2), Flax. PyTorch → Keras:
momentum 1 − m, the same eps, axis=-1 on channels-last input, training=True for
.train() and training=False for .eval(). Keras → PyTorch: momentum 1 − μ, the
same eps, channels-first input, .train() only where Keras really trains
(training=True on a trainable layer), .eval() otherwise — ``requires_grad_(False)``
is not the translation of ``trainable=False``. Flax shares Keras's momentum
convention and PyTorch's eps default; ``use_running_average`` is the opposite of
PyTorch's training mode.

With a loss (loss=mse), the optimizer too: each framework's defaults written out (PyTorch's
SGD lr 0.001, Keras's 0.01), PyTorch's L2 weight decay (SGD, Adam) as a term of the loss in
Keras, whose weight decay is decoupled, Keras's decoupled decay as PyTorch's AdamW, and
Adam's ε with a note on where each adds it.
"""

from __future__ import annotations

from bnexplore.engines.registry import REGISTRY
from bnexplore.scenario.conventions import feeds_unbiased_variance, uses_batch_statistics
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import resolved

_TORCH_MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
_CHANNELS_LAST = {
    2: "x",
    3: "x.permute(0, 2, 1)",
    4: "x.permute(0, 2, 3, 1)",
    5: "x.permute(0, 2, 3, 4, 1)",
}
_CHANNELS_FIRST = {
    2: "x",
    3: "x.permute(0, 2, 1)",
    4: "x.permute(0, 3, 1, 2)",
    5: "x.permute(0, 4, 1, 2, 3)",
}


def _torch_module(s: Scenario, eps: float, momentum: float | None, affine: bool) -> str:
    rank = len(s.shape)
    return (
        f"bn = torch.nn.{_TORCH_MODULES[rank]}({s.channels}, eps={eps!r}, "
        f"momentum={momentum!r}, affine={affine})"
    )


def _keras_layer(eps: float, momentum: float, center: bool, scale: bool) -> str:
    return (
        f"layer = keras.layers.BatchNormalization(axis=-1, momentum={momentum!r}, "
        f"epsilon={eps!r}, center={center}, scale={scale})"
    )


_KERAS_PORT = (
    "layer.set_weights([sd['weight'], sd['bias'], sd['running_mean'], sd['running_var']])"
    "  # your layer (init=state); gamma/beta only where scale/center"
)


def _complement(m: float) -> float:
    return round(1.0 - m, 12)


EPS_PLACEMENT = (
    "# Adam's ε: PyTorch adds it to the bias-corrected √v̂, Keras to √v, i.e. ε̂ = "
    "ε·√(1 − β₂ᵗ) in PyTorch's terms:\n# no constant makes them equal at every step"
)
KERAS_STEP = """with tf.GradientTape() as tape:
    y = layer({x}, training=True)
    loss = keras.ops.mean((y - {t}) ** 2){l2}
grads = tape.gradient(loss, layer.trainable_variables)
optimizer.apply_gradients(zip(grads, layer.trainable_variables))"""
TORCH_STEP = """optimizer.zero_grad()
loss = torch.mean((bn({x}) - {t}) ** 2){decay}
loss.backward()
optimizer.step()"""


def _torch_optimizer(kind: str, lr: float, wd: float, eps: float, momentum: float) -> str:
    if kind == "sgd":
        return (
            f"optimizer = torch.optim.SGD(bn.parameters(), lr={lr!r}, momentum={momentum!r}, "
            f"weight_decay={wd!r})"
        )
    name = "Adam" if kind == "adam" else "AdamW"
    return (
        f"optimizer = torch.optim.{name}(bn.parameters(), lr={lr!r}, eps={eps!r}, "
        f"weight_decay={wd!r})"
    )


def _keras_optimizer(kind: str, lr: float, wd: float, eps: float, momentum: float) -> str:
    decay = f", weight_decay={wd!r}" if wd else ""
    if kind == "sgd":
        return (
            f"optimizer = keras.optimizers.SGD(learning_rate={lr!r}, momentum={momentum!r}{decay})"
        )
    name = "Adam" if kind == "adam" else "AdamW"
    return f"optimizer = keras.optimizers.{name}(learning_rate={lr!r}, epsilon={eps!r}{decay})"


def _settings(s: Scenario, prefix: str) -> tuple[str, float, float, float, float]:
    return (
        s[f"{prefix}_optimizer"],
        resolved(s, prefix, "lr"),
        resolved(s, prefix, "weight_decay"),
        resolved(s, prefix, "adam_eps"),
        s[f"{prefix}_opt_momentum"],
    )


def _torch_training_to_keras(s: Scenario) -> list[str]:
    kind, lr, wd, eps, momentum = _settings(s, "torch")
    lines = ["", "# Training step, PyTorch (loss=mse, target t; every default written out)"]
    lines += [
        _torch_optimizer(kind, lr, wd, eps, momentum),
        TORCH_STEP.format(decay="", x="x", t="t"),
    ]
    lines += ["", "# Keras 3, the same step"]
    l2 = ""
    if kind == "adamw":
        lines.append(_keras_optimizer("adamw", lr, wd, eps, momentum))
    else:
        lines.append(_keras_optimizer(kind, lr, 0.0, eps, momentum))
        if wd:
            l2 = (
                f"\n    # PyTorch's {kind} adds wd·p to the gradient (L2); Keras's weight_decay "
                f"is decoupled\n    loss += {wd / 2!r} * sum(keras.ops.sum(v ** 2) "
                "for v in layer.trainable_variables)"
            )
    last = _CHANNELS_LAST[len(s.shape)]
    lines.append(KERAS_STEP.format(l2=l2, x=last, t=last.replace("x", "t")))
    if kind != "sgd":
        lines.append(EPS_PLACEMENT)
    if not s["torch_requires_grad"]:
        lines.append(
            "# requires_grad_(False): no γ/β update, but still the batch statistics; "
            "Keras: leave trainable=True and drop γ/β from the update, not trainable=False"
        )
    return lines


def _keras_training_to_torch(s: Scenario) -> list[str]:
    kind, lr, wd, eps, momentum = _settings(s, "keras")
    lines = ["", "# Training step, Keras 3 (loss=mse, target t; every default written out)"]
    lines += [_keras_optimizer(kind, lr, wd, eps, momentum), KERAS_STEP.format(l2="", x="x", t="t")]
    lines += ["", "# PyTorch, the same step"]
    decay = ""
    if kind == "sgd":
        lines.append(_torch_optimizer("sgd", lr, 0.0, eps, momentum))
        if wd:
            decay = (
                "\nwith torch.no_grad():  # Keras decays the weight itself, before the update\n"
                f"    for p in bn.parameters():\n        p.mul_(1 - {lr!r} * {wd!r})"
            )
    else:
        lines.append(_torch_optimizer("adamw" if wd else "adam", lr, wd, eps, momentum))
    first = _CHANNELS_FIRST[len(s.shape)]
    lines.append(TORCH_STEP.format(decay=decay, x=first, t=first.replace("x", "t")))
    if kind != "sgd":
        lines.append(EPS_PLACEMENT)
    if not s["keras_trainable"]:
        lines.append(
            "# trainable=False: no γ/β update AND inference (the gradient w.r.t. x is "
            "γ/√(running_var + eps)·dy): bn.eval() and bn.requires_grad_(False)"
        )
    return lines


def _torch_as_in(s: Scenario) -> list[str]:
    """The scenario's PyTorch module and call: the source side of a translation from it."""
    batch = uses_batch_statistics(s, "torch")
    return [
        "# PyTorch, as in this scenario (x is channels-first)",
        _torch_module(s, s["torch_eps"], s["torch_momentum"], s["torch_affine"]),
        f"bn.train({batch})" if s["torch_track_running_stats"] else "# no running statistics",
        "y = bn(x)",
    ]


def _target_momentum(m: float | None) -> float:
    """PyTorch's momentum m in the Keras and Flax convention, 1 − m; for m=None (a
    cumulative average, which no fixed momentum equals beyond the first step) 0.9, the
    translation of PyTorch's default 0.1."""
    return 0.9 if m is None else _complement(m)


def torch_to_keras(s: Scenario) -> str:
    """The scenario's PyTorch module, and the Keras 3 layer that computes the same."""
    m = s["torch_momentum"]
    batch = uses_batch_statistics(s, "torch")
    lines = [
        *_torch_as_in(s),
        "",
        "# Keras 3, the same computation (channels-last input)",
        _keras_layer(s["torch_eps"], _target_momentum(m), s["torch_affine"], s["torch_affine"]),
        f"y = layer({_CHANNELS_LAST[len(s.shape)]}, training={batch})",
    ]
    if s["init"] == "state":
        lines[2:2] = ["bn.load_state_dict(sd)  # sd: your layer's state_dict (init=state)"]
        lines[-1:-1] = [_KERAS_PORT]
    if m is None:
        lines.insert(
            -1,
            "# momentum=None is a cumulative average: no fixed Keras momentum "
            "equals it beyond the first step",
        )
    lines += [
        "# Still different: Keras 3 feeds the biased batch variance into moving_variance,",
        "# PyTorch the unbiased one (× n/(n − 1)). Ported weights: weight→gamma, bias→beta,",
        "# running_mean→moving_mean, running_var→moving_variance.",
    ]
    if s["loss"] != "none":
        lines += _torch_training_to_keras(s)
    return "\n".join(lines)


def keras_to_torch(s: Scenario) -> str:
    """The scenario's Keras 3 layer, and the PyTorch module that computes the same."""
    training = s["keras_training"]
    call = "layer(x)" if training == "none" else f"layer(x, training={training.title()})"
    batch = uses_batch_statistics(s, "keras")
    lines = [
        "# Keras 3, as in this scenario (x is channels-last)",
        _keras_layer(s["keras_eps"], s["keras_momentum"], s["keras_center"], s["keras_scale"]),
        f"layer.trainable = {s['keras_trainable']}",
        f"y = {call}",
        "",
        "# PyTorch, the same computation (channels-first input)",
        _torch_module(
            s,
            s["keras_eps"],
            _complement(s["keras_momentum"]),
            s["keras_center"] or s["keras_scale"],
        ),
        f"bn.train({batch})" + ("" if batch else "  # Keras infers here: that is .eval()"),
        f"y = bn({_CHANNELS_FIRST[len(s.shape)]})",
    ]
    if s["init"] == "state":
        lines[2:2] = [_KERAS_PORT]
        lines[-2:-2] = ["bn.load_state_dict(sd)  # the same four vectors"]
    if not s["keras_trainable"]:
        lines.append("# trainable=False is .eval() in PyTorch, not requires_grad_(False)")
    if feeds_unbiased_variance(s, "torch") and batch:
        lines.append(
            "# Still different: PyTorch's running_var takes the unbiased batch "
            "variance, Keras 3's the biased one."
        )
    if s["loss"] != "none":
        lines += _keras_training_to_torch(s)
    return "\n".join(lines)


def _flax_layer(s: Scenario, eps: float, momentum: float, bias: bool, scale: bool) -> str:
    return (
        f"bn = nnx.BatchNorm({s.channels}, momentum={momentum!r}, epsilon={eps!r}, "
        f"use_bias={bias}, use_scale={scale}, rngs=nnx.Rngs(0))"
    )


_TWO_PASS = "use_fast_variance=False"


def torch_to_flax(s: Scenario) -> str:
    """The scenario's PyTorch module, and the Flax nnx layer that computes the same."""
    batch = uses_batch_statistics(s, "torch")
    lines = [
        *_torch_as_in(s),
        "",
        "# Flax nnx, the same computation (channels-last input)",
        _flax_layer(
            s,
            s["torch_eps"],
            _target_momentum(s["torch_momentum"]),
            s["torch_affine"],
            s["torch_affine"],
        ).replace("rngs=", f"{_TWO_PASS}, rngs="),
        f"y = bn(jnp.moveaxis(x, 1, -1), use_running_average={not batch})",
        "# Still different: Flax feeds the biased batch variance into its running var,",
        "# PyTorch the unbiased one (× n/(n − 1)). Ported state: weight→scale, bias→bias,",
        "# running_mean→mean, running_var→var.",
    ]
    return "\n".join(lines)


def flax_to_torch(s: Scenario) -> str:
    """The scenario's Flax nnx layer, and the PyTorch module that computes the same."""
    batch = uses_batch_statistics(s, "flax")
    lines = [
        "# Flax nnx, as in this scenario (x is channels-last)",
        _flax_layer(
            s, s["flax_eps"], s["flax_momentum"], s["flax_use_bias"], s["flax_use_scale"]
        ).replace("rngs=", f"use_fast_variance={s['flax_use_fast_variance']}, rngs="),
        f"y = bn(x, use_running_average={not batch})",
        "",
        "# PyTorch, the same computation (channels-first input)",
        _torch_module(
            s,
            s["flax_eps"],
            _complement(s["flax_momentum"]),
            s["flax_use_bias"] or s["flax_use_scale"],
        ),
        f"bn.train({batch})",
        f"y = bn({_CHANNELS_FIRST[len(s.shape)]})",
    ]
    if s["flax_use_fast_variance"] and batch:
        lines.append("# Flax's use_fast_variance=True takes E[x²] − E[x]²: set it False to match.")
    return "\n".join(lines)


def keras_to_flax(s: Scenario) -> str:
    """The scenario's Keras 3 layer, and the Flax nnx layer that computes the same."""
    training = s["keras_training"]
    call = "layer(x)" if training == "none" else f"layer(x, training={training.title()})"
    batch = uses_batch_statistics(s, "keras")
    return "\n".join(
        [
            "# Keras 3, as in this scenario (x is channels-last, as in Flax)",
            _keras_layer(s["keras_eps"], s["keras_momentum"], s["keras_center"], s["keras_scale"]),
            f"layer.trainable = {s['keras_trainable']}",
            f"y = {call}",
            "",
            "# Flax nnx, the same computation: the same momentum convention",
            _flax_layer(
                s, s["keras_eps"], s["keras_momentum"], s["keras_center"], s["keras_scale"]
            ).replace("rngs=", f"{_TWO_PASS}, rngs="),
            f"y = bn(x, use_running_average={not batch})"
            + ("" if batch else "  # Keras infers here"),
        ]
    )


def flax_to_keras(s: Scenario) -> str:
    """The scenario's Flax nnx layer, and the Keras 3 layer that computes the same."""
    batch = uses_batch_statistics(s, "flax")
    return "\n".join(
        [
            "# Flax nnx, as in this scenario (x is channels-last, as in Keras)",
            _flax_layer(
                s, s["flax_eps"], s["flax_momentum"], s["flax_use_bias"], s["flax_use_scale"]
            ),
            f"y = bn(x, use_running_average={not batch})",
            "",
            "# Keras 3, the same computation: the same momentum convention",
            _keras_layer(
                s["flax_eps"], s["flax_momentum"], s["flax_use_bias"], s["flax_use_scale"]
            ),
            f"y = layer(x, training={batch})"
            + ("  # a direct layer(x) would infer" if batch else ""),
        ]
    )


CONVENTIONS = {engine.name: engine.convention for engine in REGISTRY}
"""Engine → whose conventions it follows (Keras 2's are Keras 3's, its fused path aside)."""

TRANSLATORS = {
    ("PyTorch", "Keras 3"): torch_to_keras,
    ("Keras 3", "PyTorch"): keras_to_torch,
    ("PyTorch", "Flax"): torch_to_flax,
    ("Flax", "PyTorch"): flax_to_torch,
    ("Keras 3", "Flax"): keras_to_flax,
    ("Flax", "Keras 3"): flax_to_keras,
}
"""(from, to) → the translator, for every pair of conventions."""


def translation_pair(s: Scenario) -> tuple[str, str]:
    """The two conventions the Code tab translates between: the scenario's first two that
    differ, or PyTorch and Keras 3 where its engines share one."""
    conventions = list(dict.fromkeys(CONVENTIONS[e] for e in s["engines"]))
    if len(conventions) >= 2:
        return conventions[0], conventions[1]
    other = "Keras 3" if conventions[0] != "Keras 3" else "PyTorch"
    return conventions[0], other
