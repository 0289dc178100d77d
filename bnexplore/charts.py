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

COLORS = {"PyTorch": "#E4572E", "Keras 3": "#1F5FBF", "Keras 2": "#2A9D8F"}
"""One colour per engine, on every chart."""


def _color(engines: list[str] | None = None) -> alt.Color:
    labels = engines or list(COLORS)
    return alt.Color(
        "engine:N",
        title="engine",
        scale=alt.Scale(domain=labels, range=[COLORS[k] for k in labels]),
        legend=alt.Legend(orient="top", title=None),
    )


def _engines_in(data: pd.DataFrame) -> list[str]:
    present = set(data["engine"]) if len(data) else set()
    return [label for label in COLORS if label in present] or list(COLORS)


def output_histogram(comparison: Comparison, bins: int = 60) -> pd.DataFrame:
    """Each engine's measured output binned on one shared axis.

    Columns: engine, start, end, share (fraction of that engine's elements).
    """
    outputs = {
        LABELS[n]: np.asarray(r.output, dtype=np.float64).ravel()
        for n, r in comparison.results.items()
        if r.output is not None
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


def output_distribution_chart(histogram: pd.DataFrame) -> alt.LayerChart:
    """Each engine's output distribution as a step outline over a light fill."""
    base = alt.Chart(histogram, title="Measured output: distribution of values").encode(
        x=alt.X("start:Q", title="output value"),
        y=alt.Y("share:Q", title="share of elements", axis=alt.Axis(format="%"), stack=None),
        color=_color(_engines_in(histogram)),
        tooltip=[
            alt.Tooltip("engine:N"),
            alt.Tooltip("start:Q", title="from", format=".6g"),
            alt.Tooltip("end:Q", title="to", format=".6g"),
            alt.Tooltip("share:Q", title="share", format=".2%"),
        ],
    )
    fill = base.mark_area(interpolate="step-after", opacity=0.18)
    outline = base.mark_line(interpolate="step-after", strokeWidth=2)
    return (fill + outline).properties(height=300).interactive(bind_y=False)


def running_statistics(comparison: Comparison) -> pd.DataFrame:
    """Running mean and variance per channel after the measured pass.

    Columns: engine, source ("framework" or "reference"), statistic, channel, value.
    """
    rows = []
    sources = [("framework", comparison.results), ("reference", comparison.references)]
    for source, results in sources:
        for name, r in results.items():
            engine = LABELS[name.removesuffix("_reference")]
            for statistic, values in (
                ("running mean", r.running_mean),
                ("running variance", r.running_var),
            ):
                if values is None:
                    continue
                rows += [
                    {
                        "engine": engine,
                        "source": source,
                        "statistic": statistic,
                        "channel": c,
                        "value": float(v),
                    }
                    for c, v in enumerate(values)
                ]
    return pd.DataFrame(rows, columns=["engine", "source", "statistic", "channel", "value"])


def running_statistics_chart(stats: pd.DataFrame, statistic: str) -> alt.Chart:
    """One running statistic per channel, one line per engine; references dashed."""
    data = stats[stats["statistic"] == statistic]
    return (
        alt.Chart(data, title=f"{statistic.capitalize()} per channel, after the measured pass")
        .mark_line(point=alt.OverlayMarkDef(size=20), strokeWidth=1.8)
        .encode(
            x=alt.X("channel:Q", title="channel", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title=statistic, scale=alt.Scale(zero=False, nice=True)),
            color=_color(_engines_in(data)),
            strokeDash=alt.StrokeDash(
                "source:N",
                title=None,
                scale=alt.Scale(domain=["framework", "reference"], range=[[1, 0], [6, 4]]),
                legend=alt.Legend(
                    orient="top",
                    symbolType="stroke",
                    symbolStrokeColor="#555",
                    labelExpr="datum.label == 'reference' ? 'float64 rules (dashed)' "
                    ": 'framework (solid)'",
                ),
            ),
            tooltip=[
                alt.Tooltip("engine:N"),
                alt.Tooltip("source:N", title="computed by"),
                alt.Tooltip("channel:Q"),
                alt.Tooltip("value:Q", format=".7g"),
            ],
        )
        .properties(height=260)
        .interactive(bind_y=False)
    )


def explain_steps(steps) -> pd.DataFrame:
    """Waterfall rows: one per explain step, the gap before and after it."""
    rows = []
    for i, step in enumerate(steps):
        before = step.gap_before or 0.0
        after = 0.0 if step.gap_after is None else step.gap_after
        rows.append(
            {
                "order": i,
                "knob": f"{i + 1}. {step.knob}",
                "cause": step.cause,
                "before": before,
                "after": after,
                "closed": before - after,
                "kind": "left as is"
                if step.gap_after is None
                else ("closes the gap" if after <= before else "widens the gap"),
            }
        )
    return pd.DataFrame(
        rows, columns=["order", "knob", "cause", "before", "after", "closed", "kind"]
    )


def waterfall_chart(steps: pd.DataFrame) -> alt.Chart:
    """Floating bars from the gap before each alignment to the gap after it."""
    kinds = ["closes the gap", "widens the gap", "left as is"]
    return (
        alt.Chart(steps, title="Where the gap goes: max |Δ| as each knob is aligned")
        .mark_bar(size=38)
        .encode(
            x=alt.X(
                "knob:N",
                title="aligned in turn",
                sort=alt.SortField("order"),
                axis=alt.Axis(labelAngle=0, labelLimit=160),
            ),
            y=alt.Y("before:Q", title="max |Δ| of the measured outputs"),
            y2="after:Q",
            color=alt.Color(
                "kind:N",
                title=None,
                scale=alt.Scale(domain=kinds, range=["#2A9D8F", "#E76F51", "#999"]),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=[
                alt.Tooltip("cause:N"),
                alt.Tooltip("before:Q", title="gap before", format=".6g"),
                alt.Tooltip("after:Q", title="gap after", format=".6g"),
            ],
        )
        .properties(height=300)
    )
