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

from bnexplore.params import MAX_DIMS, MAX_ELEMENTS, MIN_DIMS

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
        try:
            names = zipfile.ZipFile(f).namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise FileProblem(f"a truncated or malformed zip file ({exc})") from None
        finally:
            f.seek(0)
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
    if kind == "torch":
        return _torch_arrays(f)
    if kind == "safetensors":
        return _safetensors_arrays(f)
    return _npz_arrays(f)


_UNSUPPORTED = re.compile(r"Unsupported (?:global|operand)[^\n]*", re.IGNORECASE)


def _torch_arrays(f: BinaryIO) -> dict[str, np.ndarray]:
    """A PyTorch file through torch.load(weights_only=True): tensors only, never code."""
    import pickle

    torch = _framework("torch", "a PyTorch file")

    try:
        loaded = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED.search(str(exc))
        what = found.group(0) if found else str(exc).splitlines()[0]
        what = what.split(" was not", 1)[0].rstrip(".")
        raise FileProblem(
            "refused: its pickle asks for more than tensors, which "
            f"torch.load(weights_only=True) does not run ({what}). Nothing in it was "
            "executed. Save a state_dict: torch.save(model.state_dict(), 'model.pt')"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileProblem(f"a truncated or malformed PyTorch file ({first})") from None
    arrays: dict[str, np.ndarray] = {}
    _flatten(loaded, "", arrays, torch)
    return arrays


def _flatten(value, prefix: str, into: dict[str, np.ndarray], torch) -> None:
    """Tensors of nested dicts (checkpoints) under dotted names; anything else is skipped."""
    if isinstance(value, torch.Tensor):
        if not value.is_complex():
            into[prefix] = value.detach().to(torch.float64).numpy()
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                _flatten(item, f"{prefix}.{key}" if prefix else key, into, torch)


def _safetensors_arrays(f: BinaryIO) -> dict[str, np.ndarray]:
    load = _framework("safetensors.numpy", "a .safetensors file").load

    data = f.read()
    try:
        arrays = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except Exception as exc:  # noqa: BLE001 - SafetensorError, or a dtype NumPy lacks
        raise FileProblem(f"a truncated or malformed .safetensors file ({exc})") from None
    # file order is the order of the tensors' bytes (the loader's dict has none)
    where = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return {k: arrays[k] for k in sorted(arrays, key=lambda k: where.get(k, 0))}


def _npz_arrays(f: BinaryIO) -> dict[str, np.ndarray]:
    """The BatchNorm-named arrays of an .npz; every member's header is read first, so an
    object array anywhere is refused and no large array is ever decompressed."""
    try:
        with zipfile.ZipFile(f) as archive:
            names = [n.removesuffix(".npy") for n in archive.namelist()]
            for name in names:
                with archive.open(name + ".npy") as member:
                    _array_header(member, repr(name))
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            return {name: npz[name] for name in names if _state_name(name)}
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
    """A .keras file: the config's BatchNormalization layers, their weights via h5py."""
    try:
        with zipfile.ZipFile(f) as archive:
            _check_unpacked_size(archive)
            config = json.loads(archive.read("config.json"))
            weights = archive.read("model.weights.h5")
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as exc:
        raise FileProblem(f"a truncated or malformed .keras file ({exc})") from None
    options: dict[str, dict] = {}
    _find_batchnorms(config, options)
    groups = _vars_groups(io.BytesIO(weights))
    layers = []
    for name, opts in options.items():
        if name not in groups:
            continue
        switches = (opts["scale"], opts["center"])
        present = [k for k, on in zip(STATE_NAMES[:2], switches, strict=True) if on]
        order = [*present, "running_mean", "running_var"]
        vectors = [array for _, array in groups[name]]
        if len(vectors) != len(order) or any(v is None for v in vectors):
            layers.append(
                Layer(name, 0, problem=f"{len(vectors)} variables where {len(order)} were expected")
            )
            continue
        found = dict.fromkeys(STATE_NAMES) | dict(zip(order, vectors, strict=True))
        layers.append(_layer(name, found))
    return tuple(layers)


MAX_UNPACKED = 1 << 30
"""Most bytes a .keras file may unpack to (a zip bomb is refused before it is read)."""


def _check_unpacked_size(archive: zipfile.ZipFile) -> None:
    unpacked = sum(info.file_size for info in archive.infolist())
    if unpacked > MAX_UNPACKED:
        raise FileProblem(
            f"a .keras file that unpacks to {unpacked:,} bytes, over {MAX_UNPACKED:,}: refused"
        )


def _find_batchnorms(config, into: dict[str, dict]) -> None:
    """Each BatchNormalization in a Keras config (nested models too), in order."""
    if isinstance(config, dict):
        if config.get("class_name") == "BatchNormalization" and isinstance(
            config.get("config"), dict
        ):
            inner = config["config"]
            name = inner.get("name")
            if isinstance(name, str) and name not in into:
                into[name] = {
                    "scale": bool(inner.get("scale", True)),
                    "center": bool(inner.get("center", True)),
                }
        for value in config.values():
            _find_batchnorms(value, into)
    elif isinstance(config, list):
        for value in config:
            _find_batchnorms(value, into)


def _vars_groups(f: BinaryIO) -> dict[str, list[tuple[tuple[int, ...], np.ndarray | None]]]:
    """Keras 3 weights: every ``…/vars`` group's datasets 0, 1, … by its ``name``
    attribute, as (shape, array); only vectors of at most MAX_STATE_VALUES are read."""
    h5py = _framework("h5py", "a Keras weights file")
    groups: dict[str, list] = {}
    try:
        with h5py.File(f, "r") as h5:

            def visit(path: str, item) -> None:
                if not (isinstance(item, h5py.Group) and path.split("/")[-1] == "vars"):
                    return
                if not len(item) or path == "vars":  # the model's own (empty) vars
                    return
                name = item.attrs.get("name", path.rsplit("/", 2)[0])
                name = name.decode() if isinstance(name, bytes) else str(name)
                keys = sorted(item.keys(), key=lambda k: int(k) if k.isdigit() else 1 << 30)
                found = []
                for key in keys:
                    data = item[key]
                    shape = tuple(getattr(data, "shape", None) or ())
                    small = len(shape) == 1 and shape[0] <= MAX_STATE_VALUES
                    found.append((shape, np.asarray(data[()]) if small else None))
                groups.setdefault(name, found)

            h5.visititems(visit)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileProblem(f"a truncated or malformed HDF5 weights file ({exc})") from None
    return groups


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


MAX_STATE_VALUES = 1 << 24
"""Most values one BatchNorm vector may hold (larger is a malformed file, not a layer)."""


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
