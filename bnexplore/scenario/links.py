"""Scenarios and the link codec: query string ⇄ validated scenario.

A link is the app's URL, or only its query string. Reading one never raises:
each bad value is dropped (the default is used) or clamped, and a notice names
the key. The canonical link is ``v`` plus every parameter that differs from its
default, in table order; a preset is expanded into its keys, and explicit keys
in a link win over the preset's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from bnexplore.files import store
from bnexplore.files.formats import Layer
from bnexplore.files.store import MIN_PREFIX, short
from bnexplore.scenario.params import (
    BY_KEY,
    DEFAULTS,
    LINK_VERSION,
    MAX_DIMS,
    MAX_ELEMENTS,
    MIN_DIMS,
    MODEL_KEYS,
    PARAMS,
    SWEEP_KEYS,
    Param,
    engine_of,
    knobs,
)
from bnexplore.scenario.presets import PRESETS

MAX_VALUE_CHARS = 200
"""Longer values are not parsed at all: no parameter needs more."""

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class BadValue(ValueError):
    """A link value that cannot be used; its message ends a notice."""


@dataclass(frozen=True)
class Scenario:
    """A complete, validated scenario: a value for every parameter."""

    values: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULTS))

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __hash__(self) -> int:
        return hash(self.link)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scenario) and dict(self.values) == dict(other.values)

    def replace(self, **changes: Any) -> Scenario:
        return Scenario({**self.values, **changes})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values["shape"])

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def run_link(self) -> str:
        """The link without its sweep and audit settings: what the engines' results depend on."""
        return self.replace(**{k: DEFAULTS[k] for k in (*SWEEP_KEYS, *MODEL_KEYS)}).link

    def engine_link(self, engine: str) -> str:
        """The run link as one engine sees it: its own knobs and every shared key (input,
        shape, dtype, steps, loss, …), not the other frameworks' knobs nor the list of
        engines. Its result depends on nothing else, except where Keras 3 starts from a
        port of PyTorch's state (keras_init), which the runner never reuses."""
        own = knobs(engine)
        others = {p.key: DEFAULTS[p.key] for p in PARAMS if engine_of(p) not in (None, own)}
        return self.replace(**others, engines=(engine,)).run_link

    @property
    def ports(self) -> bool:
        """Does a Keras 3 engine start from PyTorch's state (keras_init), taken mid-run?"""
        keras = any(knobs(engine) == "keras" for engine in self.values["engines"])
        return keras and self.values["keras_init"] != "fresh"

    @property
    def values_per_channel(self) -> int:
        """n: how many values each channel's batch statistics are taken over."""
        return math.prod(self.shape) // self.channels

    def link_params(self) -> dict[str, str]:
        """``v`` plus every parameter that differs from its default, as link text."""
        params = {"v": str(LINK_VERSION)}
        for p in PARAMS:
            value = self.values[p.key]
            if value != p.default:
                params[p.key] = format_value(p, value)
        return params

    @property
    def link(self) -> str:
        """The canonical query string, e.g. ``?v=1&steps=1&torch_mode=eval``."""
        return "?" + urlencode(self.link_params(), safe=",")

    def to_dict(self) -> dict[str, Any]:
        """Every parameter with its value, JSON-ready (shape as a list)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.values.items()}


LAYER_NOT_GIVEN = "layer: not given"
"""How a link's notice begins where a file has several layers and the link names none (the
single-layer tabs use the first; the Model tab audits them all)."""


def format_value(param: Param, value: Any) -> str:
    """A value as it is written in a link."""
    if param.kind in ("shape", "choices"):
        return ",".join(str(d) for d in value)
    if param.kind == "bool":
        return "true" if value else "false"
    if value is None and param.kind in ("momentum", "digest", "name"):
        return "none"
    if param.kind == "or_default" and value is None:
        return "default"
    if param.kind in ("float", "momentum", "or_default"):
        return repr(float(value))
    return str(value)


def parse_value(param: Param, raw: str) -> tuple[Any, str | None]:
    """Read one link value: ``(value, notice or None)``; raises BadValue.

    Out-of-range numbers are clamped into the bounds (with a notice); values
    that cannot be clamped (not a number, NaN, inf, eps ≤ 0, unknown choice,
    a refused shape) raise BadValue and the caller keeps the default.
    """
    text = raw.strip()
    if len(text) > MAX_VALUE_CHARS:
        raise BadValue(f"value is {len(text):,} characters long")
    if text == "":
        raise BadValue("empty value")
    if param.kind == "shape":
        return _parse_shape(text), None
    if param.kind == "choices":
        return _parse_choices(param, text)
    if param.kind == "choice":
        lowered = text.lower()
        if lowered not in param.choices:
            raise BadValue(f"{_show(text)} is not one of {param.describe_range()}")
        return lowered, None
    if param.kind == "bool":
        lowered = text.lower()
        if lowered in _TRUE:
            return True, None
        if lowered in _FALSE:
            return False, None
        raise BadValue(f"{_show(text)} is not true or false")
    if param.kind in ("momentum", "digest", "name") and text.lower() == "none":
        return None, None
    if param.kind == "digest":
        return _parse_digest(text), None
    if param.kind == "name":
        if not text.isprintable():
            raise BadValue(f"{_show(text)} holds characters a layer name cannot")
        return text, None
    if param.kind == "or_default" and text.lower() == "default":
        return None, None
    if param.kind == "int":
        return _clamp(param, _parse_int(text))
    return _clamp(param, _parse_float(text))


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


def _key_text(key: str) -> str:
    """A key as a notice names it: plain when it looks like a key, quoted otherwise."""
    return key if re.fullmatch(r"[A-Za-z0-9_]{1,40}", key) else _show(key)


def _parse_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise BadValue(f"{_show(text)} is not a number") from None
    if math.isnan(x) or math.isinf(x):
        raise BadValue(f"{_show(text)} is not a finite number")
    return x


def _parse_int(text: str) -> int:
    x = _parse_float(text)
    if x != int(x):
        raise BadValue(f"{_show(text)} is not a whole number")
    return int(x)


def _clamp(param: Param, x: float) -> tuple[Any, str | None]:
    if param.low_open and param.low is not None and x <= param.low:
        raise BadValue(f"{x:g} is not above {param.low:g}")
    clamped = x
    if param.low is not None and x < param.low:
        clamped = type(x)(param.low)
    if param.high is not None and x > param.high:
        clamped = type(x)(param.high)
    if clamped != x:
        return (
            clamped,
            f"{param.key}: {x:g} is outside {param.describe_range()}; clamped to {clamped:g}",
        )
    return x, None


def _parse_choices(param: Param, text: str) -> tuple[tuple[str, ...], str | None]:
    """A comma-separated subset of the choices, in the order given, without repeats."""
    picked, unknown, repeated = [], [], []
    for piece in (p.strip().lower() for p in text.split(",")):
        if piece in param.choices:
            if piece not in picked:
                picked.append(piece)
            elif piece not in repeated:
                repeated.append(piece)
        elif piece:
            unknown.append(piece)
    if not picked:
        raise BadValue(f"{_show(text)} names none of {', '.join(param.choices)}")
    said = []
    if unknown:
        said.append(
            f"{', '.join(map(_show, unknown))} ignored; choose from {', '.join(param.choices)}"
        )
    if repeated:
        said.append(f"{', '.join(repeated)} given more than once, kept once")
    return tuple(picked), (f"{param.key}: {'; '.join(said)}" if said else None)


def _parse_digest(text: str) -> str:
    """A stored file's full digest from a link's hex prefix (a look at the store's listing)."""
    lowered = text.lower()
    if not re.fullmatch(f"[0-9a-f]{{{MIN_PREFIX},64}}", lowered):
        raise BadValue(
            f"{_show(text)} is not a digest: {MIN_PREFIX} to 64 hex characters of a SHA-256"
        )
    try:
        return store.resolve(lowered)
    except store.NotStored as missing:
        raise BadValue(str(missing)) from None


def _parse_shape(text: str) -> tuple[int, ...]:
    pieces = [p for p in re.split(r"[,x×\s]+", text.strip("()[] ")) if p]
    dims: list[int] = []
    for piece in pieces:
        if not re.fullmatch(r"[0-9]+", piece):  # ASCII digits only: int() takes "٣" and "²"
            raise BadValue(f"{_show(piece)} is not a positive integer")
        dims.append(int(piece))
    if not MIN_DIMS <= len(dims) <= MAX_DIMS:
        raise BadValue(f"{len(dims)} dims; a shape has {MIN_DIMS} to {MAX_DIMS} (N, C, …)")
    if min(dims) < 1:
        raise BadValue("every dim must be at least 1")
    elements = math.prod(dims)
    if elements > MAX_ELEMENTS:
        raise BadValue(
            f"{','.join(map(str, dims))} holds {elements:,} values per batch, "
            f"over the limit of {MAX_ELEMENTS:,}; refused before allocating"
        )
    return tuple(dims)


def query_pairs(link: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a full URL or a bare query string."""
    link = link.strip()
    if "?" in link:
        query = urlsplit(link).query if "://" in link else link.split("?", 1)[1]
    else:
        query = link
    query = query.split("#", 1)[0]
    return parse_qsl(query, keep_blank_values=True)


def parse_link(link: str) -> tuple[Scenario, list[str]]:
    """The scenario a link describes, and a notice for each value not used."""
    return from_pairs(query_pairs(link))


def from_pairs(pairs: Iterable[tuple[str, str]]) -> tuple[Scenario, list[str]]:
    """Validate raw (key, value) pairs into a scenario, never raising.

    Order of precedence: defaults, then the preset's values, then explicit keys.
    A key given more than once uses its last value.
    """
    notices: list[str] = []
    raw: dict[str, str] = {}
    for key, value in pairs:
        key = key.strip()
        if key in raw:
            notices.append(f"{_key_text(key)}: given more than once; the last value is used")
        raw[key] = value

    _check_version(raw.pop("v", None), notices)
    raw.pop("tab", None)  # the page's, not the scenario's: the app reads it (widgets.py)

    values = dict(DEFAULTS)
    preset_name = raw.pop("preset", None)
    if preset_name is not None:
        name = preset_name.strip().lower()
        if name in PRESETS:
            values.update(PRESETS[name].values)
        else:
            notices.append(
                f"preset: {_show(preset_name)} is not a preset ({', '.join(PRESETS)}); ignored"
            )
    base = dict(values)

    for key, text in raw.items():
        param = BY_KEY.get(key)
        if param is None:
            notices.append(f"{_key_text(key)}: not a parameter of this app; ignored")
            continue
        try:
            value, notice = parse_value(param, text)
        except BadValue as bad:
            if values[key] is None and param.kind in ("digest", "name"):
                notices.append(f"{key}: {bad}; ignored")
            else:
                notices.append(f"{key}: {bad}; using {format_value(param, values[key])}")
            continue
        values[key] = value
        if notice:
            notices.append(notice)

    _check_consistency(values, raw, notices)
    _check_files(values, raw, base, notices)
    return Scenario(values), notices


def _check_version(v: str | None, notices: list[str]) -> None:
    if v is None:
        return
    try:
        version = int(v)
    except ValueError:
        notices.append(f"v: {_show(v)} is not a link version; read as v={LINK_VERSION}")
        return
    if version > LINK_VERSION:
        notices.append(
            f"v: this link is format v={version}, newer than this app's "
            f"v={LINK_VERSION}; read as v={LINK_VERSION}, newer keys are ignored"
        )
    elif version < 1:
        notices.append(f"v: {version} is not a link version; read as v={LINK_VERSION}")


def _check_consistency(values: dict[str, Any], raw: Mapping[str, str], notices: list[str]) -> None:
    """Rules that span keys: uniform's low below high; a log sweep above 0."""
    if values["sweep_scale"] == "log" and min(values["sweep_from"], values["sweep_to"]) <= 0:
        notices.append("sweep_scale: log needs from and to above 0; using linear")
        values["sweep_scale"] = "linear"
    if values["low"] < values["high"]:
        return
    given = [k for k in ("low", "high") if k in raw] or ["low", "high"]
    notices.append(
        f"{'/'.join(given)}: low {values['low']:g} is not below high "
        f"{values['high']:g}; using low {DEFAULTS['low']:g}, high {DEFAULTS['high']:g}"
    )
    values["low"], values["high"] = DEFAULTS["low"], DEFAULTS["high"]


def _check_files(
    values: dict[str, Any], raw: Mapping[str, str], base: Mapping[str, Any], notices: list[str]
) -> None:
    """Rules that need the stored files: the batch file sets the shape; the state file
    must hold the layer asked for, usable and with the batch's channel count.

    Reads only the files' headers and BatchNorm vectors (cached by digest); a file
    that cannot be read is a notice, and the scenario falls back as for any bad value.
    """
    if values["input"] == "file":
        why = "needs a batch file (file=…)"
        if values["file"] is not None:
            try:
                info = store.batches_info(values["file"])
                why = None
            except store.FileProblem as problem:
                notices.append(f"file: {short(values['file'])}: {problem}; ignored")
                values["file"] = None
        if why:
            notices.append(f"input: file {why}; using {base['input']}")
            values["input"] = base["input"]
        elif info.shape != tuple(values["shape"]):
            if "shape" in raw:
                notices.append(
                    f"shape: follows the batch file, {_shape_text(info.shape)}; "
                    f"{_shape_text(values['shape'])} ignored"
                )
            values["shape"] = info.shape

    layer = None
    if values["state"] is not None:
        try:
            found = store.layers(values["state"])
        except store.FileProblem as problem:
            notices.append(f"state: {short(values['state'])}: {problem}; ignored")
            values["state"] = None
    if values["state"] is None:
        if values["layer"] is not None:
            notices.append("layer: needs a state file (state=…); ignored")
            values["layer"] = None
    else:
        names = [f.name for f in found]
        first = found[0].name or None  # a bare module's layer has no name to write
        if values["layer"] is not None and values["layer"] not in names:
            notices.append(
                f"layer: {_show(values['layer'])} is not a BatchNorm in the file "
                f"({', '.join(map(repr, names[:8]))}); using {found[0].label}"
            )
            values["layer"] = first if len(found) > 1 else None
        elif values["layer"] is None and len(found) > 1:
            notices.append(
                f"{LAYER_NOT_GIVEN}; using {found[0].label}, the first of {len(found)} in the "
                f"file (also {', '.join(f.label for f in found[1:8])})"
            )
            values["layer"] = first
        layer = found[names.index(values["layer"])] if values["layer"] is not None else found[0]

    if values["port"] is not None:
        try:
            store.layers(values["port"])
        except store.FileProblem as problem:
            notices.append(f"port: {short(values['port'])}: {problem}; ignored")
            values["port"] = None
    if values["input"] == "running":
        why = None
        if layer is None:
            why = "needs a state file (state=…)"
        elif layer.problem:
            why = f"needs a usable layer; layer {layer.label}: {layer.problem}"
        elif layer.channels != values["shape"][1] and values["init"] != "state":
            why = _follow_layer(layer, values, notices)
        if why:
            notices.append(f"input: running {why}; using {base['input']}")
            values["input"] = base["input"]
    if values["init"] != "state":
        return
    why = None
    if layer is None:
        why = "needs a state file (state=…)"
    elif layer.problem:
        why = f"layer {layer.label}: {layer.problem}"
    elif layer.channels != values["shape"][1]:
        why = _follow_layer(layer, values, notices)
    if why:
        notices.append(f"init: state {why}; using fresh")
        values["init"] = "fresh"


def shape_for_layer(shape: Sequence[int], channels: int) -> tuple[int, ...] | None:
    """The batch shape for a layer of ``channels``: C replaced, N and the spatial dims kept,
    N = min(N, ⌊MAX_ELEMENTS / (C·∏spatial)⌋) so the batch stays under the value cap
    (None where not even N = 1 fits)."""
    batch = min(shape[0], MAX_ELEMENTS // (channels * math.prod(shape[2:])))
    return (batch, channels, *shape[2:]) if batch >= 1 else None


def _follow_layer(layer: Layer, values: dict[str, Any], notices: list[str]) -> str | None:
    """init=state: a drawn batch takes the layer's channel count (a batch file's shape is
    the file's); returns why the layer cannot be used, or None with the shape set."""
    shape, channels = tuple(values["shape"]), layer.channels
    fitted = None if values["input"] == "file" else shape_for_layer(shape, channels)
    if fitted is None:
        over = ""
        if values["input"] != "file":
            one = (1, channels, *shape[2:])
            over = (
                f": even {_shape_text(one)} holds {math.prod(one):,} values, "
                f"over the limit of {MAX_ELEMENTS:,}"
            )
        return (
            f"layer {layer.label} has {channels} channels, the batch {shape[1]} "
            f"(shape {_shape_text(shape)}){over}"
        )
    shrunk = ""
    if fitted[0] != shape[0]:
        wanted = (shape[0], *fitted[1:])
        shrunk = (
            f"; {_shape_text(wanted)} would hold {math.prod(wanted):,} values, over the "
            f"limit of {MAX_ELEMENTS:,}, so the batch shrinks to {fitted[0]}"
        )
    notices.append(
        f"shape: follows layer {layer.label}'s {channels} channels, not {shape[1]} "
        f"({_shape_text(shape)}){shrunk}; using {_shape_text(fitted)}"
    )
    values["shape"] = fitted
    return None


def _shape_text(shape: Sequence[int]) -> str:
    return format_value(BY_KEY["shape"], shape)


def scenario_from_values(values: Mapping[str, Any]) -> tuple[Scenario, list[str]]:
    """Validate widget values (any types) through the same codec as links."""
    pairs = []
    for p in PARAMS:
        if p.key in values:
            v = values[p.key]
            pairs.append((p.key, v if isinstance(v, str) else format_value(p, v)))
    return from_pairs(pairs)
