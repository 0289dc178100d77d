"""Command line: ``python -m bnexplore run [--preset NAME] [--link LINK] [--json]``;
``python -m bnexplore store FILE`` keeps a file in the store and prints its link key;
``python -m bnexplore audit FILE [--port FILE] [--link LINK] [--json]`` audits a model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from urllib.parse import quote

import numpy as np

from bnexplore import run
from bnexplore.engines import LABELS
from bnexplore.judge.verdicts import GAP_NAMES, percent
from bnexplore.porting.script import reproducer
from bnexplore.runs.sweep import sweep_link
from bnexplore.scenario.links import parse_link
from bnexplore.scenario.params import MAX_SWEEP_POINTS, SWEEPABLE
from bnexplore.scenario.presets import PRESETS
from bnexplore.tools.docs import LINKS_PAGE, link_reference, refresh_links_page


def link_of(preset: str | None, link: str | None) -> str:
    """The link to run: ``--link``, with ``--preset`` added (its keys lose to the link's)."""
    link = link or ""
    if preset is None:
        return link
    query = link.split("?", 1)[1] if "?" in link else link
    return "?" + "&".join(filter(None, [f"preset={quote(preset)}", query]))


def table(doc: dict) -> str:
    """The document as a readable text table."""
    lines = [f"link: {doc['link']}", doc["headline"]]
    lines += [f"notice: {n}" for n in doc["notices"]]
    lines.append("")
    header = f"{'engine':<10}{'mean':>14}{'std':>14}{'min':>14}{'max':>14}  device"
    lines += [header, "-" * len(header)]
    for name, e in doc["engines"].items():
        label = LABELS.get(name, name)
        if not e["available"]:
            lines.append(f"{label:<10}  unavailable: {e['reason']}")
        elif e["error"]:
            lines.append(f"{label:<10}  raised: {e['error']}")
        else:
            o = e["output"]
            cells = "".join(f"{_num(o[k]):>14}" for k in ("mean", "std", "min", "max"))
            lines.append(f"{label:<10}{cells}  {e['device']}  ({e['version']})")
    for name, e in doc["engines"].items():
        if e.get("running_mean") is not None:
            rm, rv = e["running_mean"], e["running_var"]
            lines.append(
                f"{LABELS.get(name, name)} running_mean {_span(rm)}, running_var {_span(rv)}"
            )
    for name, e in doc["engines"].items():
        if e.get("grad"):
            x = e["grad"]["x"] or {}
            lines.append(
                f"{LABELS.get(name, name)} loss {_num(e['loss'])}, dL/dx mean "
                f"{_num(x.get('mean'))} std {_num(x.get('std'))}, γ {_span(e['gamma'] or [])}, "
                f"β {_span(e['beta'] or [])}"
            )
    lines.append("")
    steps = doc.get("explain", [])
    if steps:
        lines.append(f"explain ({steps[0]['method']}):")
    for step in steps:
        if step["widens"] is not None:
            part = f"widens by {_num(step['widens'])}"
        else:
            part = "—" if step["share"] is None else f"{percent(step['share'])} of the gap"
        lines.append(f"  [{GAP_NAMES[step['of']]}] {step['knob']}: {part}  {step['cause']}")
    for d in doc["divergence"]:
        pair = f"{d['a']} vs {d['b']}"
        if d.get("reason"):
            lines.append(f"{pair}: not compared, {d['reason']}")
            continue
        verdict = f"outputs {d['verdict']['output']}, state {d['verdict']['state']}"
        lines.append(
            f"{pair}: max|Δ| {_num(d['max_abs'])}  mean|Δ| {_num(d['mean_abs'])}  "
            f"rmse {_num(d['rmse'])}  max rel {_num(d['max_rel'])}  "
            f"{verdict} (rtol {d['rtol']:g}, atol {d['atol']:g})"
        )
        parts = {**{f"dL/d{k}": v for k, v in (d.get("grad") or {}).items()}, **d["state"]}
        shown = [
            f"{what} {_num(gap['max_abs'])}{'' if gap['allclose'] else ' (NOT allclose)'}"
            for what, gap in parts.items()
            if gap is not None and (d.get("grad") or what in ("gamma", "beta"))
        ]
        if d.get("grad"):
            lines.append(f"{pair}: max|Δ| of " + ", ".join(shown))
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.7g}"


def _span(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None]
    if not finite:
        return "—"
    lo, hi = min(finite), max(finite)
    return _num(lo) if lo == hi else f"{_num(lo)} … {_num(hi)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnexplore",
        description="Run BatchNorm scenarios for real in PyTorch and Keras.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run one scenario and print the result")
    run_cmd.add_argument("--preset", choices=sorted(PRESETS), help="a named scenario")
    run_cmd.add_argument("--link", help="an app URL or its query string, e.g. '?v=1&steps=3'")
    run_cmd.add_argument("--json", action="store_true", help="print the JSON document")
    run_cmd.add_argument(
        "--explain", action="store_true", help="attribute the first pair's gap to its causes"
    )
    run_cmd.add_argument(
        "--reference", action="store_true", help="add each engine's float64 reference"
    )
    script_cmd = commands.add_parser("script", help="print a standalone reproducer script")
    script_cmd.add_argument("--preset", choices=sorted(PRESETS), help="a named scenario")
    script_cmd.add_argument("--link", help="an app URL or its query string")
    sweep_cmd = commands.add_parser("sweep", help="run a scenario at each value of a parameter")
    sweep_cmd.add_argument("--preset", choices=sorted(PRESETS), help="a named scenario")
    sweep_cmd.add_argument("--link", help="an app URL or its query string")
    sweep_cmd.add_argument("--param", choices=SWEEPABLE, help="default: the link's sweep")
    sweep_cmd.add_argument("--values", help="comma-separated; default: the link's sweep range")
    sweep_cmd.add_argument("--json", action="store_true", help="print the JSON document")
    bench_cmd = commands.add_parser("bench", help="time bnexplore against bare framework calls")
    bench_cmd.add_argument("--repeat", type=int, default=5, help="warm runs per scenario")
    bench_cmd.add_argument("--quick", action="store_true", help="the seed only, once")
    bench_cmd.add_argument("--no-browser", action="store_true", help="skip the browser timing")
    bench_cmd.add_argument(
        "--browser",
        action="store_true",
        help="only the desk in Chromium: widget changes (p50, p90), a revisit, the cold start",
    )
    bench_cmd.add_argument("--json", action="store_true", help="print the JSON document")
    docs_cmd = commands.add_parser(
        "docs", help="write the link reference into docs/links.md (--check: only check it)"
    )
    docs_cmd.add_argument("--check", action="store_true", help="exit 1 if docs/links.md is stale")
    docs_cmd.add_argument("--print", action="store_true", help="print the table instead")
    store_cmd = commands.add_parser(
        "store", help="keep a file in the store; print its state= (or file=) link key"
    )
    store_cmd.add_argument("file", help=".pt/.pth, .safetensors, .keras, .weights.h5, .npz, .npy")
    audit_cmd = commands.add_parser(
        "audit", help="audit every BatchNorm of a model file in every engine; check a port"
    )
    audit_cmd.add_argument(
        "file", help="the model: .pt/.pth, .safetensors, .keras, .h5, .onnx, .npz"
    )
    audit_cmd.add_argument("--port", help="its port, checked layer by layer against it")
    audit_cmd.add_argument(
        "--link",
        help="engines, source, source_eps, source_momentum, seed, audit_n, audit_hw, dtype",
    )
    audit_cmd.add_argument("--json", action="store_true", help="print the JSON document")
    args = parser.parse_args(argv)
    if args.command == "docs":
        if args.print:
            print(link_reference())
            return 0
        current = refresh_links_page(check=args.check)
        if args.check and not current:
            print(f"{LINKS_PAGE} is stale: run python -m bnexplore docs", file=sys.stderr)
        elif not current:
            print(f"wrote the link reference into {LINKS_PAGE}", file=sys.stderr)
        return 0 if current or not args.check else 1
    if args.command == "store":
        return _store(args.file)
    if args.command == "script":
        scenario, notices = parse_link(link_of(args.preset, args.link))
        for notice in notices:
            print(f"notice: {notice}", file=sys.stderr)
        print(reproducer(scenario))
        return 0
    logging.basicConfig(level=logging.ERROR)

    if args.command == "sweep":
        return _sweep(parser, args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "bench":
        return _bench(args)
    doc = run(link_of(args.preset, args.link), reference=args.reference, explain=args.explain)
    print(json.dumps(doc, indent=2, allow_nan=False) if args.json else table(doc))
    return 0


def _sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    link = link_of(args.preset, args.link)
    for notice in parse_link(link)[1]:
        print(f"notice: {notice}", file=sys.stderr)
    points = None
    if args.values:
        try:
            points = [float(v) for v in args.values.split(",") if v.strip()]
        except ValueError:
            parser.error(f"--values: {args.values!r} is not a comma-separated list of numbers")
        if not points or len(points) > MAX_SWEEP_POINTS:
            parser.error(f"--values: give 1 to {MAX_SWEEP_POINTS} values")
    if not args.param and parse_link(link)[0]["sweep"] == "none":
        parser.error("sweep: give --param, or a link with sweep=KEY")

    def report(done: float, text: str) -> None:
        print(f"[{done:4.0%}] {text}", file=sys.stderr, flush=True)

    doc = sweep_link(link, args.param, points, report)
    if args.json:
        print(json.dumps(doc, indent=2, allow_nan=False))
        return 0
    print(f"link: {doc['link']}\nsweep: {doc['param']}")
    for point in doc["points"]:
        gaps = "  ".join(
            f"{d['a']}–{d['b']} max|Δ| {_num(d['max_abs'])}" for d in point["divergence"]
        )
        print(f"{doc['param']} = {point['value']:<12g} {gaps}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    """Store the model (and the port) as ``store`` does, then audit it."""
    from bnexplore.files import store
    from bnexplore.judge.audit import audit

    keys = {}
    for key, path in (("state", args.file), ("port", args.port)):
        if path is None:
            continue
        try:
            keys[key] = store.store_file(path)
        except (store.FileProblem, OSError) as problem:
            print(f"bnexplore audit: {path}: {problem}", file=sys.stderr)
            return 1
    query = (args.link or "").split("?", 1)[-1]
    pairs = [p for p in query.split("&") if p and p.split("=", 1)[0] not in keys]
    link = "?" + "&".join([*pairs, *(f"{k}={v}" for k, v in keys.items())])
    scenario, notices = parse_link(link)

    def report(done: float, text: str) -> None:
        print(f"[{done:4.0%}] {text}", file=sys.stderr, flush=True)

    result = audit(scenario, notices, report)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        print(audit_table(result))
    if not result.layers:
        print("bnexplore audit: no BatchNorm layer of this file could be audited", file=sys.stderr)
        return 1
    return 0


def audit_table(result) -> str:
    """The audit in words: every layer worst first, then the port's findings."""
    lines = [f"model: {result.file} ({result.format}, source {result.source})"]
    lines += [f"notice: {n}" for n in result.notices]
    targets = result.engines[1:]
    width = max([28, *(len(a.name) for a in result.layers)])  # every name whole
    head = f"{'layer':<{width}} {'C':>5} {'eps':>9} {'min var':>9}"
    for e in targets:
        head += f" {e + ' naive':>16} {e + ' faithful':>19} {'sens':>5}"
    lines += [head + "  cause"]
    for a in result.worst_first():
        row = f"{a.name:<{width}} {a.layer.channels:>5} {a.eps:>9.3g} "
        row += f"{float(np.min(a.layer.state['running_var'])):>9.2e}"
        cause = ""
        for e in targets:
            row += f" {_num(a.naive[e].max_abs):>16} {_num(a.faithful[e].max_abs):>19}"
            row += f" {a.sensitive[e]:>5}"
            named = [c.knob for c in a.causes["naive"][e] if c.share]
            cause = cause or ", ".join(named)
        lines.append(f"{row}  {cause}")
    if result.port is not None:
        lines.append(f"port: {result.port.file} ({result.port.format})")
        for f in result.port.findings:
            where = f"{f.layer or '—'} → {f.port_layer or '—'}"
            by = f" (by {f.matched_by})" if f.matched_by else ""
            gap = ""
            if f.gap is not None:
                gap = (
                    f" (inference max |Δ| {_num(f.gap.max_abs)})"
                    if f.gap.max_abs is not None
                    else ""
                )
                gap = gap or f" ({f.gap.reason})"
            lines.append(f"  {where}{by}: {', '.join(f.problems)}: {f.evidence}{gap}")
    return "\n".join(lines)


def _store(path: str) -> int:
    """``state=<digest>`` first (``file=`` for a batch file alone), then what the file holds."""
    from bnexplore.files import store

    try:
        digest = store.store_file(path)
        with open(store.path_of(digest), "rb") as f:
            layers, batches = store.describe(f)
    except (store.FileProblem, OSError) as problem:
        print(f"bnexplore store: {path}: {problem}", file=sys.stderr)
        return 1
    print(f"{'state' if layers else 'file'}={digest}")
    for layer in layers:
        problem = f"  ({layer.problem})" if layer.problem else ""
        print(f"layer {layer.label}: {layer.channels} channels{problem}")
    if batches is not None:
        if layers:
            print(f"file={digest}")
        shape = ",".join(map(str, batches.shape))
        print(f"batches: {batches.count} of shape {shape}, {np.dtype(batches.dtype).name}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from bnexplore.tools.bench import bench, browser_desk, desk_table, table

    if args.browser:
        desk = browser_desk(report=lambda text: print(text, file=sys.stderr, flush=True))
        print(json.dumps(desk, indent=2) if args.json else desk_table(desk))
        return 0

    result = bench(
        args.repeat,
        args.quick,
        not args.no_browser,
        report=lambda text: print(text, file=sys.stderr, flush=True),
    )
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
