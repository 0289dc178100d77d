"""The app through Streamlit's AppTest: opened from links, widgets bound to the URL."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from urllib.parse import urlencode

import pytest
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

from bnexplore.engines import LABELS
from bnexplore.judge.verdicts import percent
from bnexplore.scenario.links import parse_link
from bnexplore.scenario.params import TABS
from bnexplore.scenario.presets import PRESETS

APP = str(Path(__file__).parents[1] / "app.py")


def open_link(link: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    scenario_pairs = [p.split("=", 1) for p in link.lstrip("?").split("&") if p]
    for key, value in scenario_pairs:
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def widget_values(at: AppTest) -> dict:
    values = {}
    for kind in ("number_input", "radio", "text_input", "checkbox", "selectbox"):
        for w in at.sidebar.get(kind):
            values[w.key] = w.value
    return values


@pytest.fixture(scope="module")
def opened() -> AppTest:
    return open_link(
        "?v=1&shape=6,4,5&input=normal&mean=0.5&steps=3&torch_mode=eval"
        "&keras_training=true&torch_momentum=none&keras_eps=1e-05"
    )


def test_app_opens_from_a_link_with_widgets_showing_its_values(opened: AppTest) -> None:
    w = widget_values(opened)
    assert w["w_shape"] == "6,4,5"
    assert w["w_input"] == "normal"  # a select box: four kinds
    assert w["w_mean"] == 0.5
    assert w["w_steps"] == 3
    assert w["w_torch_mode"] == "eval"
    assert w["w_keras_training"] == "true"
    assert w["w_torch_momentum_none"] is True
    assert w["w_keras_eps"] == 1e-5


def test_app_address_bar_is_the_canonical_link(opened: AppTest) -> None:
    scenario, _ = parse_link("?" + urlencode(opened.query_params))
    assert opened.query_params == scenario.link_params()
    assert scenario.link == (
        "?v=1&shape=6,4,5&input=normal&mean=0.5&steps=3&torch_mode=eval"
        "&keras_training=true&torch_momentum=none&keras_eps=1e-05"
    )


def test_app_shows_both_frameworks_numbers_and_charts(opened: AppTest) -> None:
    table = next(m.value for m in opened.markdown if m.value.startswith("| engine"))
    assert "| PyTorch |" in table and "| Keras 3 |" in table
    assert [m.label for m in opened.metric][:2] == ["max |Δ|", "mean |Δ|"]
    # overview: where the outputs part; outputs: distribution + 2 per channel; running: 2
    # over steps, |Δ| per step, heatmap,
    # 2 per channel; explain: one per real gap (output, running mean, running variance).
    # Only the open tab draws.
    drawn = {}
    for slug, label in TABS.items():
        opened.session_state["w_tab"] = label
        opened.run()
        drawn[slug] = len(opened.get("vega_lite_chart"))
    opened.session_state["w_tab"] = TABS["overview"]
    opened.run()
    assert drawn == {
        "overview": 1,
        "outputs": 3,
        "running": 6,
        "training": 0,  # loss=none: a note, no chart
        "layer": 0,
        "sweep": 0,
        "explain": 3,
        "code": 0,
        "model": 0,  # no model file: a note, no chart
    }
    assert opened.subheader[0].value.startswith("max |Δ|")
    assert "of the gap:" in opened.markdown[0].value  # explain's top cause, on top


def test_the_overview_charts_where_the_two_outputs_part() -> None:
    at = open_link("?v=1")
    (chart,) = at.get("vega_lite_chart")
    spec = json.loads(chart.proto.spec)
    assert spec["title"]["text"] == "Where the outputs part: each engine's distribution of values"
    assert spec["encoding"]["color"]["scale"]["domain"] == ["PyTorch", "Keras 3"]
    (dataset,) = chart.proto.datasets  # Streamlit sends the chart's rows as Arrow
    rows = convert_arrow_bytes_to_pandas_df(dataset.data.data)
    # the seed: PyTorch normalizes the ones to 0, Keras 3 infers 0.9995 — two spikes apart
    peaks = dict(rows.loc[rows["share"] == 1.0, ["engine", "start"]].itertuples(index=False))
    assert peaks["PyTorch"] < 0.1 < 0.9 < peaks["Keras 3"], peaks


def test_changing_a_widget_updates_the_link() -> None:
    at = open_link("?shape=4,3")
    at.sidebar.number_input(key="w_steps").set_value(7).run()
    assert not at.exception
    assert at.query_params == {"v": "1", "shape": "4,3", "steps": "7"}
    at.sidebar.selectbox(key="w_input").set_value("uniform").run()
    assert at.query_params["input"] == "uniform"
    assert at.sidebar.number_input(key="w_high").value == 1.0


def test_bad_link_opens_with_a_notice_per_key() -> None:
    at = open_link("?steps=abc&shape=1000,1000,1000&foo=bar&keras_momentum=7&v=9")
    notice = at.warning[0].value
    for key in ("steps", "shape", "foo", "keras_momentum", "v"):
        assert key in notice
    assert "50,000,000" in notice


def test_framework_error_is_shown_as_a_result() -> None:
    at = open_link("?shape=1,3")
    assert any("Expected more than 1 value per channel" in e.value for e in at.error)
    table = next(m.value for m in at.markdown if m.value.startswith("| engine"))
    assert "| Keras 3 | 0.9995 |" in table  # Keras's numbers are still there


def test_make_them_agree_applies_the_translation_to_the_link() -> None:
    at = open_link("?shape=8,4,3&input=normal&steps=2&tab=code")
    agree = next(b for b in at.button if b.label == "Make them agree")
    agree.click().run()
    assert not at.exception
    assert at.query_params["keras_training"] == "true"
    assert at.query_params["keras_momentum"] == "0.9"
    assert at.query_params["keras_eps"] == "1e-05"
    # the outputs now agree; the running variances still part: no knob aligns PyTorch's
    # unbiased estimator with Keras 3's biased one, and the headline says so
    headline = at.subheader[0].value
    assert "the outputs differ only by rounding, but the running variance differs" in headline


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_links_open_without_exception(name: str) -> None:
    at = open_link(f"?preset={name}")
    assert at.sidebar.selectbox(key="w_preset").value == name
    assert not at.warning


def test_preset_picker_applies_the_preset() -> None:
    at = open_link("?steps=4&shape=4,3")
    at.sidebar.selectbox(key="w_preset").set_value("seed").run()
    assert not at.exception
    assert at.query_params == {"v": "1"}
    assert at.sidebar.number_input(key="w_steps").value == 0


def test_a_revisited_link_answers_from_the_cache_without_running_the_frameworks(
    lanes_started,
) -> None:
    link = "?shape=5,7,3&input=uniform&seed=424242&steps=2"
    open_link(link)
    first = len(lanes_started)
    assert first >= 2  # both engines ran
    again = open_link(link)  # a second visitor, a new session, the same link
    assert len(lanes_started) == first, "the frameworks ran again for a cached link"
    assert again.subheader[0].value.startswith("max |Δ|")


def test_a_tab_runs_only_what_it_draws_and_the_explain_tab_adds_the_rest(monkeypatch) -> None:
    """Overview runs the engines alone: no float64 references, no explain re-runs; the
    headline names the knobs that differ. Explain adds both, and the page keeps them."""
    import bnexplore.page.view

    explained = []
    real_explain = bnexplore.page.view.explain
    monkeypatch.setattr(
        bnexplore.page.view, "explain", lambda *a: explained.append(a) or real_explain(*a)
    )
    at = open_link("?shape=6,3,2&input=normal&seed=515151&steps=1")
    line = at.markdown[0].value
    assert "knobs that differ: mode, eps, momentum" in line and "of the gap" not in line
    assert not explained
    at.session_state["w_tab"] = "Explain"
    at.run()
    assert len(explained) == 1
    assert "of the gap:" in at.markdown[0].value
    references = next(m.value for m in at.markdown if m.value.startswith("- PyTorch: max |Δ|"))
    assert "- Keras 3: max |Δ|" in references and "float32 tolerance" in references
    at.session_state["w_tab"] = "Overview"
    at.run()  # the view cached with every part serves Overview too, explained
    assert len(explained) == 1 and "of the gap:" in at.markdown[0].value


def test_a_20_point_sweep_from_a_link_runs_and_charts_every_point() -> None:
    at = open_link(
        "?shape=16,4,3,3&input=normal&steps=2&sweep=keras_momentum&sweep_from=0.5"
        "&sweep_to=0.999&sweep_points=20&tab=sweep"
    )
    (table,) = at.dataframe
    assert len(table.value) == 20  # one row per point for the one pair
    assert table.value["max_abs"].notna().all()
    assert at.query_params["sweep_points"] == "20" if "sweep_points" in at.query_params else True
    assert at.query_params["sweep"] == "keras_momentum"
    charts = at.get("vega_lite_chart")
    assert any("as keras_momentum varies" in json.dumps(c.proto.spec) for c in charts)


def test_a_state_link_shows_the_files_layers_in_the_sidebar_and_charts_the_chosen_one(
    tmp_path, monkeypatch
) -> None:
    import numpy as np

    from bnexplore.files.store import store_file

    monkeypatch.setenv("BNEXPLORE_STORE", str(tmp_path / "store"))
    variance = np.array([1e-6, 0.5, 2.0, 1e-4])
    arrays = {"stem.bn.running_mean": np.zeros(3), "stem.bn.running_var": np.ones(3)}
    arrays |= {"head.bn.running_mean": np.zeros(4), "head.bn.running_var": variance}
    np.savez(tmp_path / "model.npz", **arrays)
    digest = store_file(tmp_path / "model.npz")
    at = open_link(
        f"?state={digest[:16]}&layer=head.bn&init=state&shape=4,4,3&input=normal&tab=layer"
    )
    assert not at.warning, [w.value for w in at.warning]
    (table,) = [m.value for m in at.sidebar.markdown if m.value.startswith("| layer")]
    assert "| `stem.bn` | 3 |" in table and "| `head.bn` | 4 |" in table
    assert at.sidebar.selectbox(key="w_layer").value == "head.bn"
    assert at.query_params["state"] == digest  # the address bar writes all 64 characters
    spec = json.dumps([c.proto.spec for c in at.get("vega_lite_chart")])
    assert "Layer head.bn: running variance per channel" in spec
    assert "2 of 4 channels" in spec  # 1e-6 and 1e-4: where eps decides


def test_a_batch_file_link_shows_its_uploader_and_runs_the_files_shape(
    tmp_path, monkeypatch
) -> None:
    import numpy as np

    from bnexplore.files.store import store_file

    monkeypatch.setenv("BNEXPLORE_STORE", str(tmp_path / "store"))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(5, 2, 3)))
    digest = store_file(tmp_path / "x.npy")
    at = open_link(f"?input=file&file={digest}")
    assert not at.warning, [w.value for w in at.warning]
    assert at.query_params["shape"] == "5,2,3" and at.query_params["file"] == digest
    assert any(f"file={digest[:16]}" in c.value for c in at.sidebar.caption)
    table = next(m.value for m in at.markdown if m.value.startswith("| engine"))
    assert "| PyTorch |" in table and "not run" not in table


def test_the_tab_is_part_of_the_link_and_not_of_the_scenario() -> None:
    at = open_link("?shape=4,3&steps=1&tab=explain")
    assert at.query_params["tab"] == "explain"
    assert at.session_state["w_tab"] == "Explain"
    assert "tab" not in at.session_state["scenario_values"]
    at.session_state["w_tab"] = "Outputs"
    at.run()
    assert at.query_params["tab"] == "outputs"
    assert len(at.get("vega_lite_chart")) == 3
    at.session_state["w_tab"] = "Overview"
    at.run()
    assert "tab" not in at.query_params  # Overview is the default: the link stays clean


def test_an_unknown_tab_opens_overview_with_a_notice() -> None:
    at = open_link("?shape=4,3&tab=nope")
    assert any("tab: 'nope' is not a tab of this page" in w.value for w in at.warning)
    assert at.session_state["w_tab"] == "Overview" and "tab" not in at.query_params


def _sidebar_keys(at: AppTest) -> set[str]:
    widgets = [*at.sidebar.radio, *at.sidebar.number_input, *at.sidebar.checkbox]
    return {w.key for w in widgets}


def test_training_group_shows_the_knobs_of_compared_engines_only_with_a_loss() -> None:
    keys = _sidebar_keys(open_link("?shape=4,3"))
    assert "w_loss" in keys and "w_torch_optimizer" not in keys  # no loss: no optimizer
    at = open_link("?shape=4,3&loss=mse&engines=torch,keras")
    keys = _sidebar_keys(at)
    assert {"w_target", "w_torch_optimizer", "w_keras_lr", "w_keras_adam_eps"} <= keys
    assert not any(key.startswith("w_keras2_") for key in keys)  # Keras 2 is not compared
    at.sidebar.radio(key="w_keras_optimizer").set_value("adamw").run()
    at.sidebar.checkbox(key="w_keras_lr_none").uncheck().run()
    at.sidebar.number_input(key="w_keras_lr").set_value(0.05).run()
    assert not at.exception
    assert at.query_params["keras_optimizer"] == "adamw"
    assert at.query_params["keras_lr"] == "0.05"
    at.session_state["w_tab"] = "Training"
    at.run()
    assert len(at.get("vega_lite_chart")) >= 4  # the Training tab's gradient charts


def test_no_bare_string_in_the_script_is_drawn_by_streamlit_magic() -> None:
    """Streamlit's magic writes any bare expression at the top level of the script onto
    the page: only the module docstring may be one (a docstring on a constant was drawn)."""
    import ast

    tree = ast.parse(Path(APP).read_text())
    bare = [
        node.lineno
        for node in tree.body[1:]
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    ]
    assert bare == []


def test_the_server_does_not_collect_garbage_after_every_run() -> None:
    """Streamlit's post-run gc.collect() holds the GIL for 70–120 ms on this app's objects
    while the run's last messages wait (README, Performance): the config turns it off."""
    config = tomllib.loads((Path(APP).parent / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False


@pytest.mark.parametrize(
    ("names", "eps", "momentum"),
    [
        (("running_mean", "running_var"), 1e-5, 0.1),
        (("moving_mean", "moving_variance"), 1e-3, 0.99),
    ],
)
def test_the_source_defaults_shown_are_the_files_framework(
    tmp_path, store_dir, names, eps, momentum
):
    """While the source's epsilon and momentum are its default, their boxes show the default
    of the framework the file names (Keras's names: Keras's), not always PyTorch's."""
    import numpy as np

    import bnexplore

    mean, var = names
    np.savez(tmp_path / "m.npz", **{f"bn.{mean}": np.zeros(3), f"bn.{var}": np.ones(3)})
    digest = bnexplore.store_file(tmp_path / "m.npz")
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"state": digest, "tab": "model"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    for knob, want in (("eps", eps), ("momentum", momentum)):
        box = at.number_input(key=f"w_source_{knob}")
        assert box.disabled and box.value == want, (knob, box.value)
        assert "source_" + knob not in at.query_params  # still the default: not in the link


def test_the_model_tab_audits_the_file_and_its_port(tmp_path, store_dir) -> None:
    """A state_dict and its port with γ and β swapped in one layer: the Model tab charts the
    gaps, tables every layer and names the port's mistake."""
    import torch

    import bnexplore

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3))
    with torch.no_grad():
        model[0].running_var.copy_(torch.tensor([1e-5, 1e-4, 1.0]))
        model[1].weight.copy_(torch.tensor([2.0, 0.5, 1.5]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    port = model.state_dict()
    port["1.weight"], port["1.bias"] = port["1.bias"].clone(), port["1.weight"].clone()
    torch.save(port, tmp_path / "port.pt")
    digest, ported = (
        bnexplore.store_file(tmp_path / "m.pt"),
        bnexplore.store_file(tmp_path / "port.pt"),
    )

    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"state": digest, "port": ported, "tab": "model"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("vega_lite_chart")) == 1
    layers, findings = (df.value for df in at.dataframe)
    assert list(layers["layer"]) == ["0", "1"]  # the small variances bite first
    assert "keras_eps" in layers["cause"].iloc[0]
    assert list(findings["problems"]) == ["ok", "swapped_gamma_beta"]
    assert list(findings["at inference"]) == ["outputs agree exactly", "outputs differ"]
    # the answer on top is the model's: the table's first layer (the largest naive gap for
    # its own scale), its largest gap and engine; then each kind of port's verdict
    naive = [c for c in layers.columns if c.endswith(" naive") and c != "worst naive"]
    gaps = layers[naive].iloc[0].to_numpy()
    column = int(gaps.argmax())
    assert at.subheader[0].value == (
        f"max |Δ| = {gaps[column]:.4g} ({percent(layers['worst naive'].iloc[0])} of its "
        f"largest output): layer {layers['layer'].iloc[0]}, ported naively to "
        f"{LABELS[naive[column].removesuffix(' naive')]}"
    )
    (said,) = [m.value for m in at.markdown if "-badge[" in m.value]
    assert ":red-badge[naive ports: differ in " in said
    assert ":red-badge[the port file: 1 of 2 layers wrong (swapped_gamma_beta in 1)]" in said
    # the tab audits every layer: a link that names none gets no notice there, as it does
    # on a single-layer tab (which runs the first)
    assert not [w.value for w in at.warning if "layer: not given" in w.value]
    overview = AppTest.from_file(APP, default_timeout=300)
    overview.query_params.update({"state": digest, "port": ported, "tab": "overview"})
    overview.run()
    assert [w.value for w in overview.warning if "layer: not given" in w.value]
    assert "ported naively" not in overview.subheader[0].value  # the scenario's own answer
