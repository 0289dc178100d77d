"""bnexplore: why do PyTorch and Keras BatchNorm give different numbers?

Run with ``streamlit run app.py``. The address bar is always a link that
reproduces the scenario and its numbers.
"""

from __future__ import annotations

import json

import streamlit as st

from bnexplore import charts, compare, parse_link
from bnexplore.engines import ENGINES, LABELS, EngineUnavailable, load
from bnexplore.params import DEFAULTS
from bnexplore.presets import matching
from bnexplore.story import VERDICT_WORDS, headline, verdict
from bnexplore.widgets import sidebar

st.set_page_config(page_title="bnexplore · BatchNorm, PyTorch vs Keras", layout="wide")


@st.cache_resource(show_spinner="Loading PyTorch and TensorFlow…")
def load_engines() -> dict[str, str]:
    """Import each framework once per server; name → why it is missing ('' if loaded)."""
    missing = {}
    for name in ENGINES:
        try:
            load(name)
            missing[name] = ""
        except EngineUnavailable as exc:
            missing[name] = str(exc)
    return missing


@st.cache_data(max_entries=32, show_spinner=False)
def results(link: str, _report=None) -> dict:
    """Everything the page draws for one canonical link: small, so cheap to cache."""
    scenario, _ = parse_link(link)
    comparison = compare(scenario, report=_report)
    return {
        "document": comparison.document(),
        "headline": headline(comparison),
        "verdicts": [verdict(d) for d in comparison.divergence],
        "histogram": charts.output_histogram(comparison),
        "running": charts.running_statistics(comparison),
    }


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.7g}"


missing_engines = load_engines()
scenario, notices = sidebar()

st.title("BatchNorm: PyTorch vs Keras")
st.caption(
    "Configure a BatchNorm scenario in the sidebar; it runs for real in each framework. "
    "The address bar is always a link that reproduces it."
)
for name, why in missing_engines.items():
    if why:
        st.error(f"{LABELS[name]} is missing, the page shows the others: {why}")
if notices:
    st.warning("Parts of the link were not used:\n\n" + "\n".join(f"- {n}" for n in notices))

progress = st.progress(0.0, text="Running…")
view = results(scenario.link, _report=lambda done, text: progress.progress(min(done, 1.0), text))
progress.empty()
doc = view["document"]

# --- the answer ---------------------------------------------------------------
BADGES = {
    "agree": ":green-badge",
    "rounding": ":blue-badge",
    "differ": ":red-badge",
    "not compared": ":gray-badge",
}
verdict_now = view["verdicts"][0] if view["verdicts"] else "not compared"
st.subheader(view["headline"])
st.markdown(
    f"{BADGES[verdict_now]}[{VERDICT_WORDS[verdict_now]}]  under {scenario['dtype']} tolerances"
)
preset = matching(scenario.values, DEFAULTS)
if preset:
    st.info(f"**Preset {preset.name} — {preset.title}.** {preset.story}")

# --- each framework -------------------------------------------------------------
columns = st.columns(len(doc["engines"]))
for column, (name, engine) in zip(columns, doc["engines"].items(), strict=True):
    with column, st.container(border=True):
        st.markdown(f"#### {LABELS[name]}")
        if not engine["available"]:
            st.error(f"Not run: {engine['reason']}")
            continue
        st.caption(f"{engine['version']} · {engine['device']} — {engine['device_note']}")
        if engine["error"]:
            st.error(f"{LABELS[name]} raised on this scenario:\n\n`{engine['error']}`")
            continue
        out = engine["output"]
        cells = st.columns(4)
        for cell, stat in zip(cells, ("mean", "std", "min", "max"), strict=True):
            cell.metric(f"output {stat}", fmt(out[stat]))
        if engine["running_mean"] is not None:
            rm, rv = engine["running_mean"], engine["running_var"]
            st.caption(
                f"running mean {fmt(min(rm))} … {fmt(max(rm))} · "
                f"running variance {fmt(min(rv))} … {fmt(max(rv))} (over channels)"
            )
        ref = doc.get("reference", {}).get(name)
        if ref and ref["vs_engine"]["max_abs"] is not None:
            gap = ref["vs_engine"]
            words = "within" if gap["allclose"] else "OUTSIDE"
            st.caption(
                f"Against its own rules in float64: max |Δ| {fmt(gap['max_abs'])}, "
                f"{words} {scenario['dtype']} tolerance."
            )

# --- how far apart ---------------------------------------------------------------
for d in doc["divergence"]:
    st.markdown(f"#### {LABELS[d['a']]} vs {LABELS[d['b']]}")
    if d.get("reason"):
        st.info(f"Not compared: {d['reason']}")
        continue
    cells = st.columns(5)
    cells[0].metric("max |Δ|", fmt(d["max_abs"]))
    cells[1].metric("mean |Δ|", fmt(d["mean_abs"]))
    cells[2].metric("RMSE", fmt(d["rmse"]))
    cells[3].metric("max relative", fmt(d["max_rel"]))
    cells[4].metric(
        "assert_close",
        "pass" if d["allclose"] else "fail",
        help=f"torch.testing.assert_close defaults for {scenario['dtype']}: "
        f"rtol {d['rtol']:g}, atol {d['atol']:g}; PyTorch as expected.",
    )

# --- charts -----------------------------------------------------------------------
left, right = st.columns(2)
with left:
    if len(view["histogram"]):
        st.altair_chart(charts.output_distribution_chart(view["histogram"]), width="stretch")
with right:
    if len(view["running"]):
        for statistic in ("running mean", "running variance"):
            st.altair_chart(
                charts.running_statistics_chart(view["running"], statistic), width="stretch"
            )
    else:
        st.info("No running statistics to draw in this scenario.")

# --- share ------------------------------------------------------------------------
with st.expander("Link and JSON document"):
    st.markdown("This scenario as a link (the address bar holds the same):")
    st.code(scenario.link, language=None)
    st.download_button(
        "Download results (JSON)",
        json.dumps(doc, indent=2),
        file_name="bnexplore.json",
        mime="application/json",
    )
    st.caption(f"The same document: `python -m bnexplore run --json --link '{scenario.link}'`")
