"""The Model tab's tables and chart, from a :class:`~bnexplore.judge.audit.ModelAudit`
(pure functions: typed results in, frames and Altair charts out)."""

from __future__ import annotations

import threading

import altair as alt
import pandas as pd
from cachetools import LRUCache

from bnexplore.engines import LABELS
from bnexplore.judge.audit import ModelAudit, audit
from bnexplore.judge.verdicts import VERDICT_WORDS, percent, verdict
from bnexplore.page.charts import _engine_scale, _finish
from bnexplore.scenario.links import Scenario

PORT_WORDS = {"naive": "naive (its default eps)", "faithful": "faithful (the source's eps)"}
POINT_LEGEND = alt.Legend(orient="top", title=None, symbolType="circle", symbolOpacity=1, columns=3)
"""The engines' legend on a chart of points (the line charts' legend draws strokes)."""
GAP_FLOOR = 1e-12
"""A gap of exactly 0 is drawn at this floor of the log axis (its tooltip says 0)."""


def _cause_words(audit: ModelAudit, layer) -> str:
    """The naive port's causes, worst engine first: "keras_eps 100 % (keras, keras_jax)"."""
    named: dict[str, list[str]] = {}
    for engine, causes in layer.causes.get("naive", {}).items():
        for cause in causes:
            if cause.share:
                named.setdefault(f"{cause.knob} {percent(cause.share)}", []).append(engine)
    return "; ".join(f"{what} ({', '.join(engines)})" for what, engines in named.items())


def layers_word(count: int) -> str:
    return f"{count} BatchNorm layer{'s' if count != 1 else ''}"


def headline(audit: ModelAudit) -> str:
    """The Model tab's answer on top: the layer the table puts first (the largest naive
    gap relative to the layer's own largest output, max |Δ| / max |y|), its max |Δ| and the
    engine it is largest in, as the single-layer page names its pair."""
    if not audit.layers:
        return "No BatchNorm layer of this file could be audited"
    where = audit.worst_first()[0]
    measured = [(d.max_abs, name, d) for name, d in where.naive.items() if d.max_abs is not None]
    if not measured:
        return f"{layers_word(len(audit.layers))}: no port could be compared"
    _, engine, worst = max(measured, key=lambda m: m[0])
    size = f"max |Δ| = {worst.max_abs:.4g}"
    found = {verdict(d) for layer in audit.layers for d in layer.naive.values()}
    if "differ" not in found:
        words = VERDICT_WORDS["rounding" if "rounding" in found else "agree"]
        return f"{size}: the naive ports of every layer {words}"
    relative = where.relative("naive", engine)
    share = f" ({percent(relative)} of its largest output)" if relative is not None else ""
    return f"{size}{share}: layer {where.name}, ported naively to {LABELS[engine]}"


def port_verdicts(audit: ModelAudit) -> list[tuple[str, str]]:
    """(words, verdict) under the headline: each kind of port's worst verdict over every
    layer and engine, with how many layers differ; the port file's, where one is given."""
    rank = {"not compared": -1, "agree": 0, "rounding": 1, "differ": 2}
    said = []
    for port in ("naive", "faithful"):
        worst, differing = "not compared", 0
        for layer in audit.layers:
            found = [
                verdict(d) for d in (layer.naive if port == "naive" else layer.faithful).values()
            ]
            differing += "differ" in found
            worst = max([worst, *found], key=rank.__getitem__)
        words = VERDICT_WORDS[worst]
        if worst == "differ":
            words += f" in {differing} of {len(audit.layers)} layers"
        said.append((f"{port} ports: {words}", worst))
    if audit.port is not None:
        wrong, training = audit.port.wrong()
        total = len(audit.port.findings)
        words = (
            f"the port file: {wrong} of {total} layers wrong ({audit.port.tally()})"
            if wrong
            else f"the port file: all {total} layers right at inference"
        )
        if training:
            words += (
                f"; the momentum of {layers_word(training)} is not the source's, which shows "
                "once it trains"
            )
        said.append((words, "differ" if wrong or training else "agree"))
    return said


def layer_table(audit: ModelAudit) -> pd.DataFrame:
    """One row per layer, worst first: its naive and faithful max |Δ| per target engine,
    its eps-sensitive channels, the naive gap's cause and the layer's link."""
    rows = []
    for rank, layer in enumerate(audit.worst_first(), 1):
        row = {
            "rank": rank,
            "layer": layer.name,
            "channels": layer.layer.channels,
            "eps": layer.eps,
            "min var": float(layer.layer.state["running_var"].min()),
        }
        for engine in audit.engines[1:]:
            row[f"{engine} naive"] = layer.naive[engine].max_abs
            row[f"{engine} faithful"] = layer.faithful[engine].max_abs
            row[f"{engine} eps-sensitive channels"] = layer.sensitive[engine]
        row["worst naive"] = layer.worst
        row["cause"] = _cause_words(audit, layer)
        row["link"] = layer.scenario.link
        rows.append(row)
    return pd.DataFrame(rows)


def gap_frame(audit: ModelAudit) -> pd.DataFrame:
    """Long form for the chart: layer, rank, engine (label), port, max |Δ| and verdict."""
    rows = []
    for rank, layer in enumerate(audit.worst_first(), 1):
        for port in ("naive", "faithful"):
            gaps = layer.naive if port == "naive" else layer.faithful
            for engine, d in gaps.items():
                if d.max_abs is None:
                    continue
                rows.append(
                    {
                        "layer": layer.name,
                        "rank": rank,
                        "engine": LABELS[engine],
                        "port": port,
                        "max_abs": d.max_abs,
                        "drawn": max(d.max_abs, GAP_FLOOR),
                        "verdict": verdict(d),
                    }
                )
    return pd.DataFrame(
        rows, columns=["layer", "rank", "engine", "port", "max_abs", "drawn", "verdict"]
    )


def gap_chart(frame: pd.DataFrame, source: str) -> alt.Chart:
    """Each layer's gap from the source's own run: one colour per engine, the naive port
    (filled) beside the faithful one (hollow), on a log axis, layers worst first."""
    engines = [e for e in LABELS.values() if e in set(frame["engine"])]
    order = list(dict.fromkeys(frame.sort_values("rank")["layer"]))
    chart = (
        alt.Chart(frame)
        .mark_point(size=70, filled=True)
        .encode(
            x=alt.X(
                "layer:N",
                sort=order,
                title="layer (worst first)",
                axis=alt.Axis(labelAngle=-60, labelLimit=400),  # a layer's whole name
            ),
            y=alt.Y("drawn:Q", scale=alt.Scale(type="log"), title=f"max |Δ| vs {source}"),
            color=alt.Color(
                "engine:N", title="engine", scale=_engine_scale(engines), legend=POINT_LEGEND
            ),
            shape=alt.Shape(
                "port:N",
                scale=alt.Scale(domain=["naive", "faithful"], range=["circle", "triangle-up"]),
                legend=alt.Legend(orient="top", title="port"),
            ),
            xOffset=alt.XOffset("port:N", scale=alt.Scale(domain=["naive", "faithful"])),
            tooltip=[
                "layer",
                "engine",
                "port",
                alt.Tooltip("max_abs:Q", title="max |Δ|", format=".4g"),
                "verdict",
            ],
        )
    )
    return _finish(
        chart,
        300,
        "The gap of each layer, each engine, each port",
        "naive: the target's default epsilon; faithful: the source's. 0 is drawn at 1e-12.",
    )


def findings_table(audit: ModelAudit) -> pd.DataFrame:
    """The port check, one row per finding."""
    rows = []
    for f in audit.port.findings if audit.port else ():
        rows.append(
            {
                "layer": f.layer or "—",
                "port layer": f.port_layer or "—",
                "matched by": f.matched_by or "—",
                "problems": ", ".join(f.problems),
                "evidence": f.evidence,
                "at inference": _inference_words(f.gap),
                "max |Δ|": None if f.gap is None else f.gap.max_abs,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "layer",
            "port layer",
            "matched by",
            "problems",
            "evidence",
            "at inference",
            "max |Δ|",
        ],
    )


def _inference_words(gap) -> str:
    """The port layer's output against its source's, in words: the verdict, or why the
    two could not be compared (a port layer no framework can run)."""
    if gap is None:
        return "—"
    found = verdict(gap)
    if found == "not compared":
        return f"not compared: {gap.reason}" if gap.reason else "not compared"
    return f"outputs {VERDICT_WORDS[found]}"


AUDIT_KEYS = (
    "state",
    "port",
    "engines",
    "source",
    "source_eps",
    "source_momentum",
    "seed",
    "audit_n",
    "audit_hw",
    "dtype",
    "device",
)
"""What an audit depends on: the link's other keys are the single-layer scenario's."""


class AuditCache:
    """Audits by what they depend on, shared by every session of the server: a teammate
    opening the same audit link gets it at once. Holds no outputs, only figures."""

    def __init__(self, max_entries: int = 8) -> None:
        self._audits: LRUCache = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()

    def audit(self, scenario: Scenario, report=None) -> ModelAudit:
        key = tuple((k, scenario[k]) for k in AUDIT_KEYS)
        with self._lock:
            found = self._audits.get(key)
        if found is None:
            found = audit(scenario, (), report)
            with self._lock:
                self._audits[key] = found
        return found
