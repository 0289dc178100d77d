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
- NumPy ``.npz``/``.npy``: ``np.load(allow_pickle=False)``.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    """

    name: str
    channels: int
    state: Mapping[str, np.ndarray] = field(default_factory=dict)
    problem: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", MappingProxyType(dict(self.state)))

    @property
    def label(self) -> str:
        """The name as people read it: the bare layer of a single module's state_dict."""
        return self.name or "(top level)"


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
    if head[:1] == b"\x80":  # a pickle stream: PyTorch's legacy format, or a bare pickle
        return "torch"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    raise FileProblem(
        "not a file bnexplore reads: expected PyTorch .pt/.pth, .safetensors, "
        ".keras, .weights.h5, .npz or .npy"
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
    kind = sniff(f)
    if kind == "npy":
        raise FileProblem(
            "a .npy holds one array, no named BatchNorm state: use an .npz with "
            "P.running_mean, P.running_var (and P.weight, P.bias)"
        )
    if kind == "keras":
        layers = _keras_layers(f)
    elif kind == "weights.h5":
        layers = _bare_weights_layers(f)
    else:
        layers = _named_layers(_named_arrays(kind, f))
    if not layers:
        raise FileProblem(
            "no BatchNorm layer found: expected P.running_mean and P.running_var "
            "(or P.moving_mean and P.moving_variance)"
        )
    return layers


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
    arrays: dict[str, np.ndarray] = {}
    _flatten(loaded, "", arrays, torch, budget, depth=0)
    return arrays


def _flatten(value, prefix: str, into: dict[str, np.ndarray], torch, budget, depth: int) -> None:
    """BatchNorm-named tensors of nested dicts (checkpoints) under dotted names, each
    checked by its shape before it is copied (a stride-0 view never expands past the
    cap); anything else is skipped."""
    if depth > MAX_NESTING:
        raise FileProblem(f"a PyTorch file nested too deeply (more than {MAX_NESTING} levels)")
    if isinstance(value, torch.Tensor):
        budget.scan()
        if _state_name(prefix) and not value.is_complex():
            budget.vector(repr(prefix), tuple(value.shape), 8)
            into[prefix] = value.detach().to(torch.float64).numpy()
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
    for name, entry in header.items():
        if not _state_name(name):
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
            wanted = []
            for name in names:
                with archive.open(name + ".npy") as member:
                    shape, dtype = _array_header(member, repr(name))
                if _state_name(name):
                    budget.vector(repr(name), shape, dtype.itemsize)
                    wanted.append(name)
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            return {name: npz[name] for name in wanted}
    except FileProblem:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise FileProblem(f"a truncated or malformed .npz file ({exc})") from None


def _state_name(name: str) -> bool:
    """Whether a name ends like one of a BatchNorm's vectors (P.running_var, P.gamma, …)."""
    last = name.rsplit(".", 1)[-1]
    return last in {*TORCH_NAMES.values(), *KERAS_NAMES.values()}


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


def _layer(name: str, found: Mapping[str, np.ndarray | None]) -> Layer:
    """A layer from its four arrays (γ, β may be None), checked."""
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
    for key in STATE_NAMES:
        bad = int(np.count_nonzero(~np.isfinite(state[key])))
        if bad:
            what = "NaN" if np.isnan(state[key]).any() else "±inf"
            return f"{key} holds {bad} non-finite value{'s' * (bad > 1)} ({what})"
    negative = int(np.count_nonzero(state["running_var"] < 0))
    if negative:
        return f"running_var is negative in {negative} channel{'s' * (negative > 1)}"
    return None


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
        layers.append(_layer(name, found))
    return tuple(layers)


def _find_batchnorms(config) -> dict[str, dict]:
    """Each BatchNormalization in a Keras config (nested models too), in order."""
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
            if item.get("class_name") == "BatchNormalization" and isinstance(inner, dict):
                name = inner.get("name")
                if isinstance(name, str) and name not in found:
                    found[name] = {
                        "scale": bool(inner.get("scale", True)),
                        "center": bool(inner.get("center", True)),
                    }
            stack.extend((value, depth + 1) for value in reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in reversed(item))
    return found


def _vars_groups(
    f: BinaryIO, wanted: set[str] | None = None
) -> dict[str, list[tuple[tuple[int, ...], np.ndarray | None]]]:
    """Keras 3 weights: every ``…/vars`` group's datasets 0, 1, … by its ``name``
    attribute (else its layer's group name), as (shape, array).

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
                name = _name_attribute(group) or path.split("/")[-2]
                if name in groups or (wanted is not None and name not in wanted):
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


def _bare_weights_layers(f: BinaryIO) -> tuple[Layer, ...]:
    groups = _vars_groups(f)
    if not groups:
        raise FileProblem("an HDF5 file without Keras 3 layer weights (layers/…/vars)")
    odd = [
        name
        for name, found in groups.items()
        if len(found) != 4 or len({shape for shape, _ in found}) != 1 or found[0][1] is None
    ]
    if odd:
        raise FileProblem(
            f"a bare .weights.h5 where {', '.join(odd[:4])} {'is' if len(odd) == 1 else 'are'} "
            "not four vectors (γ, β, mean, variance): without the model's config there is no "
            "telling which layers are BatchNorm. Upload the .keras file (model.save('m.keras'))"
        )
    return tuple(
        _layer(name, dict(zip(STATE_NAMES, [a for _, a in found], strict=True)))
        for name, found in groups.items()
    )


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
