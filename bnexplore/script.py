"""Reproducer scripts: a scenario as one standalone Python file.

The file needs only numpy, torch, tensorflow/keras (and tf_keras for Keras 2).
It rebuilds the scenario's exact batches and layers, runs every engine of the
scenario, and prints the same output statistics as ``bnexplore.run`` as JSON:
``{"link": …, "engines": {name: {"output": {mean, std, min, max, nonfinite},
"running_mean": […], "running_var": […], "gamma": […], "beta": […], "loss": L,
"grad": {"x": {mean, std, min, max}, "gamma": […], "beta": […]} | None} | {"error": str}}}``.
With loss=mse each training pass runs L = mean((y − T)²), backward and one optimizer step,
with the same optimizer and arguments as the engines.
"""

from __future__ import annotations

import inspect
import json

from bnexplore.metrics import output_summary
from bnexplore.scenario import Scenario

_HEADER = '''"""bnexplore reproducer for {link}

Standalone: needs numpy, torch and tensorflow (Keras 3){keras2_note}.
Run with `python this_file.py`; it prints each engine's measured output
statistics and running statistics as JSON.
"""

import json
import math
import os

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

S = json.loads({scenario!r})
SHAPE = tuple(S["shape"])
STEPS = S["steps"]


def numpy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def targets():
    """T_k, k = 0 … steps: None (no loss), zeros, or ONE default_rng(seed + 1), then cast."""
    dtype = numpy_dtype(S["dtype"])
    rng = np.random.default_rng(S["seed"] + 1)
    for _ in range(STEPS + 1):
        if S["loss"] == "none":
            yield None
        elif S["target"] == "zeros":
            yield np.zeros(SHAPE, dtype=dtype)
        else:
            yield rng.standard_normal(SHAPE).astype(dtype, copy=False)


def batches():
    """Batch k = 0 … steps from ONE numpy.random.default_rng(seed), float64, then cast."""
    dtype = numpy_dtype(S["dtype"])
    if S["input"] in ("ones", "constant"):
        value = 1.0 if S["input"] == "ones" else S["value"]
        batch = np.full(SHAPE, value, dtype=np.float64).astype(dtype)
        for _ in range(STEPS + 1):
            yield batch
        return
    rng = np.random.default_rng(S["seed"])
    for _ in range(STEPS + 1):
        if S["input"] == "normal":
            batch = rng.standard_normal(SHAPE) * S["std"] + S["mean"]
        else:
            batch = rng.uniform(S["low"], S["high"], SHAPE)
        yield batch.astype(dtype, copy=False)


{output_summary}

def floats(a):
    if a is None:
        return None
    return [float(v) if math.isfinite(v) else None
            for v in np.asarray(a, dtype=np.float64)]


def summary(output, running_mean, running_var, trained):
    """trained: gamma and beta before the measured pass; with a loss, its L and gradients."""
    result = {{"output": output_summary(output), "running_mean": floats(running_mean),
              "running_var": floats(running_var), "gamma": floats(trained.get("gamma")),
              "beta": floats(trained.get("beta")), "loss": trained.get("loss"), "grad": None}}
    if trained.get("grad_x") is not None:
        x = output_summary(trained["grad_x"])
        result["grad"] = {{"x": {{k: x[k] for k in ("mean", "std", "min", "max")}},
                          "gamma": floats(trained["grad_gamma"]),
                          "beta": floats(trained["grad_beta"])}}
    return result


results = {{}}
'''

_TORCH = """

# --- PyTorch ------------------------------------------------------------------------
import torch

TORCH_DTYPES = {{"float32": torch.float32, "float64": torch.float64,
                "float16": torch.float16, "bfloat16": torch.bfloat16}}
MODULES = {{2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
           4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}}


def to_numpy(t):
    if t is None:
        return None
    t = t.detach().cpu()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def to_tensor(array, device):
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(array).to(device)


def torch_optimizer(parameters):
    \"\"\"The scenario's optimizer; a knob left at "default" is not passed.\"\"\"
    if not parameters:
        return None
    kwargs = {{}}
    if S["torch_lr"] is not None:
        kwargs["lr"] = S["torch_lr"]
    if S["torch_weight_decay"] is not None:
        kwargs["weight_decay"] = S["torch_weight_decay"]
    if S["torch_optimizer"] == "sgd":
        return torch.optim.SGD(parameters, momentum=S["torch_opt_momentum"], **kwargs)
    if S["torch_adam_eps"] is not None:
        kwargs["eps"] = S["torch_adam_eps"]
    adam = torch.optim.Adam if S["torch_optimizer"] == "adam" else torch.optim.AdamW
    return adam(parameters, betas=(0.9, 0.999), **kwargs)


def torch_mse(y, target, device):
    return torch.mean(torch.square(y - to_tensor(target, device)))


def run_torch(device):
    \"\"\"(result, state after the training passes) of a fresh module on ``device``.\"\"\"
    bn = MODULES[len(SHAPE)](SHAPE[1], eps=S["torch_eps"], momentum=S["torch_momentum"],
                             affine=S["torch_affine"],
                             track_running_stats=S["torch_track_running_stats"],
                             device=device, dtype=TORCH_DTYPES[S["dtype"]])
    bn.requires_grad_(S["torch_requires_grad"])
    optimizer = None
    if S["loss"] != "none":
        optimizer = torch_optimizer([p for p in bn.parameters() if p.requires_grad])
    state, trained = None, {{}}
    try:
        for k, (batch, target) in enumerate(zip(batches(), targets())):
            if k == STEPS:
                trained["gamma"], trained["beta"] = to_numpy(bn.weight), to_numpy(bn.bias)
                if bn.running_mean is not None:
                    state = {{
                        name: (np.ones(SHAPE[1]) if t is None and name == "weight" else
                               np.zeros(SHAPE[1]) if t is None else
                               t.detach().cpu().to(torch.float64).numpy())
                        for name, t in (("weight", bn.weight), ("bias", bn.bias),
                                        ("running_mean", bn.running_mean),
                                        ("running_var", bn.running_var))
                    }}
            bn.train(k < STEPS or S["torch_mode"] == "train")
            x = to_tensor(batch, device)
            if target is None:
                with torch.no_grad():
                    output = bn(x)
            elif k < STEPS:  # a training pass: forward, L, backward, one optimizer step
                output = bn(x)
                if optimizer is not None:
                    optimizer.zero_grad()
                    torch_mse(output, target, device).backward()
                    optimizer.step()
            else:  # the measured pass: L and its gradients, no step
                x = x.detach().requires_grad_(True)  # a leaf; nothing writes to x
                for p in bn.parameters():
                    p.grad = None
                output = bn(x)
                loss = torch_mse(output, target, device)
                loss.backward()
                trained["loss"] = float(loss.detach().to(torch.float64))
                trained["grad_x"] = to_numpy(x.grad)
                trained["grad_gamma"] = None if bn.weight is None else to_numpy(bn.weight.grad)
                trained["grad_beta"] = None if bn.bias is None else to_numpy(bn.bias.grad)
    except (ValueError, RuntimeError) as exc:
        return {{"error": str(exc)}}, None
    return summary(to_numpy(output), to_numpy(bn.running_mean),
                   to_numpy(bn.running_var), trained), state


results["torch"], torch_state = run_torch({torch_device})
"""

_TORCH_GPU = """
if torch.cuda.is_available():
    results["torch_gpu"] = run_torch("cuda")[0]
else:
    results["torch_gpu"] = {"unavailable": "PyTorch sees no CUDA device"}
"""

_KERAS_COMMON = '''

# --- TensorFlow ---------------------------------------------------------------------
import tensorflow as tf

TF_DEVICE = {tf_device}
TRAINING = {{"none": None, "true": True, "false": False}}


def keras_optimizer(optimizers, prefix):
    """The scenario's optimizer; a knob left at "default" is not passed."""
    kwargs = {{}}
    if S[prefix + "_lr"] is not None:
        kwargs["learning_rate"] = S[prefix + "_lr"]
    if S[prefix + "_weight_decay"] is not None:
        kwargs["weight_decay"] = S[prefix + "_weight_decay"]
    if S[prefix + "_optimizer"] == "sgd":
        return optimizers.SGD(momentum=S[prefix + "_opt_momentum"], **kwargs)
    if S[prefix + "_adam_eps"] is not None:
        kwargs["epsilon"] = S[prefix + "_adam_eps"]
    adam = optimizers.Adam if S[prefix + "_optimizer"] == "adam" else optimizers.AdamW
    return adam(beta_1=0.9, beta_2=0.999, **kwargs)


def keras_values(variable):
    return None if variable is None else np.array(variable.numpy(), copy=True)


def run_keras(layer, prefix, optimizers, initial_state=None):
    """Training passes with training=True (and, with a loss, GradientTape and one
    apply_gradients), then the measured pass; channels-last."""
    trained = {{}}
    with tf.device(TF_DEVICE):
        layer.build((SHAPE[0], *SHAPE[2:], SHAPE[1]))
        layer.trainable = S[prefix + "_trainable"]
        optimizer = keras_optimizer(optimizers, prefix) if S["loss"] != "none" else None
        if initial_state is not None:
            for keras_name, torch_name in (("gamma", "weight"), ("beta", "bias"),
                                           ("moving_mean", "running_mean"),
                                           ("moving_variance", "running_var")):
                variable = getattr(layer, keras_name, None)
                if variable is not None:
                    variable.assign(initial_state[torch_name].astype(variable.dtype))
        for k, (batch, target) in enumerate(zip(batches(), targets())):
            if k == STEPS:
                trained["gamma"], trained["beta"] = (
                    keras_values(layer.gamma), keras_values(layer.beta))
            if initial_state is not None and k < STEPS:
                continue
            x = tf.convert_to_tensor(np.moveaxis(batch, 1, -1))
            training = True if k < STEPS else TRAINING[S[prefix + "_training"]]
            if target is None:
                output = layer(x) if training is None else layer(x, training=training)
                continue
            t = tf.convert_to_tensor(np.moveaxis(target, 1, -1))
            variables = list(layer.trainable_variables)
            measured = k == STEPS
            with tf.GradientTape() as tape:
                if measured:
                    tape.watch(x)
                output = layer(x) if training is None else layer(x, training=training)
                loss = tf.reduce_mean(tf.square(output - t))
            sources = ([x] if measured else []) + variables
            grads = tape.gradient(loss, sources) if sources else []
            by_variable = dict(zip(map(id, variables), grads[len(sources) - len(variables):]))
            if not measured:
                pairs = [(by_variable[id(v)], v) for v in variables
                         if by_variable[id(v)] is not None]
                if pairs:
                    optimizer.apply_gradients(pairs)
                continue
            trained["loss"] = float(np.asarray(loss, dtype=np.float64))
            trained["grad_x"] = np.ascontiguousarray(np.moveaxis(np.asarray(grads[0]), -1, 1))
            for name in ("gamma", "beta"):
                variable = getattr(layer, name)
                g = None if variable is None else by_variable.get(id(variable))
                trained["grad_" + name] = None if g is None else np.array(g, copy=True)
    channels_first = np.ascontiguousarray(np.moveaxis(output.numpy(), -1, 1))
    return summary(channels_first, layer.moving_mean.numpy(), layer.moving_variance.numpy(),
                   trained)
'''

_KERAS3 = """

# --- Keras 3 ------------------------------------------------------------------------
import keras

try:
    initial_state = None
    if S["keras_init"] != "fresh":
        if torch_state is None:
            raise ValueError("keras_init: PyTorch has no state to port")
        initial_state = dict(torch_state)
        if S["keras_init"] == "torch_swapped":
            initial_state["running_mean"], initial_state["running_var"] = (
                torch_state["running_var"], torch_state["running_mean"])
    layer = keras.layers.BatchNormalization(
        axis=-1, momentum=S["keras_momentum"], epsilon=S["keras_eps"],
        center=S["keras_center"], scale=S["keras_scale"], dtype=S["dtype"])
    results["keras"] = run_keras(layer, "keras", keras.optimizers, initial_state)
except (ValueError, tf.errors.OpError) as exc:
    results["keras"] = {"error": str(exc)}
"""

_KERAS2 = """

# --- Keras 2 (tf_keras) -------------------------------------------------------------
import tf_keras

try:
    layer = tf_keras.layers.BatchNormalization(
        axis=-1, momentum=S["keras2_momentum"], epsilon=S["keras2_eps"],
        center=S["keras2_center"], scale=S["keras2_scale"],
        fused={"auto": None, "true": True, "false": False}[S["keras2_fused"]],
        dtype=S["dtype"])
    results["keras2"] = run_keras(layer, "keras2", tf_keras.optimizers)
except (ValueError, tf.errors.OpError) as exc:
    results["keras2"] = {"error": str(exc)}
"""

_FOOTER = """

print(json.dumps({"link": S_LINK, "engines": {name: results[name] for name in S["engines"]}},
                 indent=2))
"""

_TORCH_DEVICES = {
    "auto": '"cuda" if torch.cuda.is_available() else "cpu"',
    "cpu": '"cpu"',
    "cuda": '"cuda"',
}
_TF_DEVICES = {
    "auto": '"/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"',
    "cpu": '"/CPU:0"',
    "cuda": '"/GPU:0"',
}


def reproducer(scenario: Scenario) -> str:
    """A standalone Python program that reruns the scenario and prints its numbers."""
    engines = scenario["engines"]
    needs_torch = (
        "torch" in engines
        or "torch_gpu" in engines
        or ("keras" in engines and scenario["keras_init"] != "fresh")
    )
    parts = [
        _HEADER.format(
            output_summary=inspect.getsource(output_summary),
            link=scenario.link,
            scenario=json.dumps(scenario.to_dict()),
            keras2_note=", tf_keras (Keras 2)" if "keras2" in engines else "",
        ),
        f"S_LINK = {scenario.link!r}\n",
    ]
    if needs_torch:
        parts.append(_TORCH.format(torch_device=_TORCH_DEVICES[scenario["device"]]))
        if "torch_gpu" in engines:
            parts.append(_TORCH_GPU)
    else:
        parts.append("\ntorch_state = None\n")
    if "keras" in engines or "keras2" in engines:
        parts.append(_KERAS_COMMON.format(tf_device=_TF_DEVICES[scenario["device"]]))
    if "keras" in engines:
        parts.append(_KERAS3)
    if "keras2" in engines:
        parts.append(_KERAS2)
    parts.append(_FOOTER)
    return "".join(parts)
