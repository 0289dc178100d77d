"""The scenario's parameters: one declarative table.

Every knob of a scenario is one row of :data:`PARAMS`. The sidebar widgets, the
link codec (:mod:`bnexplore.scenario.links`), validation, the CLI and the link reference
in docs/links.md are all derived from it, so adding a knob is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bnexplore.engines.registry import REGISTRY
from bnexplore.settings import MAX_DIMS, MAX_ELEMENTS, MIN_DIMS

LINK_VERSION = 1
"""The link format's version, written as ``v`` into every canonical link."""

Kind = Literal[
    "shape", "choice", "choices", "int", "float", "bool", "momentum", "digest", "name", "or_default"
]

ENGINE_NAMES = tuple(engine.name for engine in REGISTRY)
"""Engines a scenario may compare: the rows of bnexplore.engines.REGISTRY."""

KNOB_PREFIX = {engine.name: engine.knobs for engine in REGISTRY}
"""Whose knobs an engine reads: PyTorch on CUDA is configured by the torch_* keys, and
Keras 3 on every backend by the keras_* keys (the same layer, another kernel)."""


OWN_KNOBS = {engine.own_knobs: engine.knobs for engine in REGISTRY if engine.own_knobs}
"""Prefixes of knobs one engine alone reads → the knobs it reads beside them: onnx_exporter
goes with the torch_* keys, litert_quantize with the keras_* keys (each shown where an engine
of those knobs is compared, and part of their engine links: an engine's result depends only on
its engine link)."""


def knobs(engine: str) -> str:
    """The key prefix of an engine's knobs: torch_gpu reads torch_eps, torch_mode, …"""
    return KNOB_PREFIX[engine]


DTYPES = ("float32", "float64", "float16", "bfloat16")

TABS: dict[str, str] = {
    "overview": "Overview",
    "outputs": "Outputs",
    "running": "Running statistics",
    "training": "Training",
    "layer": "Your layer",
    "sweep": "Sweep",
    "explain": "Explain",
    "code": "Code",
    "model": "Your model",
}
"""The page's tabs: the link's ``tab`` slug → its label. ``tab`` belongs to the link, not to
the scenario: it opens the page on that tab and never changes a result."""

GROUPS: dict[str, str] = {
    "input": "Input batch",
    "layer": "Your layer",
    "run": "Run",
    "torch": "PyTorch module",
    "keras": "Keras 3 layer",
    "keras2": "Keras 2 layer (tf_keras)",
    "flax": "Flax layer (nnx.BatchNorm)",
    "onnx": "ONNX export (ONNX Runtime)",
    "litert": "LiteRT conversion",
    "training": "Training",
    "sweep": "Sweep",
    "model": "Your model",
}
"""Sidebar groups, in the order they are shown (sweep and model: in their own tabs)."""


@dataclass(frozen=True)
class Param:
    """One scenario parameter: its link key, type, default, bounds and help.

    ``low``/``high`` are inclusive bounds to clamp to, except where
    ``low_open`` says the lower bound itself is not allowed (eps > 0): a value
    there cannot be clamped and is dropped. ``only_for`` names the ``input``
    kinds for which the parameter matters (the widget is hidden otherwise).
    """

    key: str
    kind: Kind
    default: Any
    group: str
    label: str
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    step: float | None = None
    only_for: tuple[str, ...] = ()
    needs_loss: bool = False
    """Matters only with a loss (loss=mse): the widget is hidden otherwise."""
    words: tuple[tuple[str, str], ...] = ()
    """A choice's value → what its widget shows, where the value alone would mislead (the
    link keeps the value)."""

    def describe_range(self) -> str:
        """The allowed values, in words, for notices and docs."""
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind == "choices":
            return "comma-separated, from " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true | false"
        if self.kind == "shape":
            return (
                f"{MIN_DIMS} to {MAX_DIMS} positive integers, channels-first, "
                f"at most {MAX_ELEMENTS:,} values"
            )
        if self.kind == "momentum":
            return f"a number in [{self.low:g}, {self.high:g}] or none"
        if self.kind == "digest":
            return (
                "the SHA-256 of a file in this server's store: 64 hex characters, or a "
                "unique prefix of at least 16; none"
            )
        if self.kind == "name":
            return "a name in the file, up to 200 characters"
        if self.kind == "or_default":
            return f"a number ≥ {self.low:g} or default"
        if self.low is None and self.high is None:
            return "any finite number"
        low = f"({_fmt(self.low)}" if self.low_open else f"[{_fmt(self.low)}"
        high = "∞)" if self.high is None else f"{_fmt(self.high)}]"
        return f"{low}, {high}"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-∞"
    return str(x) if isinstance(x, int) else f"{x:g}"


MAX_SWEEP_POINTS = 50

SWEEPABLE = (
    "batch_size",
    "steps",
    "seed",
    "value",
    "mean",
    "std",
    "low",
    "high",
    "torch_eps",
    "torch_momentum",
    "keras_eps",
    "keras_momentum",
    "keras2_eps",
    "keras2_momentum",
    "flax_eps",
    "flax_momentum",
)
"""Parameters a sweep can vary; batch_size is the shape's first dim (N)."""

OPTIMIZERS = ("sgd", "adam", "adamw")

OPTIMIZER_PREFIXES = ("torch", "keras", "keras2", "flax")
"""Knob prefixes that get optimizer knobs (<prefix>_optimizer, _lr, …): one entry each."""

FRAMEWORK_LABELS = {e.knobs: e.label for e in REGISTRY if e.name == e.knobs}
"""A knob prefix in words: the label of the engine of that name."""

OPTIMIZER_DEFAULTS: dict[str, dict[str, dict[str, float]]] = {
    "torch": {
        "sgd": {"lr": 1e-3, "weight_decay": 0.0, "adam_eps": 1e-8},
        "adam": {"lr": 1e-3, "weight_decay": 0.0, "adam_eps": 1e-8},
        "adamw": {"lr": 1e-3, "weight_decay": 1e-2, "adam_eps": 1e-8},
    },
    "keras": {
        "sgd": {"lr": 1e-2, "weight_decay": 0.0, "adam_eps": 1e-7},
        "adam": {"lr": 1e-3, "weight_decay": 0.0, "adam_eps": 1e-7},
        "adamw": {"lr": 1e-3, "weight_decay": 4e-3, "adam_eps": 1e-7},
    },
    "keras2": {
        "sgd": {"lr": 1e-2, "weight_decay": 0.0, "adam_eps": 1e-7},
        "adam": {"lr": 1e-3, "weight_decay": 0.0, "adam_eps": 1e-7},
        "adamw": {"lr": 1e-3, "weight_decay": 4e-3, "adam_eps": 1e-7},
    },
    "flax": {  # optax: no default learning rate (the app's 0.01)
        "sgd": {"lr": 1e-2, "weight_decay": 0.0, "adam_eps": 1e-8},
        "adam": {"lr": 1e-2, "weight_decay": 0.0, "adam_eps": 1e-8},
        "adamw": {"lr": 1e-2, "weight_decay": 1e-4, "adam_eps": 1e-8},
    },
}
"""Each library's own defaults (constructor signatures of torch.optim, keras.optimizers,
tf_keras.optimizers; tests/test_training.py checks them against the libraries). A library
without a default (optax's learning rate) gets the app's 0.01, said so in the help.
Keras's weight_decay=None is 0 here; SGD has no epsilon (the value is unused)."""

TORCH_CONVENTION = ("torch", "flax")
"""Prefixes whose optimizers follow PyTorch's conventions: optax's sgd (trace), adam (ε on
the bias-corrected √v̂), adamw (p·(1 − lr·wd)), and weight decay added to the gradient
(add_decayed_weights) for sgd and adam."""

ADAM_BETAS = (0.9, 0.999)
"""β₁, β₂ of every Adam and AdamW: each library's default."""


def resolved(scenario_values, prefix: str, knob: str) -> float:
    """A knob's value for the framework: the number given, or the library's default."""
    value = scenario_values[f"{prefix}_{knob}"]
    if value is not None:
        return float(value)
    return OPTIMIZER_DEFAULTS[prefix][scenario_values[f"{prefix}_optimizer"]][knob]


def _defaults_words(prefix: str, knob: str) -> str:
    table = OPTIMIZER_DEFAULTS[prefix]
    return ", ".join(f"{name} {table[name][knob]:g}" for name in OPTIMIZERS)


def optimizer_params(prefix: str) -> tuple[Param, ...]:
    """The optimizer knobs of one framework, in the Training group."""
    who = FRAMEWORK_LABELS[prefix]
    torch_like = prefix in TORCH_CONVENTION
    decay = (
        "L2: added to the gradient (g + wd·p) by SGD and Adam; AdamW decays the weight "
        "(p ← p·(1 − lr·wd))"
        if torch_like
        else "decoupled in every optimizer: p ← p − p·wd·lr, before the update"
    )
    if prefix == "flax":
        decay += " (optax: add_decayed_weights before sgd/adam; adamw)"
    adam = (
        "p −= lr/(1−β₁ᵗ)·m/(√v/√(1−β₂ᵗ) + ε): ε added to the bias-corrected √v̂"
        if torch_like
        else "p −= lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε): ε added to √v (epsilon hat)"
    )
    lr_default = f"default: {who}'s own default ({_defaults_words(prefix, 'lr')})."
    if prefix == "flax":
        lr_default = "default: optax has none; the app's 0.01."
    return (
        Param(
            f"{prefix}_optimizer",
            "choice",
            "sgd",
            "training",
            f"{who} optimizer",
            f"The optimizer that moves {who}'s γ and β after each training pass's backward "
            "(β₁, β₂ = 0.9, 0.999). Only what that framework trains moves.",
            choices=OPTIMIZERS,
            needs_loss=True,
        ),
        Param(
            f"{prefix}_lr",
            "or_default",
            None,
            "training",
            f"{who} learning rate",
            lr_default,
            low=0.0,
            step=1e-3,
            needs_loss=True,
        ),
        Param(
            f"{prefix}_weight_decay",
            "or_default",
            None,
            "training",
            f"{who} weight decay",
            f"{decay}. default: {_defaults_words(prefix, 'weight_decay')}.",
            low=0.0,
            step=1e-3,
            needs_loss=True,
        ),
        Param(
            f"{prefix}_adam_eps",
            "or_default",
            None,
            "training",
            f"{who} Adam ε",
            f"Adam and AdamW: {adam}. default: {OPTIMIZER_DEFAULTS[prefix]['adam']['adam_eps']:g}.",
            low=0.0,
            step=1e-8,
            needs_loss=True,
        ),
        Param(
            f"{prefix}_opt_momentum",
            "float",
            0.0,
            "training",
            f"{who} SGD momentum",
            "SGD only: "
            + ("buf ← μ·buf + g; p −= lr·buf" if torch_like else "m ← μ·m − lr·g; p += m")
            + ". In [0, 1).",
            low=0.0,
            high=0.999999,
            step=0.1,
            needs_loss=True,
        ),
    )


TRAINING_PARAMS: tuple[Param, ...] = (
    Param(
        "loss",
        "choice",
        "none",
        "training",
        "Loss",
        "none: training passes are forward passes only (no backward, no update). mse: each "
        "training pass computes L = mean((y − T_k)²) over all elements, back-propagates and "
        "takes one optimizer step on γ/β; the measured pass computes L and its gradients "
        "w.r.t. x, γ and β, and takes no step.",
        choices=("none", "mse"),
    ),
    Param(
        "target",
        "choice",
        "zeros",
        "training",
        "Target T",
        "zeros, or normal: T_k from numpy.random.default_rng(seed + 1).standard_normal(shape), "
        "one per pass k = 0 … steps in order, float64 then cast to dtype, channels-first.",
        choices=("zeros", "normal"),
        needs_loss=True,
    ),
    *(row for prefix in OPTIMIZER_PREFIXES for row in optimizer_params(prefix)),
)


PARAMS: tuple[Param, ...] = (
    # --- input batch ---------------------------------------------------------------
    Param(
        "shape",
        "shape",
        (20, 100, 35, 45),
        "input",
        "Shape (N, C, …)",
        "Channels-first like PyTorch: batch, channels, then 0 to 3 spatial dims. Keras "
        "receives the same batch moved to channels-last (axis=-1).",
    ),
    Param(
        "input",
        "choice",
        "ones",
        "input",
        "Values",
        "What the batches hold. Random kinds draw every batch from one "
        "numpy.random.default_rng(seed), in step order.",
        choices=("ones", "constant", "normal", "uniform", "file", "running"),
    ),
    Param(
        "file",
        "digest",
        None,
        "input",
        "Batch file",
        "An uploaded .npy (one batch, used for every pass) or .npz (batch_0, batch_1, … "
        "for the passes in order, the last one for any pass beyond), channels-first; the "
        "shape follows it. Cast to dtype through float64.",
        only_for=("file",),
    ),
    Param(
        "value",
        "float",
        1.0,
        "input",
        "Constant value",
        "Every element of every batch.",
        only_for=("constant",),
    ),
    Param(
        "mean",
        "float",
        0.0,
        "input",
        "Mean",
        "Batches are rng.standard_normal(shape) · std + mean.",
        only_for=("normal",),
    ),
    Param(
        "std",
        "float",
        1.0,
        "input",
        "Std",
        "Standard deviation, ≥ 0.",
        low=0.0,
        only_for=("normal",),
    ),
    Param(
        "low", "float", 0.0, "input", "Low", "rng.uniform(low, high, shape).", only_for=("uniform",)
    ),
    Param("high", "float", 1.0, "input", "High", "Must be above low.", only_for=("uniform",)),
    Param(
        "seed",
        "int",
        0,
        "input",
        "Seed",
        "Seed of numpy.random.default_rng.",
        low=0,
        high=2**32 - 1,
        only_for=("normal", "uniform", "running"),
    ),
    Param(
        "dtype",
        "choice",
        "float32",
        "input",
        "dtype",
        "Batches are made in float64, then cast; every layer is built in this dtype.",
        choices=DTYPES,
    ),
    # --- your layer ------------------------------------------------------------------
    Param(
        "state",
        "digest",
        None,
        "layer",
        "Your layer",
        "An uploaded file holding one or more BatchNorm states: a PyTorch state_dict "
        "(.pt/.pth, read with torch.load(weights_only=True)), .safetensors, .keras, "
        ".weights.h5 or .npz.",
    ),
    Param(
        "layer",
        "name",
        None,
        "layer",
        "Layer",
        "Which BatchNorm of the file, by its name there. none: the first in file order.",
    ),
    Param(
        "init",
        "choice",
        "fresh",
        "layer",
        "Every engine starts from",
        "fresh: a new layer. state: the file's γ, β, running mean and running variance, "
        "in every engine and reference (PyTorch through load_state_dict, Keras through "
        "its four variables); training steps then run from there.",
        choices=("fresh", "state"),
    ),
    # --- run -----------------------------------------------------------------------
    Param(
        "engines",
        "choices",
        ("torch", "keras"),
        "run",
        "Engines to compare",
        "Each pair is compared; the first engine is the expected side. torch_gpu: PyTorch "
        "on CUDA with the PyTorch knobs, beside the other engines' device. keras_jax, "
        "keras_torch: Keras 3 on JAX and on PyTorch, with the Keras 3 knobs. flax: "
        "flax.nnx.BatchNorm. Each framework runs in a worker process of its own.",
        choices=ENGINE_NAMES,
    ),
    Param(
        "steps",
        "int",
        0,
        "run",
        "Training steps before the measured pass",
        "Batches 0 … steps−1 each run one training pass in every engine (PyTorch "
        ".train(), Keras training=True); batch `steps` is then measured.",
        low=0,
        high=1000,
    ),
    Param(
        "torch_mode",
        "choice",
        "train",
        "run",
        "PyTorch measured pass",
        "A new torch module is in training mode: it normalizes with the batch statistics "
        "and updates its running statistics.",
        choices=("train", "eval"),
    ),
    Param(
        "keras_training",
        "choice",
        "none",
        "run",
        "Keras 3 measured pass",
        "none: a direct call layer(x), which is inference; true / false: layer(x, training=…).",
        choices=("none", "true", "false"),
    ),
    Param(
        "keras2_training",
        "choice",
        "none",
        "run",
        "Keras 2 measured pass",
        "none: layer(x) outside fit() is inference; true / false: layer(x, training=…).",
        choices=("none", "true", "false"),
    ),
    Param(
        "device",
        "choice",
        "auto",
        "run",
        "Device",
        "auto: a GPU where the framework sees one, else the CPU.",
        choices=("auto", "cpu", "cuda"),
    ),
    # --- PyTorch ---------------------------------------------------------------------
    Param(
        "torch_eps",
        "float",
        1e-5,
        "torch",
        "eps",
        "Added to the variance before the square root.",
        low=0.0,
        low_open=True,
        step=1e-6,
    ),
    Param(
        "torch_momentum",
        "momentum",
        0.1,
        "torch",
        "momentum",
        "running ← (1 − m)·running + m·batch. none: cumulative average. PyTorch's m "
        "equals Keras's 1 − momentum.",
        low=0.0,
        high=1.0,
        step=0.01,
    ),
    Param(
        "torch_affine",
        "bool",
        True,
        "torch",
        "affine",
        "Learnable weight and bias (1 and 0 on a fresh layer).",
    ),
    Param(
        "torch_track_running_stats",
        "bool",
        True,
        "torch",
        "track_running_stats",
        "false: no running statistics; batch statistics even in eval mode.",
    ),
    Param(
        "torch_requires_grad",
        "bool",
        True,
        "torch",
        "requires_grad",
        "module.requires_grad_(…). false freezes the weights for the optimizer but, "
        "unlike Keras's trainable=False, changes nothing in the forward pass.",
    ),
    # --- Keras 3 ---------------------------------------------------------------------
    Param(
        "keras_eps",
        "float",
        1e-3,
        "keras",
        "epsilon",
        "Added to the variance before the square root.",
        low=0.0,
        low_open=True,
        step=1e-4,
    ),
    Param(
        "keras_momentum",
        "float",
        0.99,
        "keras",
        "momentum",
        "moving ← momentum·moving + (1 − momentum)·batch.",
        low=0.0,
        high=1.0,
        step=0.01,
    ),
    Param("keras_center", "bool", True, "keras", "center", "Learnable beta (0 on a fresh layer)."),
    Param("keras_scale", "bool", True, "keras", "scale", "Learnable gamma (1 on a fresh layer)."),
    Param(
        "keras_trainable",
        "bool",
        True,
        "keras",
        "trainable",
        "layer.trainable. false forces inference, even with training=True, and freezes "
        "the moving statistics.",
    ),
    Param(
        "keras_init",
        "choice",
        "fresh",
        "keras",
        "Starts from",
        "fresh: its own start, a new layer or the file's state (Every engine starts from). "
        "torch: PyTorch's state after its training steps, ported (weight→gamma, "
        "bias→beta, running_mean→moving_mean, running_var→moving_variance); Keras then "
        "runs no training steps of its own. torch_swapped: the classic porting mistake, "
        "mean and variance swapped.",
        choices=("fresh", "torch", "torch_swapped"),
        words=(
            ("fresh", "its own start"),
            ("torch", "PyTorch's state, ported"),
            ("torch_swapped", "PyTorch's, mean and variance swapped"),
        ),
    ),
    # --- Keras 2 ---------------------------------------------------------------------
    Param(
        "keras2_eps",
        "float",
        1e-3,
        "keras2",
        "epsilon",
        "Added to the variance before the square root.",
        low=0.0,
        low_open=True,
        step=1e-4,
    ),
    Param(
        "keras2_momentum",
        "float",
        0.99,
        "keras2",
        "momentum",
        "moving ← momentum·moving + (1 − momentum)·batch.",
        low=0.0,
        high=1.0,
        step=0.01,
    ),
    Param(
        "keras2_center", "bool", True, "keras2", "center", "Learnable beta (0 on a fresh layer)."
    ),
    Param("keras2_scale", "bool", True, "keras2", "scale", "Learnable gamma (1 on a fresh layer)."),
    Param(
        "keras2_trainable",
        "bool",
        True,
        "keras2",
        "trainable",
        "layer.trainable. false forces inference, even with training=True.",
    ),
    Param(
        "keras2_fused",
        "choice",
        "auto",
        "keras2",
        "fused",
        "The fused kernel (4-D or 5-D input, not float64) feeds the unbiased batch variance "
        "into the moving variance, like PyTorch; the non-fused path the biased one, like Keras 3. "
        "auto: fused where it can be.",
        choices=("auto", "true", "false"),
    ),
    # --- Flax ------------------------------------------------------------------------
    Param(
        "flax_use_running_average",
        "bool",
        False,
        "flax",
        "use_running_average",
        "The measured pass: false (a fresh nnx.BatchNorm's default) normalizes with the batch "
        "and updates the statistics, like a new PyTorch module; true uses the running ones. "
        "Training passes always use the batch.",
    ),
    Param(
        "flax_momentum",
        "float",
        0.99,
        "flax",
        "momentum",
        "running ← momentum·running + (1 − momentum)·batch, Keras's convention.",
        low=0.0,
        high=1.0,
        step=0.01,
    ),
    Param(
        "flax_eps",
        "float",
        1e-5,
        "flax",
        "epsilon",
        "Added to the variance before the square root (1e-5, like PyTorch).",
        low=0.0,
        low_open=True,
        step=1e-6,
    ),
    Param("flax_use_bias", "bool", True, "flax", "use_bias", "Learnable bias (0 when fresh)."),
    Param("flax_use_scale", "bool", True, "flax", "use_scale", "Learnable scale (1 when fresh)."),
    Param(
        "flax_use_fast_variance",
        "bool",
        True,
        "flax",
        "use_fast_variance",
        "true: the batch variance as E[x²] − E[x]² in at least float32 (fast, cancels when "
        "|mean| ≫ std); false: the two-pass E[(x − E[x])²].",
    ),
    # --- ONNX export --------------------------------------------------------------------
    Param(
        "onnx_exporter",
        "choice",
        "dynamo",
        "onnx",
        "exporter",
        "How the onnx engine exports the PyTorch module before its measured pass in ONNX "
        "Runtime. dynamo: torch.onnx.export(dynamo=True), PyTorch 2.13's default, which emits "
        "an inference BatchNormalization node even from a module in train mode (the running "
        "statistics normalize). torchscript: dynamo=False, with training=TrainingMode.TRAINING "
        "for a train-mode module: a training node (batch statistics, and ONNX's population "
        "variance into the running variance).",
        choices=("dynamo", "torchscript"),
    ),
    Param(
        "litert_quantize",
        "choice",
        "none",
        "litert",
        "quantize",
        "How the litert engine converts the Keras 3 layer (TFLiteConverter.from_keras_model, "
        "builtin ops). none: float32; the converter folds the layer into a multiply by "
        "γ/√(moving_variance + ε) and an add of β − moving_mean·scale. float16: those two "
        "constants stored as float16 (plus Dequantize).",
        choices=("none", "float16"),
    ),
    # --- your model (shown in the Model tab) ------------------------------------------------
    Param(
        "port",
        "digest",
        None,
        "model",
        "The port",
        "A second file, the port of the model in state=…: its BatchNorm layers are matched "
        "to the source's (by name, else by their statistics) and checked for the classic "
        "mistakes.",
    ),
    Param(
        "source",
        "choice",
        "auto",
        "model",
        "Source framework",
        "The framework the model in state=… was trained in. auto: the file says (PyTorch "
        "names: torch, Keras names: keras; a legacy .h5 by its keras_version; an .onnx by "
        "its producer_name).",
        choices=("auto", "torch", "keras", "keras2", "flax"),
    ),
    Param(
        "source_eps",
        "or_default",
        None,
        "model",
        "Source epsilon",
        "For files that carry no epsilon (a state_dict, .safetensors, .npz, weights only): "
        "the source's. default: the source framework's (1e-5 PyTorch and Flax, 1e-3 Keras).",
        low=0.0,
        low_open=True,
        step=1e-6,
    ),
    Param(
        "source_momentum",
        "or_default",
        None,
        "model",
        "Source momentum",
        "Likewise, in the source framework's own convention (PyTorch m ≡ Keras 1 − m). "
        "default: the source framework's. Inference does not read it; the port check does.",
        low=0.0,
        high=1.0,
        step=0.01,
    ),
    Param(
        "audit_n",
        "int",
        8,
        "model",
        "Audit batch N",
        "Each layer's input: N samples of x[:, c] ~ N(running_mean[c], running_var[c]).",
        low=1,
        high=256,
    ),
    Param(
        "audit_hw",
        "int",
        8,
        "model",
        "Audit spatial size",
        "Each layer's input is N × C × hw × hw.",
        low=1,
        high=64,
    ),
    # --- training step ---------------------------------------------------------------
    *TRAINING_PARAMS,
    # --- sweep (shown in the Sweep tab) ---------------------------------------------------
    Param(
        "sweep",
        "choice",
        "none",
        "sweep",
        "Parameter to sweep",
        "Runs the scenario at each value and charts each pair's gap against it. "
        "batch_size is N, the shape's first dim.",
        choices=("none", *SWEEPABLE),
    ),
    Param("sweep_from", "float", 0.0, "sweep", "From", "First value."),
    Param("sweep_to", "float", 1.0, "sweep", "To", "Last value."),
    Param(
        "sweep_points",
        "int",
        20,
        "sweep",
        "Points",
        "How many values, ends included.",
        low=2,
        high=MAX_SWEEP_POINTS,
    ),
    Param(
        "sweep_scale",
        "choice",
        "linear",
        "sweep",
        "Scale",
        "log: evenly spaced in log10 (from and to above 0).",
        choices=("linear", "log"),
    ),
)

BY_KEY: dict[str, Param] = {p.key: p for p in PARAMS}
SWEEP_KEYS = tuple(p.key for p in PARAMS if p.group == "sweep")
MODEL_KEYS = tuple(p.key for p in PARAMS if p.group == "model")
"""The whole-model audit's settings: a single-layer run reads none of them."""


def engine_of(param: Param) -> str | None:
    """The knob prefix a parameter belongs to (torch, keras, keras2), or None. A knob one
    engine alone reads belongs to that engine's prefix: onnx_exporter to torch."""
    prefix = param.key.split("_", 1)[0]
    if "_" not in param.key:
        return None
    prefix = OWN_KNOBS.get(prefix, prefix)
    return prefix if prefix in KNOB_PREFIX.values() else None


def read_by_any(param: Param, engines: tuple[str, ...]) -> bool:
    """Does one of these engines read the parameter? A shared one (engine_of None): every
    engine; a framework's knob: the engines of that prefix; a knob one engine alone reads
    (onnx_exporter, litert_quantize): that engine only."""
    engine = engine_of(param)
    if engine is None:
        return True
    own = param.key.split("_", 1)[0]
    if own in OWN_KNOBS:
        return any(e.own_knobs == own and e.name in engines for e in REGISTRY)
    return engine in {knobs(e) for e in engines}


DEFAULTS: dict[str, Any] = {p.key: p.default for p in PARAMS}
