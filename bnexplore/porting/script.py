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

The generated code lives in templates/, one ``string.Template`` file per part of the
script (``$name`` marks what the scenario fills in); ``reproducer`` picks the parts a
scenario needs and joins them in order.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import string
from importlib import resources

from bnexplore.engines.registry import REGISTRY
from bnexplore.files import store
from bnexplore.runs.metrics import output_summary
from bnexplore.scenario.batches import running_batch
from bnexplore.scenario.links import Scenario

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


@functools.cache
def _template(name: str) -> string.Template:
    """templates/NAME.py.tmpl, the code of one part of the script."""
    path = resources.files(__package__) / "templates" / f"{name}.py.tmpl"
    return string.Template(path.read_text(encoding="utf-8"))


def _part(name: str, **values: str) -> str:
    """One part of the script, its ``$name`` placeholders filled in (all of them)."""
    return _template(name).substitute(values)


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


def _running(scenario: Scenario) -> str:
    """input=running: the chosen layer's running mean and variance as a literal."""
    if scenario["input"] != "running":
        return "None"
    try:
        layer = store.find_layer(scenario["state"], scenario["layer"])
    except store.FileProblem:
        return "None"
    return repr(
        {key: [float(v) for v in layer.state[key]] for key in ("running_mean", "running_var")}
    )


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
    return _part("stored_batches", digest=scenario["file"], source=source)


def not_reproduced(scenario: Scenario) -> dict[str, str]:
    """Engine → why the script prints an error for it instead of its numbers (it covers the
    rest): the training step (loss=mse) in PyTorch, Keras 3 on TensorFlow and Keras 2 only;
    ONNX Runtime with loss=none, LiteRT also with keras_init=fresh."""
    why = {}
    for engine in scenario["engines"]:
        if scenario["loss"] != "none" and (engine in OTHER_BACKENDS or engine == "onnx"):
            why[engine] = "the script runs it without a loss (loss=none) only"
        elif engine == "litert" and (
            scenario["loss"] != "none" or scenario["keras_init"] != "fresh"
        ):
            why[engine] = "the script runs it with loss=none and keras_init=fresh only"
    return why


def reproducer(scenario: Scenario) -> str:
    """A standalone Python program that reruns the scenario and prints its numbers.

    An uploaded layer (init=state) travels as a literal; an uploaded batch file up to
    8 MiB as base64, a larger one is read from ``BNEXPLORE_BATCH_FILE``.
    """
    engines = scenario["engines"]
    ports = scenario["keras_init"] != "fresh"
    keras3 = [e for e in engines if e in ("keras", "keras_jax", "keras_torch")]
    needs_torch = any(e in engines for e in ("torch", "torch_gpu", "onnx")) or (
        ports and bool(keras3)
    )
    needs = dict.fromkeys(NEEDS[e] for e in engines)
    parts = [
        _part(
            "header",
            output_summary=inspect.getsource(output_summary),
            link=scenario.link,
            scenario=repr(json.dumps(scenario.to_dict())),
            needs="".join(f", {n}" for n in needs),
            backends=json.dumps(BACKENDS),
            start_state=_start_state(scenario),
            running=_running(scenario),
            running_batch=inspect.getsource(running_batch),
        ),
        _stored_batches(scenario),
        f"S_LINK = {scenario.link!r}\n",
    ]
    if any(e in OTHER_BACKENDS for e in engines):
        parts.append(_part("other_backends"))
    if needs_torch:
        parts.append(_part("torch", torch_device=_TORCH_DEVICES[scenario["device"]]))
        if "torch_gpu" in engines:
            parts.append(_part("torch_gpu"))
    else:
        parts.append("\ntorch_state = None\n")
    if "onnx" in engines:
        parts.append(_part("onnx"))
    if "keras" in engines or "keras2" in engines or "litert" in engines:
        parts.append(_part("keras_common", tf_device=_TF_DEVICES[scenario["device"]]))
    if "keras" in engines:
        parts.append(_part("keras3"))
    if "keras2" in engines:
        parts.append(_part("keras2"))
    if "litert" in engines:
        parts.append(_part("litert"))
    if any(e in OTHER_BACKENDS for e in engines):
        parts.append(_part("child_runs"))
    parts.append(_part("footer"))
    return "".join(parts)
