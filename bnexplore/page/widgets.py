"""The sidebar: widgets generated from the parameter table, bound to the URL.

The address bar is always the canonical link of what the widgets show. On a
session's first run the link is read through the same codec as the CLI (so a
bad value gets a notice, a preset is expanded); every run then writes the
canonical link back with ``st.query_params``. Streamlit's own
``bind="query-params"`` is not used: it drops bad values silently and cannot
expand a preset, and the app owes a notice for each.

Parameter values live in ``st.session_state[VALUES]``; a widget holds its copy
under ``"w_" + key`` only while it is shown, so values of hidden widgets (say
``mean`` while the input is ``ones``) survive in the link.
"""

from __future__ import annotations

import random
import re
from typing import Any

import streamlit as st

from bnexplore.engines import LABELS
from bnexplore.files import store as uploads
from bnexplore.judge.audit import source_default, source_of
from bnexplore.runs.sweep import start_range
from bnexplore.scenario.links import (
    Scenario,
    format_value,
    from_pairs,
    scenario_from_values,
    shape_for_layer,
)
from bnexplore.scenario.params import (
    BY_KEY,
    DEFAULTS,
    GROUPS,
    OPTIMIZER_DEFAULTS,
    PARAMS,
    TABS,
    Param,
    read_by_any,
)
from bnexplore.scenario.presets import PRESETS, matching

SWEEP_GROUP = "sweep"
MODEL_GROUP = "model"

VALUES = "scenario_values"
TAB = "w_tab"
"""The tabs' widget key: its value is the open tab's label."""
LINK_NOTICES = "link_notices"
UPLOAD_TYPES = ("pt", "pth", "safetensors", "keras", "h5", "onnx", "npz", "npy")
NO_PRESET = "(custom)"


NULLABLE = {"momentum": "None (cumulative average)", "or_default": "the library's default"}
"""Kinds whose value may be None, shown as a checkbox beside the number."""


def _default_shown(param: Param) -> float:
    """What the number box of an or_default knob shows while the default is used: the
    optimizer's, or the source framework's own (the one ``source`` names, else the one
    the model file names, else PyTorch's)."""
    prefix, knob = param.key.split("_", 1)
    if prefix == "source":
        return source_default(_source_framework(), knob)
    return OPTIMIZER_DEFAULTS[prefix]["adam"][knob]


def _source_framework() -> str:
    """The source framework as the audit resolves it (judge.audit.source_of)."""
    values = st.session_state.get(VALUES, {})
    try:
        model = uploads.model(values["state"]) if values.get("state") else None
    except uploads.FileProblem:
        model = None
    scenario, _ = scenario_from_values({"source": values.get("source", "auto")})
    return source_of(scenario, model)


def _widget_key(key: str) -> str:
    return "w_" + key


def _to_widget(param: Param, value: Any) -> Any:
    """A parameter value as its widget holds it."""
    if param.kind == "shape":
        return format_value(param, value)
    if param.kind == "choices":
        return list(value)
    if param.kind == "momentum":
        return 0.1 if value is None else float(value)
    if param.kind == "or_default":
        return _default_shown(param) if value is None else float(value)
    if param.kind == "float":
        return float(value)
    return value


def _set_widgets(values: dict[str, Any]) -> None:
    st.session_state[VALUES] = dict(values)
    for p in PARAMS:
        if p.kind == "digest":  # set by an upload, held in VALUES only
            continue
        st.session_state[_widget_key(p.key)] = _to_widget(p, values[p.key])
        if p.kind in NULLABLE:
            st.session_state[_widget_key(p.key) + "_none"] = values[p.key] is None


def _load_link() -> None:
    """First run of a session: the URL's query string → widget values and notices."""
    pairs = [(k, v) for k in st.query_params for v in st.query_params.get_all(k)]
    scenario, notices = from_pairs(pairs)
    _set_widgets(dict(scenario.values))
    tab = st.query_params.get("tab", "overview")
    slug = tab.strip().lower()
    if slug not in TABS:
        notices.append(
            f"tab: {tab[:40]!r} is not a tab of this page ({', '.join(TABS)}); opened overview"
        )
        slug = "overview"
    st.session_state[TAB] = TABS[slug]
    st.session_state[LINK_NOTICES] = notices


def open_tab() -> str:
    """The slug of the tab the page shows (the link's ``tab``)."""
    label = st.session_state.get(TAB, TABS["overview"])
    return next((slug for slug, name in TABS.items() if name == label), "overview")


def _link_params(scenario: Scenario) -> dict[str, str]:
    """The address bar: the scenario's canonical link, and the open tab unless Overview."""
    params = scenario.link_params()
    if open_tab() != "overview":
        params["tab"] = open_tab()
    return params


def _apply_preset() -> None:
    name = st.session_state["w_preset"]
    if name in PRESETS:
        apply_scenario(Scenario({**DEFAULTS, **PRESETS[name].values}))


def reset_to_defaults() -> None:
    apply_scenario(Scenario())


def apply_scenario(scenario: Scenario) -> None:
    """Show this scenario in every widget (and so in the link); for button callbacks."""
    _set_widgets(dict(scenario.values))
    st.session_state[LINK_NOTICES] = []


def _upload_key(key: str) -> str:
    return "upload_" + key


def _problem_key(key: str) -> str:
    """Where an upload's refusal waits to be shown under its uploader."""
    return "upload_problem_" + key


def _uploaded(key: str) -> None:
    """A file was dropped on an uploader: keep it in the store, point the link at it.

    A state file starts every engine from its first layer (init=state), PyTorch in
    eval mode (a trained layer's use; Keras's direct call already infers), with the
    batch's channel count set to the layer's (shape_for_layer: the batch size shrinks
    where the values would pass the cap); a batch file becomes the input.
    Removing the file from the uploader stops using it.
    """
    values = st.session_state[VALUES]
    upload = st.session_state.get(_upload_key(key))
    st.session_state.pop(_problem_key(key), None)
    if upload is None:
        values[key] = None
        return
    try:
        digest = uploads.store_bytes(upload.getvalue())
        if key in ("state", "port"):
            first = uploads.layers(digest)[0]
        else:
            shape = uploads.batches_info(digest).shape
    except uploads.FileProblem as problem:
        st.session_state[_problem_key(key)] = f"{upload.name}: {problem}"
        return
    values[key] = digest
    if key == "port":
        return
    if key == "state":
        changes = {"layer": first.name or None, "init": "state", "torch_mode": "eval"}
        shape = shape_for_layer(values_shape(values), first.channels)
        if values["input"] != "file" and shape is not None:
            changes["shape"] = shape
    else:
        changes = {"input": "file", "shape": shape}
    _set_some(changes)


def upload_problem(key: str) -> str | None:
    """Why the last file given to uploader ``key`` (state, port, file) was refused, if it was."""
    return st.session_state.get(_problem_key(key))


_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|~$:])")


def plain(text: str) -> str:
    """Text from a file or a framework, shown as it is where Streamlit reads Markdown: a
    refusal that names ``__main__.Net`` must not turn it bold."""
    return _MARKDOWN.sub(r"\\\1", text)


def values_shape(values: dict[str, Any]) -> tuple[int, ...]:
    """The shape the widgets hold, or the default where the text is not a shape."""
    scenario, _ = scenario_from_values({"shape": values["shape"]})
    return scenario.shape


def _set_some(changes: dict[str, Any]) -> None:
    """Set a few values and their widgets (from a callback, before widgets are drawn)."""
    st.session_state[VALUES].update(changes)
    for name, value in changes.items():
        st.session_state[_widget_key(name)] = _to_widget(BY_KEY[name], value)


def _forget(key: str) -> None:
    st.session_state[VALUES][key] = None
    if key == "state":
        _set_some({"layer": None, "init": "fresh"})


def _render_upload(param: Param) -> None:
    """An uploader for a digest parameter, and what the stored file holds."""
    values = st.session_state[VALUES]
    batch = param.key == "file"
    st.file_uploader(
        "Batch file (.npy, .npz)" if batch else param.label,
        type=["npy", "npz"] if batch else list(UPLOAD_TYPES),
        key=_upload_key(param.key),
        help=param.help,
        on_change=_uploaded,
        args=(param.key,),
        max_upload_size=max(1, uploads.file_limit() // 1024**2),
    )
    if _problem_key(param.key) in st.session_state:
        st.error(plain(st.session_state[_problem_key(param.key)]))
    digest = values[param.key]
    if digest is None:
        return
    st.caption(f"`{param.key}={uploads.short(digest)}` on this server")
    st.button(
        "Forget this file",
        key=f"forget_{param.key}",
        on_click=_forget,
        args=(param.key,),
        help="Run without it; the file stays on the server for links that name it.",
    )


def _render_layers(param: Param) -> None:
    """The file's BatchNorm layers with their channel counts; a picker when there are several."""
    values = st.session_state[VALUES]
    try:
        found = uploads.layers(values["state"])
    except uploads.FileProblem:
        return  # the link codec's notice says why
    problems = any(layer.problem for layer in found)
    rows = ["| layer | channels |" + " problem |" * problems, "|---|---:|" + "---|" * problems]
    for layer in found:
        name = layer.label.replace("`", "'").replace("|", "\\|")  # a name from a file
        problem = f" {layer.problem or ''} |" * problems
        rows.append(f"| `{name}` | {layer.channels} |{problem}")
    st.markdown("\n".join(rows))
    names = [layer.name for layer in found]
    if len(names) < 2:
        return
    key = _widget_key(param.key)
    if st.session_state.get(key) not in names:
        st.session_state[key] = values[param.key] if values[param.key] in names else names[0]
    labels = {layer.name: f"{layer.label} ({layer.channels} channels)" for layer in found}
    st.selectbox(
        param.label,
        names,
        key=key,
        help=param.help,
        format_func=labels.get,
        on_change=_layer_picked,
    )
    _read_widget(param, values)


def _layer_picked() -> None:
    """Another layer: the batch's channel count follows it (unless the batch is a file)."""
    values = st.session_state[VALUES]
    name = st.session_state[_widget_key("layer")]
    for layer in uploads.layers(values["state"]):
        if layer.name == name and values["input"] != "file":
            shape = shape_for_layer(values_shape(values), layer.channels)
            if shape is not None:  # not even one sample fits: the link's notice says so
                _set_some({"shape": shape})


def _render(param: Param, on_change=None) -> None:
    """One widget; its current value is written to the VALUES store."""
    if param.kind == "digest":
        _render_upload(param)
        return
    if param.kind == "name":
        _render_layers(param)
        return
    key = _widget_key(param.key)
    store = st.session_state[VALUES]
    if key not in st.session_state:
        st.session_state[key] = _to_widget(param, store[param.key])
    common = {"label": param.label, "key": key, "help": param.help, "on_change": on_change}
    if param.kind == "shape":
        st.text_input(**common)
    elif param.kind == "choices":
        st.multiselect(options=param.choices, format_func=lambda e: LABELS.get(e, e), **common)
    elif param.kind == "choice" and (len(param.choices) > 3 or max(map(len, param.choices)) > 6):
        words = dict(param.words)
        st.selectbox(options=param.choices, format_func=lambda c: words.get(c, c), **common)
    elif param.kind == "choice":
        words = dict(param.words)
        st.radio(
            options=param.choices, format_func=lambda c: words.get(c, c), horizontal=True, **common
        )
    elif param.kind == "bool":
        st.checkbox(**common)
    elif param.kind == "int":
        st.number_input(min_value=int(param.low), max_value=int(param.high), step=1, **common)
    elif param.kind in NULLABLE:
        none_key = key + "_none"
        if none_key not in st.session_state:
            st.session_state[none_key] = store[param.key] is None
        # the Model tab's columns are narrow: "default" there (its help says whose)
        words = "default" if param.group == MODEL_GROUP else NULLABLE[param.kind]
        unset = st.checkbox(f"{param.label}: {words}", key=none_key)
        if unset and param.kind == "or_default":  # the box shows the default in use
            st.session_state[key] = _to_widget(param, None)
        st.number_input(
            min_value=param.low,
            max_value=param.high,
            step=param.step,
            format="%g",
            disabled=unset,
            **common,
        )
    else:
        st.number_input(
            min_value=None if param.low_open else param.low,
            max_value=param.high,
            step=param.step or 0.1,
            format="%g",
            **common,
        )
    _read_widget(param, store)


def model_controls() -> None:
    """The audit's widgets (the model group), in the current container (the Model tab):
    the port's uploader, then the source's settings side by side."""
    _render_upload(BY_KEY["port"])
    params = [p for p in PARAMS if p.group == MODEL_GROUP and p.key != "port"]
    for column, param in zip(st.columns(len(params)), params, strict=True):
        with column:
            _render(param)


def open_scenario(scenario: Scenario, slug: str) -> None:
    """Show this scenario in every widget and open tab ``slug`` (a button's callback)."""
    apply_scenario(scenario)
    st.session_state[TAB] = TABS[slug]


def sweep_controls() -> None:
    """The sweep's widgets, side by side, in the current container (the Sweep tab)."""
    store = st.session_state[VALUES]
    params = [p for p in PARAMS if p.group == SWEEP_GROUP]
    first, *rest = params
    _render(first, on_change=_sweep_picked)
    if store[first.key] != "none":
        for column, param in zip(st.columns(len(rest)), rest, strict=True):
            with column:
                _render(param)


def _sweep_picked() -> None:
    """A parameter was picked for sweeping: offer a sensible range for it."""
    key = st.session_state[_widget_key("sweep")]
    if key == "none":
        return
    start, stop, scale = start_range(key)
    values = {"sweep_from": float(start), "sweep_to": float(stop), "sweep_scale": scale}
    st.session_state[VALUES].update(values)
    for name, value in values.items():
        st.session_state[_widget_key(name)] = value


def new_seed() -> None:
    seed = random.SystemRandom().randrange(2**32)
    st.session_state[VALUES]["seed"] = seed
    st.session_state[_widget_key("seed")] = seed


def _shown(param: Param, store: dict[str, Any], engines: tuple[str, ...]) -> bool:
    """Widgets of engines not compared, and input knobs of other kinds, are hidden."""
    if param.only_for and store["input"] not in param.only_for:
        return False
    if param.needs_loss and store["loss"] == "none":
        return False
    if param.kind == "name":
        return store["state"] is not None
    return read_by_any(param, engines)


def _read_widget(param: Param, store: dict[str, Any]) -> None:
    """Copy a shown widget's value into the store (hidden widgets keep theirs)."""
    key = _widget_key(param.key)
    if key not in st.session_state:
        return
    if param.kind in NULLABLE and st.session_state.get(key + "_none"):
        store[param.key] = None
    else:
        store[param.key] = st.session_state[key]


def sidebar() -> tuple[Scenario, list[str]]:
    """Draw the sidebar; return the scenario it shows and the notices to show."""
    if VALUES not in st.session_state:
        _load_link()
    store = st.session_state[VALUES]
    for p in PARAMS:  # a widget changed by the user since the last run
        _read_widget(p, store)

    with st.sidebar:
        preset = matching(scenario_from_values(store)[0].values, DEFAULTS)
        st.session_state["w_preset"] = preset.name if preset else NO_PRESET
        st.selectbox(
            "Preset",
            (NO_PRESET, *PRESETS),
            key="w_preset",
            on_change=_apply_preset,
            help="A named scenario to start from; every knob below stays editable.",
        )
        st.button("Reset to defaults", on_click=reset_to_defaults)
        st.button(
            "New seed",
            on_click=new_seed,
            disabled=store["input"] in ("ones", "constant"),
            help="Draw the random batches again from another seed.",
        )
        engines = scenario_from_values(store)[0]["engines"]
        for group, title in GROUPS.items():
            if group in (SWEEP_GROUP, MODEL_GROUP):  # shown in their own tabs
                continue
            shown = [p for p in PARAMS if p.group == group and _shown(p, store, engines)]
            if shown:
                st.subheader(title, divider="gray")
            for p in shown:
                _render(p)

    scenario, notices = scenario_from_values(store)
    sync_address_bar(scenario)
    return scenario, [*st.session_state[LINK_NOTICES], *notices]


def sync_address_bar(scenario: Scenario) -> None:
    """Write the link of what the page shows into the address bar, if it differs."""
    if st.query_params.to_dict() != _link_params(scenario):
        st.query_params.from_dict(_link_params(scenario))
