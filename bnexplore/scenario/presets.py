"""Named scenarios to start from: ``preset=NAME`` in a link.

A preset is a set of parameter values over the defaults, plus the story it
tells. Its claims are about numbers the app measures; ``tests/test_presets.py``
asserts each against the real frameworks. No number here is a framework output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    story: str
    values: Mapping[str, Any] = field(default_factory=dict)


SMALL = (16, 32, 8, 8)
"""A 4-D shape that runs in milliseconds: 1024 values per channel."""

MATCHED_LAYERS = {"keras_training": "true", "keras_momentum": 0.9, "keras_eps": 1e-5}
"""Keras 3 translated from PyTorch's defaults: training, momentum 1 − 0.1, eps 1e-5."""
TRAINING = {"input": "normal", "loss": "mse", "target": "normal", "steps": 3}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "seed",
            "The question as asked",
            "An all-ones batch of shape (20, 100, 35, 45) through a fresh "
            "torch.nn.BatchNorm2d(100) and a fresh keras.layers.BatchNormalization(), every "
            "default. A new PyTorch module is "
            "in training mode: it normalizes with the batch's own statistics (mean 1, variance 0) "
            "and returns 0. A direct Keras call is inference: it uses its fresh moving statistics "
            "(mean 0, variance 1) and returns 1/√(1 + 1e-3).",
        ),
        Preset(
            "both-inference",
            "Both in inference: only eps differs",
            "PyTorch in eval mode, Keras called directly: both normalize the ones with fresh "
            "running statistics (0, 1). PyTorch returns 1/√(1 + 1e-5), Keras 1/√(1 + 1e-3): "
            "the whole gap is the default eps.",
            {"torch_mode": "eval"},
        ),
        Preset(
            "train-then-eval",
            "One training pass, then inference",
            "One training pass on ones, then inference in both. PyTorch's running statistics "
            "moved 10 % of the way (momentum 0.1): mean 0.1, variance 0.9, so it returns "
            "0.9/√(0.9 + 1e-5). Keras's moved 1 % (momentum 0.99 keeps 99 %): 0.99/√(0.99 + 1e-3).",
            {"steps": 1, "torch_mode": "eval"},
        ),
        Preset(
            "momentum-drift",
            "Momentum conventions: 0.1 in PyTorch is 0.9 in Keras",
            "Fifty training steps on random batches (mean 2, std 3), then inference. PyTorch's "
            "running ← 0.9·running + 0.1·batch has all but 0.9⁵⁰ of its weight on the data; "
            "Keras's moving ← 0.99·moving + 0.01·batch still holds 0.99⁵⁰ ≈ 60 % of its "
            "initial (0, 1). torch momentum m equals Keras momentum 1 − m.",
            {
                "shape": SMALL,
                "input": "normal",
                "mean": 2.0,
                "std": 3.0,
                "steps": 50,
                "torch_mode": "eval",
                "keras_training": "false",
            },
        ),
        Preset(
            "matched",
            "Hyperparameters translated",
            "Keras momentum = 1 − torch momentum, equal eps, both training: the outputs agree to "
            "float32 rounding. The running variances still differ: PyTorch feeds the unbiased "
            "batch variance var·n/(n − 1) into its running variance, Keras 3 the biased var.",
            {
                "shape": SMALL,
                "input": "normal",
                "steps": 3,
                "keras_training": "true",
                "keras_momentum": 0.9,
                "keras_eps": 1e-5,
            },
        ),
        Preset(
            "bessel",
            "Bessel's correction in the running variance",
            "One training pass on a batch of 4 with momenta and eps matched. PyTorch's running "
            "variance moves by 0.1·var·n/(n − 1), Keras 3's by 0.1·var: with n = 4 values per "
            "channel, a third more. The smaller the batch, the larger the gap.",
            {
                "shape": (4, 3),
                "input": "normal",
                "keras_training": "true",
                "keras_momentum": 0.9,
                "keras_eps": 1e-5,
            },
        ),
        Preset(
            "frozen-keras",
            "Keras trainable=False forces inference",
            "Both called in training (torch .train(), Keras training=True) with the layers "
            "frozen the way each framework's users do: Keras layer.trainable = False, PyTorch "
            "requires_grad_(False). Keras ignores training=True and normalizes with its moving "
            "statistics; PyTorch still normalizes with the batch statistics — only .eval() "
            "changes that.",
            {
                "shape": SMALL,
                "input": "normal",
                "mean": 1.0,
                "std": 2.0,
                "keras_training": "true",
                "keras_trainable": False,
                "torch_requires_grad": False,
            },
        ),
        Preset(
            "keras2-vs-keras3",
            "The question's era: Keras 2 against Keras 3",
            "The question was asked with TensorFlow 2.5 and Keras 2, whose BatchNormalization "
            "runs TensorFlow's fused kernel on 4-D input. That kernel feeds the unbiased batch "
            "variance into the moving variance, like PyTorch; Keras 3 feeds the biased one. "
            "Training outputs agree; moving variances differ by the factor n/(n − 1) on the "
            "batch part. With n = 64 values per channel that is 1/63 of the batch part, "
            "beyond float32 rounding; with 16 × 8 × 8 = 1024 values it falls within it.",
            {
                "shape": (4, 32, 4, 4),
                "input": "normal",
                "engines": ("keras2", "keras"),
                "keras_training": "true",
                "keras2_training": "true",
            },
        ),
        Preset(
            "small-variance-eps",
            "Ported statistics with a tiny variance: eps matters",
            "Batches with std 0.01 (variance 1e-4). PyTorch's state after one pass "
            "(momentum None: the running statistics are that batch's) is ported into Keras, "
            "but Keras keeps its eps 1e-3. Each output is scaled by √((v + 1e-5)/(v + 1e-3)) "
            "relative to PyTorch's: about a third at v = 1e-4.",
            {
                "shape": SMALL,
                "input": "normal",
                "std": 0.01,
                "steps": 1,
                "torch_momentum": None,
                "torch_mode": "eval",
                "keras_init": "torch",
            },
        ),
        Preset(
            "one-sample",
            "One value per channel in training",
            "A batch of one (N = 1, no spatial dims) in training mode. PyTorch refuses: "
            '"Expected more than 1 value per channel when training". Keras computes variance '
            "0, returns beta (0) and decays its moving variance toward 0.",
            {"shape": (1, 8), "keras_training": "true"},
        ),
        Preset(
            "half-precision",
            "float16 (try bfloat16 too)",
            "Both layers built in float16, eps and momenta matched, training. Keras 3 computes "
            "in float32 and rounds the output once: within half an ulp of the exact result. "
            "PyTorch's CPU half kernel is accurate to an ulp of the output's largest values, so "
            "its outputs near zero carry large relative errors. Both are far outside float32's "
            "tolerance. Switch dtype to bfloat16: 8 bits of mantissa instead of 11.",
            {
                "shape": SMALL,
                "input": "normal",
                "dtype": "float16",
                "keras_training": "true",
                "keras_momentum": 0.9,
                "keras_eps": 1e-5,
            },
        ),
        Preset(
            "large-mean",
            "Inputs far from zero: float32 batch means",
            "Training mode on batches with mean 1000 and std 1. The output inherits every "
            "rounding error of the float32 batch mean, amplified by 1000/std. TensorFlow's "
            "float32 mean is less exact than PyTorch's: Keras 3 lands much further from the "
            "exact float64 result than PyTorch does. Compare each engine with its reference.",
            {"input": "normal", "mean": 1000.0, "keras_training": "true", "keras_eps": 1e-5},
        ),
        Preset(
            "cpu-vs-gpu",
            "One framework, two kernels: PyTorch on the CPU and on CUDA",
            "The same module configuration and the same batches through PyTorch's CPU kernel "
            "and its CUDA (cuDNN) kernel. Their reductions sum in different orders, so they "
            "differ by float32 rounding, not by semantics. Needs a machine whose PyTorch sees "
            "a CUDA device; elsewhere the CUDA side says why it did not run.",
            {"input": "normal", "steps": 3, "device": "cpu", "engines": ("torch", "torch_gpu")},
        ),
        Preset(
            "weight-port",
            "PyTorch's trained state ported into Keras",
            "Five training steps in PyTorch, then its state copied into a Keras layer: weight → "
            "gamma, bias → beta, running_mean → moving_mean, running_var → moving_variance, with "
            "eps matched; both infer. They agree to rounding. Set keras_init=torch_swapped for "
            "the classic porting mistake, mean and variance swapped.",
            {
                "shape": SMALL,
                "input": "normal",
                "mean": 0.5,
                "std": 2.0,
                "steps": 5,
                "torch_mode": "eval",
                "keras_init": "torch",
                "keras_eps": 1e-5,
            },
        ),
        Preset(
            "keras-backends",
            "One Keras layer, three backends: TensorFlow, JAX, PyTorch",
            "The same keras.layers.BatchNormalization in training mode on batches with mean "
            "1000 and std 1, on Keras 3's TensorFlow, JAX and PyTorch backends: same rules, "
            "different kernels. JAX's two-pass variance stays close to the exact result, "
            "TensorFlow's float32 moments less so, and the PyTorch backend's E[x²] − E[x]² in "
            "float32 cancels every digit of the variance: its output is garbage. Compare each "
            "with its reference.",
            {
                "input": "normal",
                "mean": 1000.0,
                "keras_training": "true",
                "engines": ("keras", "keras_jax", "keras_torch"),
            },
        ),
        Preset(
            "flax-vs-torch",
            "Flax against PyTorch: same first answer, different memory",
            "A fresh flax.nnx.BatchNorm normalizes with the batch, like a new PyTorch module: "
            "on the seed both return 0 (and with these random batches both normalize alike in "
            "training). After three training steps, both infer from their running statistics: "
            "Flax's momentum 0.99 keeps 99 % of the old value, PyTorch's 0.1 keeps 90 %, and "
            "PyTorch feeds the unbiased variance. Flax momentum m equals PyTorch 1 − m.",
            {
                "shape": SMALL,
                "input": "normal",
                "mean": 1.0,
                "std": 2.0,
                "steps": 3,
                "torch_mode": "eval",
                "flax_use_running_average": True,
                "engines": ("torch", "flax"),
            },
        ),
        Preset(
            "fast-variance",
            "E[x²] − E[x]²: the fast variance against the two-pass one",
            "Training mode on batches with mean 100 and std 1. Flax (use_fast_variance, its "
            "default) and Keras on PyTorch compute the batch variance as E[x²] − E[x]² in "
            "float32, which cancels when the mean dwarfs the spread; Keras on JAX takes two "
            "passes. Flax's epsilon is set to Keras's 1e-3, so only the kernels differ. Set "
            "flax_use_fast_variance=false and Flax joins the two-pass side.",
            {
                "shape": SMALL,
                "input": "normal",
                "mean": 100.0,
                "keras_training": "true",
                "flax_eps": 1e-3,
                "engines": ("keras_jax", "keras_torch", "flax"),
            },
        ),
        Preset(
            "train-step-then-eval",
            "A real training step, translated: SGD on both sides, then eval",
            "Three training steps with a loss (mean squared error against a normal target), "
            "backward and SGD in both frameworks, everything translated: Keras momentum "
            "1 − 0.1, eps 1e-5, and PyTorch's SGD given Keras's learning rate 0.01 (PyTorch's "
            "own default is 0.001). After the steps γ and β agree to float32 rounding: the "
            "training passes' gradients and updates are the same. Then both infer, and the "
            "outputs (and the measured pass's loss and gradients) part by what no knob "
            "translates: PyTorch's running variance took the unbiased batch variance, Keras's "
            "the biased one (see bessel).",
            {
                **TRAINING,
                **MATCHED_LAYERS,
                "shape": SMALL,
                "torch_lr": 0.01,
                "torch_mode": "eval",
                "keras_training": "false",
            },
        ),
        Preset(
            "adam-epsilon",
            "Adam's ε: its default and where it is added",
            "Adam on both sides with the same learning rate 0.1, layers translated. PyTorch "
            "adds ε = 1e-8 to the bias-corrected √v̂; Keras adds ε = 1e-7 to √v, which in "
            "PyTorch's terms is ε/√(1 − β₂ᵗ) ≈ 3e-6 at the first step. β's gradients here are "
            "about 1e-3, so Keras's steps on β are a fraction of a percent shorter, and the "
            "outputs part beyond float32 rounding. Giving Keras ε = 1e-8 closes most of the gap; "
            "the placement keeps the rest.",
            {
                **TRAINING,
                **MATCHED_LAYERS,
                "shape": SMALL,
                "torch_optimizer": "adam",
                "torch_lr": 0.1,
                "keras_optimizer": "adam",
                "keras_lr": 0.1,
            },
        ),
        Preset(
            "weight-decay",
            "Weight decay: PyTorch Adam's L2 against Keras's decoupled decay",
            "weight_decay = 0.1 on both sides, both Adam, same learning rate. PyTorch's Adam adds "
            "0.1·p to the gradient (L2), and Adam then normalizes that by √v̂: γ ≈ 1 gets a "
            "gradient dominated by the decay. Keras (like PyTorch's AdamW) shrinks the weight "
            "itself, p ← p − p·0.1·lr. γ parts at once; PyTorch's AdamW would agree with Keras.",
            {
                **TRAINING,
                **MATCHED_LAYERS,
                "shape": SMALL,
                "torch_optimizer": "adam",
                "torch_lr": 0.01,
                "torch_weight_decay": 0.1,
                "keras_optimizer": "adam",
                "keras_lr": 0.01,
                "keras_weight_decay": 0.1,
            },
        ),
        Preset(
            "frozen-finetune",
            "Fine-tuning with a frozen BatchNorm: different gradients w.r.t. x",
            "Training steps with the layers frozen the way each framework's users freeze them: "
            "Keras layer.trainable = False (called with training=True, as fit() does), PyTorch "
            "requires_grad_(False) in train mode. Neither moves γ or β. But Keras runs "
            "inference, so the gradient w.r.t. x is γ/√(moving_var + ε)·dy, while PyTorch still "
            "normalizes with the batch and back-propagates through its mean and variance: its "
            "gradient sums to zero over each channel. The layers below learn different things "
            "(keras-team/keras #9965, #13892, #11590).",
            {
                **TRAINING,
                **MATCHED_LAYERS,
                "shape": SMALL,
                "mean": 1.0,
                "std": 2.0,
                "keras_trainable": False,
                "torch_requires_grad": False,
            },
        ),
        Preset(
            "adam-noise",
            "Adam turns rounding noise into steps",
            "A zero target: β's exact gradient is 0 (in training mode Σ x̂ = 0 over each "
            "channel), and the float64 reference leaves β at 0. But the frameworks' float32 "
            "gradient is rounding noise of about 1e-9, and Adam divides it by its own "
            "magnitude plus ε: β moves by up to the learning rate each step, differently in "
            "PyTorch (ε = 1e-8) and Keras (ε = 1e-7 on √v). No formula predicts that step: "
            "the reference says so, with the bound lr per step.",
            {
                **TRAINING,
                **MATCHED_LAYERS,
                "shape": SMALL,
                "target": "zeros",
                "torch_optimizer": "adam",
                "keras_optimizer": "adam",
            },
        ),
        Preset(
            "sgd-defaults",
            "SGD with each library's defaults",
            "Plain SGD, left at its defaults, layers translated. PyTorch's SGD takes lr = 0.001, "
            "Keras's lr = 0.01: after three steps Keras's γ and β have moved ten times as far.",
            {**TRAINING, **MATCHED_LAYERS, "shape": SMALL},
        ),
        Preset(
            "onnx-export",
            "The default ONNX export of a train-mode module",
            "A fresh PyTorch module, in training mode, exported with torch.onnx.export's defaults "
            "(dynamo=True) and run in ONNX Runtime. PyTorch normalizes the ones with their own "
            "statistics and returns 0; the exporter emits an inference BatchNormalization node, "
            "so the deployed layer uses the running statistics (0, 1) and returns "
            "1/√(1 + 1e-5). onnx_exporter=torchscript exports a training node instead.",
            {"shape": SMALL, "engines": ("torch", "onnx")},
        ),
        Preset(
            "litert-folded",
            "LiteRT's folded BatchNorm is Keras's, bit for bit",
            "Three training passes in Keras, then its layer converted to LiteRT: the converter "
            "folds inference BatchNorm into x·scale + offset, with scale = γ/√(moving_variance + "
            "ε) and offset = β − moving_mean·scale computed at conversion. Keras 3 on "
            "TensorFlow computes inference the same way, in float32: the outputs agree exactly.",
            {
                "shape": SMALL,
                "input": "normal",
                "mean": 3.0,
                "std": 0.5,
                "steps": 3,
                "keras_momentum": 0.5,
                "engines": ("keras", "litert"),
            },
        ),
        Preset(
            "litert-float16",
            "LiteRT quantized to float16",
            "The same Keras layer converted with float16 quantization: the folded scale and "
            "offset are stored as float16 and dequantized, so the deployed output moves by "
            "float16's rounding of the constants, far beyond float32's tolerance.",
            {
                "shape": SMALL,
                "input": "normal",
                "mean": 0.5,
                "std": 2.0,
                "engines": ("keras", "litert"),
                "litert_quantize": "float16",
            },
        ),
    )
}


def matching(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> Preset | None:
    """The preset whose scenario these values are, sweep settings aside, if any."""
    run = {k: v for k, v in values.items() if not k.startswith("sweep")}
    for preset in PRESETS.values():
        expected = {**defaults, **preset.values}
        if run == {k: v for k, v in expected.items() if not k.startswith("sweep")}:
            return preset
    return None
