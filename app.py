"""bnexplore: why do PyTorch and Keras BatchNorm give different numbers?

Run with ``streamlit run app.py``. The address bar is always a link that
reproduces the scenario and its numbers.
"""

from __future__ import annotations

import json

import streamlit as st

from bnexplore.page.serving import lifespan, log_to_stderr

if __name__ != "__main__":
    # `streamlit run app.py` finds this st.App and serves the file as its page: the
    # workers start with the server (bnexplore.page.serving), not with the first visitor
    app = st.App(__file__, lifespan=lifespan)
else:  # the page, run for each visitor's every rerun (Streamlit runs it as __main__)
    from bnexplore.runs.pool import start_early

    # the link's frameworks import in their workers (seconds) while the page imports its own
    start_early((key, value) for key in st.query_params for value in st.query_params.get_all(key))

    from bnexplore.engines import LABELS
    from bnexplore.judge.audit import ModelAudit
    from bnexplore.judge.explain import aligned
    from bnexplore.judge.verdicts import GAP_NAMES, VERDICT_WORDS, part, percent, verdict
    from bnexplore.page import charts, model
    from bnexplore.page.view import (
        EVERYTHING,
        PARTS_OF_TAB,
        View,
        ViewCache,
        chart_spec,
        layer_view,
    )
    from bnexplore.page.widgets import (
        TAB,
        apply_scenario,
        model_controls,
        open_scenario,
        open_tab,
        plain,
        sidebar,
        sweep_controls,
        upload_problem,
    )
    from bnexplore.porting.script import not_reproduced, reproducer
    from bnexplore.porting.translate import TRANSLATORS, translation_pair
    from bnexplore.runs.metrics import Divergence
    from bnexplore.scenario.links import LAYER_NOT_GIVEN
    from bnexplore.scenario.params import DEFAULTS, TABS
    from bnexplore.scenario.presets import matching

    st.set_page_config(page_title="bnexplore · BatchNorm, PyTorch vs Keras", layout="wide")

    @st.cache_resource
    def audits() -> model.AuditCache:
        """Whole-model audits, shared by every session of this server."""
        return model.AuditCache()

    @st.cache_resource
    def views() -> ViewCache:
        """Results by canonical link, shared by every session of this server."""
        return ViewCache(max_entries=64)

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.4g}"

    log_to_stderr(st.get_option("logger.level"))
    scenario, notices = sidebar()

    st.title("BatchNorm: PyTorch vs Keras")
    st.caption(
        "Configure a BatchNorm scenario in the sidebar; it runs for real in each framework. "
        "The address bar is always a link that reproduces it."
    )
    shown = [n for n in notices if open_tab() != "model" or not n.startswith(LAYER_NOT_GIVEN)]
    if shown:  # the Model tab audits every layer: a link naming none is no notice there
        st.warning("Parts of the link were not used:\n\n" + "\n".join(f"- {n}" for n in shown))

    def engine_table(view: View) -> str:
        """Each engine's output summary, where it ran and its version, as a Markdown table."""
        rows = [
            "| engine | output mean | std | min | max | ran on | version |",
            "|---|---:|---:|---:|---:|---|---|",
        ]
        for name, engine in view.engines.items():
            if not engine.available:
                rows.append(f"| {LABELS[name]} | not run: {engine.reason} | | | | | |")
            elif engine.error:
                rows.append(
                    f"| {LABELS[name]} | raised (see below) | | | | {engine.device} | "
                    f"{engine.version} |"
                )
            else:
                out = engine.output
                rows.append(
                    f"| {LABELS[name]} | {fmt(out.mean)} | {fmt(out.std)} | "
                    f"{fmt(out.min)} | {fmt(out.max)} | {engine.device} | {engine.version} |"
                )
        return "\n".join(rows)

    BADGES = {"agree": "green", "rounding": "blue", "differ": "red", "not compared": "gray"}

    def badge(what: str, verdict: str) -> str:
        return f":{BADGES[verdict]}-badge[{what}: {VERDICT_WORDS[verdict]}]"

    def single_layer_answer() -> View:
        """The scenario run in every engine (a labelled prediction first, while a framework
        still imports), and its answer: the headline, the verdicts, the preset's story."""
        prediction = st.empty()

        def show_prediction(predicted: View) -> None:
            """A first answer while frameworks import, labelled; the real run replaces it."""
            with prediction.container():
                st.subheader(predicted.headline)
                names = ", ".join(LABELS[name] for name in predicted.predicted)
                st.warning(
                    f"**Prediction.** {names}: still importing in their worker processes. Their "
                    "rows are what their rules predict, computed in float64 NumPy (the reference "
                    "engine), not the frameworks' own numbers. The real run replaces them here "
                    "when it arrives."
                )
                st.markdown(engine_table(predicted))

        progress = st.progress(0.0, text="Running in each framework's worker process…")
        view = views().view(  # with what the open tab draws, no more
            scenario,
            report=lambda done, text: progress.progress(min(done, 1.0), text=text),
            parts=PARTS_OF_TAB[open_tab()],
            preview=show_prediction,
        )
        progress.empty()
        prediction.empty()
        run_notices = [n for n in view.notices if n not in notices]
        if run_notices:
            st.warning("\n".join(f"- {n}" for n in run_notices))
        for name, engine in view.engines.items():
            if not engine.available and "could not be loaded" in (engine.reason or ""):
                st.error(f"{LABELS[name]} is missing; the page shows the others. {engine.reason}")

        st.subheader(view.headline)
        badges = [
            badge(what, verdict)
            for what, verdict in (
                ("outputs", view.verdict["output"]),
                ("state", view.verdict["state"]),
            )
            if verdict != "not compared" or what == "outputs"
        ]
        under = (
            f" under {scenario['dtype']} tolerances"
            if view.verdict["output"] != "not compared"
            else ""
        )
        summary = ""
        if view.explain_summary:
            summary = f" · **{view.explain_summary}**"
        elif view.differing and "differ" in view.verdict.values():
            summary = f" · knobs that differ: {', '.join(view.differing)} (their shares: Explain)"
        st.markdown(" ".join(badges) + under + summary)
        preset = matching(scenario.values, DEFAULTS)
        if preset:
            st.info(f"**Preset {preset.name}: {preset.title}.** {preset.story}")
        return view

    def model_answer() -> ModelAudit:
        """The whole model's audit (the Model tab draws the same one, from the cache), and
        its answer on top: the worst naive port, and each kind of port's verdict."""
        audit_progress = st.progress(0.0, text="Auditing every layer in every engine…")
        audited = audits().audit(
            scenario,
            report=lambda done, text: audit_progress.progress(min(done, 1.0), text=text),
        )
        audit_progress.empty()
        st.subheader(model.headline(audited))
        if audited.layers:
            said = [f":{BADGES[v]}-badge[{words}]" for words, v in model.port_verdicts(audited)]
            st.markdown(
                " ".join(said) + f" under {scenario['dtype']} tolerances, against the source "
                "framework's own run"
            )
        return audited

    # --- the answer, on top: the model's on the Model tab with a file, else the scenario's ----
    if open_tab() == "model" and scenario["state"] is not None:
        audited, view = model_answer(), None
    else:
        audited, view = None, single_layer_answer()

    with st.expander("Share: link and JSON document", expanded=False):
        base = (st.context.url or "").split("?", 1)[0]
        if base and not base.endswith("/"):  # served by st.App, the URL has no path: add one
            base += "/"
        st.markdown(
            "**Copy link** (the copy icon at the right of the box); the address bar holds the same:"
        )
        st.code(base + scenario.link, language=None)
        st.download_button(
            "Download results (JSON)",
            lambda: json.dumps(
                {**views().view(scenario, parts=EVERYTHING).document, "notices": notices}, indent=2
            ),
            file_name="bnexplore.json",
            mime="application/json",
            on_click="ignore",
            help="Every figure, with the float64 references and explain's causes (computed "
            "on the click where this tab has not run them).",
        )
        st.caption(f"The same numbers: `python -m bnexplore run --json --link '{scenario.link}'`")

    def show(build, name: str, memo: dict | None = None, spec=None, downloads: bool = True) -> None:
        """A chart (``build()`` makes the Altair chart), with PNG and SVG downloads rendered on
        demand. Its spec is validated once per view (``memo``: the view's), then reused;
        ``spec()``, where given, makes the same spec faster."""
        spec = chart_spec(view.specs if memo is None else memo, name, build, spec)
        st.vega_lite_chart(spec, width="stretch")
        if downloads:
            with st.popover("Download chart", icon=":material/download:"):
                download_chart(build, name)

    def download_chart(build, name: str) -> None:
        formats = (("PNG", charts.to_png, "image/png"), ("SVG", charts.to_svg, "image/svg+xml"))
        for column, (label, render, mime) in zip(st.columns(2), formats, strict=True):
            column.download_button(
                label,
                lambda render=render: render(build()),
                file_name=f"{name}.{label.lower()}",
                mime=mime,
                key=f"{label.lower()}_{name}",
                on_click="ignore",
            )

    def draw_overview() -> None:
        st.markdown(engine_table(view))
        for name, engine in view.engines.items():
            if engine.available and engine.error:
                st.error(
                    f"**{LABELS[name]} raised on this scenario** — a result, not a crash:\n\n"
                    f"`{engine.error}`"
                )
            if engine.available:  # what ran, below the table: the exporter, the converter
                detail = f"; {engine.detail}" if engine.detail else ""
                st.caption(f"{LABELS[name]}: {engine.device_note}{detail}")
        if len(view.overview_histogram):  # on every change of a knob: cheap, no downloads
            show(
                lambda: charts.output_overview_chart(view.overview_histogram),
                "output_overview",
                spec=lambda: charts.output_overview_spec(view.overview_histogram),
                downloads=False,
            )

        not_compared = [pair for pair in view.divergence if pair.reason]
        if not_compared:  # one line for them all: with 8 engines refused, 28 pairs
            reasons = "; ".join(dict.fromkeys(pair.reason for pair in not_compared))
            pairs = ", ".join(f"{LABELS[p.a]} vs {LABELS[p.b]}" for p in not_compared)
            st.info(f"Not compared: {pairs} ({reasons}).")
        for pair in view.divergence:
            if pair.reason:
                continue
            st.markdown(f"##### {LABELS[pair.a]} vs {LABELS[pair.b]}")
            cells = st.columns(5)
            cells[0].metric("max |Δ|", fmt(pair.max_abs))
            cells[1].metric("mean |Δ|", fmt(pair.mean_abs))
            cells[2].metric("RMSE", fmt(pair.rmse))
            cells[3].metric("max relative", fmt(pair.max_rel))
            cells[4].metric(
                "assert_close",
                "pass" if pair.allclose else "fail",
                help=f"torch.testing.assert_close defaults for {scenario['dtype']}: rtol "
                f"{pair.rtol:g}, atol {pair.atol:g}; {LABELS[pair.a]} as expected.",
            )
        st.caption(
            "Each framework against its own rules, computed in float64, and the gaps cause by "
            "cause: the Explain tab."
        )

    def draw_outputs() -> None:
        if len(view.histogram):
            show(lambda: charts.output_distribution_chart(view.histogram), "output_distribution")
            left, right = st.columns(2)
            with left:
                show(
                    lambda: charts.channel_output_chart(view.channel_outputs, "output mean"),
                    "output_mean_per_channel",
                )
            with right:
                show(
                    lambda: charts.channel_output_chart(view.channel_outputs, "output std"),
                    "output_std_per_channel",
                )
        else:
            st.info("No engine produced an output to draw.")

    def draw_running() -> None:
        if len(view.history):
            left, right = st.columns(2)
            with left:
                show(
                    lambda: charts.history_chart(view.history, "running mean"),
                    "running_mean_over_steps",
                )
            with right:
                show(
                    lambda: charts.history_chart(view.history, "running variance"),
                    "running_variance_over_steps",
                )
            if len(view.step_gaps) and (view.step_gaps["gap"] > 0).any():
                left, right = st.columns(2)
                with left:
                    show(lambda: charts.step_gap_chart(view.step_gaps), "gap_per_step")
                with right:
                    show(lambda: charts.gap_heatmap_chart(view.heatmap), "gap_heatmap")
            left, right = st.columns(2)
            for column, statistic in zip(
                (left, right), ("running mean", "running variance"), strict=True
            ):
                with column:
                    show(
                        lambda statistic=statistic: charts.running_statistics_chart(
                            view.running, statistic
                        ),
                        statistic.replace(" ", "_") + "_per_channel",
                    )
        else:
            st.info("No running statistics in this scenario.")

    def draw_layer() -> None:
        stored = layer_view(scenario)
        if stored is None:
            st.info(
                "Upload a BatchNorm state in the sidebar (Your layer): a PyTorch state_dict, "
                ".safetensors, .keras or .npz. Its trained statistics then start every engine "
                "(init=state), and the link names the file by its SHA-256 for teammates on "
                "this server."
            )
        else:
            show(
                lambda: charts.layer_variance_chart(
                    stored.statistics, stored.eps, stored.layer.label
                ),
                "layer_running_variance",
                memo={},
            )
            if stored.layer.problem:
                st.error(f"This layer cannot start a run: {stored.layer.problem}.")
            starts = "every engine starts from it" if scenario["init"] == "state" else "init=fresh"
            st.caption(
                f"{stored.layer.label}: {stored.layer.channels} channels; {starts}. "
                f"File `{scenario['state']}`."
            )

    def draw_training() -> None:
        if scenario["loss"] == "none":
            st.info(
                "No loss: training passes are forward passes only. Set Loss to mse in the "
                "sidebar's Training group for a real step: L = mean((y − T)²), backward, and one "
                "optimizer step on γ and β per training pass."
            )
        else:
            rows = [
                "| engine | loss L | dL/dx mean | std | min | max |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for name, engine in view.engines.items():
                x = engine.grad_x
                if x:
                    rows.append(
                        f"| {LABELS[name]} | {fmt(engine.loss)} | {fmt(x.mean)} | "
                        f"{fmt(x.std)} | {fmt(x.min)} | {fmt(x.max)} |"
                    )
            st.markdown("\n".join(rows))
            labels = {"x": "dL/dx", "gamma": "dL/dγ", "beta": "dL/dβ"}
            for pair in view.divergence:
                if pair.reason or not pair.grad:
                    continue
                st.markdown(f"##### {LABELS[pair.a]} vs {LABELS[pair.b]}")
                rows = [
                    "| compared | max \\|Δ\\| | max relative | assert_close |",
                    "|---|---:|---:|---|",
                ]
                parts = [(labels[k], d) for k, d in pair.grad.items()]
                parts += [(f"{k.replace('_', ' ')} (layer)", d) for k, d in pair.state.items()]
                for what, d in parts:
                    if d is None:
                        rows.append(f"| {what} | — | — | not computed on one side |")
                    else:
                        verdict = "pass" if d.allclose else "**fail**"
                        rows.append(f"| {what} | {fmt(d.max_abs)} | {fmt(d.max_rel)} | {verdict} |")
                st.markdown("\n".join(rows))
            for name, ref in view.references.items():
                for parameter, bound in ref.unpredictable.items():
                    st.info(
                        f"{LABELS[name]}: {parameter}'s exact gradient was 0 on an Adam step, so "
                        f"the framework stepped on rounding noise, which no formula predicts; it "
                        f"can move {parameter} by up to {bound:.3g} (lr per step)."
                    )
            if len(view.grad_histogram):
                show(
                    lambda: charts.output_distribution_chart(
                        view.grad_histogram, "dL/dx", "Gradient w.r.t. x"
                    ),
                    "grad_x_distribution",
                )
            statistics = [
                s
                for s in charts.PARAMETER_LABELS.values()
                if s in set(view.parameters["statistic"])
            ]
            for left_right in range(0, len(statistics), 2):
                columns = st.columns(2)
                for column, statistic in zip(
                    columns, statistics[left_right : left_right + 2], strict=False
                ):
                    with column:
                        show(
                            lambda s=statistic: charts.parameter_chart(view.parameters, s),
                            statistic,
                        )
            if len(view.parameter_history):
                left, right = st.columns(2)
                for column, statistic in zip((left, right), ("gamma", "beta"), strict=True):
                    if statistic in set(view.parameter_history["statistic"]):
                        with column:
                            show(
                                lambda s=statistic: charts.history_chart(view.parameter_history, s),
                                f"{statistic}_over_steps",
                            )

    def draw_sweep() -> None:
        sweep_controls()
        if scenario["sweep"] == "none":
            st.info(
                "Pick a parameter to sweep: the scenario runs for real at each value, and each "
                "pair's gap is charted against it. The sweep is part of the link."
            )
        else:
            sweep_progress = st.progress(0.0, text="Sweeping…")
            swept = views().sweep(
                scenario,
                report=lambda done, text: sweep_progress.progress(min(done, 1.0), text=text),
            )
            sweep_progress.empty()
            show(
                lambda: charts.sweep_chart(swept.table, swept.key, swept.log_x),
                "sweep",
                swept.specs,
            )
            st.dataframe(
                swept.table,
                column_config={
                    "value": st.column_config.NumberColumn(swept.key, format="%.6g"),
                    "max_abs": st.column_config.NumberColumn("max |Δ|", format="%.4g"),
                    "link": st.column_config.LinkColumn("link", display_text="open"),
                },
                hide_index=True,
            )
            st.download_button(
                "Download sweep (JSON)",
                json.dumps(swept.document, indent=2),
                file_name="bnexplore_sweep.json",
                mime="application/json",
            )

    def draw_explain() -> None:
        if view.about is None:
            st.success("Nothing to explain: only one engine ran, or the pair cannot be compared.")
        else:
            draw_causes(view.about)
        draw_references()

    def draw_references() -> None:
        st.markdown("##### Each framework against its own rules, computed in float64")
        lines = []
        for name, ref in view.references.items():
            gap = ref.gap
            if gap.max_abs is None:
                continue
            where = "within" if gap.allclose else "**outside**"
            lines.append(
                f"- {LABELS[name]}: max |Δ| {fmt(gap.max_abs)}, {where} "
                f"{scenario['dtype']} tolerance"
            )
        st.markdown("\n".join(lines) or "Nothing to check: no engine produced an output.")

    def draw_causes(about: Divergence) -> None:
        """The causes of each of ``about``'s gaps (the headline pair's)."""
        pair = f"{LABELS[about.a]} and {LABELS[about.b]}"
        st.markdown(
            f"The gaps between **{pair}** (the pair the headline is about) beyond "
            f"{scenario['dtype']} tolerances, cause by cause. Every knob that differs is aligned "
            "in every combination, each run for real; a knob's Shapley value is how much it "
            "closes a gap (its max |Δ|), averaged over every order of aligning the knobs. A "
            "gap's shares add up to at most 100 %; the rest is what remains. Each knob links to "
            "the scenario with that knob alone aligned."
        )
        if view.steps:
            st.caption(view.steps[0].method)
        output, state = st.columns(2)
        with output:
            st.markdown("#### The output")
            for of in ("output", "grad_x"):
                explain_gap(of, about)
        with state:
            st.markdown("#### The state after the measured pass")
            for of in ("running_mean", "running_var", "gamma", "beta"):
                explain_gap(of, about)

    # gap names at the start of a line (γ, β and dL/dx stay as they are)
    GAP_TITLES = {
        "output": "Output",
        "running_mean": "Running mean",
        "running_var": "Running variance",
    }

    def explain_gap(of: str, pair: Divergence) -> None:
        """One gap's causes (chart and list), or why it has none."""
        gap = part(pair, of)
        name = GAP_TITLES.get(of, GAP_NAMES[of])
        steps = [step for step in view.steps if step.of == of]
        if gap is None:
            if of in ("output", "running_mean", "running_var"):
                st.caption(f"{name}: not compared (a side has none).")
            return
        if not steps:
            words = {"agree": "agrees exactly", "rounding": "agrees within rounding"}
            said = words.get(verdict(gap), "differs, with no share to compute")
            st.success(f"**{name}**: the pair {said} (max |Δ| = {fmt(gap.max_abs)}).")
            return
        st.markdown(f"**{name}**: max |Δ| = {fmt(gap.max_abs)}, beyond tolerance")
        show(lambda: charts.attribution_chart(view.explain, of), f"explain_{of}")
        for step in steps:
            link = f"[{step.knob}]({step.link})"
            if step.knob == "what remains":
                share = "" if step.share is None else f"{percent(step.share)} of the gap, "
                st.markdown(
                    f"- {link}: {share}{fmt(step.gap_before)} left with every knob aligned — "
                    f"{step.cause}"
                )
            elif step.widens is not None:
                st.markdown(f"- {link}: **widens** the gap by {fmt(step.widens)} — {step.cause}")
            else:
                st.markdown(
                    f"- {link}: {percent(step.share)} of the gap (alone: "
                    f"{fmt(step.gap_before)} → {fmt(step.gap_after)}) — {step.cause}"
                )

    def draw_code() -> None:
        left, right = st.columns(2)
        first, second = translation_pair(scenario)
        directions = ((first, second), (second, first))
        for column, (source, target) in zip((left, right), directions, strict=True):
            column.markdown(f"##### {source} → {target}")
            column.code(TRANSLATORS[source, target](scenario), language="python", wrap_lines=True)
        agreed, causes = aligned(scenario)
        if causes:
            st.button(
                "Make them agree",
                type="primary",
                on_click=apply_scenario,
                args=(agreed,),
                help="Aligns " + "; ".join(causes) + ". The link follows.",
            )
        st.markdown("##### Reproduce without bnexplore")
        script = reproducer(scenario)
        left_out = not_reproduced(scenario)
        if left_out:
            st.warning(
                "The script prints an error instead of numbers for "
                + "; ".join(f"{LABELS[e]}: {why}" for e, why in left_out.items())
                + ". The other engines' numbers are the page's."
            )
        st.download_button(
            "Export script", script, file_name="bnexplore_repro.py", mime="text/x-python"
        )
        with st.expander("The script"):
            st.code(script, language="python")

    def _open_layer(layers) -> None:
        """A row of the Model tab's table was chosen: open that layer's single-layer scenario."""
        rows = st.session_state["model_table"].selection.rows
        if rows:
            open_scenario(layers[rows[0]].scenario, "outputs")

    def draw_model() -> None:
        model_controls()
        if scenario["state"] is None:
            if refused := upload_problem("state"):
                st.error(f"This model was refused: {plain(refused)}")
            st.info(
                "Upload a model under **Your layer** in the sidebar: a PyTorch state_dict, "
                ".safetensors, .keras, a Keras 2 .h5, an .onnx or an .npz. Every BatchNorm in it "
                "runs in every engine, in inference, on inputs drawn from its own statistics: "
                "each port with the target's default eps (naive) and with the source's "
                "(faithful). Add the port above to check it layer by layer."
            )
            return
        if audited.notices:  # the audit run on top, for the answer
            st.warning("\n".join(f"- {n}" for n in audited.notices))
        if not audited.layers:
            st.error("No BatchNorm layer of this file could be audited.")
            return
        source = LABELS[audited.engines[0]]
        st.markdown(
            f"**{model.layers_word(len(audited.layers))}** ({audited.format}), "
            f"source **{source}**, "
            f"against {', '.join(LABELS[e] for e in audited.engines[1:])}. Worst first; choose "
            "a row to open that layer."
        )
        show(lambda: model.gap_chart(model.gap_frame(audited), source), "model_gaps", memo={})
        layers = audited.worst_first()
        table = model.layer_table(audited)
        st.dataframe(
            table,
            column_config={
                "eps": st.column_config.NumberColumn("eps", format="%.3g"),
                "min var": st.column_config.NumberColumn("min var", format="%.3g"),
                "worst naive": st.column_config.NumberColumn(
                    "worst naive / max |y|",
                    format="%.3g",
                    help="The naive port's largest max |Δ| over the engines, relative to max |y| "
                    "of the source's own output: the ranking.",
                ),
                "cause": st.column_config.TextColumn(
                    "cause", help="The naive gap's causes: the knob aligned by the faithful port."
                ),
                **{
                    c: st.column_config.NumberColumn(c, format="%.4g")
                    for c in table.columns
                    if c.endswith(" naive") or c.endswith(" faithful")
                },
                "link": st.column_config.LinkColumn("link", display_text="open"),
            },
            hide_index=True,
            key="model_table",
            on_select=lambda: _open_layer(layers),
            selection_mode="single-row",
        )
        if audited.port is not None:
            st.markdown(f"##### The port ({audited.port.format})")
            st.dataframe(
                model.findings_table(audited),
                column_config={"max |Δ|": st.column_config.NumberColumn("max |Δ|", format="%.4g")},
                hide_index=True,
            )
        st.download_button(
            "Download the audit (JSON)",
            lambda: json.dumps(audited.to_dict(), indent=2),
            file_name="bnexplore_audit.json",
            mime="application/json",
            on_click="ignore",
        )
        st.caption(
            f"The same numbers: `python -m bnexplore audit FILE --link '{scenario.link}' --json`"
        )

    # --- the tabs: only the open one runs; its slug is the link's ``tab`` ---------------------
    DRAW = {
        "overview": draw_overview,
        "outputs": draw_outputs,
        "running": draw_running,
        "training": draw_training,
        "layer": draw_layer,
        "sweep": draw_sweep,
        "explain": draw_explain,
        "code": draw_code,
        "model": draw_model,
    }
    for slug, tab in zip(
        TABS, st.tabs(list(TABS.values()), key=TAB, on_change="rerun"), strict=True
    ):
        with tab:
            if tab.open:
                DRAW[slug]()
