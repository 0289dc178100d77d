"""Chart data and chart builders: pure functions from results to small tables to Altair.

Charts get only what they draw: outputs are binned here, never sent whole.
One colour per engine, everywhere.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from bnexplore.engines import LABELS
from bnexplore.runner import Comparison
from bnexplore.story import GAP_NAMES

COLORS = {
    "PyTorch": "#E4572E",
    "Keras 3": "#1F5FBF",
    "Keras 2": "#2A9D8F",
    "PyTorch (CUDA)": "#8E3B1F",
}
"""One colour per engine, on every chart."""


def _engine_scale(engines: list[str] | None = None) -> alt.Scale:
    labels = engines or list(COLORS)
    return alt.Scale(domain=labels, range=[COLORS[k] for k in labels])


def _color(engines: list[str] | None = None) -> alt.Color:
    return alt.Color(
        "engine:N",
        title="engine",
        scale=_engine_scale(engines),
        legend=alt.Legend(orient="top", title=None),
    )


def _stroke_width(engines: list[str]) -> alt.StrokeWidth:
    """Wider lines for engines drawn first, so identical lines stay visible under each other."""
    widths = {"PyTorch": 5.0, "Keras 3": 2.5, "Keras 2": 1.2, "PyTorch (CUDA)": 1.8}
    return alt.StrokeWidth(
        "engine:N",
        scale=alt.Scale(domain=engines, range=[widths[e] for e in engines]),
        legend=None,
    )


def _finish(chart, height: int, title: str, subtitle: str | None = None):
    """Title on the left, the plot ``height`` px tall, width fitted to the container."""
    return chart.properties(
        height=height,
        title=alt.TitleParams(
            title,
            subtitle=subtitle or [],
            anchor="start",
            fontSize=14,
            subtitleColor="#555",
            offset=8,
        ),
        autosize=alt.AutoSizeParams(type="fit-x", contains="padding"),
    )


REFERENCE_NOTE = "Thin dashed black lines: each framework's rules computed in float64."


def _engines_in(data: pd.DataFrame) -> list[str]:
    present = set(data["engine"]) if len(data) else set()
    return [label for label in COLORS if label in present] or list(COLORS)


def output_histogram(
    comparison: Comparison, bins: int = 60, quantity: str = "output"
) -> pd.DataFrame:
    """Each engine's measured output (or ``quantity``, e.g. grad_x) binned on one shared axis.

    Columns: engine, start, end, share (fraction of that engine's elements).
    """
    outputs = {
        LABELS[n]: np.asarray(getattr(r, quantity), dtype=np.float64).ravel()
        for n, r in comparison.results.items()
        if getattr(r, quantity) is not None
    }
    finite = [o[np.isfinite(o)] for o in outputs.values()]
    finite = [o for o in finite if o.size]
    if not finite:
        return pd.DataFrame(columns=["engine", "start", "end", "share"])
    lo = min(o.min() for o in finite)
    hi = max(o.max() for o in finite)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    rows = []
    for label, values in outputs.items():
        counts, _ = np.histogram(values[np.isfinite(values)], bins=edges)
        share = counts / max(values.size, 1)
        rows += [
            {"engine": label, "start": edges[i], "end": edges[i + 1], "share": share[i]}
            for i in range(bins)
        ]
    return pd.DataFrame(rows)


def output_distribution_chart(
    histogram: pd.DataFrame, what: str = "output", title: str = "Measured output"
) -> alt.LayerChart:
    """Each engine's output (or ``what``) distribution as a step outline over a light fill."""
    engines = _engines_in(histogram)
    base = alt.Chart(histogram).encode(
        x=alt.X("start:Q", title=f"{what} value", axis=alt.Axis(format="~g")),
        y=alt.Y("share:Q", title="share of elements", axis=alt.Axis(format="%"), stack=None),
        tooltip=[
            alt.Tooltip("engine:N"),
            alt.Tooltip("start:Q", title="from", format=".6g"),
            alt.Tooltip("end:Q", title="to", format=".6g"),
            alt.Tooltip("share:Q", title="share", format=".2%"),
        ],
    )
    fill = base.mark_area(interpolate="step-after", opacity=0.15).encode(
        color=alt.Color("engine:N", scale=_engine_scale(engines), legend=None)
    )
    outline = base.mark_line(interpolate="step-after").encode(
        color=_color(engines), strokeWidth=_stroke_width(engines)
    )
    chart = (fill + outline).interactive(bind_y=False)
    return _finish(
        chart,
        300,
        f"{title}: distribution of values",
        "Where lines coincide, the wider one underneath is the first engine.",
    )


def running_statistics(comparison: Comparison) -> pd.DataFrame:
    """Running mean and variance per channel after the measured pass.

    Columns: engine, source ("framework" or "reference"), statistic, channel, value.
    """
    return _per_channel(
        comparison, {"running_mean": "running mean", "running_var": "running variance"}
    )


def _per_channel(comparison: Comparison, labels: dict[str, str]) -> pd.DataFrame:
    """Each per-channel array named in ``labels`` (EngineResult attribute → statistic), of
    every engine and reference, one row per (sampled) channel."""
    rows = []
    sources = [("framework", comparison.results), ("reference", comparison.references)]
    for source, results in sources:
        for name, r in results.items():
            engine = LABELS[name.removesuffix("_reference")]
            for quantity, statistic in labels.items():
                values = getattr(r, quantity)
                if values is None:
                    continue
                values = np.asarray(values, dtype=np.float64)
                rows += [
                    {
                        "engine": engine,
                        "source": source,
                        "statistic": statistic,
                        "channel": int(c),
                        "value": float(values[c]),
                    }
                    for c in _sample(len(values), MAX_CHANNELS)
                ]
    return pd.DataFrame(rows, columns=["engine", "source", "statistic", "channel", "value"])


def _engine_lines(data: pd.DataFrame, x: alt.X, y: alt.Y, tooltip: list) -> alt.LayerChart:
    """Framework lines coloured by engine, references as thin dashed black lines on top."""
    engines = _engines_in(data)
    framework = (
        alt.Chart(data[data["source"] == "framework"])
        .mark_line(point=alt.OverlayMarkDef(size=16))
        .encode(
            x=x, y=y, color=_color(engines), strokeWidth=_stroke_width(engines), tooltip=tooltip
        )
    )
    reference = (
        alt.Chart(data[data["source"] == "reference"])
        .mark_line(color="#111", strokeWidth=1, strokeDash=[4, 3])
        .encode(x=x, y=y, detail="engine:N", tooltip=tooltip)
    )
    return framework + reference


def running_statistics_chart(stats: pd.DataFrame, statistic: str) -> alt.LayerChart:
    """One running statistic per channel after the measured pass, one line per engine."""
    data = stats[stats["statistic"] == statistic]
    chart = _engine_lines(
        data,
        alt.X("channel:Q", title="channel", axis=alt.Axis(tickMinStep=1)),
        alt.Y(
            "value:Q",
            title=statistic,
            scale=alt.Scale(zero=False, nice=True),
            axis=alt.Axis(format="~g"),
        ),
        [
            alt.Tooltip("engine:N"),
            alt.Tooltip("source:N", title="computed by"),
            alt.Tooltip("channel:Q"),
            alt.Tooltip("value:Q", format=".7g"),
        ],
    ).interactive(bind_y=False)
    return _finish(
        chart, 240, f"{statistic.capitalize()} per channel, after the measured pass", REFERENCE_NOTE
    )


VARIANCE_FLOOR = 1e-12
"""Where a zero running variance is drawn on the log axis (its tooltip keeps 0)."""


def layer_statistics(state: dict[str, np.ndarray], eps: dict[str, float]) -> pd.DataFrame:
    """One row per channel of a stored layer: its statistics, and how far eps moves it.

    ``eps``: engine label → its eps. ``eps_scale`` is the output ratio
    √((v + eps_min)/(v + eps_max)) between the engines with the smallest and the
    largest eps, in inference on this layer (1: eps does not matter; PyTorch 1e-5 vs
    Keras 1e-3 at v = 1e-4 gives 0.32). ``eps_matters``: that ratio is below 0.999.
    """
    variance = np.asarray(state["running_var"], dtype=np.float64)
    low, high = (min(eps.values()), max(eps.values())) if eps else (0.0, 0.0)
    with np.errstate(all="ignore"):
        scale = np.sqrt((variance + low) / (variance + high))
    return pd.DataFrame(
        {
            "channel": np.arange(len(variance)),
            "running_var": variance,
            "shown_var": np.maximum(variance, VARIANCE_FLOOR),
            "running_mean": np.asarray(state["running_mean"], dtype=np.float64),
            "weight": np.asarray(state["weight"], dtype=np.float64),
            "bias": np.asarray(state["bias"], dtype=np.float64),
            "eps_scale": scale,
            "eps_matters": scale < 0.999,
        }
    )


def layer_variance_chart(stats: pd.DataFrame, eps: dict[str, float], name: str) -> alt.LayerChart:
    """Running variance per channel on a log axis, each engine's eps a horizontal rule.

    Channels whose variance is near or below an eps (output moved by more than 0.1 %
    between the engines) are drawn in red: there, eps decides the output.
    """
    matters = int(stats["eps_matters"].sum()) if len(stats) else 0
    where = np.where(stats["eps_matters"], "eps decides", "eps negligible")
    points = (
        alt.Chart(stats.assign(where=where))
        .mark_circle(size=60, opacity=0.9)
        .encode(
            x=alt.X(
                "channel:Q",
                title="channel",
                axis=alt.Axis(tickMinStep=1),
                scale=alt.Scale(domain=[-0.5, max(len(stats), 1) - 0.5], nice=False),
            ),
            y=alt.Y(
                "shown_var:Q",
                title="running variance (log)",
                scale=alt.Scale(type="log"),
                axis=alt.Axis(format="~g"),
            ),
            color=alt.Color(
                "where:N",
                scale=alt.Scale(
                    domain=["eps decides", "eps negligible"], range=["#C62828", "#777777"]
                ),
                legend=alt.Legend(title=None, orient="top"),
            ),
            tooltip=[
                alt.Tooltip("channel:Q"),
                alt.Tooltip("running_var:Q", title="running variance", format=".4g"),
                alt.Tooltip("running_mean:Q", title="running mean", format=".4g"),
                alt.Tooltip("weight:Q", title="γ (weight)", format=".4g"),
                alt.Tooltip("bias:Q", title="β (bias)", format=".4g"),
                alt.Tooltip("eps_scale:Q", title="output ratio from eps", format=".4f"),
            ],
        )
    )
    lines = pd.DataFrame({"engine": list(eps), "eps": list(eps.values())})
    engines = [label for label in COLORS if label in eps]
    rules = (
        alt.Chart(lines)
        .mark_rule(strokeDash=[6, 3], strokeWidth=2)
        .encode(
            y="eps:Q",
            color=alt.Color(
                "engine:N",
                scale=_engine_scale(engines),
                legend=alt.Legend(orient="top", title="eps of"),
            ),
            tooltip=[alt.Tooltip("engine:N"), alt.Tooltip("eps:Q", format="g")],
        )
    )
    chart = alt.layer(points, rules).resolve_scale(color="independent").interactive(bind_y=False)
    subtitle = (
        f"{matters} of {len(stats)} channels have a variance where eps moves the output by "
        "more than 0.1 % between the engines (red). Dashed: each engine's eps."
    )
    return _finish(chart, 280, f"Layer {name}: running variance per channel", subtitle)


def explain_steps(steps) -> pd.DataFrame:
    """One row per explain step: the gap it is about (``of``), its share of that gap, or
    how much it widens it.

    ``share`` is the knob's Shapley share (negative for a knob that widens the gap: its
    Shapley value over the scenario's gap, drawn left of zero).
    """
    rows = []
    for i, step in enumerate(steps):
        gap = step.gap_before or 0.0
        if step.knob == "what remains":
            kind, share = "what remains", step.share
        elif step.widens is not None:
            kind, share = "widens the gap", -step.widens / gap if gap else None
        else:
            kind, share = "closes the gap", step.share
        rows.append(
            {
                "order": i,
                "of": step.of,
                "knob": step.knob,
                "cause": step.cause,
                "share": share,
                "kind": kind,
                "gap_after": step.gap_after,
            }
        )
    columns = ["order", "of", "knob", "cause", "share", "kind", "gap_after"]
    return pd.DataFrame(rows, columns=columns)


def attribution_chart(steps: pd.DataFrame, of: str = "output") -> alt.Chart:
    """Each knob's Shapley share of one gap (widening knobs left of zero), then what
    remains. ``of``: "output", "running_mean", "running_var", "gamma", "beta", "grad_x"."""
    kinds = ["closes the gap", "widens the gap", "what remains"]
    rows = steps[steps["of"] == of].dropna(subset=["share"])
    name = GAP_NAMES[of]
    chart = (
        alt.Chart(rows)
        .mark_bar(size=22)
        .encode(
            y=alt.Y(
                "knob:N", title=None, sort=alt.SortField("order"), axis=alt.Axis(labelLimit=200)
            ),
            x=alt.X(
                "share:Q",
                title=f"share of the gap (max |Δ| of the {name}s)"
                if of == "output"
                else f"share of the gap (max |Δ| of the {name})",
                axis=alt.Axis(format="%"),
            ),
            color=alt.Color(
                "kind:N",
                title=None,
                scale=alt.Scale(domain=kinds, range=["#7A9E7E", "#B56576", "#AAAAAA"]),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=[
                alt.Tooltip("cause:N"),
                alt.Tooltip("share:Q", title="share", format=".1%"),
                alt.Tooltip("gap_after:Q", title="gap with this knob alone aligned", format=".6g"),
            ],
        )
    )
    return _finish(
        chart,
        max(120, 36 * len(rows)),
        f"Where the {name} gap comes from: each knob's Shapley share",
        "Averaged over every order of aligning the knobs, each order re-run for real.",
    )


# --- per channel, per step, per sweep point ---------------------------------------------

MAX_CHANNELS = 512
"""Channels drawn on a per-channel line at most; more are sampled evenly (ends kept)."""
MAX_STEPS = 400
"""Passes drawn on a per-pass line at most; more are sampled evenly (ends kept)."""
HEATMAP_CHANNELS, HEATMAP_STEPS = 64, 60
"""Cells of the channel × pass heatmap at most: 3840, under Altair's 5000-row limit."""


def _sample(count: int, limit: int) -> np.ndarray:
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


def channel_output_stats(comparison: Comparison) -> pd.DataFrame:
    """Per-channel mean and std of each engine's measured output (float64, ddof=0)."""
    rows = []
    for name, r in comparison.results.items():
        if r.output is None:
            continue
        x = np.asarray(r.output, dtype=np.float64)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        with np.errstate(all="ignore"):
            stats = {"output mean": x.mean(axis=axes), "output std": x.std(axis=axes)}
        channels = _sample(x.shape[1], MAX_CHANNELS)
        for statistic, values in stats.items():
            rows += [
                {
                    "engine": LABELS[name],
                    "statistic": statistic,
                    "channel": int(c),
                    "value": float(values[c]),
                }
                for c in channels
            ]
    return pd.DataFrame(rows, columns=["engine", "statistic", "channel", "value"])


def channel_output_chart(stats: pd.DataFrame, statistic: str) -> alt.Chart:
    """One output statistic per channel, one line per engine."""
    data = stats[stats["statistic"] == statistic]
    engines = _engines_in(data)
    chart = (
        alt.Chart(data)
        .mark_line(point=alt.OverlayMarkDef(size=16))
        .encode(
            x=alt.X("channel:Q", title="channel", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y(
                "value:Q",
                title=statistic,
                scale=alt.Scale(zero=False, nice=True),
                axis=alt.Axis(format="~g"),
            ),
            color=_color(engines),
            strokeWidth=_stroke_width(engines),
            tooltip=[
                alt.Tooltip("engine:N"),
                alt.Tooltip("channel:Q"),
                alt.Tooltip("value:Q", format=".7g"),
            ],
        )
        .interactive(bind_y=False)
    )
    what = statistic.removeprefix("output ")
    return _finish(chart, 240, f"Measured output: {what} of each channel")


def running_history(comparison: Comparison) -> pd.DataFrame:
    """Running statistics after each pass, averaged over channels, per engine and source."""
    rows = []
    sources = [("framework", comparison.results), ("reference", comparison.references)]
    for source, results in sources:
        for name, r in results.items():
            if r.history is None:
                continue
            engine = LABELS[name.removesuffix("_reference")]
            for statistic in ("running_mean", "running_var"):
                values = r.history[statistic].mean(axis=1)
                label = statistic.replace("_", " ").replace("var", "variance")
                rows += [
                    {
                        "engine": engine,
                        "source": source,
                        "statistic": label,
                        "step": int(r.history["step"][i]),
                        "value": float(values[i]),
                    }
                    for i in _sample(len(values), MAX_STEPS)
                ]
    return pd.DataFrame(rows, columns=["engine", "source", "statistic", "step", "value"])


def history_chart(history: pd.DataFrame, statistic: str) -> alt.LayerChart:
    """A running statistic (mean over channels) over the passes; nearest-pass tooltip."""
    data = history[history["statistic"] == statistic]
    framework = data[data["source"] == "framework"]
    x = alt.X(
        "step:Q",
        title="pass (the last one is the measured pass)",
        axis=alt.Axis(tickMinStep=1, format="d"),
    )
    lines = _engine_lines(
        data,
        x,
        alt.Y(
            "value:Q",
            title=f"{statistic}, mean over channels",
            scale=alt.Scale(zero=False, nice=True),
            axis=alt.Axis(format="~g"),
        ),
        [
            alt.Tooltip("engine:N"),
            alt.Tooltip("source:N", title="computed by"),
            alt.Tooltip("step:Q", title="pass"),
            alt.Tooltip("value:Q", format=".7g"),
        ],
    )
    nearest = alt.selection_point(nearest=True, on="pointerover", fields=["step"], empty=False)
    present = [e for e in _engines_in(framework) if e in set(framework["engine"])]
    tooltip = [alt.Tooltip("step:Q", title="pass")] + [
        alt.Tooltip(f"{e}:Q", format=".7g") for e in present
    ]
    pivot = alt.Chart(framework).transform_pivot("engine", value="value", groupby=["step"])
    if len(present) >= 2:
        a, b = present[:2]
        pivot = pivot.transform_calculate(delta=f"datum['{a}'] - datum['{b}']")
        tooltip.append(alt.Tooltip("delta:Q", title=f"Δ ({a} − {b})", format=".4g"))
    rule = (
        pivot.mark_rule(color="#888", strokeWidth=8)
        .encode(
            x="step:Q",
            opacity=alt.condition(nearest, alt.value(0.35), alt.value(0)),
            tooltip=tooltip,
        )
        .add_params(nearest)
    )
    return _finish(lines + rule, 240, f"{statistic.capitalize()} over the passes", REFERENCE_NOTE)


def step_gaps(comparison: Comparison) -> pd.DataFrame:
    """Per pass and pair: max over channels of |Δ| of each running statistic, and the
    assert_close tolerance there (atol + rtol·max |expected|)."""
    from bnexplore.metrics import TOLERANCES

    rtol, atol = TOLERANCES[comparison.scenario["dtype"]]
    names = [n for n, r in comparison.results.items() if r.history is not None]
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ha, hb = comparison.results[a].history, comparison.results[b].history
            shared, ia, ib = np.intersect1d(ha["step"], hb["step"], return_indices=True)
            for statistic in ("running_mean", "running_var"):
                va, vb = ha[statistic][ia], hb[statistic][ib]
                gap = np.abs(va - vb).max(axis=1)
                tol = atol + rtol * np.abs(va).max(axis=1)
                label = statistic.replace("_", " ").replace("var", "variance")
                rows += [
                    {
                        "pair": f"{LABELS[a]} vs {LABELS[b]}",
                        "statistic": label,
                        "step": int(k),
                        "gap": float(g),
                        "tolerance": float(t),
                    }
                    for k, g, t in zip(
                        *(v[_sample(len(shared), MAX_STEPS)] for v in (shared, gap, tol)),
                        strict=True,
                    )
                ]
    return pd.DataFrame(rows, columns=["pair", "statistic", "step", "gap", "tolerance"])


def step_gap_chart(gaps: pd.DataFrame) -> alt.LayerChart:
    """|Δ| of the running statistics per pass, log scale, the tolerance as a dotted line.

    Exact zeros cannot sit on a log axis; they are left out.
    """
    drawn = gaps[gaps["gap"] > 0]
    x = alt.X("step:Q", title="pass", axis=alt.Axis(tickMinStep=1, format="d"))
    lines = (
        alt.Chart(drawn)
        .mark_line(point=alt.OverlayMarkDef(size=16), strokeWidth=2)
        .encode(
            x=x,
            y=alt.Y(
                "gap:Q",
                title="max |Δ| over channels (log)",
                scale=alt.Scale(type="log"),
                axis=alt.Axis(format=".0e"),
            ),
            color=alt.Color(
                "statistic:N",
                title=None,
                legend=alt.Legend(orient="top"),
                scale=alt.Scale(range=["#6A4C93", "#8D6E63"]),
            ),
            detail="pair:N",
            tooltip=[
                alt.Tooltip("pair:N"),
                alt.Tooltip("statistic:N"),
                alt.Tooltip("step:Q"),
                alt.Tooltip("gap:Q", format=".3g"),
                alt.Tooltip("tolerance:Q", format=".3g"),
            ],
        )
    )
    tolerance = (
        alt.Chart(drawn)
        .mark_line(color="#444", strokeDash=[2, 3])
        .encode(x=x, y=alt.Y("max(tolerance):Q"))
    )
    pairs = ", ".join(sorted(set(drawn["pair"]))) if len(drawn) else ""
    return _finish(
        lines + tolerance,
        240,
        "Running statistics: |Δ| per pass",
        f"{pairs}. Dotted: the assert_close tolerance.",
    )


def gap_heatmap(comparison: Comparison) -> pd.DataFrame:
    """Signed running-variance gap (first engine − second) per channel and pass."""
    names = [n for n, r in comparison.results.items() if r.history is not None]
    if len(names) < 2:
        return pd.DataFrame(columns=["step", "channel", "gap"])
    ha, hb = comparison.results[names[0]].history, comparison.results[names[1]].history
    shared, ia, ib = np.intersect1d(ha["step"], hb["step"], return_indices=True)
    gap = ha["running_var"][ia] - hb["running_var"][ib]
    steps = _sample(len(shared), HEATMAP_STEPS)
    channels = _sample(gap.shape[1], HEATMAP_CHANNELS)
    return pd.DataFrame(
        [
            {"step": int(shared[i]), "channel": int(c), "gap": float(gap[i, c])}
            for i in steps
            for c in channels
        ],
        columns=["step", "channel", "gap"],
    ).assign(pair=f"{LABELS[names[0]]} − {LABELS[names[1]]}")


def gap_heatmap_chart(heat: pd.DataFrame) -> alt.Chart:
    """Channel × pass heatmap of the signed gap; white is 0, the scale symmetric."""
    pair = heat["pair"].iloc[0] if len(heat) else ""
    reach = float(heat["gap"].abs().max()) if len(heat) else 1.0
    reach = reach if reach > 0 else 1.0
    chart = (
        alt.Chart(heat)
        .mark_rect()
        .encode(
            x=alt.X("step:O", title="pass", axis=alt.Axis(labelAngle=0, labelOverlap=True)),
            y=alt.Y("channel:O", title="channel", axis=alt.Axis(labelOverlap=True)),
            color=alt.Color(
                "gap:Q",
                title="Δ",
                scale=alt.Scale(scheme="redblue", domain=[-reach, reach], reverse=True),
                legend=alt.Legend(format=".2~e"),
            ),
            tooltip=[
                alt.Tooltip("step:O", title="pass"),
                alt.Tooltip("channel:O"),
                alt.Tooltip("gap:Q", format=".4g"),
            ],
        )
    )
    return _finish(
        chart,
        260,
        "Running variance gap per channel and pass",
        f"{pair}; white is no gap, red where the first engine is higher.",
    )


def sweep_table(points, key: str) -> pd.DataFrame:
    """Each sweep point's gap per pair: value, pair, max_abs, verdict."""
    rows = []
    for point in points:
        for d in point.divergence:
            rows.append(
                {
                    "value": point.value,
                    "pair": f"{LABELS[d['a']]} vs {LABELS[d['b']]}",
                    "max_abs": d["max_abs"],
                    "assert_close": "not compared"
                    if d["allclose"] is None
                    else ("pass" if d["allclose"] else "fail"),
                    "link": point.link,
                }
            )
    return pd.DataFrame(rows, columns=["value", "pair", "max_abs", "assert_close", "link"])


def sweep_chart(table: pd.DataFrame, key: str, log_x: bool) -> alt.Chart:
    """Each pair's max |Δ| against the swept value (log y where every gap is positive)."""
    drawn = table.dropna(subset=["max_abs"])
    positive = len(drawn) and bool((drawn["max_abs"] > 0).all())
    chart = (
        alt.Chart(drawn)
        .mark_line(point=alt.OverlayMarkDef(size=60, filled=True))
        .encode(
            x=alt.X(
                "value:Q",
                title=key,
                scale=alt.Scale(type="log" if log_x else "linear"),
                axis=alt.Axis(format="~g", labelOverlap="greedy"),
            ),
            y=alt.Y(
                "max_abs:Q",
                title="max |Δ| of the outputs" + (" (log)" if positive else ""),
                scale=alt.Scale(type="log" if positive else "linear"),
                axis=alt.Axis(format=".0e" if positive else "~g"),
            ),
            color=alt.Color(
                "pair:N",
                title=None,
                legend=alt.Legend(orient="top"),
                scale=alt.Scale(range=["#6A4C93", "#8D6E63", "#264653"]),
            ),
            shape=alt.Shape(
                "assert_close:N", title="assert_close", legend=alt.Legend(orient="top")
            ),
            tooltip=[
                alt.Tooltip("value:Q", title=key, format=".6g"),
                alt.Tooltip("pair:N"),
                alt.Tooltip("max_abs:Q", title="max |Δ|", format=".4g"),
                alt.Tooltip("assert_close:N"),
            ],
        )
        .interactive(bind_y=False)
    )
    return _finish(chart, 320, f"Gap between the engines as {key} varies")


def to_png(chart: alt.TopLevelMixin) -> bytes:
    """The chart as a PNG, rendered offline by vl-convert."""
    import io

    buffer = io.BytesIO()
    chart.save(buffer, format="png", scale_factor=2)
    return buffer.getvalue()


def to_svg(chart: alt.TopLevelMixin) -> str:
    import io

    buffer = io.StringIO()
    chart.save(buffer, format="svg")
    return buffer.getvalue()


# --- the training step: parameters and gradients ----------------------------------------

PARAMETER_LABELS = {
    "gamma": "γ after training",
    "beta": "β after training",
    "grad_gamma": "dL/dγ",
    "grad_beta": "dL/dβ",
}


def parameters(comparison: Comparison) -> pd.DataFrame:
    """γ and β after the training steps and dL/dγ, dL/dβ of the measured pass, per channel.

    Columns: engine, source ("framework" or "reference"), statistic, channel, value.
    """
    return _per_channel(comparison, PARAMETER_LABELS)


def parameter_chart(data: pd.DataFrame, statistic: str) -> alt.LayerChart:
    """One parameter (or its gradient) per channel, one line per engine."""
    chart = _engine_lines(
        data[data["statistic"] == statistic],
        alt.X("channel:Q", title="channel", axis=alt.Axis(tickMinStep=1)),
        alt.Y("value:Q", title=statistic, scale=alt.Scale(zero=False), axis=alt.Axis(format="~g")),
        [
            alt.Tooltip("engine:N"),
            alt.Tooltip("source:N", title="computed by"),
            alt.Tooltip("channel:Q"),
            alt.Tooltip("value:Q", format=".7g"),
        ],
    ).interactive(bind_y=False)
    return _finish(chart, 240, f"{statistic} per channel", REFERENCE_NOTE)


def parameter_history(comparison: Comparison) -> pd.DataFrame:
    """γ and β after each pass, averaged over channels, per engine and source (the columns
    of running_history, so history_chart draws it)."""
    rows = []
    sources = [("framework", comparison.results), ("reference", comparison.references)]
    for source, results in sources:
        for name, r in results.items():
            history = r.parameter_history
            if history is None:
                continue
            engine = LABELS[name.removesuffix("_reference")]
            for quantity in ("gamma", "beta"):
                if quantity not in history:
                    continue
                values = history[quantity].mean(axis=1)
                rows += [
                    {
                        "engine": engine,
                        "source": source,
                        "statistic": quantity,
                        "step": int(history["step"][i]),
                        "value": float(values[i]),
                    }
                    for i in _sample(len(values), MAX_STEPS)
                ]
    return pd.DataFrame(rows, columns=["engine", "source", "statistic", "step", "value"])
