"""Whole-model checkpoints for the tests: a small trained CNN, its ports to every format
bnexplore reads, a ResNet-50-shaped state, and the mistakes people make when porting.

Two shapes of data travel between the builders:

- a torch module (``small_cnn()``), whose BatchNorm2d modules are found by
  ``named_modules`` in order;
- a **dict of layers**, ``{name: {"weight", "bias", "running_mean", "running_var"}}`` of
  float32 vectors, in file order (:func:`bn_layers` makes one from a module or a flat
  state; :func:`flat_state` goes back). The port mutations take and return one, never
  changing their argument.

Every writer takes either, and a path::

    m = small_cnn()                       # eval(), ~2 s on 2 cores
    save_state_dict(m, tmp / "m.pt")
    save_onnx(m, tmp / "m.onnx")          # BatchNormalization nodes kept (optimize=False)
    save_keras(m, tmp / "m.keras")        # Keras 3, the faithful port (eps, 1 − m)
    save_keras_h5(m, tmp / "m.h5")        # tf_keras legacy full model
    save_keras_h5(m, tmp / "w.h5", weights_only=True)
    save_keras(swap_mean_var(bn_layers(m), "bn2"), tmp / "bad.keras")
    save_keras(m, tmp / "m01.keras", momentum=AS_TORCH)   # Keras momentum = torch's 0.1

Keras files are built in this process with whichever Keras 3 backend it has (the file does
not depend on it; TensorFlow where none is chosen yet). A Keras layer is named after its
torch module with dots as underscores ("layer1.0.bn1" → "layer1_0_bn1").
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bnexplore.tools.bench import resnet50_names  # the bench's ResNet-50 shape, one place

STATE_KEYS = ("weight", "bias", "running_mean", "running_var")
TINY_LAYER = "bn3"
"""The layer of :func:`small_cnn` whose running variances lie around 1e-5 … 1e-3."""
TINY_SHRINK = 0.03
"""What :func:`small_cnn` multiplies ``conv3``'s input by, so that ``bn3`` sees tiny
activations (``conv3`` stays frozen at its initial weights, as a pretrained layer)."""
INPUT_SHAPE = (3, 16, 16)
AS_TORCH = "as_torch"
"""``save_keras(..., momentum=AS_TORCH)``: write PyTorch's m (0.1) as Keras's momentum,
the classic porting mistake (Keras's momentum is 1 − m)."""

Layers = dict[str, dict[str, np.ndarray]]


# --- a small trained CNN ------------------------------------------------------------------


def small_cnn(seed: int = 0, steps: int = 300):
    """A torch CNN of four Conv2d(3×3, no bias) + BatchNorm2d + ReLU blocks (8, 16, 16, 8
    channels; modules ``conv1``/``bn1`` … ``conv4``/``bn4``, then ``head``), trained
    ``steps`` SGD steps on synthetic 3×16×16 batches of 16, so its running statistics are
    real. ``bn3``'s input is shrunk by :data:`TINY_SHRINK` (``conv3`` frozen), so its running
    variances lie around 1e-5 … 1e-3, where eps decides the output. Returned in eval()."""
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = (INPUT_SHAPE[0], 8, 16, 16, 8)
            for k in range(1, 5):
                conv = nn.Conv2d(widths[k - 1], widths[k], 3, padding=1, bias=False)
                setattr(self, f"conv{k}", conv)
                setattr(self, f"bn{k}", nn.BatchNorm2d(widths[k]))
            self.head = nn.Linear(widths[-1], 4)

        def forward(self, x):
            for k in range(1, 5):
                if k == 3:
                    x = x * TINY_SHRINK
                x = torch.relu(getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x)))
            return self.head(x.mean(dim=(2, 3)))

    generator = torch.Generator().manual_seed(seed)
    with _torch_seed(torch, seed):
        model = SmallCNN()
    model.conv3.requires_grad_(False)
    # synthetic data: channels of their own mean and scale, labels a fixed function of them
    offsets = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    scales = torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    data = torch.randn(512, *INPUT_SHAPE, generator=generator) * scales + offsets
    direction = torch.randn(INPUT_SHAPE[0] * 4, generator=generator)
    pooled = nn.functional.adaptive_avg_pool2d(data, 2).flatten(1)
    labels = (pooled @ direction).argsort().argsort() * 4 // len(data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small: 20× faster than two contending threads
    try:
        for _ in range(steps):
            batch = torch.randint(0, len(data), (16,), generator=generator)
            loss = nn.functional.cross_entropy(model(data[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@contextlib.contextmanager
def _torch_seed(torch, seed: int):
    """Seed torch's global generator for a block (module init), restoring it after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# --- dicts of layers ------------------------------------------------------------------------


def bn_layers(source) -> Layers:
    """{name: {weight, bias, running_mean, running_var}} (float32 copies, in order) of a
    torch module's BatchNorm modules, or of a flat state (``"bn1.running_var"`` → ``bn1``)."""
    if hasattr(source, "named_modules"):
        import torch

        return {
            name: {
                k: getattr(module, k).detach().cpu().numpy().astype(np.float32) for k in STATE_KEYS
            }
            for name, module in source.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        }
    layers: Layers = {}
    for key, value in source.items():
        prefix, _, last = key.rpartition(".")
        if last in STATE_KEYS:
            layers.setdefault(prefix, {})[last] = np.asarray(value, np.float32).copy()
    return {name: vectors for name, vectors in layers.items() if len(vectors) == 4}


def flat_state(layers: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A dict of layers as a flat state_dict of arrays ("bn1.weight", …)."""
    return {
        f"{name}.{k}": np.asarray(v) for name, vectors in layers.items() for k, v in vectors.items()
    }


def _copy(layers: Mapping[str, Mapping[str, np.ndarray]]) -> Layers:
    return {name: {k: np.array(v) for k, v in vectors.items()} for name, vectors in layers.items()}


# --- port mutations: each returns a new dict of layers ----------------------------------------


def swap_mean_var(layers: Mapping, name: str) -> Layers:
    """Layer ``name``'s running mean and running variance swapped (a port that mixed up the
    order of Keras's [γ, β, mean, variance])."""
    out = _copy(layers)
    out[name]["running_mean"], out[name]["running_var"] = (
        out[name]["running_var"],
        out[name]["running_mean"],
    )
    return out


def swap_gamma_beta(layers: Mapping, name: str) -> Layers:
    """Layer ``name``'s γ and β swapped."""
    out = _copy(layers)
    out[name]["weight"], out[name]["bias"] = out[name]["bias"], out[name]["weight"]
    return out


def std_for_var(layers: Mapping, name: str) -> Layers:
    """Layer ``name``'s running variance replaced by its square root (a port that stored
    the standard deviation)."""
    out = _copy(layers)
    out[name]["running_var"] = np.sqrt(out[name]["running_var"])
    return out


def drop_layer(layers: Mapping, name: str) -> Layers:
    """Every layer but ``name`` (a port that lost one)."""
    out = _copy(layers)
    del out[name]
    return out


# --- writers ---------------------------------------------------------------------------------


def save_state_dict(m, path: str | os.PathLike) -> Path:
    """``torch.save(m.state_dict(), path)``; ``m`` a module, or a flat state / dict of layers."""
    import torch

    if hasattr(m, "state_dict"):
        state = m.state_dict()
    else:
        flat = m if not _is_layers(m) else flat_state(m)
        state = {k: torch.from_numpy(np.array(v)) for k, v in flat.items()}
    torch.save(state, path)
    return Path(path)


save_torch = save_state_dict


def save_npz(m, path: str | os.PathLike) -> Path:
    """An ``.npz`` of the flat state (``bn1.running_var``, …); ``m`` a module, a flat state
    or a dict of layers."""
    if hasattr(m, "state_dict"):
        flat = {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}
    else:
        flat = flat_state(m) if _is_layers(m) else dict(m)
    with open(path, "wb") as out:
        np.savez(out, **flat)
    return Path(path)


def _is_layers(value) -> bool:
    return bool(value) and all(isinstance(v, Mapping) for v in value.values())


def save_onnx(m, path: str | os.PathLike, optimize: bool = False, dynamo: bool = True) -> Path:
    """``torch.onnx.export`` of the eval module on a (2, 3, 16, 16) input, weights inside the
    file. ``optimize=False`` keeps the BatchNormalization nodes (the default optimizer folds
    them into the Convs); with ``dynamo=False`` the same is ``do_constant_folding=False``."""
    import torch

    x = torch.zeros(2, *INPUT_SHAPE)
    with _quiet():
        if dynamo:
            torch.onnx.export(
                m.eval(), (x,), str(path), dynamo=True, optimize=optimize, external_data=False
            )
        else:
            torch.onnx.export(m.eval(), (x,), str(path), dynamo=False, do_constant_folding=optimize)
    return Path(path)


@contextlib.contextmanager
def _quiet():
    """The exporters' and Keras's chatter off for a block."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def save_keras(
    m,
    path: str | os.PathLike,
    momentum: float | str | None = None,
    eps: float | None = None,
) -> Path:
    """A Keras 3 ``.keras`` model whose BatchNormalization layers carry the torch layers'
    weights (γ = weight, β = bias, moving_mean, moving_variance), named as the torch modules
    with dots as underscores.

    The faithful port: eps = torch's eps, momentum = 1 − torch's m (0.9). ``momentum=``
    :data:`AS_TORCH` writes torch's m itself (0.1), a number writes that number; ``eps``
    overrides every layer's eps. ``m`` is a module (its 3×3 convs are ported too) or a dict
    of layers (1×1 convs between layers of different widths; defaults eps 1e-5, m 0.1)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    model = _keras_model(keras, m, momentum, eps)
    with _quiet():
        model.save(str(path))
    return Path(path)


def save_keras_h5(
    m,
    path: str | os.PathLike,
    weights_only: bool = False,
    momentum: float | str | None = None,
    eps: float | None = None,
) -> Path:
    """The same port (see :func:`save_keras`) in tf_keras (Keras 2), as a legacy ``.h5``:
    ``model.save(path)`` (the full model, its config with eps and momentum) or, with
    ``weights_only``, ``model.save_weights(path)``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_keras

    model = _keras_model(tf_keras, m, momentum, eps)
    with _quiet():
        if weights_only:
            model.save_weights(str(path), save_format="h5")
        else:
            model.save(str(path), save_format="h5")
    return Path(path)


def _keras_model(keras, m, momentum, eps):
    """Input + (Conv2D +) BatchNormalization per torch layer, channels-last, weights set."""
    plan = _port_plan(m)
    rng = np.random.default_rng(0)
    first = plan[0]
    channels = first["conv"].shape[1] if first["conv"] is not None else len(first["running_var"])
    inputs = keras.Input((4, 4, channels))
    x, assign = inputs, []
    for step in plan:
        width = len(step["running_var"])
        if step["conv"] is not None:  # (out, in, kh, kw) → (kh, kw, in, out)
            kernel = np.transpose(step["conv"], (2, 3, 1, 0))
            conv = keras.layers.Conv2D(
                width, kernel.shape[:2], padding="same", use_bias=False, name=step["conv_name"]
            )
        elif width != channels:
            kernel = rng.normal(0, 1 / np.sqrt(channels), (1, 1, channels, width)).astype("f4")
            conv = keras.layers.Conv2D(width, 1, use_bias=False, name=f"{step['keras']}_proj")
        else:
            conv = kernel = None
        if conv is not None:
            x = conv(x)
            assign.append((conv, [kernel]))
        layer_momentum = {None: 1 - step["momentum"], AS_TORCH: step["momentum"]}.get(
            momentum, momentum
        )
        bn = keras.layers.BatchNormalization(
            epsilon=step["eps"] if eps is None else eps,
            momentum=float(layer_momentum),
            name=step["keras"],
        )
        x = bn(x)
        assign.append((bn, [step[k] for k in STATE_KEYS]))
        channels = width
    model = keras.Model(inputs, x, name="port")
    for layer, weights in assign:
        layer.set_weights([np.asarray(w, np.float32) for w in weights])
    return model


def _port_plan(m) -> list[dict]:
    """Each BatchNorm in order: its vectors, eps, torch momentum, Keras name, and the 3×3
    stride-1 Conv2d before it when it can be ported as a Keras "same" Conv2D."""
    plan = []
    if not hasattr(m, "named_modules"):
        for name, vectors in m.items():
            plan.append(
                {**vectors, "eps": 1e-5, "momentum": 0.1, "keras": _keras_name(name), "conv": None}
            )
        return plan
    import torch

    last_conv = None
    for name, module in m.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            last_conv = (name, module)
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            vectors = {
                k: getattr(module, k).detach().cpu().numpy().astype(np.float32) for k in STATE_KEYS
            }
            conv = None
            if last_conv is not None:
                _, c = last_conv
                k = c.kernel_size[0]
                if (
                    c.out_channels == module.num_features
                    and c.kernel_size == (k, k)
                    and k % 2 == 1
                    and c.stride == (1, 1)
                    and c.padding == (k // 2, k // 2)
                    and c.groups == 1
                    and c.dilation == (1, 1)
                ):
                    conv = c.weight.detach().cpu().numpy()
            plan.append(
                {
                    **vectors,
                    "eps": float(module.eps),
                    "momentum": float(module.momentum if module.momentum is not None else 0.1),
                    "keras": _keras_name(name),
                    "conv": conv,
                    "conv_name": _keras_name(last_conv[0]) if conv is not None else None,
                }
            )
            last_conv = None
    return plan


def _keras_name(torch_name: str) -> str:
    return torch_name.replace(".", "_")


# --- a ResNet-50-shaped state ------------------------------------------------------------------


def resnet50_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A flat ResNet-50 BatchNorm state_dict in torchvision's names (``layer1.0.bn1.weight``,
    …, ``layer4.0.downsample.1.running_var``, each layer's ``num_batches_tracked``), float32,
    with trained-looking statistics: γ around 1 (a block's last γ around 0.2), β and means
    spread, log-normal variances and about 1 % of channels nearly dead (1e-7 … 1e-5)."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, channels in resnet50_names().items():
        last = name.endswith(".bn3")
        gamma = np.abs(rng.normal(0.2 if last else 1.0, 0.1 if last else 0.3, channels))
        var = np.exp(rng.normal(-1.0, 1.5, channels))
        dead = rng.random(channels) < 0.01
        var[dead] = 10.0 ** rng.uniform(-7, -5, int(dead.sum()))
        state[f"{name}.weight"] = gamma.astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.2, channels).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0, 0.5, channels).astype(np.float32)
        state[f"{name}.running_var"] = var.astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(450_360, np.int64)
    return state
