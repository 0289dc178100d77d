"""Chart builders: pure functions from results to valid Vega-Lite, fed small data."""

from __future__ import annotations

import pytest

from bnexplore import charts
from bnexplore.explain import explain
from bnexplore.runner import compare
from bnexplore.scenario import parse_link
from bnexplore.sweep import run_sweep, values


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
