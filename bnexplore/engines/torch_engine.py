"""PyTorch engine: ``torch.nn.BatchNorm1d/2d/3d`` run for real.

Training pass (``.train()``, or always when track_running_stats is false)::

    y = (x − mean_b) / √(var_b + eps) · weight + bias
    running_mean ← (1 − m)·running_mean + m·mean_b
    running_var  ← (1 − m)·running_var  + m·var_b·n/(n − 1)     (unbiased!)

with m = momentum, or 1/num_batches_tracked when momentum is None. Eval pass:
the same normalization with the running statistics. Statistics are per
channel (axis 1) over the n values of every other axis.

With loss=mse a training pass is ``L = mean((y − T)²)``, ``L.backward()`` and one
``optimizer.step()`` on the parameters that require grad; the measured pass computes L
and the gradients w.r.t. x, weight and bias, and takes no step. ``requires_grad_(False)``
only stops the update: the forward pass still uses the batch statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from bnexplore.engines import (
    EngineResult,
    Session,
    State,
    history_of,
    parameter_history_of,
)
from bnexplore.scenario.links import Scenario
from bnexplore.scenario.params import ADAM_BETAS

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_MODULES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


class DeviceMissing(RuntimeError):
    pass


def resolve_device(requested: str) -> tuple[torch.device, str]:
    """The device to run on, and why."""
    has_cuda = torch.cuda.is_available()
    if requested == "cpu":
        return torch.device("cpu"), "device=cpu asked for"
    if requested == "cuda":
        if not has_cuda:
            raise DeviceMissing("device=cuda, but PyTorch sees no CUDA device")
        return torch.device("cuda"), "device=cuda asked for"
    if has_cuda:
        return torch.device("cuda"), "auto: PyTorch sees a CUDA device"
    return torch.device("cpu"), "auto: PyTorch sees no CUDA device, ran on CPU"


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """A NumPy batch as a tensor, bit for bit (bfloat16 travels as its 16 bits)."""
    if batch.dtype.name == "bfloat16":
        return torch.from_numpy(batch.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(batch).to(device)


def to_numpy(tensor: torch.Tensor | None, copy: bool = True) -> np.ndarray | None:
    """A tensor as a NumPy array of the same dtype (bfloat16 through ml_dtypes).

    ``copy=False`` shares the tensor's memory on the CPU: only for tensors that
    nothing writes to afterwards, such as the measured pass's output.
    """
    if tensor is None:
        return None
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        array = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return array.copy() if copy else array


def build_optimizer(scenario: Scenario, parameters: list) -> torch.optim.Optimizer | None:
    """The scenario's torch.optim optimizer over ``parameters`` (None: nothing to train).

    A knob left at ``default`` is not passed: the library's own default applies.
    """
    if not parameters:
        return None
    kind = scenario["torch_optimizer"]
    kwargs: dict = {}
    if scenario["torch_lr"] is not None:
        kwargs["lr"] = scenario["torch_lr"]
    if scenario["torch_weight_decay"] is not None:
        kwargs["weight_decay"] = scenario["torch_weight_decay"]
    if kind == "sgd":
        return torch.optim.SGD(parameters, momentum=scenario["torch_opt_momentum"], **kwargs)
    if scenario["torch_adam_eps"] is not None:
        kwargs["eps"] = scenario["torch_adam_eps"]
    adam = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return adam(parameters, betas=ADAM_BETAS, **kwargs)


def mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = mean((y − T)²) over all elements."""
    return torch.mean(torch.square(y - target))


class TorchEngine:
    name = "torch"
    label = "PyTorch"
    version = f"torch {torch.__version__}"

    def build(self, scenario: Scenario, device: torch.device) -> torch.nn.Module:
        """A fresh BatchNorm module of the scenario's rank, dtype and settings."""
        module_class = _MODULES[len(scenario.shape)]
        module = module_class(
            scenario.channels,
            eps=scenario["torch_eps"],
            momentum=scenario["torch_momentum"],
            affine=scenario["torch_affine"],
            track_running_stats=scenario["torch_track_running_stats"],
            device=device,
            dtype=_DTYPES[scenario["dtype"]],
        )
        return module.requires_grad_(scenario["torch_requires_grad"])

    def start(self, scenario: Scenario) -> Session | EngineResult:
        try:
            device, note = resolve_device(scenario["device"])
        except DeviceMissing as missing:
            return EngineResult(
                self.name, available=False, version=self.version, reason=str(missing)
            )
        where = {"version": self.version, "device": describe(device), "device_note": note}
        return TorchSession(self.name, where, scenario, self.build(scenario, device), device)


class TorchGpuEngine(TorchEngine):
    """PyTorch on CUDA, whatever ``device`` says: the GPU kernel beside the others.

    Configured by the same torch_* knobs as the ``torch`` engine, so a scenario
    with engines=torch,torch_gpu and device=cpu compares PyTorch's CPU and CUDA
    kernels on the same batches.
    """

    name = "torch_gpu"
    label = "PyTorch (CUDA)"

    def start(self, scenario: Scenario) -> Session | EngineResult:
        if not torch.cuda.is_available():
            return EngineResult(
                self.name,
                available=False,
                version=self.version,
                reason="PyTorch sees no CUDA device: the GPU kernel cannot run here",
            )
        device = torch.device("cuda")
        where = {
            "version": self.version,
            "device": describe(device),
            "device_note": "torch_gpu: CUDA, whatever device says",
        }
        return TorchSession(self.name, where, scenario, self.build(scenario, device), device)


class TorchSession(Session):
    def __init__(self, name, where, scenario: Scenario, module: torch.nn.Module, device):
        self.name, self.where, self.module, self.device = name, where, module, device
        self.steps, self.measured_train = scenario["steps"], scenario["torch_mode"] == "train"
        self.recorded: list[torch.Tensor] = []  # (2, C) per pass, on the device until the end
        self.trained_state: State | None = None
        self.output: torch.Tensor | None = None
        trained = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(scenario, trained) if scenario["loss"] != "none" else None
        self.parameters_seen: list[torch.Tensor] = []  # (γ, β) per pass with a loss
        self.gamma = self.beta = None
        self.loss = self.grad_x = self.grad_gamma = self.grad_beta = None

    def step(self, k: int, batch: np.ndarray, target: np.ndarray | None = None) -> None:
        module = self.module
        if k == self.steps:
            self.trained_state = self.state()
            self.gamma, self.beta = to_numpy(module.weight), to_numpy(module.bias)
        module.train(k < self.steps or self.measured_train)
        x = to_tensor(batch, self.device)
        if target is None:
            with torch.no_grad():
                self.output = module(x)
        elif k < self.steps:
            self.train_step(x, to_tensor(target, self.device))
        else:
            self.measure_gradients(x, to_tensor(target, self.device))
        if module.running_mean is not None:
            self.recorded.append(torch.stack([module.running_mean, module.running_var]))
        if target is not None and module.weight is not None:
            self.parameters_seen.append(torch.stack([module.weight, module.bias]).detach())

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Forward, L, backward, one optimizer step (nothing to step: forward and L only)."""
        y = self.module(x)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
            mse(y, target).backward()
            self.optimizer.step()
        self.output = y.detach()

    def measure_gradients(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """The measured pass: L and dL/dx, dL/dweight, dL/dbias; no step."""
        module = self.module
        x = x.detach().requires_grad_(True)  # a leaf; nothing writes to x
        for parameter in module.parameters():
            parameter.grad = None
        y = module(x)
        loss = mse(y, target)
        loss.backward()
        self.output = y.detach()
        self.loss = float(loss.detach().to(torch.float64))
        self.grad_x = to_numpy(x.grad, copy=False)
        self.grad_gamma = to_numpy(module.weight.grad) if module.weight is not None else None
        self.grad_beta = to_numpy(module.bias.grad) if module.bias is not None else None

    def port(self, state: State) -> None:
        """Start from a state (PyTorch's names) through ``load_state_dict``.

        Only the entries the module has are loaded: affine=False has no weight and
        bias, track_running_stats=False no running statistics; each is cast to the
        module's dtype and device as load_state_dict copies it.
        """
        own = self.module.state_dict()
        given = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in state.items()}
        self.module.load_state_dict({k: v for k, v in given.items() if k in own}, strict=False)

    def state(self) -> State | None:
        """weight, bias, running_mean, running_var as float64 (None without running stats)."""
        module = self.module
        if module.running_mean is None:
            return None
        channels = module.num_features

        def f64(t: torch.Tensor | None, fill: float) -> np.ndarray:
            if t is None:
                return np.full(channels, fill)
            return t.detach().cpu().to(torch.float64).numpy().copy()

        return {
            "weight": f64(module.weight, 1.0),
            "bias": f64(module.bias, 0.0),
            "running_mean": f64(module.running_mean, 0.0),
            "running_var": f64(module.running_var, 1.0),
        }

    def finish(self) -> EngineResult:
        history = None
        if self.recorded:
            stacked = torch.stack(self.recorded).to(torch.float64).cpu().numpy()
            history = history_of(list(range(len(self.recorded))), stacked[:, 0], stacked[:, 1])
        parameter_history = None
        if self.parameters_seen:
            stacked = torch.stack(self.parameters_seen).to(torch.float64).cpu().numpy()
            parameter_history = parameter_history_of(
                list(range(len(stacked))), stacked[:, 0], stacked[:, 1]
            )
        return EngineResult(
            self.name,
            available=True,
            output=to_numpy(self.output, copy=False),
            running_mean=to_numpy(self.module.running_mean),
            running_var=to_numpy(self.module.running_var),
            trained_state=self.trained_state,
            history=history,
            **self.training_fields(),
            parameter_history=parameter_history,
            **self.where,
        )
