"""Reproducer scripts: a scenario as one standalone Python file.

The file needs only numpy and the scenario's frameworks. Keras 3 on JAX or
PyTorch and Flax run in child processes of the script, each with KERAS_BACKEND
set before Keras is imported. It rebuilds the scenario's exact batches and
layers, runs every engine of the scenario, and prints the same output
statistics as ``bnexplore.run`` as JSON:
``{"link": …, "engines": {name: {"output": {mean, std, min, max, nonfinite},
"running_mean": […], "running_var": […], "gamma": […], "beta": […], "loss": L,
"grad": {"x": {mean, std, min, max}, "gamma": […], "beta": […]} | None} | {"error": str}}}``.
With loss=mse each training pass runs L = mean((y − T)²), backward and one optimizer step,
with the same optimizer and arguments as the engines.
"""

from __future__ import annotations

import base64
import inspect
import json

from bnexplore.engines.registry import REGISTRY
from bnexplore.files import store
from bnexplore.runs.metrics import output_summary
from bnexplore.scenario.links import Scenario

_HEADER = '''"""bnexplore reproducer for {link}

Standalone: needs numpy{needs}.
Run with `python this_file.py`; it prints each engine's measured output
statistics and running statistics as JSON.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np

# Keras 3 on JAX or PyTorch, and Flax, run in a child process of this script (a Keras
# backend is chosen once per process): `python this_file.py keras_jax` runs one alone.
ENGINE = sys.argv[1] if len(sys.argv) > 1 else None
BACKENDS = {backends}
os.environ["KERAS_BACKEND"] = BACKENDS.get(ENGINE, "tensorflow")  # before Keras is imported
os.environ["JAX_ENABLE_X64"] = "1"  # float64 on JAX is float64
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

S = json.loads({scenario!r})
SHAPE = tuple(S["shape"])
STEPS = S["steps"]
START = {start_state}
"""init=state: the uploaded layer's γ, β and running statistics (PyTorch's names), or None."""


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
    if S["input"] == "file":  # the uploaded batches: batch_k for pass k, the last beyond
        stored = stored_batches()
        for k in range(STEPS + 1):
            yield stored[min(k, len(stored) - 1)].astype(np.float64).astype(dtype)
        return
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
    if START is not None:  # load_state_dict keeps what the module has (affine, tracked)
        own = bn.state_dict()
        bn.load_state_dict({{k: torch.tensor(v, dtype=torch.float64)
                            for k, v in START.items() if k in own}}, strict=False)
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
        for state in (START, initial_state):  # the uploaded layer, then a port over it
            if state is None:
                continue
            for keras_name, torch_name in (("gamma", "weight"), ("beta", "bias"),
                                           ("moving_mean", "running_mean"),
                                           ("moving_variance", "running_var")):
                variable = getattr(layer, keras_name, None)
                if variable is not None:
                    value = tf.constant(np.asarray(state[torch_name], np.float64))
                    variable.assign(tf.cast(value, variable.dtype))
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

_KERAS3_OTHER_BACKEND = """

# --- Keras 3 on JAX or PyTorch, and Flax: one engine per child process ------------------
def run_other_backend(engine, state):
    \"\"\"The engine alone, in this process (started as `this_file.py ENGINE`).\"\"\"
    if engine == "flax":
        import jax.numpy as jnp
        from flax import nnx

        dtype = jnp.dtype(S["dtype"])
        bn = nnx.BatchNorm(SHAPE[1], use_running_average=S["flax_use_running_average"],
                           axis=-1, momentum=S["flax_momentum"], epsilon=S["flax_eps"],
                           dtype=dtype, param_dtype=dtype, use_bias=S["flax_use_bias"],
                           use_scale=S["flax_use_scale"],
                           use_fast_variance=S["flax_use_fast_variance"], rngs=nnx.Rngs(0))
        if START is not None:
            for flax_name, torch_name in (("scale", "weight"), ("bias", "bias"),
                                          ("mean", "running_mean"), ("var", "running_var")):
                variable = getattr(bn, flax_name, None)
                if variable is not None:
                    variable[...] = jnp.asarray(START[torch_name], dtype=variable[...].dtype)
        for k, batch in enumerate(batches()):
            running = False if k < STEPS else S["flax_use_running_average"]
            output = bn(jnp.asarray(np.moveaxis(batch, 1, -1)), use_running_average=running)
        # forward passes only: γ and β are still what the layer started with
        trained = {"gamma": None if bn.scale is None else np.asarray(bn.scale[...]),
                   "beta": None if bn.bias is None else np.asarray(bn.bias[...])}
        return summary(np.moveaxis(np.asarray(output), -1, 1), np.asarray(bn.mean[...]),
                       np.asarray(bn.var[...]), trained)
    import keras

    layer = keras.layers.BatchNormalization(
        axis=-1, momentum=S["keras_momentum"], epsilon=S["keras_eps"],
        center=S["keras_center"], scale=S["keras_scale"], dtype=S["dtype"])
    layer.build((SHAPE[0], *SHAPE[2:], SHAPE[1]))
    if not S["keras_trainable"]:
        layer.trainable = False
    ported = state is not None
    for given in (START, state):  # the uploaded layer, then a port over it
        if given is None:
            continue
        for keras_name, torch_name in (("gamma", "weight"), ("beta", "bias"),
                                       ("moving_mean", "running_mean"),
                                       ("moving_variance", "running_var")):
            variable = getattr(layer, keras_name, None)
            if variable is not None:
                value = keras.ops.convert_to_tensor(np.asarray(given[torch_name], np.float64))
                variable.assign(keras.ops.cast(value, variable.dtype))
    for k, batch in enumerate(batches()):
        if ported and k < STEPS:
            continue
        x = keras.ops.convert_to_tensor(np.moveaxis(batch, 1, -1))
        training = True if k < STEPS else TRAINING[S["keras_training"]]
        output = layer(x) if training is None else layer(x, training=training)
    channels_first = np.moveaxis(keras.ops.convert_to_numpy(output), -1, 1)
    trained = {name: None if v is None else keras.ops.convert_to_numpy(v)
               for name, v in (("gamma", layer.gamma), ("beta", layer.beta))}
    return summary(channels_first, keras.ops.convert_to_numpy(layer.moving_mean),
                   keras.ops.convert_to_numpy(layer.moving_variance), trained)


TRAINING = {"none": None, "true": True, "false": False}
if ENGINE is not None and S["loss"] != "none":
    print(json.dumps({"error": "this script reproduces the training step (loss=mse) in "
                               "torch, keras and keras2; run it with bnexplore for " + ENGINE}))
    sys.exit(0)
if ENGINE is not None:
    state = json.loads(sys.stdin.read() or "null")
    try:
        print(json.dumps(run_other_backend(ENGINE, state)))
    except Exception as exc:  # the framework's error is the result
        print(json.dumps({"error": str(exc)}))
    sys.exit(0)
"""

_CHILD_RUNS = """

# --- the engines that run in child processes --------------------------------------------
for engine in [e for e in S["engines"] if e in BACKENDS]:
    ported = engine != "flax" and S["keras_init"] != "fresh"
    state = None
    if ported and torch_state is None:
        results[engine] = {"error": "keras_init: PyTorch has no state to port"}
        continue
    if ported:
        state = {k: np.asarray(v).tolist() for k, v in torch_state.items()}
        if S["keras_init"] == "torch_swapped":
            state["running_mean"], state["running_var"] = (
                state["running_var"], state["running_mean"])
    child = subprocess.run([sys.executable, __file__, engine], input=json.dumps(state),
                           capture_output=True, text=True, check=False)
    lines = child.stdout.strip().splitlines()
    results[engine] = json.loads(lines[-1]) if lines else {"error": child.stderr[-2000:]}
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


BACKENDS = {e.name: e.process_backend for e in REGISTRY if e.process_backend}
"""Engines that run in a child process of the script, and the backend each sets there."""
OTHER_BACKENDS = tuple(BACKENDS)
NEEDS = {engine.name: engine.needs for engine in REGISTRY}
EMBED_LIMIT = 8 * 1024**2
"""Batch files up to this size travel inside the script (base64); larger ones beside it."""

_STORED_BATCHES = """

def stored_batches():
    \"\"\"The batch file {digest}: batch_0, batch_1, … of an .npz, or one .npy.\"\"\"
    import base64
    import io

    data = {source}
    loaded = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return [loaded]
    count = 0
    while f"batch_{{count}}" in loaded.files:
        count += 1
    return [loaded[f"batch_{{k}}"] for k in range(count)]
"""


def _start_state(scenario: Scenario) -> str:
    """init=state: the layer's four vectors as a literal (float repr is exact)."""
    from bnexplore.runs.runner import initial_state

    try:
        state = initial_state(scenario)
    except store.FileProblem:
        state = None
    if state is None:
        return "None"
    return repr({key: [float(v) for v in values] for key, values in state.items()})


def _stored_batches(scenario: Scenario) -> str:
    if scenario["input"] != "file":
        return ""
    path = store.path_of(scenario["file"])
    size = path.stat().st_size if path.exists() else EMBED_LIMIT + 1
    if size <= EMBED_LIMIT:
        encoded = base64.b64encode(path.read_bytes()).decode()
        source = f"base64.b64decode({encoded!r})"
    else:
        source = f"os.environ.get('BNEXPLORE_BATCH_FILE', {scenario['file'] + '.npz'!r})"
    return _STORED_BATCHES.format(digest=scenario["file"], source=source)


def reproducer(scenario: Scenario) -> str:
    """A standalone Python program that reruns the scenario and prints its numbers.

    An uploaded layer (init=state) travels as a literal; an uploaded batch file up to
    8 MiB as base64, a larger one is read from ``BNEXPLORE_BATCH_FILE``.
    """
    engines = scenario["engines"]
    ports = scenario["keras_init"] != "fresh"
    keras3 = [e for e in engines if e in ("keras", "keras_jax", "keras_torch")]
    needs_torch = "torch" in engines or "torch_gpu" in engines or (ports and bool(keras3))
    needs = dict.fromkeys(NEEDS[e] for e in engines)
    parts = [
        _HEADER.format(
            output_summary=inspect.getsource(output_summary),
            link=scenario.link,
            scenario=json.dumps(scenario.to_dict()),
            needs="".join(f", {n}" for n in needs),
            backends=json.dumps(BACKENDS),
            start_state=_start_state(scenario),
        ),
        _stored_batches(scenario),
        f"S_LINK = {scenario.link!r}\n",
    ]
    if any(e in OTHER_BACKENDS for e in engines):
        parts.append(_KERAS3_OTHER_BACKEND)
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
    if any(e in OTHER_BACKENDS for e in engines):
        parts.append(_CHILD_RUNS)
    parts.append(_FOOTER)
    return "".join(parts)
