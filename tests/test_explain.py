"""Explain, translator and reproducer scripts, on the real frameworks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import bnexplore
from bnexplore.judge.explain import EXACT_UP_TO, aligned, explain, shapley, summary
from bnexplore.judge.verdicts import GAPS, part, verdict
from bnexplore.porting.script import not_reproduced, reproducer
from bnexplore.porting.translate import keras_to_torch, torch_to_keras
from bnexplore.runs.metrics import TOLERANCES
from bnexplore.runs.runner import Reuse, compare
from bnexplore.scenario.batches import batches
from bnexplore.scenario.links import parse_link
from tests.scenarios import random_backend_links, random_links, random_training_links

RTOL, ATOL = TOLERANCES["float32"]


def test_explain_seed_names_the_mode_as_the_top_cause() -> None:
    steps = explain(parse_link("?preset=seed")[0])
    assert steps[0].knob == "mode"
    assert steps[0].gap_before == pytest.approx(1 / np.sqrt(1.001), rel=RTOL)
    assert steps[0].gap_after == 0.0
    assert summary(steps) == "100% of the gap: PyTorch ran in training mode, Keras 3 in inference"


def test_explain_seed_lists_eps_as_widening_with_no_share() -> None:
    """Aligning eps alone moves Keras's 1/√(1 + 1e-3) to 1/√(1 + 1e-5), further from
    PyTorch's 0: a knob with a negative Shapley value widens the gap and gets no share."""
    steps = {
        step.knob: step for step in explain(parse_link("?preset=seed")[0]) if step.of == "output"
    }
    assert steps["eps"].share is None and steps["eps"].widens > 0
    assert steps["eps"].gap_after > steps["eps"].gap_before
    assert "momentum" not in steps  # differs, but moves the gap in no order: not listed
    shares = [step.share for step in steps.values() if step.share is not None]
    assert all(0 <= share <= 1 for share in shares) and sum(shares) <= 1 + 1e-12
    assert "exact Shapley values over 3 knobs" in steps["mode"].method


def _orders_average(knobs: list[str], closed) -> dict[str, float]:
    """Shapley's definition: the marginal effect averaged over every order of the knobs."""
    import itertools

    phi = dict.fromkeys(knobs, 0.0)
    orders = list(itertools.permutations(knobs))
    for order in orders:
        done: frozenset[str] = frozenset()
        for knob in order:
            phi[knob] += (closed(done | {knob}) - closed(done)) / len(orders)
            done = done | {knob}
    return phi


def test_shapley_is_order_independent_and_adds_up_to_the_gap_closed() -> None:
    knobs = ["a", "b", "c", "d"]

    def closed(names: frozenset[str]) -> float:  # interactions: b only with a, d widens
        return (
            3.0 * ("a" in names)
            + 2.0 * ({"a", "b"} <= names)
            + ("c" in names)
            - (0.5 * ("d" in names))
        )

    phi, method = shapley(knobs, closed)
    assert phi == pytest.approx(_orders_average(knobs, closed))
    assert sum(phi.values()) == pytest.approx(closed(frozenset(knobs)))
    assert phi["d"] < 0 and "exact" in method


def test_shapley_above_six_knobs_is_sampled_with_a_fixed_seed_and_says_so() -> None:
    knobs = [f"k{i}" for i in range(EXACT_UP_TO + 1)]

    def closed(names: frozenset[str]) -> float:  # additive: every order gives the same
        return float(sum(int(name[1:]) + 1 for name in names))

    phi, method = shapley(knobs, closed)
    assert phi == pytest.approx({k: int(k[1:]) + 1.0 for k in knobs})
    assert "estimated from 64 random orders" in method and "default_rng(0)" in method
    assert shapley(knobs, closed) == (phi, method)  # the fixed seed: the same answer


def test_explain_matched_leaves_the_outputs_to_rounding_and_names_the_estimator() -> None:
    doc = bnexplore.run("?preset=matched", explain=True)
    final = doc["divergence"][0]
    assert final["allclose"] and final["max_abs"] <= ATOL
    assert final["verdict"] == {"output": "rounding", "state": "differ"}
    assert [step["of"] for step in doc["explain"]] == ["running_var"]
    (step,) = doc["explain"]
    assert step["knob"] == "what remains" and step["share"] == 1.0
    assert step["cause"].startswith("what no knob aligns: the variance estimator")


def test_explain_steps_are_links_that_reproduce_their_gap() -> None:
    doc = bnexplore.run("?preset=train-then-eval", explain=True)
    for step in doc["explain"]:
        if step["gap_after"] is not None:
            again = bnexplore.run(step["link"], reference=False)
            assert part(again["divergence"][0], step["of"])["max_abs"] == step["gap_after"]


def test_make_them_agree_aligns_every_knob_and_the_outputs_agree() -> None:
    scenario, _ = parse_link("?preset=momentum-drift&steps=3&torch_mode=train")
    agreed, causes = aligned(scenario)
    assert causes and agreed["keras_momentum"] == pytest.approx(0.9)
    assert agreed["keras_eps"] == agreed["torch_eps"]
    assert agreed["keras_training"] == "true"
    assert bnexplore.run(agreed.link, reference=False)["divergence"][0]["allclose"] is True


def test_translator_carries_the_optimizer_and_the_loss() -> None:
    scenario, _ = parse_link("?preset=weight-decay")
    to_keras, to_torch = torch_to_keras(scenario), keras_to_torch(scenario)
    compile(to_keras, "to_keras", "exec")
    compile(to_torch, "to_torch", "exec")
    # PyTorch's L2 decay becomes a loss term in Keras; Keras's decoupled decay is AdamW
    assert "torch.optim.Adam(bn.parameters(), lr=0.01, eps=1e-08, weight_decay=0.1)" in to_keras
    assert "loss += 0.05 * sum(" in to_keras
    assert "torch.optim.AdamW(bn.parameters(), lr=0.01, eps=1e-07, weight_decay=0.1)" in to_torch
    assert "√v̂" in to_keras and "keras.ops.mean((y - t" in to_keras
    sgd = torch_to_keras(parse_link("?loss=mse")[0])
    assert "lr=0.001" in sgd and "keras.optimizers.SGD(learning_rate=0.001" in sgd


def test_translator_code_compiles_and_says_the_conventions() -> None:
    scenario, _ = parse_link("?preset=frozen-keras")
    to_keras, to_torch = torch_to_keras(scenario), keras_to_torch(scenario)
    compile(to_keras, "to_keras", "exec")
    compile(to_torch, "to_torch", "exec")
    assert "momentum=0.9," in to_keras and "epsilon=1e-05" in to_keras
    assert "momentum=0.01," in to_torch and "bn.train(False)" in to_torch
    assert "not requires_grad_(False)" in to_torch


@pytest.mark.parametrize(
    "link",
    [
        "?preset=seed&shape=4,3,5,6",
        "?preset=weight-port",
        "?preset=keras2-vs-keras3",
        "?preset=one-sample",
        "?preset=half-precision&dtype=bfloat16",
        "?input=uniform&low=-1&high=3&steps=4&shape=6,5,7&torch_momentum=none&seed=11"
        "&engines=keras,torch,keras2&keras2_fused=false&keras_training=true",
        "?input=normal&steps=2&shape=8,3,4,4&keras_init=torch"
        "&engines=torch,keras,keras_jax,keras_torch,flax",
        "?preset=fast-variance",
        "?preset=adam-noise&engines=torch,keras,keras2&keras2_optimizer=adamw",
        "?preset=frozen-finetune&torch_mode=eval&keras_optimizer=sgd&keras_opt_momentum=0.9",
        "?preset=weight-port&loss=mse&target=normal&torch_optimizer=adamw&dtype=float64",
    ],
)
def test_generated_script_prints_the_apps_numbers(link: str, tmp_path) -> None:
    scenario, _ = parse_link(link)
    path = tmp_path / "repro.py"
    path.write_text(reproducer(scenario))
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=True,
    )
    printed = json.loads(done.stdout)
    doc = bnexplore.run(link, reference=False)
    assert printed["link"] == doc["link"]
    for name, engine in doc["engines"].items():
        got = printed["engines"][name]
        if engine["error"]:
            assert got["error"] == engine["error"]
            continue
        for key in ("output", "running_mean", "running_var", "gamma", "beta", "loss", "grad"):
            assert got[key] == engine[key], (name, key)


def test_the_script_says_which_engines_it_leaves_out_and_the_code_tab_warns(tmp_path) -> None:
    """With a loss, the script reproduces PyTorch, Keras 3 and Keras 2 and prints an error for
    the others: exactly the engines script.not_reproduced names (the Code tab's warning)."""
    link = "?shape=4,3,2&input=normal&steps=1&loss=mse&engines=torch,keras,flax,onnx"
    scenario, _ = parse_link(link)
    assert set(not_reproduced(scenario)) == {"flax", "onnx"}
    assert not not_reproduced(parse_link("?shape=4,3,2&engines=torch,keras,flax,onnx")[0])
    path = tmp_path / "repro.py"
    path.write_text(reproducer(scenario))
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    printed = json.loads(done.stdout)["engines"]
    doc = bnexplore.run(link, reference=False)
    for name in scenario["engines"]:
        if name in not_reproduced(scenario):
            assert printed[name].get("error"), (name, printed[name])
        else:
            assert printed[name]["output"] == doc["engines"][name]["output"], name
    at = AppTest.from_file(str(Path(__file__).parents[1] / "app.py"), default_timeout=300)
    at.query_params.update({**dict(parse_qsl(link[1:])), "tab": "code"})
    at.run()
    assert not at.exception
    (warned,) = [w.value for w in at.warning if "prints an error instead of numbers" in w.value]
    assert "Flax" in warned and "ONNX Runtime" in warned and "Keras 3:" not in warned


@pytest.mark.parametrize("seed", range(8))
def test_keras2_fused_feeds_unbiased_variance_non_fused_biased(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (
        int(rng.integers(2, 6)),
        int(rng.integers(1, 5)),
        int(rng.integers(1, 5)),
        int(rng.integers(1, 5)),
    )
    n = shape[0] * shape[2] * shape[3]
    base = (
        f"?shape={','.join(map(str, shape))}&input=normal&seed={seed}"
        f"&mean={rng.uniform(-2, 2):.3f}&std={rng.uniform(0.5, 2):.3f}"
        f"&engines=keras2&keras2_training=true&keras2_momentum=0.5"
    )
    for fused, factor in (("true", n / (n - 1) if n > 1 else 1.0), ("false", 1.0)):
        comparison = compare(parse_link(f"{base}&keras2_fused={fused}")[0])
        result = comparison.results["keras2"]
        assert result.detail == ("fused path" if fused == "true" else "non-fused path")
        x = next(batches(comparison.scenario))
        var_b = x.astype(np.float64).var(axis=(0, 2, 3))
        np.testing.assert_allclose(
            result.running_var, 0.5 + 0.5 * var_b * factor, rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("link", ["?engines=torch,flax", "?engines=keras_jax,flax&steps=2"])
def test_translator_covers_every_pair_of_conventions(link: str) -> None:
    from bnexplore.porting.translate import TRANSLATORS, translation_pair

    scenario = parse_link(link)[0]
    assert {pair for pair in TRANSLATORS} == {
        (a, b)
        for a in ("PyTorch", "Keras 3", "Flax")
        for b in ("PyTorch", "Keras 3", "Flax")
        if a != b
    }
    for (source, target), translate in TRANSLATORS.items():
        code = translate(scenario)
        compile(code, f"{source}->{target}", "exec")
        assert source.split()[0] in code and target.split()[0] in code
    first, second = translation_pair(scenario)
    assert "Flax" in (first, second)
    flax_to_torch = TRANSLATORS["Flax", "PyTorch"](scenario)
    assert "momentum=0.01" in flax_to_torch and "eps=1e-05" in flax_to_torch


def test_one_engine_has_nothing_to_align_or_explain() -> None:
    scenario, _ = parse_link("?engines=torch,torch&shape=4,3")  # one engine after dedup
    assert aligned(scenario) == (scenario, [])
    assert explain(scenario) == []


PROPERTY_LINKS = (
    random_links(5, seed=131) + random_training_links(3, seed=131) + random_backend_links(2, 131)
)


@pytest.mark.parametrize("link", PROPERTY_LINKS)
def test_explain_attributes_only_real_gaps_with_shares_that_add_up_to_at_most_one(link) -> None:
    """Random scenarios (three engines, every backend, training steps): each attributed
    gap is beyond its tolerance, each real gap of the headline's pair is attributed, and a
    gap's shares lie in (0, 1] and add up (exactly) to at most 1."""
    doc = bnexplore.run(link, explain=True)
    about = doc["headline_about"]
    if about is None:
        assert not doc["explain"]
        return
    (pair,) = [d for d in doc["divergence"] if (d["a"], d["b"]) == (about["a"], about["b"])]
    first_differing = next(
        (d for d in doc["divergence"] if "differ" in d["verdict"].values()), doc["divergence"][0]
    )
    assert pair is first_differing
    by_gap: dict[str, list[dict]] = {}
    for step in doc["explain"]:
        by_gap.setdefault(step["of"], []).append(step)
    for of in GAPS:
        gap = part(pair, of)
        real = gap is not None and verdict(gap) == "differ"
        assert (of in by_gap) == real, (of, gap, by_gap.get(of))
    for of, steps in by_gap.items():
        assert part(pair, of)["allclose"] is False, of
        shares = [step["share"] for step in steps if step["share"] is not None]
        assert all(0 < share <= 1 for share in shares), steps
        assert math.fsum(shares) <= 1, steps
        for step in steps:
            if step["widens"] is not None:
                assert step["share"] is None and step["widens"] > 0, step


def test_pytorchs_cumulative_average_against_a_moving_average_is_a_cause() -> None:
    """momentum=None over several steps has no Keras equivalent: aligning it makes PyTorch
    keep Keras's moving average, and that closes the running mean's gap (a review's find:
    it was put down to rounding)."""
    doc = bnexplore.run(
        "?v=1&shape=8,16,4,4&input=normal&mean=2&steps=3&torch_mode=eval&torch_momentum=none"
        "&keras_momentum=0.5&keras_eps=1e-5",
        explain=True,
    )
    (mean,) = [s for s in doc["explain"] if s["of"] == "running_mean"]
    assert mean["knob"] == "momentum" and mean["share"] == 1.0
    assert mean["cause"].startswith("averaging: PyTorch (momentum=None) keeps the cumulative")


def test_a_frozen_keras_layer_asked_to_train_is_one_cause_not_two() -> None:
    """keras_training=true with trainable=False: the mode is the trainable knob's doing."""
    doc = bnexplore.run("?preset=frozen-keras", explain=True)
    output = [s for s in doc["explain"] if s["of"] == "output" and s["share"]]
    assert [s["knob"] for s in output] == ["trainable"] and output[0]["share"] == 1.0


def test_a_knob_that_matters_only_once_another_is_aligned_says_so() -> None:
    doc = bnexplore.run("?preset=frozen-finetune", explain=True)
    said = {s["knob"]: s["cause"] for s in doc["explain"] if s["of"] == "output"}
    # Keras is frozen: PyTorch's frozen γ/β matter once Keras trains, and the learning
    # rates once both train
    assert said["requires_grad"].endswith("this matters only once trainable is aligned")
    assert said["learning rate"].endswith(
        "this matters only once trainable and requires_grad are aligned"
    )


def test_a_float64_layer_on_keras_jax_is_named_as_computed_in_float32() -> None:
    doc = bnexplore.run(
        "?v=1&engines=keras,keras_jax&shape=8,16,4,4&input=normal&mean=1&steps=2"
        "&dtype=float64&keras_training=true",
        explain=True,
    )
    causes = [s["cause"] for s in doc["explain"] if s["of"] == "output"]
    assert causes and all("computes a float64 layer in float32" in c for c in causes)


def test_pytorch_without_running_statistics_has_no_momentum_to_blame() -> None:
    doc = bnexplore.run(
        "?v=1&shape=8,16,4,4&input=normal&mean=1&steps=2&torch_mode=eval"
        "&torch_track_running_stats=false&keras_training=false",
        explain=True,
    )
    knobs = {s["knob"]: s["cause"] for s in doc["explain"]}
    assert "momentum" not in knobs
    assert knobs["mode"].startswith("PyTorch ran in eval mode with no running statistics")


def test_a_gap_with_nan_says_so_and_gets_no_share() -> None:
    """float16 Adam in PyTorch: β becomes NaN (a finding); max |Δ| cannot be split."""
    doc = bnexplore.run(
        "?v=1&shape=8,16,4,4&input=normal&dtype=float16&loss=mse&steps=1&torch_optimizer=adam"
        "&keras_optimizer=adam&keras_training=true&keras_eps=1e-5&keras_momentum=0.9",
        explain=True,
    )
    assert "values NaN or ±inf)" in doc["headline"]
    (beta,) = [s for s in doc["explain"] if s["of"] == "beta"]
    assert beta["share"] is None and beta["cause"] == "not finite: 16 values of β are NaN or ±inf"


# --- re-running only the framework whose knobs or inputs change -------------------------


@pytest.mark.parametrize(
    "link",
    [
        "?shape=6,3,2&input=normal&seed=7&steps=2",
        "?shape=6,3,2&input=normal&seed=8&steps=2&loss=mse&keras_optimizer=adam&torch_lr=0.05",
        "?shape=5,4,3&input=uniform&seed=9&steps=1&engines=torch,keras,flax&keras_eps=0.01",
    ],
)
def test_explain_with_reuse_gives_the_same_steps_running_each_framework_only_when_needed(
    link, monkeypatch, lanes_started
) -> None:
    import bnexplore.judge.explain

    scenario = parse_link(link)[0]
    monkeypatch.setattr(bnexplore.judge.explain, "GAPS", bnexplore.judge.explain.GapCache())
    everything = [s.to_dict() for s in explain(scenario, reuse=Reuse(per_engine=0))]
    monkeypatch.setattr(bnexplore.judge.explain, "GAPS", bnexplore.judge.explain.GapCache())
    lanes_started.clear()  # the runs of this explanation only
    reuse = Reuse()
    assert [s.to_dict() for s in explain(scenario, reuse=reuse)] == everything
    assert everything and reuse.hits > 0
    # the knobs aligned here are mostly Keras's: PyTorch runs again less often than Keras
    assert lanes_started.count("torch") < lanes_started.count("keras"), lanes_started


def test_a_sweep_of_one_frameworks_knob_runs_the_other_framework_once(lanes_started) -> None:
    from bnexplore.runs.sweep import run_sweep

    scenario = parse_link("?shape=6,3,2&input=normal&seed=11&steps=2")[0]
    points = run_sweep(scenario, "keras_momentum", [0.5, 0.9, 0.99])
    assert lanes_started.count("torch") == 1, lanes_started
    assert lanes_started.count("keras") == 3, lanes_started
    for point in points:  # each point as its own run gives
        alone = compare(parse_link(point.link)[0], reference=False)
        assert point.divergence == [d.to_dict() for d in alone.divergence]


def test_a_port_of_pytorchs_state_is_never_reused() -> None:
    scenario = parse_link("?shape=6,3,2&input=normal&seed=12&steps=2&keras_init=torch")[0]
    comparison = compare(scenario, reference=False)
    reuse = Reuse()
    for result in comparison.results.values():
        reuse.keep(scenario, result)
    assert reuse.get(scenario, "keras") is None and reuse.get(scenario, "torch") is None
    fresh = scenario.replace(keras_init="fresh")
    assert reuse.get(fresh, "torch") is None  # nothing was kept from a porting run
