"""Reading BatchNorm states and input batches from files, with no unsafe unpickling.

Every reader takes a seekable binary file and returns plain NumPy arrays:
a layer's state is float64 in PyTorch's names (weight, bias, running_mean,
running_var), a batch is channels-first. The format is told by the content,
never by the file's name:

- PyTorch ``.pt``/``.pth`` (a zip with ``data.pkl``, or a legacy pickle stream):
  ``torch.load(weights_only=True)``, whose restricted unpickler is the only
  pickle reader in bnexplore. Nested checkpoints ({"state_dict": …}) are flattened
  with dots.
- ``.safetensors``: ``safetensors.numpy``.
- Keras ``.keras`` (a zip with ``config.json`` and ``model.weights.h5``): the
  config names each BatchNormalization and says whether it has γ (scale) and β
  (center); the weights are read with h5py from ``…/vars`` groups, whose ``name``
  attribute is the layer's name, in Keras's order [γ, β, moving_mean,
  moving_variance]. No model is built.
- A bare ``.weights.h5``: accepted only when every layer's ``vars`` group holds
  exactly four vectors of one length (γ, β, mean, variance); otherwise there is
  no telling which groups are BatchNorm, and the ``.keras`` is asked for.
- A legacy Keras ``.h5`` (Keras 2 / tf.keras ``model.save("x.h5")``, or
  ``save_weights("x.h5")``): h5py, the layer groups under ``model_weights/`` (or at the
  root) in ``layer_names`` order, each layer's vectors named by ``weight_names``
  (``bn1/gamma:0``); a full model's ``model_config`` gives eps and momentum.
- ONNX ``.onnx`` (no magic bytes: told last, by parsing its top-level fields): the
  ``onnx`` package, never run; each ``BatchNormalization`` node's initializers.
- NumPy ``.npz``/``.npy``: ``np.load(allow_pickle=False)``.

:func:`read_model` reads a file as a whole checkpoint (:class:`ModelFile`: its format, the
framework it names, its layers with their eps and momentum where the format has them);
:func:`read_layers` is its layers.

In name → array files (state_dicts, safetensors, npz) a BatchNorm layer is a
prefix P with ``P.running_mean`` and ``P.running_var`` (PyTorch: γ, β are
``P.weight``, ``P.bias``) or ``P.moving_mean`` and ``P.moving_variance`` (Keras:
``P.gamma``, ``P.beta``). A missing γ is 1, a missing β 0. A bare single layer's
state_dict (``running_mean`` with no prefix) is one layer named ``""``.

Batches (``input=file``): a ``.npy`` is one batch, used for every pass; a
``.npz`` holds ``batch_0``, ``batch_1``, … for the passes in order.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import BinaryIO

import numpy as np

from bnexplore import settings
from bnexplore.settings import MAX_DIMS, MAX_ELEMENTS, MIN_DIMS

STATE_NAMES = ("weight", "bias", "running_mean", "running_var")
TORCH_NAMES = {"weight": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
KERAS_NAMES = {"weight": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
FILL = {"weight": 1.0, "bias": 0.0}
"""γ and β where a file has none (center/scale off, or not saved)."""

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"


class FileProblem(ValueError):
    """A file that cannot be used; the message names the problem for a person."""


@dataclass(frozen=True)
class Layer:
    """One BatchNorm layer found in a file: its name there and its state.

    ``problem`` is set (and the layer cannot start a run) when a statistic holds
    NaN or ±inf, the variance is negative, or the four vectors disagree in length.
    ``eps`` and ``momentum`` are the file's own, where its format carries them (a
    ``.keras`` or legacy ``.h5`` config, an ONNX node; None elsewhere), momentum in
    the Keras/ONNX convention: new_running = m·running + (1 − m)·batch.
    """

    name: str
    channels: int
    state: Mapping[str, np.ndarray] = field(default_factory=dict)
    problem: str | None = None
    eps: float | None = None
    momentum: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", MappingProxyType(dict(self.state)))

    @property
    def label(self) -> str:
        """The name as people read it: the bare layer of a single module's state_dict."""
        return self.name or "(top level)"


MODEL_FORMATS = ("pytorch", "safetensors", "npz", "keras", "keras_weights", "keras_h5", "onnx")
"""What :attr:`ModelFile.format` may say: a ``.pt``/``.pth``, a ``.safetensors``, an
``.npz``, a Keras 3 ``.keras`` zip, a weights-only HDF5 (Keras 3 ``.weights.h5`` or a
legacy ``save_weights("x.h5")``), a legacy full model (``model.save("x.h5")``), an ``.onnx``."""


@dataclass(frozen=True)
class ModelFile:
    """What a whole checkpoint holds for bnexplore: its BatchNorm layers, in file order.

    ``source`` is the framework the file itself names: "torch" (PyTorch's names, or an
    ONNX file produced by "pytorch"), "keras" (Keras 3, or Keras's names in a
    name → array file), "keras2" (a legacy ``.h5`` of Keras 2.x, or an ONNX file from
    "tf2onnx"), or None where the file does not say. ``notices`` are for a person:
    what the file could not tell (a weights-only file has no eps), and how it was read.
    """

    format: str
    source: str | None
    layers: tuple[Layer, ...]
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchInfo:
    """What a batch file holds, read from its headers: count, shape, dtype."""

    count: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.count * math.prod(self.shape) * np.dtype(self.dtype).itemsize


def sniff(f: BinaryIO) -> str:
    """The format of a file from its first bytes and, for zips, its members."""
    f.seek(0)
    head = f.read(16)
    f.seek(0)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(HDF5_MAGIC):
        return "weights.h5"
    if head.startswith(ZIP_MAGIC):
        names = [info.filename for info in _zip_members(f)]
        if "config.json" in names and "model.weights.h5" in names:
            return "keras"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise FileProblem(
            "a zip file that is neither a PyTorch file, a .keras file nor an .npz "
            f"(members: {', '.join(names[:5])})"
        )
    # safetensors first: its header's length, little-endian, may begin with the byte 0x80
    # (a pickle's first); a pickle's next seven bytes never make a length this small
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    if head[:1] == b"\x80":  # a pickle stream: PyTorch's legacy format, or a bare pickle
        return "torch"
    if _looks_like_onnx(f):  # no magic bytes: the last resort, a parse of its top level
        return "onnx"
    if not head:
        raise FileProblem("an empty file")
    raise FileProblem(
        "not a file bnexplore reads, or a truncated one: expected PyTorch .pt/.pth, "
        ".safetensors, .keras, .weights.h5 or Keras .h5, .onnx, .npz or .npy"
    )


# --- limits: checked from headers, shapes and strides, before anything is materialized -----


class Budget:
    """What one file may make us hold: a count of objects scanned (groups, datasets, zip
    members, tensors) and the bytes of the BatchNorm vectors read, as stored."""

    def __init__(self) -> None:
        self.objects_left = settings.max_objects()
        self.bytes_left = settings.max_state_bytes()

    def scan(self, count: int = 1) -> None:
        self.objects_left -= count
        if self.objects_left < 0:
            raise FileProblem(
                f"more than {settings.max_objects():,} objects (groups, datasets, members or "
                "tensors) to scan: refused before reading them (BNEXPLORE_MAX_OBJECTS)"
            )

    def vector(self, what: str, shape: tuple[int, ...], itemsize: int) -> None:
        """A vector about to be read: within the channel cap and what is left of the bytes."""
        values = math.prod(shape)
        if values > settings.max_channels():
            raise FileProblem(
                f"{what} holds {values:,} values, over the limit of "
                f"{settings.max_channels():,} channels per layer (BNEXPLORE_MAX_CHANNELS)"
            )
        self.bytes_left -= values * itemsize
        if self.bytes_left < 0:
            raise FileProblem(
                "its BatchNorm vectors hold more than "
                f"{settings.exact_words(settings.max_state_bytes())} "
                "(BNEXPLORE_MAX_STATE_BYTES): refused before reading them"
            )


def _zip_members(f: BinaryIO) -> list[zipfile.ZipInfo]:
    """A zip's members, their count read from its end record before Python parses the
    directory (a directory of millions of entries is refused, not parsed)."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 65_557))
    tail = f.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) < end + 22:
        f.seek(0)
        raise FileProblem("a truncated or malformed zip file (no end of central directory)")
    count = int.from_bytes(tail[end + 10 : end + 12], "little")
    if count == 0xFFFF and end >= 20 and tail[end - 20 : end - 16] == b"PK\x06\x07":
        f.seek(int.from_bytes(tail[end - 12 : end - 4], "little"))
        record = f.read(56)
        count = int.from_bytes(record[32:40], "little") if record[:4] == b"PK\x06\x06" else count
    f.seek(0)
    if count > settings.max_objects():
        raise FileProblem(
            f"a zip file of {count:,} members, over {settings.max_objects():,}: refused "
            "before reading them (BNEXPLORE_MAX_OBJECTS)"
        )
    try:
        return zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise FileProblem(f"a truncated or malformed zip file ({exc})") from None
    finally:
        f.seek(0)


def _read_member(archive: zipfile.ZipFile, name: str, most: int, what: str) -> bytes:
    """A zip member's bytes, never more than ``most`` (its declared size is not trusted)."""
    with archive.open(name) as member:
        data = member.read(most + 1)
    if len(data) > most:
        raise FileProblem(
            f"{what} unpacks to more than {settings.exact_words(most)}: refused before unpacking it"
        )
    return data


def _json(data: bytes, what: str):
    try:
        return json.loads(data)
    except RecursionError:
        raise FileProblem(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise FileProblem(f"{what} is not valid JSON ({exc})") from None


def _framework(module: str, what: str):
    """A reader's library, imported when first needed; missing, it is a FileProblem."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FileProblem(f"reading {what} needs {module}, which is missing here ({exc})") from None


# --- BatchNorm states --------------------------------------------------------------------


def read_layers(f: BinaryIO) -> tuple[Layer, ...]:
    """Every BatchNorm layer in a file, in file order; raises FileProblem."""
    return read_model(f).layers


NO_LAYER = (
    "no BatchNorm layer found: expected P.running_mean and P.running_var "
    "(or P.moving_mean and P.moving_variance)"
)


def read_model(f: BinaryIO) -> ModelFile:
    """A whole checkpoint's BatchNorm layers, its format and the framework it names;
    raises FileProblem (a file with no BatchNorm layer among them)."""
    kind = sniff(f)
    if kind == "npy":
        raise FileProblem(
            "a .npy holds one array, no named BatchNorm state: use an .npz with "
            "P.running_mean, P.running_var (and P.weight, P.bias)"
        )
    if kind == "keras":
        model = ModelFile("keras", "keras", _keras_layers(f))
    elif kind == "weights.h5":
        model = _hdf5_model(f)
    elif kind == "onnx":
        model = _onnx_model(f)
    else:
        arrays = _named_arrays(kind, f)
        layers, notices = _without_averaged_copies(_named_layers(arrays))
        fmt = {"torch": "pytorch"}.get(kind, kind)
        model = ModelFile(fmt, _named_source(arrays, layers), layers, notices)
    if not model.layers:
        raise FileProblem(NO_LAYER_IN.get(model.format, NO_LAYER))
    return model


NO_LAYER_IN = {
    "keras": "no BatchNormalization layer: the model's config.json lists none",
    "keras_h5": (
        "no BatchNormalization layer: no layer of the model has a moving_mean and a moving_variance"
    ),
    "keras_weights": (
        "no BatchNormalization layer: no layer's weights include a moving_mean and a "
        "moving_variance"
    ),
}
"""A Keras file's words for a model without a BatchNorm (NO_LAYER's names are PyTorch's)."""


AVERAGED = re.compile(r"ema|swa|averaged", re.IGNORECASE)
"""A checkpoint key that holds an averaged copy of the weights (timm's ``state_dict_ema``,
torchvision's ``model_ema``, a ``swa_model``)."""


def _without_averaged_copies(
    layers: tuple[Layer, ...],
) -> tuple[tuple[Layer, ...], tuple[str, ...]]:
    """A checkpoint that holds its model twice, the weights and an averaged copy under a key
    such as ``state_dict_ema``, audited once: the copy's layers, the same names under the
    other key (``module.`` aside: torch.optim.swa_utils.AveragedModel's), are left out,
    with a notice. Two keys that are not an averaged copy (two branches of a model) both
    stay."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        key, dot, rest = layer.name.partition(".")
        if not dot:
            return layers, ()
        groups.setdefault(key, []).append(rest.removeprefix("module."))  # AveragedModel's
    kept = [k for k in groups if not AVERAGED.search(k)]
    copies = [k for k in groups if AVERAGED.search(k) and any(groups[k] == groups[b] for b in kept)]
    if not copies:
        return layers, ()
    main = next(b for b in kept if groups[b] == groups[copies[0]])
    notice = (
        f"the file holds its {len(groups[main])} BatchNorm layers again under "
        f"{', '.join(repr(k) for k in copies)}, an averaged copy of the weights: "
        f"{main!r} is read, the copy left out"
    )
    return tuple(la for la in layers if la.name.partition(".")[0] not in copies), (notice,)


def _named_source(arrays: Mapping[str, np.ndarray], layers: tuple[Layer, ...]) -> str | None:
    """ "torch" when every layer has PyTorch's names, "keras" when every one has Keras's."""
    found = set()
    for layer in layers:
        prefix = f"{layer.name}." if layer.name else ""
        torch_names = prefix + TORCH_NAMES["mean"] in arrays
        found.add("torch" if torch_names else "keras")
    return found.pop() if len(found) == 1 else None


def _named_arrays(kind: str, f: BinaryIO) -> dict[str, np.ndarray]:
    reader = {"torch": _torch_arrays, "safetensors": _safetensors_arrays}.get(kind, _npz_arrays)
    return reader(f, Budget())


_UNSUPPORTED = re.compile(r"Unsupported (?:global|operand)[^\n]*", re.IGNORECASE)
_SAVE_STATE = "save the state_dict instead: torch.save(model.state_dict(), 'model.pt')"
MAX_NESTING = 64
"""Most levels of dicts (a checkpoint), groups (HDF5) or config an honest file nests."""


def _torch_arrays(f: BinaryIO, budget: Budget) -> dict[str, np.ndarray]:
    """A PyTorch file through torch.load(weights_only=True): tensors only, never code.

    A zip's members are checked first: TorchScript is refused, and so are compressed
    members (torch.save stores them as they are), so nothing unpacks past the file's size.
    """
    import pickle

    f.seek(0)
    if f.read(4) == ZIP_MAGIC:
        members = _zip_members(f)
        budget.scan(len(members))
        names = [m.filename for m in members]
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise FileProblem(f"a TorchScript file, refused: {_SAVE_STATE}")
        packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise FileProblem(
                f"a PyTorch zip with compressed members ({', '.join(packed[:3])}), which "
                f"torch.save never writes: refused before unpacking them; {_SAVE_STATE}"
            )
    f.seek(0)
    torch = _framework("torch", "a PyTorch file")

    try:
        loaded = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED.search(str(exc))
        what = found.group(0) if found else str(exc).splitlines()[0]
        what = what.split(" was not", 1)[0].rstrip(".")
        kind = "a full-model file" if re.search(r"torch\.nn\.|__main__\.", what) else "a file"
        raise FileProblem(
            f"refused: {kind} whose pickle asks for more than tensors, which "
            f"torch.load(weights_only=True) does not run ({what}). Nothing in it was "
            f"executed. {_SAVE_STATE[0].upper()}{_SAVE_STATE[1:]}"
        ) from None
    except RecursionError:
        raise FileProblem("a PyTorch file nested too deeply to be a state_dict") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        first = first.split(" weights_only", 1)[0] if "weights_only=False" in first else first
        raise FileProblem(f"a truncated or malformed PyTorch file ({first})") from None
    tensors: dict[str, object] = {}
    _flatten(loaded, "", tensors, torch, budget, depth=0)
    arrays: dict[str, np.ndarray] = {}
    for name in _batchnorm_names(tensors):
        tensor = tensors[name]
        if not tensor.is_complex():
            # checked by its shape before it is copied: a stride-0 view never expands past
            # the cap
            budget.vector(repr(name), tuple(tensor.shape), 8)
            arrays[name] = tensor.detach().to(torch.float64).numpy()
    return arrays


def _flatten(value, prefix: str, into: dict[str, object], torch, budget, depth: int) -> None:
    """The tensors of nested dicts (checkpoints) under dotted names, uncopied; anything
    else is skipped."""
    if depth > MAX_NESTING:
        raise FileProblem(f"a PyTorch file nested too deeply (more than {MAX_NESTING} levels)")
    if isinstance(value, torch.Tensor):
        budget.scan()
        into[prefix] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                _flatten(item, f"{prefix}.{key}" if prefix else key, into, torch, budget, depth + 1)


SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
"""safetensors' dtype names, as NumPy (and ml_dtypes, for bfloat16 and float8) call them."""


def _safetensors_arrays(f: BinaryIO, budget: Budget) -> dict[str, np.ndarray]:
    """A .safetensors file read from its header: each BatchNorm tensor's offsets are checked
    against the file and its shape before its bytes are read; nothing else is read."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    header_len = int.from_bytes(f.read(8), "little")
    if not 0 < header_len <= min(size - 8, settings.max_config_bytes()):
        raise FileProblem(
            f"a truncated or malformed .safetensors file (a header of {header_len:,} bytes "
            f"in a file of {size:,})"
        )
    header = _json(f.read(header_len), "the .safetensors header")
    if not isinstance(header, dict):
        raise FileProblem("a malformed .safetensors file (its header is not a mapping)")
    header.pop("__metadata__", None)
    budget.scan(len(header))
    data_start, data_size = 8 + header_len, size - 8 - header_len
    found: list[tuple[int, str, np.ndarray]] = []
    wanted = set(_batchnorm_names(header))
    for name, entry in header.items():
        if name not in wanted:
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise FileProblem(f"a malformed .safetensors entry for {name!r}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise FileProblem(f"{name!r} is of dtype {dtype_name!r}, which bnexplore does not read")
        dtype = _numpy_dtype(SAFETENSORS_DTYPES[dtype_name])
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size:
            raise FileProblem(
                f"a malformed .safetensors file: {name!r} claims bytes {begin:,}–{end:,} of "
                f"{data_size:,}"
            )
        budget.vector(repr(name), shape, dtype.itemsize)
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise FileProblem(
                f"a malformed .safetensors file: {name!r} of shape {shape} ({dtype_name}) "
                f"needs {math.prod(shape) * dtype.itemsize:,} bytes, its offsets give "
                f"{end - begin:,}"
            )
        f.seek(data_start + begin)
        array = np.frombuffer(f.read(end - begin), dtype=dtype).reshape(shape)
        found.append((begin, name, array.astype(np.float64)))
    # file order is the order of the tensors' bytes
    return {name: array for _, name, array in sorted(found, key=lambda t: t[0])}


def _numpy_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _npz_arrays(f: BinaryIO, budget: Budget) -> dict[str, np.ndarray]:
    """The BatchNorm-named arrays of an .npz; every member's header is read first, so an
    object array anywhere is refused, and each array's shape is checked before it is
    decompressed."""
    try:
        members = _zip_members(f)
        budget.scan(len(members))
        with zipfile.ZipFile(f) as archive:
            names = [m.filename.removesuffix(".npy") for m in members]
            batchnorm = set(_batchnorm_names(names))
            wanted = []
            for name in names:
                with archive.open(name + ".npy") as member:
                    shape, dtype = _array_header(member, repr(name))
                if name in batchnorm:
                    budget.vector(repr(name), shape, dtype.itemsize)
                    wanted.append(name)
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            return {name: npz[name] for name in wanted}
    except FileProblem:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise FileProblem(f"a truncated or malformed .npz file ({exc})") from None


def _batchnorm_names(names: Iterable[str]) -> list[str]:
    """The names of a BatchNorm's vectors, in the order given: P.running_mean beside
    P.running_var (or P.moving_mean beside P.moving_variance) make P a BatchNorm, and its
    P.weight, P.bias (P.gamma, P.beta) and statistics are kept. A convolution's P.weight,
    whose P has no running statistics, is none of them: it is neither read nor held to the
    channel cap."""
    names = list(names)
    present, kept = set(names), set()
    for family in (TORCH_NAMES, KERAS_NAMES):
        mean = family["mean"]
        for name in names:
            if name != mean and not name.endswith("." + mean):
                continue
            prefix = name[: -len(mean)]  # "" or "P."
            if prefix + family["var"] in present:
                kept.update(prefix + vector for vector in family.values())
    return [name for name in names if name in kept]


def _named_layers(arrays: Mapping[str, np.ndarray]) -> tuple[Layer, ...]:
    """Layers by prefix: P.running_mean + P.running_var, or P.moving_mean + P.moving_variance."""
    layers = []
    for key in arrays:
        for names in (TORCH_NAMES, KERAS_NAMES):
            suffix = names["mean"]
            if key != suffix and not key.endswith("." + suffix):
                continue
            prefix = key[: -len(suffix)]  # "" or "P."
            if prefix + names["var"] not in arrays:
                continue
            found = {ours: arrays.get(prefix + names[short]) for short, ours in _PAIRS}
            layers.append(_layer(prefix.removesuffix("."), found))
    return tuple(layers)


_PAIRS = (("weight", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))


def _layer(
    name: str,
    found: Mapping[str, np.ndarray | None],
    eps: float | None = None,
    momentum: float | None = None,
) -> Layer:
    """A layer from its four arrays (γ, β may be None), checked; with the file's eps and
    momentum where it has them."""
    layer = _checked_layer(name, found)
    return replace(layer, eps=eps, momentum=momentum) if (eps, momentum) != (None, None) else layer


def _checked_layer(name: str, found: Mapping[str, np.ndarray | None]) -> Layer:
    shapes = {k: np.shape(v) for k, v in found.items() if v is not None}
    channels = int(np.size(found["running_var"]))
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        described = ", ".join(f"{k} {s}" for k, s in shapes.items())
        return Layer(name, channels, problem=f"the vectors are not all one length ({described})")
    if not np.issubdtype(np.asarray(found["running_var"]).dtype, np.number):
        return Layer(name, channels, problem="non-numeric statistics")
    if channels == 0:
        return Layer(name, 0, problem="0 channels: its vectors are empty")
    state = {}
    for key in STATE_NAMES:
        value = found.get(key)
        state[key] = (
            np.full(channels, FILL[key]) if value is None else np.asarray(value, np.float64)
        )
    return Layer(name, channels, state, _problem(state))


def _problem(state: Mapping[str, np.ndarray]) -> str | None:
    """What makes a layer's state unusable, every part of it, or None."""
    said = []
    for key in STATE_NAMES:
        bad = int(np.count_nonzero(~np.isfinite(state[key])))
        if bad:
            what = "NaN" if np.isnan(state[key]).any() else "±inf"
            said.append(f"{key} holds {bad} non-finite value{'s' * (bad > 1)} ({what})")
    negative = int(np.count_nonzero(state["running_var"] < 0))
    if negative:
        said.append(f"running_var is negative in {negative} channel{'s' * (negative > 1)}")
    return "; ".join(said) or None


def _keras_layers(f: BinaryIO) -> tuple[Layer, ...]:
    """A .keras file: the config's BatchNormalization layers, their weights via h5py.

    Nothing is extracted: config.json is read up to BNEXPLORE_MAX_CONFIG_BYTES and the
    weights up to the file limit (Keras stores them as they are), both in memory.
    """
    _zip_members(f)  # its member count, checked before Python parses the directory
    try:
        with zipfile.ZipFile(f) as archive:
            config = _read_member(
                archive, "config.json", settings.max_config_bytes(), "its config.json"
            )
            weights = _read_member(
                archive, "model.weights.h5", settings.store_file_limit(), "its model.weights.h5"
            )
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as exc:
        raise FileProblem(f"a truncated or malformed .keras file ({exc})") from None
    options = _find_batchnorms(_json(config, "its config.json"))
    groups = _vars_groups(io.BytesIO(weights), wanted=set(options))
    layers = []
    for name, opts in options.items():
        if name not in groups:
            continue
        switches = (opts["scale"], opts["center"])
        present = [k for k, on in zip(STATE_NAMES[:2], switches, strict=True) if on]
        order = [*present, "running_mean", "running_var"]
        vectors = [array for _, array in groups[name]]
        if len(vectors) != len(order) or any(v is None for v in vectors):
            shapes = ", ".join(str(shape) for shape, _ in groups[name]) or "none"
            layers.append(
                Layer(
                    name,
                    0,
                    problem=(
                        f"{len(vectors)} variables (shapes {shapes}) where its config "
                        f"(scale={opts['scale']}, center={opts['center']}) needs "
                        f"{len(order)} vectors of one length"
                    ),
                )
            )
            continue
        found = dict.fromkeys(STATE_NAMES) | dict(zip(order, vectors, strict=True))
        layers.append(_layer(name, found, eps=opts["eps"], momentum=opts["momentum"]))
    return tuple(layers)


BATCHNORM_CLASSES = {
    "BatchNormalization",
    "BatchNormalizationV1",
    "BatchNormalizationV2",
    "SyncBatchNormalization",
}
"""The class names Keras 3, tf.keras and Keras 2 write for a BatchNorm layer."""


def _find_batchnorms(config) -> dict[str, dict]:
    """Each BatchNormalization in a Keras config (nested models too), in order: its
    ``scale`` and ``center`` switches, ``eps``, ``momentum`` (None where missing or not
    a finite number) and ``axis`` (as written)."""
    found: dict[str, dict] = {}
    stack: list[tuple[object, int]] = [(config, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > MAX_NESTING or seen > 10 * settings.max_objects():
            raise FileProblem("its config.json is nested too deeply or holds too much")
        if isinstance(item, dict):
            inner = item.get("config")
            if item.get("class_name") in BATCHNORM_CLASSES and isinstance(inner, dict):
                name = inner.get("name")
                if isinstance(name, str) and name not in found:
                    found[name] = {
                        "scale": bool(inner.get("scale", True)),
                        "center": bool(inner.get("center", True)),
                        "eps": _number(inner.get("epsilon")),
                        "momentum": _number(inner.get("momentum")),
                        "axis": inner.get("axis", -1),
                    }
            stack.extend((value, depth + 1) for value in reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in reversed(item))
    return found


def _number(value) -> float | None:
    """A config's or attribute's number as a float; None if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _vars_groups(
    f: BinaryIO, wanted: set[str] | None = None, batchnorm_only: bool = False
) -> dict[str, list[tuple[tuple[int, ...], np.ndarray | None]]]:
    """Keras 3 weights: every ``…/vars`` group's datasets 0, 1, … by its ``name``
    attribute (else its layer's group name), as (shape, array); with ``batchnorm_only``,
    only the groups Keras named after a BatchNormalization (KERAS_BATCHNORM_GROUP).

    The whole file is walked first, without reading a byte of data: a soft or
    external link, a dataset stored outside the file (external storage) or made of
    other datasets (virtual), more than BNEXPLORE_MAX_OBJECTS objects or nesting past
    MAX_NESTING levels refuse it. Then only the vectors of the ``wanted`` layers (all,
    if None) are read: 1-D, numeric, within the channel cap and the state's bytes.
    """
    h5py = _framework("h5py", "a Keras weights file")
    budget = Budget()
    groups: dict[str, list] = {}
    try:
        with h5py.File(f, "r") as h5:
            for path, group in _walk_hdf5(h5, h5py, budget):
                saved_as = path.split("/")[-2]  # the layer's group: its class, numbered
                name = _name_attribute(group) or saved_as
                if name in groups or (wanted is not None and name not in wanted):
                    continue
                if batchnorm_only and not KERAS_BATCHNORM_GROUP.fullmatch(saved_as):
                    continue
                keys = sorted(group.keys(), key=lambda k: int(k) if k.isdigit() else 1 << 30)
                groups[name] = [group[key] for key in keys]
            return {
                name: [_read_vector(data, name, h5py, budget) for data in datasets]
                for name, datasets in groups.items()
            }
    except FileProblem:
        raise
    except RecursionError:
        raise FileProblem("an HDF5 file nested too deeply") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise FileProblem(f"a truncated or malformed HDF5 weights file ({exc})") from None


def _read_vector(
    data, name: str, h5py, budget: Budget
) -> tuple[tuple[int, ...], np.ndarray | None]:
    """(shape, array) of a layer's variable; the array only for a numeric vector within
    the budget (anything else is not a BatchNorm statistic: None)."""
    shape = tuple(getattr(data, "shape", None) or ())
    if not (isinstance(data, h5py.Dataset) and data.dtype.kind in "fiub" and len(shape) == 1):
        return shape, None
    budget.vector(f"{name}'s variable", shape, data.dtype.itemsize)
    return shape, np.asarray(data[()])


def _walk_hdf5(h5, h5py, budget: Budget) -> list[tuple[str, object]]:
    """Every non-empty ``…/vars`` group of an HDF5 file, breadth first, after checking
    every link and dataset (see :func:`_vars_groups`); reads no data."""
    found = []
    queue = [("", h5, 0)]
    while queue:
        path, group, depth = queue.pop(0)
        if depth > MAX_NESTING:
            raise FileProblem(f"an HDF5 file nested too deeply (more than {MAX_NESTING} levels)")
        for key in group:
            budget.scan()
            where = f"{path}/{key}" if path else key
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                kind = {h5py.ExternalLink: "an external", h5py.SoftLink: "a soft"}.get(
                    type(link), "a user-defined"
                )
                raise FileProblem(
                    f"an HDF5 file with {kind} link at {where!r}: links are refused, as they "
                    "may point outside the file"
                )
            item = group.get(key)
            if isinstance(item, h5py.Dataset):
                _check_dataset(item, where, h5py)
            elif isinstance(item, h5py.Group):
                if key == "vars" and len(item) and path:  # not the model's own (empty) vars
                    found.append((where, item))
                queue.append((where, item, depth + 1))
    return found


def _check_dataset(data, where: str, h5py) -> None:
    """Refuse a dataset whose bytes live outside the file, or whose chunks could make
    HDF5 allocate more than the channel cap."""
    plist = data.id.get_create_plist()
    if plist.get_external_count() > 0:
        raise FileProblem(
            f"an HDF5 file whose dataset {where!r} is stored in an external file: refused "
            "before reading it, as it would read a file outside the upload"
        )
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise FileProblem(
            f"an HDF5 file whose dataset {where!r} is a virtual dataset (made of other "
            "files' data): refused before reading it"
        )
    if layout == h5py.h5d.CHUNKED and math.prod(plist.get_chunk()) > settings.max_channels():
        raise FileProblem(
            f"an HDF5 file whose dataset {where!r} has chunks of "
            f"{math.prod(plist.get_chunk()):,} values, over the channel cap: refused"
        )


def _name_attribute(group) -> str | None:
    """A Keras ``vars`` group's ``name`` attribute, if it is a short string."""
    if "name" not in group.attrs:
        return None
    if group.attrs.get_id("name").shape not in ((), (1,)):
        return None
    name = group.attrs["name"]
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return name[:1000]


KERAS_BATCHNORM_GROUP = re.compile(r"(sync_)?batch_normalization(_\d+)?")
"""The group Keras 3 saves a BatchNormalization's variables under, in a ``.weights.h5``:
its class in snake case, numbered from the second on (``layers/batch_normalization_1/vars``,
saving_lib's own naming; the ``name`` attribute holds the layer's name, ``bn1``)."""


def _hdf5_model(f: BinaryIO) -> ModelFile:
    """An HDF5 file: Keras 3 weights (``…/vars`` groups), else a legacy Keras ``.h5``.

    In Keras 3 weights, the groups named after BatchNormalization are its BatchNorms (a
    whole CNN's ``model.save_weights``); a file without any is read only where every group
    is four vectors (γ, β, mean, variance): then nothing else is in it."""
    groups = _vars_groups(f, batchnorm_only=True)
    named = bool(groups)
    groups = groups or _vars_groups(f)
    if groups:
        layers = _bare_weights_layers(groups, named)
        return ModelFile("keras_weights", "keras", layers, (NO_CONFIG,))
    return _legacy_h5_model(f)


NO_CONFIG = (
    "a weights-only file carries no config: each layer's eps and momentum are unknown "
    "(the full model, model.save(...), carries them)"
)


def _bare_weights_layers(groups: Mapping[str, list], named: bool) -> tuple[Layer, ...]:
    """The BatchNorm layers of Keras 3 weights: ``groups`` named after a BatchNormalization
    (``named``), else every group of the file. Keras saves a BatchNormalization's vectors
    in the order γ, β, moving mean, moving variance, leaving out γ where scale=False and β
    where center=False: four vectors, or two (neither: γ = 1, β = 0). Three (one of γ and β)
    are refused, since a weights file does not say which one it kept."""

    def vectors(found: list) -> bool:
        return len({shape for shape, _ in found}) == 1 and all(a is not None for _, a in found)

    def listed(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if named:
        three = [name for name, found in groups.items() if len(found) == 3 and vectors(found)]
        if three:
            raise FileProblem(
                f"a bare .weights.h5 whose BatchNormalization layer{'s' * (len(three) > 1)} "
                f"{listed(three)} "
                f"{'holds' if len(three) == 1 else 'hold'} three vectors: built with "
                "scale=False or center=False, and a weights file does not say which of γ "
                "and β it kept. Upload the .keras file (model.save('m.keras')), whose "
                "config does"
            )
    odd = [
        name
        for name, found in groups.items()
        if not (vectors(found) and (len(found) == 4 or (named and len(found) == 2)))
    ]
    if odd:
        plural = "s" * (len(odd) > 1)
        raise FileProblem(
            f"a bare .weights.h5 where group{plural} {listed(odd)} "
            f"{'is' if len(odd) == 1 else 'are'} not four vectors (γ, β, mean, variance) and "
            "no group is named after a BatchNormalization (layers/batch_normalization…/"
            "vars): it seems to hold no BatchNormalization layer (a subclass of one is saved "
            "under its own class's name). Upload the .keras file (model.save('m.keras')), "
            "whose config names every layer"
            if not named
            else f"a bare .weights.h5 where BatchNormalization layer{plural} {listed(odd)} "
            f"{'is' if len(odd) == 1 else 'are'} not two or four vectors of one length"
        )
    layers = []
    for name, found in groups.items():
        arrays = [a for _, a in found]
        if len(arrays) == 2:
            ones = np.ones_like(arrays[0], dtype=np.float64)
            arrays = [ones, np.zeros_like(ones), *arrays]
        layers.append(_layer(name, dict(zip(STATE_NAMES, arrays, strict=True))))
    return tuple(layers)


# --- legacy Keras .h5 (Keras 2 / tf.keras model.save("x.h5") and save_weights("x.h5")) -----

NOT_KERAS_H5 = (
    "an HDF5 file without Keras layer weights: neither Keras 3's layers/…/vars groups nor "
    "a legacy Keras .h5's layer_names"
)
_INDEX_SUFFIX = re.compile(r":\d+$")
LEGACY_NAMES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
"""A legacy weight's last name (``bn1/gamma:0`` → ``gamma``) → our name."""


def _legacy_h5_model(f: BinaryIO) -> ModelFile:
    """A legacy Keras ``.h5``: the layer groups under ``model_weights/`` (a full model) or
    at the root (weights only), in ``layer_names`` order; each layer's vectors named by its
    ``weight_names`` (``bn1/gamma:0``). A BatchNorm is a weight-name prefix with
    ``moving_mean`` and ``moving_variance``; a full model's ``model_config`` gives its eps
    and momentum. The whole file is walked and checked first, as for Keras 3 weights."""
    h5py = _framework("h5py", "a Keras .h5 file")
    budget = Budget()
    try:
        with h5py.File(f, "r") as h5:
            _walk_hdf5(h5, h5py, budget)  # every link and dataset checked; no data read
            full = isinstance(h5.get("model_weights"), h5py.Group)
            top = h5["model_weights"] if full else h5
            layer_names = _strings_attribute(top, "layer_names", budget)
            if layer_names is None:
                raise FileProblem(NOT_KERAS_H5)
            version = _string_attribute(h5, "keras_version", 1000, "its keras_version")
            source = {"2": "keras2", "3": "keras"}.get((version or "").split(".", 1)[0])
            options: dict[str, dict] = {}
            if full:
                raw = _string_attribute(
                    h5, "model_config", settings.max_config_bytes(), "its model_config"
                )
                if raw is not None:
                    options = _find_batchnorms(_json(raw.encode(), "its model_config"))
            found = _legacy_batchnorms(top, layer_names, h5py, budget)
            layers, notices = _legacy_layers(found, options, h5py, budget)
    except FileProblem:
        raise
    except RecursionError:
        raise FileProblem("an HDF5 file nested too deeply") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise FileProblem(f"a truncated or malformed Keras .h5 file ({exc})") from None
    if not full:
        notices.insert(0, NO_CONFIG)
    elif not options:
        notices.insert(0, "its model_config names no BatchNormalization: eps and momentum unknown")
    return ModelFile("keras_h5" if full else "keras_weights", source, layers, tuple(notices))


def _legacy_batchnorms(top, layer_names: list[str], h5py, budget: Budget) -> list[tuple]:
    """(prefix, {last name: dataset}) of each BatchNorm, in layer_names then weight_names
    order; a nested model's group holds its inner layers' weights (``ibn/beta:0``)."""
    found: dict[str, dict] = {}
    for layer_name in layer_names:
        group = top.get(layer_name)
        if not isinstance(group, h5py.Group):
            continue
        for weight in _strings_attribute(group, "weight_names", budget) or ():
            prefix, _, last = weight.rpartition("/")
            data = group.get(weight)
            if isinstance(data, h5py.Dataset):
                found.setdefault(prefix or layer_name, {})[_INDEX_SUFFIX.sub("", last)] = data
    return [
        (prefix, variables)
        for prefix, variables in found.items()
        if {"moving_mean", "moving_variance"} <= set(variables)
    ]


def _legacy_layers(
    found: list[tuple], options: Mapping[str, dict], h5py, budget: Budget
) -> tuple[tuple[Layer, ...], list[str]]:
    """Each BatchNorm's layer, named by its weight-name prefix (by its config name when
    the prefix ends in one: Keras 3 writes ``sequential/bn1``), with its config's eps and
    momentum."""

    def short(prefix: str) -> str:
        last = prefix.rsplit("/", 1)[-1]
        return last if prefix not in options and last in options else prefix

    names = [short(prefix) for prefix, _ in found]
    layers, notices = [], []
    for (prefix, variables), name in zip(found, names, strict=True):
        name = name if names.count(name) == 1 else prefix
        opts = options.get(prefix) or options.get(name) or {}
        arrays = {
            ours: _read_vector(variables[theirs], name, h5py, budget)[1]
            if theirs in variables
            else None
            for theirs, ours in LEGACY_NAMES.items()
        }
        unread = [t for t, o in LEGACY_NAMES.items() if t in variables and arrays[o] is None]
        mismatch = [
            f"{switch}={opts[switch]} but {'a' if opts[switch] else 'no'} {vector}"
            for switch, vector in (("scale", "gamma"), ("center", "beta"))
            if switch in opts and opts[switch] != (vector in variables)
        ]
        if unread or mismatch:
            what = (
                f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not numeric vectors"
                if unread
                else f"its config says {' and '.join(mismatch)} in the file"
            )
            layers.append(Layer(name, 0, problem=what))
            continue
        layers.append(_layer(name, arrays, eps=opts.get("eps"), momentum=opts.get("momentum")))
        if opts.get("axis") in (1, [1]):
            notices.append(
                f"{name} normalizes axis 1: its features after a Dense layer, or the channels "
                "of a channels-first Keras model; audited as channels"
            )
    return tuple(layers), notices


def _attribute_id(obj, key: str):
    return obj.attrs.get_id(key) if key in obj.attrs else None


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _string_attribute(obj, key: str, most: int, what: str) -> str | None:
    """A scalar string attribute, at most ``most`` bytes: a fixed-length one is measured
    before it is read; a variable-length one lives in the file (bounded by its size) and
    is measured before it is parsed."""
    aid = _attribute_id(obj, key)
    if aid is None or aid.shape not in ((), (1,)):
        return None
    if aid.dtype.kind in "SU" and aid.get_storage_size() > most:
        raise FileProblem(f"{what} holds more than {settings.exact_words(most)}: refused")
    value = obj.attrs[key]
    if not isinstance(value, str | bytes | np.ndarray):
        return None
    text = _text(value)
    if len(text) > most:
        raise FileProblem(
            f"{what} holds more than {settings.exact_words(most)} "
            "(BNEXPLORE_MAX_CONFIG_BYTES): refused before parsing it"
        )
    return text


def _strings_attribute(obj, key: str, budget: Budget) -> list[str] | None:
    """A 1-D attribute of names (``layer_names``, ``weight_names``), counted against the
    object budget before it is read; an empty one may be stored as float64."""
    aid = _attribute_id(obj, key)
    if aid is None or len(aid.shape) > 1:
        return None
    count = math.prod(aid.shape)
    budget.scan(count)
    if count == 0:
        return []
    if aid.dtype.kind not in "SUO":
        return None
    values = np.asarray(obj.attrs[key]).reshape(-1)
    return [_text(value)[:1000] for value in values]


# --- ONNX ------------------------------------------------------------------------------

NO_BN_NODE = (
    "no BatchNormalization node: exporters fold eval BatchNorm into the Conv or Gemm "
    "before it; "
    "re-export with optimize=False"
)
_ONNX_FIELDS = {1: 0, 5: 0, 2: 2, 3: 2, 4: 2, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
"""ModelProto's top-level fields and their wire types (0 varint, 2 length-delimited)."""
ONNX_ROLES = ("weight", "bias", "running_mean", "running_var")
"""A BatchNormalization node's inputs 1–4 (scale, B, input_mean, input_var), our names."""


def _looks_like_onnx(f: BinaryIO) -> bool:
    """Whether the whole file parses as a protobuf ModelProto's top-level fields, with an
    ir_version and a graph: length-delimited fields are skipped by seeking, nothing is kept."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    seen: set[int] = set()
    count = 0
    try:
        while f.tell() < size:
            tag = _varint(f)
            number, wire = tag >> 3, tag & 7
            if wire != _ONNX_FIELDS.get(number, wire) or wire not in (0, 1, 2, 5) or not number:
                return False
            if wire == 0:
                _varint(f)
            else:
                skip = {1: 8, 5: 4}.get(wire) or _varint(f)
                if f.tell() + skip > size:
                    return False
                f.seek(skip, io.SEEK_CUR)
            seen.add(number)
            count += 1
            if count > settings.max_objects():
                return False
        return {1, 7} <= seen
    except ValueError:
        return False
    finally:
        f.seek(0)


def _varint(f: BinaryIO) -> int:
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise ValueError("a varint of more than 10 bytes")


def _onnx_model(f: BinaryIO) -> ModelFile:
    """An ``.onnx``: each BatchNormalization node in graph order, its epsilon and momentum
    attributes, its four vectors from initializers (or Constant nodes, through Identity
    nodes). Every initializer's location and dims are checked before any tensor is
    converted; external data is refused, never loaded."""
    onnx = _framework("onnx", "an ONNX file")
    f.seek(0)
    data = f.read()
    size = len(data)
    budget = Budget()
    _onnx_prescan(data, onnx.ModelProto.DESCRIPTOR, budget)
    try:
        model = onnx.load_model_from_string(data)
    except RecursionError:
        raise FileProblem("an ONNX file nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise FileProblem(f"a truncated or malformed ONNX file ({exc})") from None
    del data
    graph = model.graph
    stored = {tensor.name: tensor for tensor in graph.initializer}
    made: dict[str, object] = {}
    for tensor in graph.initializer:
        _check_onnx_tensor(tensor, size, onnx)
    for node in graph.node:
        if node.op_type in ("Identity", "Constant") and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    _check_onnx_tensor(attribute.t, size, onnx)
            if node.output:
                made[node.output[0]] = node
    nodes = [
        node
        for node in graph.node
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
    ]
    if not nodes:
        raise FileProblem(
            f"{NO_BN_NODE} (torch.onnx.export(..., optimize=False); with dynamo=False, "
            "do_constant_folding=False)"
        )
    used: set[str] = set()
    layers = []
    for k, node in enumerate(nodes):
        name = _onnx_layer_name(node, used, k)
        used.add(name)
        layers.append(_onnx_layer(node, name, stored, made, onnx, budget))
    notices = [
        "ONNX stores epsilon and momentum as float32 (1e-5 as 9.99999975e-06): each is read "
        "as the shortest decimal that rounds to it (1e-05)"
    ]
    source = ONNX_PRODUCERS.get(model.producer_name)
    if source is None:
        producer = " ".join(filter(None, [model.producer_name, model.producer_version]))
        notices.append(
            f"ONNX producer {producer or '(none)'!r}: not one that names its framework "
            f"({', '.join(ONNX_PRODUCERS)})"
        )
    return ModelFile("onnx", source, tuple(layers), tuple(notices))


ONNX_PRODUCERS = {"pytorch": "torch", "tf2onnx": "keras2", "keras2onnx": "keras2"}
"""An ONNX file's producer_name → the framework it was exported from."""


ONNX_PARSE_ALLOWANCE = 32 * 1024**2
"""What parsing an ONNX file may hold beyond its own bytes (messages, numbers unpacked)."""
_VARINT_TYPES = {3, 4, 5, 8, 13, 14, 17, 18}
"""protobuf's int64, uint64, int32, bool, uint32, enum, sint32, sint64: 1 to 10 bytes each
on the wire, 8 in memory."""
_MESSAGE_COST = 128
"""Bytes a parsed protobuf message is counted as (upb's arena, generously)."""
ONNX_FIELDS_PER_OBJECT = 50
"""Protobuf fields an ONNX file may hold per object of BNEXPLORE_MAX_OBJECTS (1,000,000 at
the default): walking them takes a few seconds."""


def _onnx_prescan(data: bytes, descriptor, budget: Budget) -> None:
    """Walk an ONNX file's protobuf wire format by ModelProto's descriptor, before protobuf
    parses it: every node and initializer (subgraphs too) counts against the object budget,
    and what parsing would hold (each message, each number unpacked, each string) may pass
    the file's own size by at most ONNX_PARSE_ALLOWANCE: a file of millions of empty
    messages, or of packed varints that unpack eightfold, is refused unparsed."""
    view = memoryview(data)
    most = len(data) + ONNX_PARSE_ALLOWANCE
    graph_name = "onnx.GraphProto"
    cost, elements, most_elements = 0, 0, ONNX_FIELDS_PER_OBJECT * settings.max_objects()
    stack = [(0, len(data), descriptor, 0)]
    while stack:
        pos, end, desc, depth = stack.pop()
        if depth > MAX_NESTING:
            raise FileProblem(f"an ONNX file nested too deeply (more than {MAX_NESTING} levels)")
        fields = desc.fields_by_number
        counted = desc.full_name == graph_name
        cost += _MESSAGE_COST
        while pos < end:
            tag = data[pos]
            pos += 1
            if tag > 0x7F:
                tag, pos = _varint_at(data, pos - 1, end)
            number, wire = tag >> 3, tag & 7
            field = fields.get(number)
            if wire == 0:
                while pos < end and data[pos] > 0x7F:
                    pos += 1
                pos += 1
                cost += 8
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
                cost += 8
            elif wire == 2:
                length = data[pos] if pos < end else 0x80
                if length > 0x7F:
                    length, pos = _varint_at(data, pos, end)
                else:
                    pos += 1
                start, pos = pos, pos + length
                if pos > end:
                    raise FileProblem("a truncated or malformed ONNX file (a field past its end)")
                if field is not None and field.type == field.TYPE_MESSAGE:
                    if counted and number in (1, 5):  # GraphProto.node, .initializer
                        budget.scan()
                    stack.append((start, pos, field.message_type, depth + 1))
                elif field is not None and field.type in _VARINT_TYPES:  # packed numbers
                    chunk = np.frombuffer(view[start:pos], np.uint8)
                    cost += 8 * int(np.count_nonzero(chunk < 0x80)) + 48
                else:
                    cost += length + 48
            else:
                raise FileProblem(f"a malformed ONNX file (protobuf wire type {wire})")
            elements += 1
            if pos > end or cost > most or elements > most_elements:
                if pos > end:
                    raise FileProblem("a truncated or malformed ONNX file (a field past its end)")
                raise FileProblem(
                    "an ONNX file whose parse would hold more than its own size and "
                    f"{settings.exact_words(ONNX_PARSE_ALLOWANCE)}, or more than "
                    f"{most_elements:,} protobuf fields (millions of messages or numbers): "
                    "refused before parsing it"
                )


def _varint_at(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise FileProblem("a truncated or malformed ONNX file (a truncated number)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise FileProblem("a malformed ONNX file (a number of more than 10 bytes)")


def _check_onnx_tensor(tensor, size: int, onnx) -> None:
    """Refuse a tensor whose data lives outside the file, or whose dims declare more values
    than it holds (checked before it is ever converted)."""
    name = repr(tensor.name[:200])
    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        where = next((e.value for e in tensor.external_data if e.key == "location"), "")
        raise FileProblem(
            f"an ONNX file whose tensor {name} keeps its data in an external file "
            f"({where[:100]!r}): refused, as reading it would read a file outside the upload. "
            "Re-export with the weights inside: torch.onnx.export(..., external_data=False)"
        )
    dims = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in dims):
        raise FileProblem(f"a malformed ONNX file: tensor {name} has dims {dims}")
    values = math.prod(dims)
    if tensor.HasField("raw_data"):
        held = len(tensor.raw_data)
    else:
        held = sum(
            len(getattr(tensor, typed))
            for typed in (
                "float_data",
                "int32_data",
                "string_data",
                "int64_data",
                "double_data",
                "uint64_data",
            )
        )
    if values > 2 * held + 1 or values > 2 * size:
        raise FileProblem(
            f"a malformed ONNX file: tensor {name} declares dims {list(dims)} ({values:,} "
            f"values) and holds {held:,}: refused before reading it"
        )


def _onnx_layer(node, name: str, stored, made, onnx, budget: Budget) -> Layer:
    """A BatchNormalization node's layer: its four vectors, checked then converted."""
    inputs = list(node.input)
    if len(inputs) < 5:
        return Layer(name, 0, problem=f"a BatchNormalization node with {len(inputs)} inputs")
    found: dict[str, np.ndarray | None] = {}
    for role, source in zip(ONNX_ROLES, inputs[1:5], strict=True):
        tensor = _onnx_tensor(source, stored, made)
        if tensor is None:
            return Layer(
                name,
                0,
                problem=(
                    f"its {role} ({source[:200]!r}) is computed in the graph, not stored: "
                    "bnexplore reads initializers and Constant nodes"
                ),
            )
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except (KeyError, ValueError, TypeError):
            return Layer(name, 0, problem=f"its {role} has ONNX data type {tensor.data_type}")
        if dtype.kind not in "fiub":
            return Layer(name, 0, problem=f"its {role} holds {dtype}, not real numbers")
        budget.vector(f"{name}'s {role}", tuple(int(d) for d in tensor.dims), dtype.itemsize)
        try:
            found[role] = onnx.numpy_helper.to_array(tensor).astype(np.float64)
        except (ValueError, TypeError) as exc:
            return Layer(name, 0, problem=f"its {role} cannot be read ({exc})")
    attributes = {a.name: a for a in node.attribute}
    eps = _float32_number(attributes["epsilon"].f) if "epsilon" in attributes else 1e-5
    momentum = _float32_number(attributes["momentum"].f) if "momentum" in attributes else 0.9
    return _layer(name, found, eps=eps, momentum=momentum)


def _onnx_tensor(name: str, stored, made, depth: int = 0):
    """The TensorProto an input names: an initializer, or a Constant node's value, through
    Identity nodes; None if it is computed."""
    while depth <= MAX_NESTING:
        if name in stored:
            return stored[name]
        node = made.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            values = (a.t for a in node.attribute if a.name == "value" and a.HasField("t"))
            return next(values, None)
        if not node.input:
            return None
        name, depth = node.input[0], depth + 1
    return None


def _float32_number(value: float) -> float | None:
    """A float32 attribute as the shortest decimal that rounds to it (9.99999975e-06 →
    1e-05), so that a file's 1e-5 reads as 1e-5."""
    return _number(float(str(np.float32(value))))


_SEPARATORS = "._/"


def _onnx_layer_name(node, used: set[str], k: int) -> str:
    """A BatchNorm node's layer name: the common prefix of its four vectors' names ("bn1"
    from bn1.weight, bn1.bias, …), cut back to a separator; else the node's name."""
    names = [n for n in list(node.input)[1:5] if n]
    prefix = ""
    if len(names) == 4:
        prefix = names[0][: len(_common_prefix(names))]
        if prefix and prefix[-1] not in _SEPARATORS and any(n != prefix for n in names):
            cut = max(prefix.rfind(s) for s in _SEPARATORS)
            prefix = prefix[: cut + 1] if cut >= 0 else ""
        prefix = prefix.rstrip(_SEPARATORS)
    for name in (prefix, node.name, f"batchnorm_{k}"):
        if name and name not in used:
            return name[:1000]
    return f"batchnorm_{k}_{len(used)}"


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    end = 0
    while end < min(len(first), len(last)) and first[end] == last[end]:
        end += 1
    return first[:end]


# --- input batches -------------------------------------------------------------------------


def batch_info(f: BinaryIO) -> BatchInfo:
    """Count, shape and dtype of a batch file, from its headers alone; raises FileProblem."""
    kind = sniff(f)
    if kind == "npy":
        headers = [_npy_header(f, "the .npy")]
    elif kind == "npz":
        headers = []
        _zip_members(f)
        try:
            with zipfile.ZipFile(f) as archive:
                names = set(archive.namelist())
                while f"batch_{len(headers)}.npy" in names:
                    member = f"batch_{len(headers)}"
                    with archive.open(member + ".npy") as m:
                        headers.append(_npy_header(m, member))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise FileProblem(f"a truncated or malformed .npz file ({exc})") from None
        if not headers:
            raise FileProblem("an .npz without batch_0: name the batches batch_0, batch_1, …")
    else:
        raise FileProblem(f"a batch file is an .npy or an .npz of batch_0, batch_1, …, not {kind}")
    shapes = {shape for shape, _ in headers}
    if len(shapes) > 1:
        raise FileProblem(f"the batches differ in shape ({', '.join(map(str, sorted(shapes)))})")
    (shape,) = shapes
    dtypes = {dtype for _, dtype in headers}
    return BatchInfo(len(headers), shape, max(dtypes, key=lambda d: np.dtype(d).itemsize))


def _array_header(f: BinaryIO, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an .npy header; an object array is refused (it needs a pickle)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"format version {version} is not read here")
        shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError) as exc:
        raise FileProblem(f"{what}: a truncated or malformed array header ({exc})") from None
    if dtype.hasobject:
        raise FileProblem(
            f"{what} is an object array: reading it needs a pickle, which is refused. "
            "Save plain numeric arrays"
        )
    return tuple(int(d) for d in shape), dtype


def _npy_header(f: BinaryIO, what: str) -> tuple[tuple[int, ...], str]:
    """A batch's shape and dtype: real numbers, channels-first, within the value cap."""
    shape, dtype = _array_header(f, what)
    if dtype.kind not in "biuf":
        raise FileProblem(f"{what} holds {dtype}, not real numbers")
    if not MIN_DIMS <= len(shape) <= MAX_DIMS or min(shape, default=0) < 1:
        raise FileProblem(
            f"{what} has shape {shape}: a batch is channels-first (N, C, …), "
            f"{MIN_DIMS} to {MAX_DIMS} dims, none empty"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise FileProblem(f"{what} holds {math.prod(shape):,} values, over {MAX_ELEMENTS:,}")
    return shape, dtype.str


def check_batch_data(f: BinaryIO, info: BatchInfo) -> None:
    """That a batch file holds all the values its headers declare (a truncated file is
    refused when it is stored, not when it runs): an .npy's length, and each .npz
    member read through once, in chunks, with its CRC checked, nothing kept."""
    f.seek(0)
    if sniff(f) == "npy":
        _array_header(f, "the .npy")
        f.seek(0, io.SEEK_END)
        data = f.tell() - _header_end(f)
        need = info.nbytes
        if data < need:
            raise FileProblem(
                f"a truncated .npy: its header declares shape {info.shape} ({need:,} bytes "
                f"of {info.dtype}), the file holds {data:,}"
            )
        return
    with zipfile.ZipFile(f) as archive:
        for k in range(info.count):
            member = f"batch_{k}.npy"
            read = 0
            try:
                with archive.open(member) as m:
                    while chunk := m.read(1 << 22):
                        read += len(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                raise FileProblem(f"a truncated or malformed .npz: {member} ({exc})") from None
            with archive.open(member) as m:
                _array_header(m, member)
                header = m.tell()
            need = header + info.nbytes // info.count
            if read < need:
                raise FileProblem(
                    f"a truncated .npz: {member} declares shape {info.shape}, "
                    f"{need - header:,} bytes, and holds {read - header:,}"
                )
    f.seek(0)


def _header_end(f: BinaryIO) -> int:
    f.seek(0)
    _array_header(f, "the .npy")
    return f.tell()


def read_batches(f: BinaryIO) -> tuple[np.ndarray, ...]:
    """The batches of a batch file, as stored (not yet cast); raises FileProblem."""
    info = batch_info(f)
    f.seek(0)
    try:
        if sniff(f) == "npy":
            arrays = (np.load(f, allow_pickle=False),)
        else:
            with np.load(f, allow_pickle=False) as npz:
                arrays = tuple(npz[f"batch_{k}"] for k in range(info.count))
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FileProblem(f"a truncated or malformed batch file ({exc})") from None
    return arrays
