"""Every BatchNorm of a model, in every engine, in inference: which layer bites, and why.

For each layer of the file in ``state=…`` and each target engine, two ports are run for
real, each in inference (``torch.eval()``, Keras ``training=False``, Flax
``use_running_average=True``), on a batch drawn from the layer's own statistics
(``input=running``: x[:, c] ~ N(running_mean[c], running_var[c]), N × C × hw × hw):

- naive: the file's γ, β and statistics loaded into the target framework's layer with
  that framework's default epsilon;
- faithful: the same with the source's epsilon (the translator's port).

Each is compared with the source framework's own run of the layer. In inference only
epsilon separates the two ports, so the naive gap's causes come from these runs with
nothing re-run: with v(∅) the naive gap's max |Δ| and v(eps) the faithful one's, epsilon's
Shapley value is v(∅) − v(eps), and its share is that over v(∅), or 1 where the faithful
gap is within the dtype's tolerance (as in bnexplore.judge.explain); a faithful gap
beyond tolerance is named "what remains".

A channel is eps-sensitive for a target when |√((v_c + ε_target)/(v_c + ε_source)) − 1|
> 1e-3: the naive port rescales its output by more than 0.1 %.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnexplore.engines import LABELS
from bnexplore.files import store
from bnexplore.files.formats import Layer, ModelFile
from bnexplore.judge.ports import Finding, PortCheck, match, problems
from bnexplore.judge.verdicts import verdict
from bnexplore.runs.many import Pass, infer_all
from bnexplore.runs.metrics import Divergence, Figures
from bnexplore.runs.runner import initial_state, strict_json
from bnexplore.scenario.batches import batches
from bnexplore.scenario.conventions import other_convention
from bnexplore.scenario.links import (
    LAYER_NOT_GIVEN,
    Scenario,
    scenario_from_values,
    shape_for_layer,
)
from bnexplore.scenario.params import DEFAULTS, knobs

SOURCE_ENGINES = {"torch": "torch", "keras": "keras", "keras2": "keras2", "flax": "flax"}
"""The engine that runs a source framework's own layer."""
INFERENCE = {
    "torch_mode": "eval",
    "keras_training": "false",
    "keras2_training": "false",
    "flax_use_running_average": True,
}
"""Every engine's measured pass in inference: the deployed use."""
SENSITIVE = 1e-3
"""A channel is eps-sensitive when a port's epsilon rescales it by more than this."""
PORTS = ("naive", "faithful")

Report = Callable[[float, str], None]


@dataclass(frozen=True)
class Cause:
    """One cause of a port's gap: a knob (``torch_eps``, …) or "what remains"; its share
    of the gap (None where it widens the gap instead: ``widens``)."""

    knob: str
    share: float | None
    widens: bool = False

    def to_dict(self) -> dict:
        return {"knob": self.knob, "share": self.share, "widens": self.widens}


@dataclass(frozen=True)
class LayerAudit:
    """One layer's audit: its source settings, each port's gap per target engine."""

    layer: Layer
    eps: float
    momentum: float | None
    """In the source framework's own convention (PyTorch m ≡ Keras 1 − m)."""
    eps_from: str
    scenario: Scenario
    """The layer's single-layer scenario (its link): the source's epsilon in its knobs."""
    naive: dict[str, Divergence] = field(default_factory=dict)
    faithful: dict[str, Divergence] = field(default_factory=dict)
    sensitive: dict[str, int] = field(default_factory=dict)
    causes: dict[str, dict[str, list[Cause]]] = field(default_factory=dict)
    scale: float = 0.0
    """max |y| of the source's own output (0 without one)."""

    @property
    def name(self) -> str:
        return self.layer.label

    def relative(self, port: str, engine: str) -> float | None:
        """A port's max |Δ| over max |y| of the source's output: the gap as a fraction of
        the layer's own scale (None where it was not measured)."""
        d = (self.naive if port == "naive" else self.faithful).get(engine)
        if d is None or d.max_abs is None:
            return None
        return d.max_abs / self.scale if self.scale > 0 else (0.0 if d.max_abs == 0 else None)

    @property
    def worst(self) -> float:
        """The naive port's largest relative gap over the target engines (the ranking)."""
        rel = [self.relative("naive", e) for e in self.naive]
        return max((r for r in rel if r is not None), default=0.0)

    def to_dict(self) -> dict:
        layer = self.layer
        var = np.asarray(layer.state["running_var"], dtype=np.float64)
        return {
            "name": layer.name,
            "channels": layer.channels,
            "eps": self.eps,
            "momentum": self.momentum,
            "eps_from": self.eps_from,
            "min_running_var": float(var.min()) if var.size else None,
            "eps_sensitive_channels": dict(self.sensitive),
            "naive": {e: _gap_dict(d) for e, d in self.naive.items()},
            "faithful": {e: _gap_dict(d) for e, d in self.faithful.items()},
            "causes": {
                port: {e: [c.to_dict() for c in cs] for e, cs in by_engine.items()}
                for port, by_engine in self.causes.items()
            },
            "link": self.scenario.link,
        }


@dataclass(frozen=True)
class ModelAudit:
    """A whole model's audit (``bnexplore.audit``): typed up to the page."""

    scenario: Scenario
    file: str | None
    format: str | None
    source: str | None
    engines: tuple[str, ...]
    layers: tuple[LayerAudit, ...]
    port: PortCheck | None
    notices: tuple[str, ...]

    def worst_first(self) -> list[LayerAudit]:
        return sorted(self.layers, key=lambda a: -a.worst)

    def to_dict(self) -> dict:
        """The strict-JSON document (``audit --json``)."""
        return strict_json(
            {
                "link": self.scenario.link,
                "file": self.file,
                "format": self.format,
                "source": self.source,
                "engines": list(self.engines),
                "layers": [a.to_dict() for a in self.layers],
                "port": self.port.to_dict() if self.port else None,
                "notices": list(self.notices),
            }
        )


def _gap_dict(d: Divergence) -> dict:
    return {**d.to_dict(), "verdict": verdict(d)}


def source_of(scenario: Scenario, model: ModelFile | None) -> str:
    """The source framework: an explicit ``source=`` wins, then what the file says, then
    PyTorch."""
    if scenario["source"] != "auto":
        return scenario["source"]
    return (model.source if model is not None else None) or "torch"


def source_default(source: str, knob: str) -> float:
    """The source framework's own default ``knob`` (eps, momentum), in its convention."""
    return DEFAULTS[f"{knobs(source)}_{knob}"]


def source_eps(scenario: Scenario, source: str, layer: Layer) -> tuple[float, str]:
    """The layer's epsilon and where it comes from: the file's, else the link's
    (``source_eps``, else the source framework's default)."""
    if layer.eps is not None:
        return float(layer.eps), "file"
    given = scenario["source_eps"]
    return (float(given) if given is not None else source_default(source, "eps")), "link"


def source_momentum(scenario: Scenario, source: str, layer: Layer) -> float | None:
    """The layer's momentum in the source framework's convention: the file's (stored in
    Keras's convention, as ONNX's is) where it has one, else the link's or the default."""
    if layer.momentum is not None:
        m = float(layer.momentum)
        return other_convention(m) if source == "torch" else m
    given = scenario["source_momentum"]
    return float(given) if given is not None else source_default(source, "momentum")


def eps_sensitive(var: np.ndarray, eps_target: float, eps_source: float) -> int:
    """Channels with |√((v + ε_target)/(v + ε_source)) − 1| > SENSITIVE."""
    v = np.asarray(var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt((v + eps_target) / (v + eps_source))
    return int(np.count_nonzero(np.abs(ratio - 1.0) > SENSITIVE))


def port_causes(naive: Divergence, faithful: Divergence, knob: str | None) -> list[Cause]:
    """The naive gap's causes from the two ports' runs (the module's docstring)."""
    if verdict(naive) != "differ" or naive.max_abs is None:
        return []
    remains = verdict(faithful) == "differ"
    closed = naive.max_abs - (faithful.max_abs or 0.0)
    share = max(0.0, closed) / naive.max_abs if remains else 1.0
    causes = []
    if knob is not None and closed > 0:
        causes.append(Cause(knob, share))
    elif knob is not None and closed < 0:
        causes.append(Cause(knob, None, widens=True))
    if remains:
        causes.append(Cause("what remains", 1.0 - share if knob is not None else 1.0))
    return causes


def layer_scenario(
    scenario: Scenario, layer: Layer, source: str, engines: Sequence[str], eps: float, momentum
) -> Scenario | None:
    """The layer's single-layer scenario: its state, ``init=state``, ``input=running``,
    every engine in inference, the source's epsilon (and momentum) in the source's knobs.
    None where not even one sample of the layer fits the value cap."""
    shape = shape_for_layer(
        (scenario["audit_n"], layer.channels, scenario["audit_hw"], scenario["audit_hw"]),
        layer.channels,
    )
    if shape is None:
        return None
    own = knobs(SOURCE_ENGINES[source])
    values = {
        "state": scenario["state"],
        "layer": layer.name or None,
        "init": "state",
        "input": "running",
        "seed": scenario["seed"],
        "shape": shape,
        "dtype": scenario["dtype"],
        "device": scenario["device"],
        "engines": tuple(engines),
        "steps": 0,
        **INFERENCE,
        f"{own}_eps": eps,
    }
    if momentum is not None:
        values[f"{own}_momentum"] = momentum
    return scenario_from_values(values)[0]


def _with_eps(s: Scenario, engine: str, eps: float) -> Scenario:
    return s.replace(**{f"{knobs(engine)}_eps": eps})


def audit(scenario: Scenario, notices: Sequence[str] = (), report: Report | None = None):
    """Audit the model in ``state=…`` (and check the port in ``port=…``), for real."""
    notices = [n for n in notices if not n.startswith(LAYER_NOT_GIVEN)]  # all are audited
    if scenario["state"] is None:
        notices.append("audit: needs a model file (state=…)")
        return ModelAudit(scenario, None, None, None, (), (), None, tuple(notices))
    try:
        model = store.model(scenario["state"])
    except store.FileProblem as problem:
        notices.append(f"state: {problem}")
        return ModelAudit(scenario, scenario["state"], None, None, (), (), None, tuple(notices))
    notices.extend(model.notices)
    source = source_of(scenario, model)
    if scenario["source"] == "auto" and model.source is None:
        notices.append(
            "source: the file does not say which framework trained it; audited as "
            "PyTorch's, with PyTorch's defaults where it carries none (Source framework in "
            "the Model group, source=… in a link, says otherwise)"
        )
    first = SOURCE_ENGINES[source]
    engines = (first, *(e for e in scenario["engines"] if e != first))
    targets = engines[1:]

    plans, passes, drawn = [], [], []
    for layer in model.layers:
        if layer.problem:
            notices.append(f"layer {layer.label}: {layer.problem}; not audited")
            continue
        eps, eps_from = source_eps(scenario, source, layer)
        momentum = source_momentum(scenario, source, layer)
        s = layer_scenario(scenario, layer, source, engines, eps, momentum)
        if s is None:
            notices.append(f"layer {layer.label}: too many channels for one sample; not audited")
            continue
        batch_index = len(drawn)
        drawn.append(next(batches(s)))
        state = initial_state(s)
        wanted = {("source", first): (first, s)}
        for e in targets:
            default = DEFAULTS[f"{knobs(e)}_eps"]
            wanted[("naive", e)] = (e, _with_eps(s, e, default))
            if default != eps:
                wanted[("faithful", e)] = (e, _with_eps(s, e, eps))
        runs: dict[tuple[str, str], int] = {}
        for key, (engine, run) in wanted.items():
            runs[key] = len(passes)
            passes.append(Pass(engine, run, state, batch_index))
        for e in targets:  # where the default is the source's epsilon, one run is both ports
            runs.setdefault(("faithful", e), runs[("naive", e)])
        plans.append((layer, eps, eps_from, momentum, s, runs))

    port = None
    if scenario["port"] is not None:
        port = _plan_port(scenario, model, source, plans, passes, notices)

    results = infer_all(passes, drawn, report) if passes else []
    gaps = _measure_layers(plans, results, targets, source, scenario["dtype"])
    layers = tuple(
        _judge(plan, results, targets, source, scenario["dtype"], gaps[k])
        for k, plan in enumerate(plans)
    )
    if port is not None:
        outputs = {plan[0].name: results[plan[5][("source", first)]] for plan in plans}
        port = _finish_port(port, results, outputs, scenario, source)
    return ModelAudit(
        scenario, scenario["state"], model.format, source, engines, layers, port, tuple(notices)
    )


def _plan_port(scenario, model, source, plans, passes, notices):
    """Match the port's layers to the source's; a pass of each matched port layer, in the
    port's framework with the port's epsilon (the source's where it carries none), on its
    source layer's batch."""
    try:
        ported = store.model(scenario["port"])
    except store.FileProblem as problem:
        notices.append(f"port: {problem}")
        return None
    notices.extend(f"port: {n}" for n in ported.notices)
    if ported.source is not None:
        engine = SOURCE_ENGINES[ported.source]
    else:
        engine = "keras" if source == "torch" else "torch"
    plan_of = {plan[0].name: (k, plan) for k, plan in enumerate(plans)}
    rows = []
    for s, p, how in match(model.layers, ported.layers):
        index = None
        if s is not None and p is not None and not p.problem and s.name in plan_of:
            k, plan = plan_of[s.name]
            if s.channels == p.channels:
                state = {key: np.array(v, dtype=np.float64) for key, v in p.state.items()}
                eps = float(p.eps) if p.eps is not None else plan[1]
                index = len(passes)
                passes.append(Pass(engine, _with_eps(plan[4], engine, eps), state, k))
        rows.append((s, p, how, index))
    return scenario["port"], ported, rows


def _finish_port(port, results, outputs, scenario, source) -> PortCheck:
    digest, ported, rows = port
    dtype = scenario["dtype"]
    findings = []
    for s, p, how, index in rows:
        if p is None:
            findings.append(
                Finding(s.name, None, None, ("missing",), "no layer of the port matches it")
            )
            continue
        if s is None:
            findings.append(
                Finding(None, p.name, None, ("extra",), "no layer of the source matches it")
            )
            continue
        eps, _ = source_eps(scenario, source, s)
        momentum = source_momentum(scenario, source, s)
        keras_momentum = (
            None
            if momentum is None
            else (other_convention(momentum) if source == "torch" else momentum)
        )
        found, evidence = problems(s, p, eps, keras_momentum)
        gap = None
        if p.problem:  # a port layer no framework can run as it is (a negative variance)
            gap = Divergence.missing(
                SOURCE_ENGINES[source], "port", dtype, f"the port's layer cannot run: {p.problem}"
            )
        elif index is not None and s.name in outputs:
            mine, theirs = outputs[s.name].output, results[index].output
            if mine is not None and theirs is not None and mine.shape == theirs.shape:
                gap = Divergence.between(
                    SOURCE_ENGINES[source], results[index].name, mine, theirs, dtype
                )
            else:
                why = results[index].reason or results[index].error or "no output"
                gap = Divergence.missing(SOURCE_ENGINES[source], results[index].name, dtype, why)
        findings.append(Finding(s.name, p.name, how, found, evidence, gap))
    return PortCheck(digest, ported.format, tuple(findings))


def _measure_layers(plans, results, targets, source, dtype) -> list[dict]:
    """Every layer's gaps, source against each port's output (a run that is both ports
    once), measured together: shared out over the measuring threads (metrics.Figures).
    Per layer: {("source", "port:engine"): Divergence}."""
    first = SOURCE_ENGINES[source]
    figures, pairs_of = Figures(dtype), []
    for k, (_, _, _, _, _, runs) in enumerate(plans):
        src, pairs = results[runs[("source", first)]], []
        if src.output is not None:
            figures.add(f"{k}/source", src.output)
            for port in PORTS:
                for e in targets:
                    r = results[runs[(port, e)]]
                    if port == "faithful" and runs[(port, e)] == runs[("naive", e)]:
                        continue  # one run is both ports: measured once
                    if r.output is not None and r.output.shape == src.output.shape:
                        figures.add(f"{k}/{port}:{e}", r.output)
                        pairs.append(("source", f"{port}:{e}"))
        pairs_of.append(pairs)
    keyed = [(f"{k}/{a}", f"{k}/{b}") for k, pairs in enumerate(pairs_of) for a, b in pairs]
    measured = figures.gaps(keyed)
    return [
        {(a, b): measured[(f"{k}/{a}", f"{k}/{b}")] for a, b in pairs}
        for k, pairs in enumerate(pairs_of)
    ]


def _judge(plan, results, targets, source, dtype, gaps: dict) -> LayerAudit:
    layer, eps, eps_from, momentum, s, runs = plan
    first = SOURCE_ENGINES[source]
    src = results[runs[("source", first)]]
    for e in targets:
        if runs[("faithful", e)] == runs[("naive", e)] and ("source", f"naive:{e}") in gaps:
            gaps[("source", f"faithful:{e}")] = gaps[("source", f"naive:{e}")]
    by_port: dict[str, dict[str, Divergence]] = {port: {} for port in PORTS}
    for port in PORTS:
        for e in targets:
            d = gaps.get(("source", f"{port}:{e}"))
            if d is None:
                missing = src if src.output is None else results[runs[(port, e)]]
                why = missing.reason or missing.error or "no output"
                label = LABELS.get(missing.name, missing.name)
                d = Divergence.missing(first, e, dtype, f"{label}: {why}")
            by_port[port][e] = d.renamed(first, e)
    var = layer.state["running_var"]
    sensitive = {e: eps_sensitive(var, DEFAULTS[f"{knobs(e)}_eps"], eps) for e in targets}
    causes: dict[str, dict[str, list[Cause]]] = {"naive": {}, "faithful": {}}
    for e in targets:
        default = DEFAULTS[f"{knobs(e)}_eps"]
        knob = None if default == eps else f"{knobs(e)}_eps"
        causes["naive"][e] = port_causes(by_port["naive"][e], by_port["faithful"][e], knob)
        causes["faithful"][e] = port_causes(by_port["faithful"][e], by_port["faithful"][e], None)
    return LayerAudit(
        layer,
        eps,
        momentum,
        eps_from,
        s,
        by_port["naive"],
        by_port["faithful"],
        sensitive,
        causes,
        _scale(src.output),
    )


def _scale(out: np.ndarray | None) -> float:
    if out is None or out.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        top = float(np.nanmax(np.abs(out.astype(np.float64))))
    return top if np.isfinite(top) else 0.0
