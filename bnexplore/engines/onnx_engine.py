"""ONNX engine: the PyTorch module exported with ``torch.onnx.export``, run in ONNX Runtime.

The module is PyTorch's own (the torch_* knobs, :class:`TorchEngine`'s construction and
state handling). Training passes run in PyTorch; before the measured pass the module, in
the measured pass's mode and with its trained state, is exported and the pass runs in ONNX
Runtime on ``CPUExecutionProvider``: train, export, run, as a model is deployed.

``onnx_exporter`` picks the exporter:

- ``dynamo`` (PyTorch 2.13's default, ``dynamo=True``): onnxscript's op library emits every
  batch norm as an inference node (``training_mode`` 0), even from a module in train mode,
  so the deployed layer normalizes with its running statistics::

      y = (x − running_mean) / √(running_var + epsilon) · weight + bias

- ``torchscript`` (``dynamo=False``, ``training=TrainingMode.TRAINING`` for a module in
  train mode): a training node. Its running-statistics outputs are made graph outputs, so
  ORT's CPU kernel runs it: the batch statistics normalize, and::

      running ← momentum·running + (1 − momentum)·batch     (ONNX momentum = 1 − PyTorch's)
      running_var is fed the population (biased) batch variance, not PyTorch's unbiased one

The node's ``epsilon`` and ``momentum`` are float32 attributes. ORT's CPU BatchNormalization
takes float32 and float64 only, and the pinned wheel is CPU-only (device=cuda: unavailable).
With loss=mse the measured pass's L is taken from ORT's output, its gradients by PyTorch
autograd through the rule the exported node computes (ONNX Runtime computes none).
Exports are cached (a small LRU) by everything that shapes them: knobs, shape, dtype, state.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import re
import threading
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from cachetools import LRUCache

from bnexplore.engines import EngineResult, Session
from bnexplore.engines.torch_engine import TorchEngine, TorchSession, mse, to_numpy, to_tensor
from bnexplore.scenario.links import Scenario

ORT_DTYPES = ("float32", "float64")
"""What ORT's CPU BatchNormalization kernel takes."""

_CACHE: LRUCache = LRUCache(maxsize=8)
_CACHE_LOCK = threading.Lock()


def _onnxscript_version() -> str:
    try:
        import onnxscript

        return f", onnxscript {onnxscript.__version__}"
    except ImportError:  # the dynamo exporter then fails: its result says so
        return ""


class Exported:
    """One export: the ORT session, the node's training mode, and words for the document."""

    def __init__(self, model: onnx.ModelProto, exporter: str) -> None:
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
        self.training = False
        self.stats_outputs: tuple[str, str] | None = None
        if nodes:
            node = nodes[0]
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            self.training = bool(attributes.get("training_mode", 0))
            if self.training and len(node.output) == 3:
                self.stats_outputs = (node.output[1], node.output[2])
                _expose(model, node)
            kind = (
                "a training node: the batch statistics normalize"
                if self.training
                else "an inference node: the running statistics normalize"
            )
            node_words = f"BatchNormalization training_mode={int(self.training)} ({kind})"
        else:
            node_words = "no BatchNormalization node: " + ", ".join(
                dict.fromkeys(n.op_type for n in model.graph.node)
            )
        flag = "dynamo=True" if exporter == "dynamo" else "dynamo=False"
        self.detail = (
            f"exported by torch.onnx.export({flag}), opset {self.opset}; {node_words}; "
            f"run by ONNX Runtime {ort.__version__} on CPUExecutionProvider"
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """y, and the training node's running mean and variance (None for an inference node)."""
        found = dict(zip(self.outputs, self.session.run(None, {self.input: x}), strict=True))
        y = found[self.outputs[0]]
        if self.stats_outputs is None:
            return y, None, None
        return y, found[self.stats_outputs[0]], found[self.stats_outputs[1]]


def _expose(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Make the training node's running-mean/var outputs graph outputs (ORT's CPU kernel
    runs a training BatchNormalization only when they are wanted)."""
    present = {o.name for o in model.graph.output}
    elem_type = next(
        (i.data_type for i in model.graph.initializer if i.name == node.input[3]),
        model.graph.input[0].type.tensor_type.elem_type,
    )
    for name in node.output[1:3]:
        if name and name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))


def export(module: torch.nn.Module, x: torch.Tensor, exporter: str) -> onnx.ModelProto:
    """The module (a copy: exporting traces a forward pass) as an ONNX model."""
    original, module = module, copy.deepcopy(module)
    mode = None
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                try:
                    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
                except Exception as exc:
                    why = f"torch.onnx.export(dynamo=True) failed: {_gist(exc)}"
                    raise RuntimeError(why) from exc
                return program.model_proto
            mode = torch.onnx.TrainingMode.TRAINING if module.training else None
            buffer = io.BytesIO()
            torch.onnx.export(
                module,
                (x,),
                buffer,
                dynamo=False,
                training=mode or torch.onnx.TrainingMode.EVAL,
                input_names=["input"],
                output_names=["output"],
            )
            model = onnx.load_from_string(buffer.getvalue())
    finally:
        quiet.setLevel(level)
    if mode is not None and original.running_mean is not None:
        _restore_statistics(model, original)
    return model


def _gist(exc: Exception) -> str:
    """The exporter's long message cut to its first line and its exception summary."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class ")), None)
    head = lines[0] if lines else type(exc).__name__
    return head if summary is None else f"{head} {summary}"


def _restore_statistics(model: onnx.ModelProto, module: torch.nn.Module) -> None:
    """Write the module's running statistics into the training node's initializers.

    Measured (torch 2.13): exporting with TrainingMode.TRAINING traces one training forward
    pass, which updates the running statistics before they are written out, so the file
    holds them one batch ahead (on the seed 0.9 where the module has 1, then 0.81 after
    ORT's pass). The module is exported with its state as it is, as the other exporter does.
    """
    values = {
        "running_mean": to_numpy(module.running_mean),
        "running_var": to_numpy(module.running_var),
    }
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        wanted = {node.input[3]: values["running_mean"], node.input[4]: values["running_var"]}
        for index, initializer in enumerate(model.graph.initializer):
            if initializer.name in wanted:
                replaced = onnx.numpy_helper.from_array(wanted[initializer.name], initializer.name)
                model.graph.initializer[index].CopyFrom(replaced)


def cache_key(scenario: Scenario, module: torch.nn.Module, x: torch.Tensor) -> str:
    """Everything that shapes an export: the exporter, the mode, shape, dtype, the module's
    settings and its state (weights and running statistics, bit for bit)."""
    digest = hashlib.sha256()
    digest.update(
        repr(
            (
                scenario["onnx_exporter"],
                module.training,
                tuple(x.shape),
                scenario["dtype"],
                scenario["torch_eps"],
                scenario["torch_momentum"],
                scenario["torch_affine"],
                scenario["torch_track_running_stats"],
            )
        ).encode()
    )
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def exported(scenario: Scenario, module: torch.nn.Module, x: torch.Tensor) -> Exported:
    """The module's export, from the cache where it was exported before."""
    key = cache_key(scenario, module, x)
    with _CACHE_LOCK:
        found = _CACHE.get(key)
    if found is None:
        exporter = scenario["onnx_exporter"]
        found = Exported(export(module, x, exporter), exporter)
        with _CACHE_LOCK:
            _CACHE[key] = found
    return found


class OnnxEngine(TorchEngine):
    name = "onnx"
    label = "ONNX Runtime"
    version = (
        f"onnxruntime {ort.__version__} (onnx {onnx.__version__}{_onnxscript_version()}, "
        f"exported by torch {torch.__version__})"
    )

    def start(self, scenario: Scenario) -> Session | EngineResult:
        if scenario["device"] == "cuda":
            return EngineResult(
                self.name,
                available=False,
                version=self.version,
                reason="device=cuda, but the pinned onnxruntime wheel is CPU-only "
                "(CPUExecutionProvider)",
            )
        dtype = scenario["dtype"]
        where = {
            "version": self.version,
            "device": "cpu",
            "device_note": "ONNX Runtime's CPUExecutionProvider (the pinned wheel is CPU-only); "
            "training passes in PyTorch on the CPU",
        }
        if dtype not in ORT_DTYPES:
            return EngineResult(
                self.name,
                available=True,
                error=f"ONNX Runtime's CPU BatchNormalization takes float32 and float64 only, "
                f"not {dtype}",
                **where,
            )
        device = torch.device("cpu")
        return OnnxSession(self.name, where, scenario, self.build(scenario, device), device)


class OnnxSession(TorchSession):
    """Training passes in PyTorch (TorchSession's); the measured pass exported and in ORT."""

    def __init__(self, name, where, scenario: Scenario, module, device) -> None:
        super().__init__(name, where, scenario, module, device)
        self.scenario = scenario
        self.detail: str | None = None

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        if k < self.steps:
            super().step(k, batch, target)
            return
        module = self.module
        self.trained_state = self.state()
        self.gamma, self.beta = to_numpy(module.weight), to_numpy(module.bias)
        module.train(self.measured_train)
        x = to_tensor(np.ascontiguousarray(batch), self.device)
        deployed = exported(self.scenario, module, x)
        self.detail = deployed.detail
        y, mean, var = deployed.run(np.ascontiguousarray(batch))
        self.output = torch.from_numpy(y)
        if target is not None:
            target_tensor = to_tensor(target, self.device)
            self.measure_deployed_gradients(x, target_tensor, deployed.training)
            self.loss = float(mse(self.output, target_tensor).to(torch.float64))
        if module.running_mean is not None:
            if mean is not None:  # the training node's update, ORT's numbers
                with torch.no_grad():
                    module.running_mean.copy_(torch.from_numpy(mean))
                    module.running_var.copy_(torch.from_numpy(var))
            self.recorded.append(torch.stack([module.running_mean, module.running_var]))
        if target is not None and module.weight is not None:
            self.parameters_seen.append(torch.stack([module.weight, module.bias]).detach())

    def measure_deployed_gradients(self, x, target, training: bool) -> None:
        """dL/dx, dγ, dβ by autograd through the exported node's rule (batch
        statistics for a training node, the running ones for an inference node), on a copy:
        the module's statistics are ORT's to set."""
        module = copy.deepcopy(self.module)
        if module.running_mean is not None:
            module.train(training)
        x = x.detach().requires_grad_(True)
        for parameter in module.parameters():
            parameter.grad = None
        mse(module(x), target).backward()
        self.grad_x = to_numpy(x.grad)
        self.grad_gamma = to_numpy(module.weight.grad) if module.weight is not None else None
        self.grad_beta = to_numpy(module.bias.grad) if module.bias is not None else None

    def finish(self) -> EngineResult:
        result = super().finish()
        return EngineResult(**{**result.__dict__, "detail": self.detail})

    def failed(self, exc: Exception) -> EngineResult:
        result = super().failed(exc)
        return EngineResult(**{**result.__dict__, "detail": self.detail})
