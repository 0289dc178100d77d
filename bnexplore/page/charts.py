"""Chart data and chart builders: pure functions from results to small tables to Altair.

Charts get only what they draw: outputs are binned here, never sent whole, and no chart
layer holds more than MAX_ROWS rows. One colour and line style per engine, everywhere: each
engine's row of bnexplore.engines.REGISTRY.
"""

from __future__ import annotations

import copy
import functools

import altair as alt
import numpy as np
import pandas as pd

from bnexplore.engines.registry import BY_LABEL, LABELS
from bnexplore.judge.verdicts import GAP_NAMES
from bnexplore.runs.runner import Comparison

MAX_ROWS = 4000
"""Rows one chart layer holds at most, under Altair's 5000 (its MaxRowsError): lines
sharing a layer are sampled more sparsely, however many engines draw them."""


def _engine_scale(engines: list[str], to: str = "color") -> alt.Scale:
    """Engine label → its registry row's ``to`` (color, stroke_width, stroke_dash), each
    exactly (an ordinal scale: a point scale would interpolate the widths)."""
    values = [getattr(BY_LABEL[e], to) for e in engines]
    return alt.Scale(
        type="ordinal",
        domain=engines,
        range=[list(v) if isinstance(v, tuple) else v for v in values],
    )


def _in_registry_order(data: pd.DataFrame) -> pd.DataFrame:
    """The rows engine by engine in the registry's order: the order the lines are drawn."""
    order = {label: i for i, label in enumerate(BY_LABEL)}
    return data.sort_values("engine", key=lambda e: e.map(order), kind="stable")


ENGINE_LEGEND = alt.Legend(
    orient="top",
    title=None,
    symbolType="stroke",
    symbolStrokeWidth=3,
    symbolOpacity=1,
    columns=3,
)
"""One legend of every engine on a chart: its colour and its dash (Vega-Lite merges the
colour and dash legends of one field into this one), three to a row so that six fit in a
half-width chart."""


def _color(engines: list[str]) -> alt.Color:
    return alt.Color("engine:N", title="engine", scale=_engine_scale(engines), legend=ENGINE_LEGEND)


def _line_style(engines: list[str]) -> dict:
    """Each engine's colour, width and dash from its registry row, in one legend."""
    return {
        "color": _color(engines),
        "strokeWidth": alt.StrokeWidth(
            "engine:N", scale=_engine_scale(engines, "stroke_width"), legend=None
        ),
        "strokeDash": alt.StrokeDash(
            "engine:N", scale=_engine_scale(engines, "stroke_dash"), legend=ENGINE_LEGEND
        ),
    }


def _framework_lines(data: pd.DataFrame, x: alt.X, y: alt.Y, tooltip: list) -> alt.LayerChart:
    """One line per engine in its colour, width and dash, a dot on each point."""
    engines = _engines_in(data)
    base = alt.Chart(_in_registry_order(data)).encode(x=x, y=y, tooltip=tooltip)
    lines = base.mark_line().encode(**_line_style(engines))
    dots = base.mark_circle(size=16, opacity=1).encode(color=_color(engines))
    return lines + dots


def _finish(chart, height: int, title: str, subtitle: str | list[str] | None = None):
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
    """The engines a chart's table holds, in the registry's order (each in its domain)."""
    present = set(data["engine"]) if len(data) else set()
    return [label for label in BY_LABEL if label in present] or list(BY_LABEL)


OVERVIEW_SAMPLE = 1 << 16
"""Values of each output the Overview's distribution bins at most (a sample, drawn evenly
at random; the Outputs tab bins every value)."""


def output_histogram(
    comparison: Comparison, bins: int = 60, quantity: str = "output", sample: int | None = None
) -> pd.DataFrame:
    """Each engine's measured output (or ``quantity``, e.g. grad_x) binned on one shared axis.

    Columns: engine, start, end, share (fraction of the binned elements), binned (how many
    elements were binned), values (how many the output holds). The axis spans the finite
    values; NaN and ±inf fall in no bin. With ``sample``, at most that many values of each
    output are binned: one drawn at random from each of ``sample`` equal runs of its
    elements (a fixed seed), the axis still spanning them all. The bins are counted in
    place, on float64 edges (NumPy's evenly spaced bins: no float64 copy of the output).
    """
    outputs = {
        LABELS[n]: _flat_floats(getattr(r, quantity))
        for n, r in comparison.results.items()
        if getattr(r, quantity) is not None
    }
    spans = [_finite_span(o) for o in outputs.values()]
    spans = [span for span in spans if span is not None]
    columns = ["engine", "start", "end", "share", "binned", "values"]
    if not spans:
        return pd.DataFrame(columns=columns)
    lo = min(low for low, _ in spans)
    hi = max(high for _, high in spans)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    parts = []
    for label, values in outputs.items():
        binned = _stratified(values, sample) if sample else values
        counts, _ = np.histogram(binned, bins=bins, range=(np.float64(lo), np.float64(hi)))
        parts.append(
            pd.DataFrame(
                {
                    "engine": label,
                    "start": edges[:-1],
                    "end": edges[1:],
                    "share": counts / max(binned.size, 1),
                    "binned": binned.size,
                    "values": values.size,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _stratified(values: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` of the values: one at a random place in each of ``size`` equal
    runs (a fixed seed), so no stride can fall in step with the tensor's layout."""
    if values.size <= size:
        return values
    return values[_stratified_places(values.size, size)]


@functools.lru_cache(maxsize=16)
def _stratified_places(count: int, size: int) -> np.ndarray:
    """The places _stratified takes (the same for every output of ``count`` values)."""
    runs = np.arange(size) + np.random.default_rng(0).random(size)
    places = np.minimum((runs * (count / size)).astype(np.intp), count - 1)
    places.flags.writeable = False
    return places


def _flat_floats(values: np.ndarray) -> np.ndarray:
    """The array as one flat float32 or float64 view (float16 and bfloat16 widened)."""
    flat = np.asarray(values).reshape(-1)
    return flat if flat.dtype in (np.float32, np.float64) else flat.astype(np.float32)


def _finite_span(values: np.ndarray) -> tuple[float, float] | None:
    """The smallest and largest finite value, or None where there is none."""
    if not values.size:
        return None
    low, high = float(values.min()), float(values.max())
    if np.isfinite(low) and np.isfinite(high):
        return low, high
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _outlined(histogram: pd.DataFrame) -> pd.DataFrame:
    """The bins in the registry's order, each engine's closed by a point of share 0 at its
    last bin's end: a step-after line then draws the last bin too, and drops to 0."""
    if not len(histogram):
        return histogram
    last = histogram.drop_duplicates("engine", keep="last")
    closing = last.assign(start=last["end"], share=0.0)
    return _in_registry_order(pd.concat([histogram, closing], ignore_index=True))


COINCIDING = (
    "Where lines coincide, the legend's first engine lies underneath, the widest; "
    "dashed lines show what they cover."
)


def output_distribution_chart(
    histogram: pd.DataFrame, what: str = "output", title: str = "Measured output"
) -> alt.LayerChart:
    """Each engine's output (or ``what``) distribution as a step outline over a light fill."""
    engines = _engines_in(histogram)
    base = alt.Chart(_outlined(histogram)).encode(
        x=alt.X("start:Q", title=f"{what} value", axis=alt.Axis(format="~g")),
        y=alt.Y("share:Q", title="share of elements", axis=alt.Axis(format="%"), stack=None),
        tooltip=[
            alt.Tooltip("engine:N"),
            alt.Tooltip("start:Q", title="from", format=".6g"),
            alt.Tooltip("end:Q", title="to", format=".6g"),
            alt.Tooltip("share:Q", title="share", format=".2%"),
        ],
    )
    fill = base.mark_area(interpolate="step-after", opacity=0.15).encode(color=_color(engines))
    outline = base.mark_line(interpolate="step-after").encode(**_line_style(engines))
    chart = (fill + outline).interactive(bind_y=False)
    return _finish(
        chart,
        300,
        f"{title}: distribution of values",
        COINCIDING,
    )


OVERVIEW_DATA = "output_overview"
"""The name of the Overview chart's dataset: the same for every scenario, so that the page
swaps the rows of the chart it has drawn instead of drawing it anew on every change."""


def output_overview_chart(histogram: pd.DataFrame) -> alt.Chart:
    """Where the outputs part, for the Overview: each engine's output distribution as a
    step outline (output_distribution_chart's, without its fill and zoom: one layer). Its
    rows are the dataset OVERVIEW_DATA."""
    chart = _overview_frame(*_overview_key(histogram))
    # validated with the chart, by to_dict
    chart.datasets = {OVERVIEW_DATA: _overview_rows(histogram).to_dict("records")}
    return chart


def output_overview_spec(histogram: pd.DataFrame) -> dict:
    """output_overview_chart(histogram).to_dict(), fast, for st.vega_lite_chart: the chart
    without its rows is built and validated once per set of engines (and note), then its
    rows are set in as a table (Streamlit sends a dataset as Arrow)."""
    return {  # a copy: st.vega_lite_chart patches the spec it is given in place
        **copy.deepcopy(_overview_frame_spec(*_overview_key(histogram))),
        "datasets": {OVERVIEW_DATA: _overview_rows(histogram)},
    }


def _overview_rows(histogram: pd.DataFrame) -> pd.DataFrame:
    return _outlined(histogram)[["engine", "start", "end", "share"]]


def _overview_key(histogram: pd.DataFrame) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the Overview chart draws besides its rows: the engines, and its note's lines."""
    sampled = len(histogram) and bool((histogram["binned"] < histogram["values"]).any())
    note = (
        f"Binned from {int(histogram['binned'].max()):,} values of each output, drawn at "
        "random; the Outputs tab bins them all, and zooms in channel by channel."
        if sampled
        else "The Outputs tab zooms in, channel by channel."
    )
    engines = tuple(_engines_in(histogram))
    # two coinciding lines are told apart by width and colour alone
    return engines, (note, COINCIDING) if len(engines) > 2 else (note,)


@functools.lru_cache(maxsize=64)
def _overview_frame_spec(engines: tuple[str, ...], note: tuple[str, ...]) -> dict:
    return _overview_frame(engines, note).to_dict()


def _overview_frame(engines: tuple[str, ...], note: tuple[str, ...]) -> alt.Chart:
    """The Overview chart without its rows (the named dataset OVERVIEW_DATA). Redrawn on
    every change of a knob, it is kept cheap to draw: on a canvas, and without tooltips
    (the Outputs tab's chart has them)."""
    chart = (
        alt.Chart(alt.NamedData(name=OVERVIEW_DATA))
        .mark_line(interpolate="step-after")
        .encode(
            x=alt.X("start:Q", title="output value", axis=alt.Axis(format="~g")),
            y=alt.Y("share:Q", title="share of elements", axis=alt.Axis(format="%")),
            **_line_style(list(engines)),
        )
    )
    chart = _finish(
        chart, 200, "Where the outputs part: each engine's distribution of values", list(note)
    )
    return chart.properties(usermeta={"embedOptions": {"renderer": "canvas"}})


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
                    for c in _sample(len(values), MAX_CHANNELS, len(comparison.results))
                ]
    return pd.DataFrame(rows, columns=["engine", "source", "statistic", "channel", "value"])


def _engine_lines(data: pd.DataFrame, x: alt.X, y: alt.Y, tooltip: list) -> alt.LayerChart:
    """Framework lines coloured by engine, references as thin dashed black lines on top."""
    framework = _framework_lines(data[data["source"] == "framework"], x, y, tooltip)
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


LAYER_POINTS = 2000
"""Channels of a stored layer drawn one point each at most; a larger layer is binned."""
LAYER_BINS = 800
"""Runs of consecutive channels a larger layer is drawn in: two bars each at most, under
the 2000 marks past which Streamlit draws on a canvas instead of in SVG."""
WHERE_EPS = alt.Scale(domain=["eps decides", "eps negligible"], range=["#C62828", "#777777"])


def _where_eps(stats: pd.DataFrame) -> np.ndarray:
    return np.where(stats["eps_matters"], "eps decides", "eps negligible")


def layer_bins(stats: pd.DataFrame, bins: int = LAYER_BINS) -> pd.DataFrame:
    """A layer's channels in at most ``bins`` runs of consecutive channels, each run split
    into its channels where eps decides and the others: per part, the run's first and last
    channel, how many channels the part holds, and their smallest, median and largest
    running variance (as drawn: shown_var)."""
    per_bin = max(1, -(-len(stats) // bins))
    parts = (
        stats.assign(run=stats["channel"] // per_bin, where=_where_eps(stats))
        .groupby(["run", "where"], sort=True)["shown_var"]
        .agg(channels="size", low="min", median="median", high="max")
        .reset_index()
    )
    first = parts["run"] * per_bin
    last = np.minimum(first + per_bin, len(stats)) - 1
    return parts.assign(first=first, last=last, middle=(first + last) / 2).drop(columns="run")


def layer_variance_chart(stats: pd.DataFrame, eps: dict[str, float], name: str) -> alt.LayerChart:
    """Running variance per channel on a log axis, each engine's eps a horizontal rule.

    Channels whose variance is near or below an eps (output moved by more than 0.1 %
    between the engines) are drawn in red: there, eps decides the output. Past
    LAYER_POINTS channels, a run of consecutive channels (LAYER_BINS runs at most) is drawn
    as two bars, each from the smallest to the largest variance (the median in its
    tooltip): of its channels where eps decides, in red, and of the others, in grey.
    """
    matters = int(stats["eps_matters"].sum()) if len(stats) else 0

    def x(field: str) -> alt.X:
        return alt.X(
            f"{field}:Q",
            title="channel",
            axis=alt.Axis(tickMinStep=1),
            scale=alt.Scale(domain=[-0.5, max(len(stats), 1) - 0.5], nice=False),
        )

    def y(field: str) -> alt.Y:
        return alt.Y(
            f"{field}:Q",
            title="running variance (log)",
            scale=alt.Scale(type="log"),
            axis=alt.Axis(format="~g"),
        )

    where = alt.Color("where:N", scale=WHERE_EPS, legend=alt.Legend(title=None, orient="top"))
    subtitle = [
        f"{matters:,} of {len(stats):,} channels have a variance where eps moves the output "
        "by more than 0.1 % between the engines (red). Dashed: each engine's eps."
    ]
    if len(stats) <= LAYER_POINTS:
        channels = (
            alt.Chart(stats.assign(where=_where_eps(stats)))
            .mark_circle(size=60, opacity=0.9)
            .encode(
                x=x("channel"),
                y=y("shown_var"),
                color=where,
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
    else:
        binned = layer_bins(stats)
        per_bin = int(binned["last"].iloc[0] + 1)
        base = alt.Chart(binned).encode(
            x=x("middle"),
            color=where,
            tooltip=[
                alt.Tooltip("first:Q", title="from channel"),
                alt.Tooltip("last:Q", title="to channel"),
                alt.Tooltip("where:N", title="of these, where"),
                alt.Tooltip("channels:Q", title="channels"),
                alt.Tooltip("low:Q", title="smallest variance", format=".4g"),
                alt.Tooltip("median:Q", title="median variance", format=".4g"),
                alt.Tooltip("high:Q", title="largest variance", format=".4g"),
            ],
        )
        # round caps: a run of equal variances (a bar of no length) still shows, as a dot
        channels = base.mark_rule(strokeWidth=2.5, strokeCap="round", opacity=0.7).encode(
            y=y("low"), y2="high:Q"
        )
        runs = binned["first"].nunique()
        subtitle.append(
            f"{len(stats):,} channels in {runs:,} runs of {per_bin:,}: per run, one bar spans "
            "the variances where eps decides (red), one the others' (grey)."
        )
    lines = pd.DataFrame({"engine": list(eps), "eps": list(eps.values())})
    engines = [label for label in BY_LABEL if label in eps]
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
    chart = alt.layer(channels, rules).resolve_scale(color="independent").interactive(bind_y=False)
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
        f"Where the {name} gap comes from",
        [  # two short lines: a chart in a column is narrow, and Vega cuts a long one
            "Each knob's Shapley share, averaged over",
            "every order of aligning the knobs, each re-run for real.",
        ],
    )


# --- per channel, per step, per sweep point ---------------------------------------------

MAX_CHANNELS = 512
"""Channels drawn on a per-channel line at most; more are sampled evenly (ends kept)."""
MAX_STEPS = 400
"""Passes drawn on a per-pass line at most; more are sampled evenly (ends kept)."""
HEATMAP_CHANNELS, HEATMAP_STEPS = 64, 60
"""Cells of the channel × pass heatmap at most: 3840, under Altair's 5000-row limit."""


def _sample(count: int, limit: int, lines: int = 1) -> np.ndarray:
    """Indices of at most ``limit`` of ``count`` points, evenly spread (ends kept); fewer
    where ``lines`` lines of them share one chart layer, to keep it within MAX_ROWS."""
    limit = min(limit, max(2, MAX_ROWS // max(lines, 1)))
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
        channels = _sample(x.shape[1], MAX_CHANNELS, len(comparison.results))
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


def channel_output_chart(stats: pd.DataFrame, statistic: str) -> alt.LayerChart:
    """One output statistic per channel, one line per engine."""
    chart = _framework_lines(
        stats[stats["statistic"] == statistic],
        alt.X("channel:Q", title="channel", axis=alt.Axis(tickMinStep=1)),
        alt.Y(
            "value:Q",
            title=statistic,
            scale=alt.Scale(zero=False, nice=True),
            axis=alt.Axis(format="~g"),
        ),
        [
            alt.Tooltip("engine:N"),
            alt.Tooltip("channel:Q"),
            alt.Tooltip("value:Q", format=".7g"),
        ],
    ).interactive(bind_y=False)
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
                    for i in _sample(len(values), MAX_STEPS, len(comparison.results))
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
    from bnexplore.runs.metrics import TOLERANCES

    rtol, atol = TOLERANCES[comparison.scenario["dtype"]]
    names = [n for n, r in comparison.results.items() if r.history is not None]
    lines = len(names) * (len(names) - 1)  # pairs × 2 statistics, on one chart
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
                        *(v[_sample(len(shared), MAX_STEPS, lines)] for v in (shared, gap, tol)),
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
                    for i in _sample(len(values), MAX_STEPS, len(comparison.results))
                ]
    return pd.DataFrame(rows, columns=["engine", "source", "statistic", "step", "value"])
