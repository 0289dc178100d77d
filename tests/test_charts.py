"""Chart builders: pure functions from results to valid Vega-Lite, fed small data."""

from __future__ import annotations

import html
import re

import altair as alt
import numpy as np
import pandas as pd
import pytest

from bnexplore.engines.registry import LABELS, REGISTRY
from bnexplore.judge.explain import explain
from bnexplore.page import charts
from bnexplore.runs.runner import Comparison, compare
from bnexplore.runs.sweep import run_sweep, values
from bnexplore.scenario.links import parse_link
from bnexplore.scenario.params import knobs


@pytest.mark.parametrize(
    "link",
    [
        "?preset=seed",
        "?preset=momentum-drift&steps=5",
        "?preset=one-sample",
        "?preset=keras2-vs-keras3",
        "?preset=half-precision&dtype=bfloat16",
        "?shape=2,900&input=normal&steps=401&keras_training=true&engines=torch,keras,keras2",
        "?preset=adam-noise&engines=torch,keras,keras2",
        "?preset=frozen-finetune&torch_affine=false",
    ],
)
def test_every_chart_builds_valid_vega_lite_from_small_data(link: str) -> None:
    scenario, _ = parse_link(link)
    comparison = compare(scenario)
    tables = {
        "histogram": charts.output_histogram(comparison),
        "channels": charts.channel_output_stats(comparison),
        "running": charts.running_statistics(comparison),
        "history": charts.running_history(comparison),
        "gaps": charts.step_gaps(comparison),
        "heat": charts.gap_heatmap(comparison),
        "explain": charts.explain_steps(explain(scenario)),
        "grad_x": charts.output_histogram(comparison, quantity="grad_x"),
        "parameters": charts.parameters(comparison),
        "parameter_history": charts.parameter_history(comparison),
    }
    built = [
        charts.output_distribution_chart(tables["histogram"]),
        charts.channel_output_chart(tables["channels"], "output mean"),
        charts.channel_output_chart(tables["channels"], "output std"),
        charts.running_statistics_chart(tables["running"], "running mean"),
        charts.history_chart(tables["history"], "running variance"),
        charts.step_gap_chart(tables["gaps"]),
        charts.gap_heatmap_chart(tables["heat"]),
        charts.attribution_chart(tables["explain"]),
        charts.output_distribution_chart(tables["grad_x"], "dL/dx", "Gradient w.r.t. x"),
        *(
            charts.parameter_chart(tables["parameters"], statistic)
            for statistic in set(tables["parameters"]["statistic"])
        ),
        *(
            charts.history_chart(tables["parameter_history"], statistic)
            for statistic in set(tables["parameter_history"]["statistic"])
        ),
    ]
    for chart in built:
        spec = chart.to_dict()  # validates against the Vega-Lite schema
        assert spec["autosize"]["type"] == "fit-x"  # the plot keeps its height in the app
    # never millions of points: binned and sampled, each chart under Altair's 5000 rows
    assert len(tables["histogram"]) <= 60 * 3 and len(tables["grad_x"]) <= 60 * 3
    if scenario["loss"] == "none":
        assert len(tables["grad_x"]) == len(tables["parameter_history"]) == 0
        assert not set(tables["parameters"]["statistic"]) & {"dL/dγ", "dL/dβ"}
    else:
        assert len(tables["grad_x"]) and len(tables["parameter_history"])
    assert len(tables["heat"]) <= charts.HEATMAP_STEPS * charts.HEATMAP_CHANNELS < 5000
    engines = len(scenario["engines"])
    assert len(tables["channels"]) <= engines * 2 * charts.MAX_CHANNELS
    assert len(tables["history"]) <= engines * 2 * 2 * charts.MAX_STEPS


def test_sweep_chart_and_table() -> None:
    scenario, _ = parse_link(
        "?shape=8,4&input=normal&sweep=keras_eps&sweep_from=1e-6"
        "&sweep_to=0.01&sweep_scale=log&sweep_points=5"
    )
    points = run_sweep(scenario, "keras_eps", values(scenario))
    table = charts.sweep_table(points, "keras_eps")
    assert list(table["value"]) == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    charts.sweep_chart(table, "keras_eps", log_x=True).to_dict()


def test_png_and_svg_render_offline() -> None:
    scenario, _ = parse_link("?shape=8,4&input=normal")
    chart = charts.output_distribution_chart(charts.output_histogram(compare(scenario)))
    assert charts.to_png(chart)[:8] == b"\x89PNG\r\n\x1a\n"
    assert charts.to_svg(chart).lstrip().startswith("<svg")


# --- every engine on every chart, and no chart over Altair's row limit -------------------

ALL_ENGINES = ",".join(e.name for e in REGISTRY)


@pytest.fixture(scope="module")
def every_engine() -> tuple[Comparison, list[str]]:
    """One run of every engine in the registry, 6000 channels, a training step with a loss:
    every chart has data. Returns the comparison and the labels of the engines that ran
    here (the machine's: PyTorch on CUDA needs a GPU)."""
    scenario, _ = parse_link(
        f"?shape=2,6000&input=normal&steps=2&loss=mse&keras_training=true&engines={ALL_ENGINES}"
    )
    comparison = compare(scenario, reference=True)
    ran = [LABELS[n] for n, r in comparison.results.items() if r.available and not r.error]
    assert {"PyTorch", "Keras 3"} <= set(ran), {n: r.reason for n, r in comparison.results.items()}
    return comparison, ran


def engine_charts(comparison: Comparison) -> dict[str, alt.TopLevelMixin]:
    """Every chart kind whose lines or rules are engines, built from one comparison."""
    running = charts.running_statistics(comparison)
    history = charts.running_history(comparison)
    outputs = charts.channel_output_stats(comparison)
    parameters = charts.parameters(comparison)
    parameter_history = charts.parameter_history(comparison)
    histogram = charts.output_histogram(comparison)
    eps = {LABELS[n]: comparison.scenario[f"{knobs(n)}_eps"] for n in comparison.results}
    state = next(r.trained_state for r in comparison.results.values() if r.trained_state)
    return {
        "overview": charts.output_overview_chart(
            charts.output_histogram(comparison, sample=charts.OVERVIEW_SAMPLE)
        ),
        "output distribution": charts.output_distribution_chart(histogram),
        "dL/dx distribution": charts.output_distribution_chart(
            charts.output_histogram(comparison, quantity="grad_x"), "dL/dx", "Gradient"
        ),
        "output mean per channel": charts.channel_output_chart(outputs, "output mean"),
        "output std per channel": charts.channel_output_chart(outputs, "output std"),
        "running mean per channel": charts.running_statistics_chart(running, "running mean"),
        "running variance per channel": charts.running_statistics_chart(
            running, "running variance"
        ),
        "running mean over passes": charts.history_chart(history, "running mean"),
        "running variance over passes": charts.history_chart(history, "running variance"),
        "γ over passes": charts.history_chart(parameter_history, "gamma"),
        "β over passes": charts.history_chart(parameter_history, "beta"),
        **{
            statistic: charts.parameter_chart(parameters, statistic)
            for statistic in charts.PARAMETER_LABELS.values()
        },
        "layer": charts.layer_variance_chart(charts.layer_statistics(state, eps), eps, "trained"),
    }


def engine_domains(spec: dict) -> list[list[str]]:
    """The domain of every colour encoding of the engine field, in every layer."""
    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            color = node.get("encoding", {}).get("color", {})
            if color.get("field") == "engine":
                assert color.get("legend", {}) is not None, "a layer turns the legend off"
                found.append(color["scale"]["domain"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    return found


def legend_labels(chart: alt.TopLevelMixin) -> set[str]:
    """The texts of the chart's legends, as vl-convert draws them."""
    svg = charts.to_svg(chart)
    legends = re.findall(r'role-legend-label".*?</g>', svg, flags=re.S)
    return {html.unescape(t) for legend in legends for t in re.findall(r">([^<>]+)</text>", legend)}


def test_every_chart_kind_names_every_engine_that_ran_in_its_colour_domain_and_legend(
    every_engine,
) -> None:
    comparison, ran = every_engine
    for name, chart in engine_charts(comparison).items():
        spec = chart.to_dict()  # validates, and raises MaxRowsError past Altair's 5000 rows
        domains = engine_domains(spec)
        assert domains, name
        for domain in domains:
            assert set(ran) <= set(domain), (name, domain)
        drawn = legend_labels(chart)
        assert set(ran) <= drawn, (name, sorted(drawn))


def test_every_registry_row_has_its_own_colour_and_line_style() -> None:
    """Every engine, the machine's or not, draws in a colour and a style of its own, with
    its legend, on synthetic data: adding a row cannot leave a chart without it."""
    labels = [e.label for e in REGISTRY]
    assert len({e.color for e in REGISTRY}) == len(REGISTRY)
    assert len({(e.stroke_width, e.stroke_dash) for e in REGISTRY}) == len(REGISTRY)
    rows = [
        {"engine": label, "source": source, "statistic": "s", "channel": c, "value": c * i}
        for i, label in enumerate(labels)
        for source in ("framework", "reference")
        for c in range(3)
    ]
    per_channel = pd.DataFrame(rows)
    histogram = pd.DataFrame(
        [
            {"engine": label, "start": b, "end": b + 1, "share": 0.1, "binned": 9, "values": 9}
            for label in labels
            for b in range(4)
        ]
    )
    for chart in (
        charts.running_statistics_chart(per_channel, "s"),
        charts.history_chart(per_channel.rename(columns={"channel": "step"}), "s"),
        charts.channel_output_chart(per_channel.drop(columns="source"), "s"),
        charts.output_distribution_chart(histogram),
        charts.output_overview_chart(histogram),
    ):
        for domain in engine_domains(chart.to_dict()):
            assert domain == labels
        assert set(labels) <= legend_labels(chart)


@pytest.mark.parametrize("channels", [5000, 5001, 100_000, 262_144])
def test_a_layer_of_any_allowed_size_draws_binned_past_a_few_thousand_channels(
    channels: int,
) -> None:
    rng = np.random.default_rng(channels)
    variance = rng.lognormal(0.0, 2.0, channels)
    variance[::7] = 1e-7  # where eps decides
    state = {
        "running_var": variance,
        "running_mean": rng.normal(size=channels),
        "weight": np.ones(channels),
        "bias": np.zeros(channels),
    }
    eps = {"PyTorch": 1e-5, "Keras 3": 1e-3}
    stats = charts.layer_statistics(state, eps)
    spec = charts.layer_variance_chart(stats, eps, "bn").to_dict()  # no MaxRowsError
    assert all(len(rows) < 5000 for rows in spec["datasets"].values())
    subtitle = " ".join(spec["title"]["subtitle"])
    assert f"of {channels:,} channels" in subtitle
    binned = charts.layer_bins(stats)
    assert binned["channels"].sum() == channels  # every channel in one bar
    deciding = binned.loc[binned["where"] == "eps decides", "channels"].sum()
    assert deciding == stats["eps_matters"].sum() >= len(variance[::7])
    assert binned["low"].min() == stats["shown_var"].min()
    assert binned["high"].max() == stats["shown_var"].max()
    assert f"in {binned['first'].nunique():,} runs" in subtitle


def test_a_small_layer_draws_every_channel_as_a_point() -> None:
    state = {k: np.ones(4) for k in ("running_mean", "weight", "bias")}
    state["running_var"] = np.array([1e-6, 0.5, 2.0, 1e-4])
    eps = {"PyTorch": 1e-5, "Keras 3": 1e-3}
    spec = charts.layer_variance_chart(charts.layer_statistics(state, eps), eps, "bn").to_dict()
    assert spec["title"]["subtitle"] == [
        "2 of 4 channels have a variance where eps moves the output by more than 0.1 % "
        "between the engines (red). Dashed: each engine's eps."
    ]


def test_the_overview_histogram_bins_a_sample_on_the_whole_outputs_span() -> None:
    scenario, _ = parse_link("?shape=64,32,8,8&input=normal")
    comparison = compare(scenario)
    full = charts.output_histogram(comparison)
    sampled = charts.output_histogram(comparison, sample=charts.OVERVIEW_SAMPLE)
    assert (full["binned"] == 64 * 32 * 8 * 8).all()
    assert (sampled["binned"] == charts.OVERVIEW_SAMPLE).all()
    assert list(sampled["start"]) == list(full["start"])  # the same axis: every value's span
    # a stratified sample of 65,536: each share within a few standard errors of the whole
    error = np.sqrt(full["share"] * (1 - full["share"]) / charts.OVERVIEW_SAMPLE)
    assert (np.abs(sampled["share"] - full["share"]) <= 5 * error + 1e-12).all()
    spec = charts.output_overview_chart(sampled).to_dict()
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "65,536 values of each output" in subtitle
    # more than two engines' lines can coincide: the note says which lies underneath
    assert (charts.COINCIDING in subtitle) == (sampled["engine"].nunique() > 2)


def test_the_overview_spec_is_the_charts_own_with_its_rows_set_in() -> None:
    """The app sends output_overview_spec (the chart without its rows validated once per
    set of engines): it must be exactly what Altair makes of output_overview_chart."""
    for link in ("?v=1", "?shape=8,3&input=normal&engines=torch,keras,keras2"):
        scenario, _ = parse_link(link)
        histogram = charts.output_histogram(compare(scenario), sample=charts.OVERVIEW_SAMPLE)
        spec = charts.output_overview_spec(histogram)
        rows = spec["datasets"][charts.OVERVIEW_DATA].to_dict("records")
        made = {**spec, "datasets": {charts.OVERVIEW_DATA: rows}}
        assert made == charts.output_overview_chart(histogram).to_dict()
        assert spec["data"] == {"name": charts.OVERVIEW_DATA}  # one name for every scenario
        three = histogram["engine"].nunique() > 2
        assert (charts.COINCIDING in spec["title"]["subtitle"]) == three


def test_streamlit_patching_a_sent_overview_spec_leaves_the_next_one_as_altair_makes_it() -> None:
    """st.vega_lite_chart patches a spec's null legend titles in place: the cached frame
    must not be what it patches."""
    from streamlit.elements.vega_charts import _patch_null_legend_titles

    scenario, _ = parse_link("?v=1")
    histogram = charts.output_histogram(compare(scenario), sample=charts.OVERVIEW_SAMPLE)
    _patch_null_legend_titles(charts.output_overview_spec(histogram))
    again = charts.output_overview_spec(histogram)
    made = {
        **again,
        "datasets": {
            charts.OVERVIEW_DATA: again["datasets"][charts.OVERVIEW_DATA].to_dict("records")
        },
    }
    assert made == charts.output_overview_chart(histogram).to_dict()
