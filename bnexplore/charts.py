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

COLORS = {"PyTorch": "#EE4C2C", "Keras 3": "#1565C0"}
REFERENCE_SUFFIX = " rules (float64)"


def _color(title: str | None = None) -> alt.Color:
    labels = list(COLORS)
    return alt.Color(
        "engine:N",
        title=title or "engine",
        scale=alt.Scale(domain=labels, range=[COLORS[k] for k in labels]),
        legend=alt.Legend(orient="top"),
    )


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
            if counts[i]
        ]
    return pd.DataFrame(rows)


def output_distribution_chart(histogram: pd.DataFrame) -> alt.Chart:
    """Overlaid histograms of the measured outputs."""
    return (
        alt.Chart(histogram, title="Measured output: distribution of values")
        .mark_bar(opacity=0.55, binSpacing=0)
        .encode(
            x=alt.X("start:Q", title="output value", bin="binned"),
            x2="end:Q",
            y=alt.Y("share:Q", title="share of elements", axis=alt.Axis(format="%"), stack=None),
            color=_color(),
            tooltip=[
                alt.Tooltip("engine:N"),
                alt.Tooltip("start:Q", title="from", format=".6g"),
                alt.Tooltip("end:Q", title="to", format=".6g"),
                alt.Tooltip("share:Q", title="share", format=".2%"),
            ],
        )
        .properties(height=260)
        .interactive(bind_y=False)
    )


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
        alt.Chart(data, title=f"{statistic.capitalize()} per channel after the measured pass")
        .mark_line(point=alt.OverlayMarkDef(size=18), strokeWidth=1.6)
        .encode(
            x=alt.X("channel:Q", title="channel", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title=statistic, scale=alt.Scale(zero=False)),
            color=_color(),
            strokeDash=alt.StrokeDash(
                "source:N",
                title="computed by",
                scale=alt.Scale(domain=["framework", "reference"], range=[[1, 0], [5, 3]]),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=[
                alt.Tooltip("engine:N"),
                alt.Tooltip("source:N", title="computed by"),
                alt.Tooltip("channel:Q"),
                alt.Tooltip("value:Q", format=".7g"),
            ],
        )
        .properties(height=200)
        .interactive(bind_y=False)
    )
