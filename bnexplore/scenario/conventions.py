"""What each framework's BatchNorm does, in its own terms: the rules a scenario's knobs select.

Per engine:

- normalizes with batch statistics: PyTorch in train mode (or without running
  statistics); Keras with training=True on a trainable layer; Flax with
  use_running_average=False.
- weight of a new batch in the running statistics: PyTorch m, Keras and Flax 1 − momentum.
- running variance fed with the unbiased var_b·n/(n − 1): PyTorch, and Keras 2
  on its fused path; biased var_b: Keras 3, Keras 2 non-fused, Flax.
- batch variance as E[x²] − E[x]² (the fast variance): Flax with use_fast_variance,
  Keras on PyTorch; two passes (E[(x − E[x])²]) elsewhere.
- ONNX Runtime (engine onnx) runs the PyTorch module as exported: torch.onnx.export's
  default (dynamo) exporter emits an inference node even from a train-mode module (the
  running statistics normalize: "exported as inference"); the torchscript exporter with
  TrainingMode.TRAINING a training node, which feeds ONNX's population (biased) variance.
"""

from __future__ import annotations

from decimal import Decimal

from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import TORCH_CONVENTION, knobs

FUSED_DTYPES = ("float16", "bfloat16", "float32")
"""Compute dtypes tf_keras's fused kernel supports; float64 takes the non-fused path."""


def other_convention(momentum: float) -> float:
    """A momentum in the other framework's convention, 1 − m, taken in decimal: PyTorch's 0.1
    is Keras's 0.9 and Keras's 0.9 is PyTorch's 0.1, where 1.0 − 0.9 in binary is
    0.09999999999999998."""
    return float(Decimal(1) - Decimal(repr(float(momentum))))


def exported_as_inference(s: Scenario, engine: str) -> bool:
    """Does the deployed layer normalize with its running statistics where the PyTorch
    module would use the batch's: the onnx engine's dynamo export of a train-mode module
    (onnxscript's op library emits every batch norm as an inference node)?"""
    return (
        engine == "onnx"
        and s["onnx_exporter"] == "dynamo"
        and s["torch_mode"] == "train"
        and s["torch_track_running_stats"]
    )


def onnx_training_node(s: Scenario, engine: str) -> bool:
    """Is the onnx engine's measured pass a training BatchNormalization node (torchscript
    exporter, train mode, running statistics tracked)?"""
    return (
        engine == "onnx"
        and s["onnx_exporter"] == "torchscript"
        and s["torch_mode"] == "train"
        and s["torch_track_running_stats"]
    )


def uses_batch_statistics(s: Scenario, engine: str) -> bool:
    if exported_as_inference(s, engine):
        return False
    if knobs(engine) == "torch":
        return s["torch_mode"] == "train" or not s["torch_track_running_stats"]
    if knobs(engine) == "flax":
        return not s["flax_use_running_average"]
    return s[f"{knobs(engine)}_training"] == "true" and s[f"{knobs(engine)}_trainable"]


def new_batch_weight(s: Scenario, engine: str) -> float | None:
    """m in running ← (1 − m)·running + m·batch; None: PyTorch's cumulative average."""
    if knobs(engine) == "torch":
        return s["torch_momentum"]
    return 1.0 - s[f"{knobs(engine)}_momentum"]


def feeds_unbiased_variance(s: Scenario, engine: str) -> bool:
    if onnx_training_node(s, engine):  # the measured pass's update is ONNX's
        return False
    if knobs(engine) == "torch":
        return True
    if knobs(engine) in ("keras", "flax"):
        return False
    fusable = len(s.shape) in (4, 5) and s["dtype"] in FUSED_DTYPES
    return s["keras2_fused"] != "false" and fusable


def fast_variance(s: Scenario, engine: str) -> bool:
    """Does the engine's kernel take the batch variance as E[x²] − E[x]²?"""
    if engine == "flax":
        return s["flax_use_fast_variance"]
    return engine == "keras_torch"


def trains_parameters(s: Scenario, engine: str) -> bool:
    """Does the engine's optimizer move γ/β on a training pass?"""
    p = knobs(engine)
    if p == "torch":
        return s["torch_affine"] and s["torch_requires_grad"]
    if p == "flax":
        return s["flax_use_scale"] or s["flax_use_bias"]
    return s[f"{p}_trainable"] and (s[f"{p}_scale"] or s[f"{p}_center"])


def decay_coupling(s: Scenario, engine: str) -> str:
    """ "L2" (added to the gradient) or "decoupled" (the weight itself decays)."""
    p = knobs(engine)
    if p in TORCH_CONVENTION and s[f"{p}_optimizer"] != "adamw":
        return "L2"
    return "decoupled"
