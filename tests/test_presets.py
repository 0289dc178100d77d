"""Every preset opens, and every story's claim holds on the real frameworks' numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bnexplore
from bnexplore.runs.metrics import TOLERANCES
from bnexplore.runs.runner import compare
from bnexplore.scenario.links import parse_link
from bnexplore.scenario.presets import PRESETS

RTOL, ATOL = TOLERANCES["float32"]


def approx32(x: float):
    return pytest.approx(x, rel=RTOL, abs=ATOL)


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    return {
        name: bnexplore.run(f"?preset={name}", reference=True, explain=True) for name in PRESETS
    }


def engines(doc: dict) -> dict:
    return doc["engines"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_opens_without_notice_and_expands_into_its_keys(runs, name) -> None:
    doc = runs[name]
    assert doc["notices"] == []
    assert "preset" not in doc["link"]
    assert parse_link(doc["link"])[0] == parse_link(f"?preset={name}")[0]
    for name, engine in engines(doc).items():
        assert engine["available"] or name == "torch_gpu", engine  # CUDA only where there is one


def test_seed_pytorch_trains_keras_infers(runs) -> None:
    e = engines(runs["seed"])
    assert e["torch"]["output"]["max"] == 0.0
    assert e["keras"]["output"]["mean"] == approx32(1 / math.sqrt(1 + 1e-3))


def test_both_inference_only_eps_differs(runs) -> None:
    doc = runs["both-inference"]
    e = engines(doc)
    assert e["torch"]["output"]["mean"] == approx32(1 / math.sqrt(1 + 1e-5))
    assert e["keras"]["output"]["mean"] == approx32(1 / math.sqrt(1 + 1e-3))
    assert [s["knob"] for s in doc["explain"]] == ["eps"]
    assert doc["explain"][0]["gap_after"] <= ATOL


def test_train_then_eval_momentum_convention(runs) -> None:
    e = engines(runs["train-then-eval"])
    assert e["torch"]["output"]["mean"] == approx32(0.9 / math.sqrt(0.9 + 1e-5))
    assert f"{e['torch']['output']['mean']:.7f}" == "0.9486780"
    assert e["keras"]["output"]["mean"] == approx32(0.99 / math.sqrt(0.99 + 1e-3))
    assert f"{e['keras']['output']['mean']:.7f}" == "0.9944853"


def test_momentum_drift_running_statistics_part(runs) -> None:
    e = engines(runs["momentum-drift"])
    torch_mean = np.mean(e["torch"]["running_mean"])
    keras_mean = np.mean(e["keras"]["running_mean"])
    # PyTorch's weight on the data: 1 − 0.9⁵⁰; Keras's: 1 − 0.99⁵⁰ (data mean 2)
    assert torch_mean == pytest.approx(2 * (1 - 0.9**50), abs=0.05)
    assert keras_mean == pytest.approx(2 * (1 - 0.99**50), abs=0.05)
    momentum = next(s for s in runs["momentum-drift"]["explain"] if s["knob"] == "momentum")
    assert momentum["gap_after"] < 0.5 * momentum["gap_before"]  # aligned alone, it halves it
    assert momentum["share"] > 0.25


def test_matched_outputs_agree_running_variances_differ_by_bessel(runs) -> None:
    doc = runs["matched"]
    (pair,) = doc["divergence"]
    assert pair["allclose"] is True
    tv = np.array(engines(doc)["torch"]["running_var"])
    kv = np.array(engines(doc)["keras"]["running_var"])
    assert np.all(tv > kv)  # the unbiased estimate is the larger, channel by channel
    # the gap is Bessel's: the references (biased vs unbiased rules) reproduce it
    ref_gap = np.array(doc["reference"]["torch"]["running_var"]) - np.array(
        doc["reference"]["keras"]["running_var"]
    )
    np.testing.assert_allclose(tv - kv, ref_gap, rtol=1e-4, atol=ATOL)
    assert all(s["gap_after"] is None or s["gap_after"] <= ATOL for s in doc["explain"])


def test_bessel_running_variance_moves_by_n_over_n_minus_1(runs) -> None:
    doc = runs["bessel"]
    n = 4
    tv = np.array(engines(doc)["torch"]["running_var"])
    kv = np.array(engines(doc)["keras"]["running_var"])
    np.testing.assert_allclose((tv - 0.9) / (kv - 0.9), n / (n - 1), rtol=1e-4)


def test_frozen_keras_ignores_training_true_pytorch_does_not(runs) -> None:
    e = engines(runs["frozen-keras"])
    assert e["keras"]["running_mean"] == [0.0] * 32  # no update
    assert e["torch"]["output"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert e["torch"]["output"]["std"] == pytest.approx(1.0, abs=1e-3)  # batch statistics
    assert e["keras"]["output"]["mean"] == pytest.approx(1.0, abs=0.05)  # (x − 0)/√(1 + eps)
    # asked to train, Keras infers only because it is frozen: one cause, not mode as well
    assert runs["frozen-keras"]["explain"][0]["knob"] == "trainable"


def test_keras2_vs_keras3_fused_variance_is_bessel_corrected(runs) -> None:
    doc = runs["keras2-vs-keras3"]
    e = engines(doc)
    assert e["keras2"]["detail"] == "fused path"
    assert doc["divergence"][0]["allclose"] is True  # training outputs agree
    n = 4 * 4 * 4
    k2 = np.array(e["keras2"]["running_var"]) - 0.99
    k3 = np.array(e["keras"]["running_var"]) - 0.99
    np.testing.assert_allclose(k2 / k3, n / (n - 1), rtol=1e-3)


def test_small_variance_eps_scales_keras_by_a_third(runs) -> None:
    e = engines(runs["small-variance-eps"])
    v = np.mean(e["torch"]["running_var"])
    ratio = e["keras"]["output"]["std"] / e["torch"]["output"]["std"]
    assert ratio == pytest.approx(math.sqrt((v + 1e-5) / (v + 1e-3)), rel=0.02)
    assert ratio < 0.4  # tens of percent
    assert runs["small-variance-eps"]["explain"][0]["knob"] == "eps"


def test_one_sample_pytorch_raises_keras_returns_beta(runs) -> None:
    e = engines(runs["one-sample"])
    assert "Expected more than 1 value per channel when training" in e["torch"]["error"]
    assert e["keras"]["output"] == {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "nonfinite": 0}
    assert e["keras"]["running_var"] == approx32(0.99) or all(
        v == approx32(0.99) for v in e["keras"]["running_var"]
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keras_rounds_once_pytorch_to_the_outputs_scale(dtype) -> None:
    """Finding (CPU): Keras 3 computes in float32 and rounds the output once, within half an
    ulp of the exact result; PyTorch's CPU half kernel is accurate to one ulp of the output's
    largest magnitude, so its values near zero carry large relative errors."""
    from bnexplore.scenario.batches import numpy_dtype

    half = numpy_dtype(dtype)
    scenario, _ = parse_link(f"?preset=half-precision&dtype={dtype}")
    comparison = compare(scenario)
    errors = {}
    for name, result in comparison.results.items():
        assert result.output.dtype == half
        exact = comparison.references[name].output
        errors[name] = np.abs(result.output.astype(np.float64) - exact)
        ulp_here = np.spacing(np.abs(exact).astype(half)).astype(np.float64)
        ulp_scale = float(np.spacing(half.type(np.abs(exact).max())))
        if name == "keras":
            # one rounding to half, after float32 arithmetic (relative 2⁻²⁴ per operation)
            assert np.all(errors[name] <= 0.5 * ulp_here + 2.0**-20 * np.abs(exact))
        else:
            assert errors[name].max() <= ulp_scale
            assert np.any(errors[name] > ulp_here)  # not correctly rounded near zero
        # either way, far outside float32's tolerance: half precision is visible
        assert not np.all(errors[name] <= ATOL + RTOL * np.abs(exact)), name


def test_large_mean_tensorflow_batch_mean_is_less_exact(runs) -> None:
    ref = runs["large-mean"]["reference"]
    torch_error = ref["torch"]["vs_engine"]["max_abs"]
    keras_error = ref["keras"]["vs_engine"]["max_abs"]
    assert keras_error > 10 * torch_error
    assert ref["keras"]["vs_engine"]["allclose"] is False


def test_weight_port_agrees_and_swapped_port_does_not(runs) -> None:
    assert runs["weight-port"]["divergence"][0]["allclose"] is True
    swapped = bnexplore.run("?preset=weight-port&keras_init=torch_swapped", explain=True)
    assert swapped["divergence"][0]["max_abs"] > 1.0
    assert [s["knob"] for s in swapped["explain"]][-1] == "port"
    assert swapped["explain"][-1]["gap_after"] <= ATOL


def test_cpu_vs_gpu_says_why_the_cuda_side_did_not_run_without_a_gpu(runs) -> None:
    import torch

    engines = runs["cpu-vs-gpu"]["engines"]
    assert engines["torch"]["device"] == "cpu" and engines["torch"]["output"]
    if torch.cuda.is_available():
        assert engines["torch_gpu"]["device"].startswith("cuda")
        assert runs["cpu-vs-gpu"]["divergence"][0]["allclose"] is True
    else:
        assert engines["torch_gpu"]["available"] is False
        assert "no CUDA device" in engines["torch_gpu"]["reason"]
        assert "did not run" in runs["cpu-vs-gpu"]["divergence"][0]["reason"]


def _reference_errors(doc: dict) -> dict[str, float]:
    return {name: ref["vs_engine"]["max_abs"] for name, ref in doc["reference"].items()}


def test_keras_backends_same_rules_three_kernels(runs) -> None:
    errors = _reference_errors(runs["keras-backends"])
    assert errors["keras_jax"] < errors["keras"] < errors["keras_torch"], errors
    assert errors["keras_torch"] > 0.1, errors  # the fast variance lost every digit
    explained = runs["keras-backends"]["explain"]
    assert {s["knob"] for s in explained} == {"what remains"}  # no rule differs
    assert all("kernel path" in s["cause"] for s in explained)


def test_flax_vs_torch_agree_on_the_seed_and_part_by_momentum_after_training(runs) -> None:
    seed = bnexplore.run("?engines=torch,flax")
    assert seed["divergence"][0]["allclose"] is True
    assert engines(seed)["flax"]["output"]["max"] == 0.0
    doc = runs["flax-vs-torch"]
    assert doc["divergence"][0]["max_abs"] > 1.0
    first = doc["explain"][0]
    assert first["knob"] == "momentum" and first["gap_after"] < 0.01 * first["gap_before"]
    assert "unbiased" in doc["explain"][-1]["cause"]


def test_fast_variance_cancels_in_flax_and_keras_on_pytorch_not_in_two_passes(runs) -> None:
    doc = runs["fast-variance"]
    errors = _reference_errors(doc)
    # two passes keep the float32 mean's rounding (times the gain |mean|/std = 100): ~1e-5
    assert errors["keras_jax"] < 1e-4 and errors["keras_jax"] < errors["flax"] / 100, errors
    assert errors["keras_jax"] < errors["keras_torch"] / 100, errors
    two_pass = bnexplore.run("?preset=fast-variance&flax_use_fast_variance=false", reference=True)
    assert _reference_errors(two_pass)["flax"] < errors["flax"] / 100


# --- the training step (loss=mse) ----------------------------------------------------------


def pair_of(doc: dict) -> dict:
    return doc["divergence"][0]


def test_train_step_then_eval_translated_sgd_trains_alike_bessel_parts_the_eval(runs) -> None:
    doc = runs["train-step-then-eval"]
    pair, e = pair_of(doc), engines(doc)
    assert pair["state"]["gamma"]["allclose"] and pair["state"]["beta"]["allclose"]
    assert max(abs(g - 1) for g in e["torch"]["gamma"]) > 1e-3  # the steps moved γ
    # the eval outputs part, and the float64 references (unbiased vs biased running
    # variance, identical γ/β updates) part by the same amount: semantics, not arithmetic
    references = doc["reference"]
    exact_gap = np.max(
        np.abs(np.array(references["torch"]["running_var"]) - references["keras"]["running_var"])
    )
    assert pair["state"]["running_var"]["max_abs"] == pytest.approx(exact_gap, rel=0.01)
    explained = doc["explain"]
    assert [(s["of"], s["knob"]) for s in explained] == [
        ("output", "what remains"),
        ("running_var", "what remains"),
    ]
    assert all("unbiased" in s["cause"] for s in explained)


def test_adam_epsilon_default_and_placement_part_them(runs) -> None:
    doc = runs["adam-epsilon"]
    pair = pair_of(doc)
    assert not pair["allclose"] and not pair["state"]["beta"]["allclose"]
    for name in ("torch", "keras"):  # each follows its own rules: the gap is semantics
        assert doc["reference"][name]["vs_engine"]["allclose"], name
        assert doc["reference"][name]["vs_engine"]["state"]["beta"]["allclose"], name
    steps = {s["knob"]: s for s in doc["explain"]}
    assert steps["Adam ε"]["share"] > 0.5  # the default ε: most of the gap
    assert steps["what remains"]["share"] > 0.01  # its placement: the rest
    assert "√v̂" in steps["what remains"]["cause"]
    assert steps["Adam ε"]["gap_after"] > ATOL  # equal ε values do not make them agree


def test_weight_decay_l2_against_decoupled(runs) -> None:
    doc = runs["weight-decay"]
    pair = pair_of(doc)
    assert not pair["state"]["gamma"]["allclose"]
    top = doc["explain"][0]
    assert top["knob"] == "weight decay" and top["share"] > 0.9
    assert "L2" in top["cause"] and "decoupled" in top["cause"]
    # PyTorch's AdamW decays like Keras: with it, γ agrees
    adamw = bnexplore.run(f"{doc['link']}&torch_optimizer=adamw")
    assert pair_of(adamw)["state"]["gamma"]["allclose"]


def test_frozen_finetune_gradients_wrt_x_differ(runs) -> None:
    doc = runs["frozen-finetune"]
    pair, e = pair_of(doc), engines(doc)
    for name in ("torch", "keras"):
        assert e[name]["gamma"] == [1.0] * 32 and e[name]["beta"] == [0.0] * 32  # no update
        assert e[name]["grad"]["gamma"] is None and e[name]["grad"]["beta"] is None
    assert pair["grad"]["x"]["allclose"] is False
    assert pair["grad"]["gamma"] is None
    # PyTorch back-propagates through the batch statistics: its gradient has mean 0
    assert abs(e["torch"]["grad"]["x"]["mean"]) < 1e-9
    assert abs(e["keras"]["grad"]["x"]["mean"]) > 1e-5
    assert doc["explain"][0]["knob"] == "trainable"


def test_adam_noise_reference_cannot_predict_the_step(runs) -> None:
    doc = runs["adam-noise"]
    e, references = engines(doc), doc["reference"]
    for name in ("torch", "keras"):
        reference = references[name]
        assert reference["beta"] == [0.0] * 32  # the exact gradient is 0: β stays
        bound = reference["unpredictable"]["beta"]
        assert bound == pytest.approx(3 * 1e-3, rel=0.01)  # lr per step, 3 Adam steps
        moved = max(abs(b) for b in e[name]["beta"])
        assert 1e-6 < moved <= bound, name  # rounding noise became steps, within the bound
        assert reference["vs_engine"]["state"]["gamma"]["allclose"], name
    assert not pair_of(doc)["state"]["beta"]["allclose"]  # and differently in each


def test_sgd_defaults_keras_moves_ten_times_as_far(runs) -> None:
    e = engines(runs["sgd-defaults"])
    torch_move = np.abs(np.array(e["torch"]["gamma"]) - 1)
    keras_move = np.abs(np.array(e["keras"]["gamma"]) - 1)
    np.testing.assert_allclose(keras_move / torch_move, 10.0, rtol=0.01)
    assert runs["sgd-defaults"]["explain"][0]["knob"] == "learning rate"


# --- the headline and explain tell each preset's story (issue 13) ---------------------

STORIES: dict[str, tuple[str | None, str, dict[str, tuple[str, ...]]]] = {
    # preset: (the gap the headline is about, words in the headline,
    #          {gap: what its largest share names (any of)})
    "seed": ("output", "normalized with the batch statistics", {"output": ("mode",)}),
    "both-inference": ("output", "PyTorch and Keras 3 differ", {"output": ("eps",)}),
    "train-then-eval": ("output", "differ", {"output": ("momentum",)}),
    "momentum-drift": ("output", "differ", {"output": ("momentum",)}),
    "matched": (
        "running_var",
        "the outputs differ only by rounding, but the running variance differs",
        {"running_var": ("variance estimator",)},
    ),
    "bessel": (
        "running_var",
        "the outputs differ only by rounding, but the running variance differs",
        {"running_var": ("variance estimator",)},
    ),
    "frozen-keras": ("output", "with its moving averages", {"output": ("mode", "trainable")}),
    "keras2-vs-keras3": (
        "running_var",
        "the outputs differ only by rounding, but the running variance differs",
        {"running_var": ("variance estimator",)},
    ),
    "small-variance-eps": ("output", "differ", {"output": ("eps",)}),
    "one-sample": (None, "cannot be compared: PyTorch raised an error", {}),
    "half-precision": ("output", "differ", {"output": ("own arithmetic",)}),
    "large-mean": ("output", "differ", {"output": ("own arithmetic",)}),
    "weight-port": (None, "differ only by rounding; so do their running statistics", {}),
    "keras-backends": ("output", "Keras 3 and Keras 3 (JAX) differ", {"output": ("kernel path",)}),
    "flax-vs-torch": ("output", "PyTorch and Flax differ", {"output": ("momentum",)}),
    "fast-variance": ("output", "differ", {"output": ("kernel path", "E[x²] − E[x]²")}),
    "train-step-then-eval": ("output", "differ", {"output": ("variance estimator",)}),
    "adam-epsilon": ("output", "γ, β, dL/dβ differ", {"output": ("Adam ε",), "gamma": ("Adam ε",)}),
    "weight-decay": ("output", "γ, β, dL/dγ, dL/dβ differ", {"output": ("weight decay",)}),
    "frozen-finetune": (
        "output",
        "normalized with the batch statistics",
        {"output": ("mode", "trainable"), "grad_x": ("mode", "trainable")},
    ),
    "adam-noise": ("output", "differ", {"output": ("where Adam adds ε",)}),
    "sgd-defaults": ("output", "γ, β, dL/dγ differ", {"output": ("learning rate",)}),
    "onnx-export": (
        "output",
        "ONNX Runtime with its running statistics",
        {"output": ("exported as inference",), "running_var": ("exported as inference",)},
    ),
    "litert-folded": (None, "Keras 3 and LiteRT agree exactly", {}),
    "litert-float16": (
        "output",
        "Keras 3 and LiteRT differ",
        {"output": ("quantized to float16",)},
    ),
}


def top_cause(doc: dict, of: str) -> dict:
    steps = [step for step in doc["explain"] if step["of"] == of and step["share"]]
    return max(steps, key=lambda step: step["share"])


@pytest.mark.parametrize("name", list(PRESETS))
def test_headline_and_explain_tell_the_presets_story(runs, name) -> None:
    doc = runs[name]
    if name == "cpu-vs-gpu":  # its story needs a GPU: without one, the pair is not compared
        if not doc["engines"]["torch_gpu"]["available"]:
            assert "cannot be compared" in doc["headline"] and not doc["explain"]
            return
        about = doc["headline_about"]
        assert (about["a"], about["b"]) == ("torch", "torch_gpu")
        for step in doc["explain"]:
            assert step["knob"] in ("device", "what remains")
            assert "kernel path" in step["cause"]
        return
    of, words, causes = STORIES[name]
    assert words in doc["headline"], doc["headline"]
    assert (doc["headline_about"] or {}).get("of") == of, doc["headline_about"]
    attributed = {step["of"] for step in doc["explain"]}
    for gap, names in causes.items():
        top = top_cause(doc, gap)
        assert any(n in f"{top['knob']}: {top['cause']}" for n in names), (gap, top)
    if of is None:
        assert not doc["explain"]
    elif of != "output":
        assert "output" not in attributed  # the outputs agree within rounding
    assert set(causes) <= attributed


def test_every_preset_has_its_story_checked() -> None:
    assert set(STORIES) | {"cpu-vs-gpu"} == set(PRESETS)


def test_bessel_running_variance_gap_is_the_variance_estimator_whole(runs) -> None:
    doc = runs["bessel"]
    assert doc["divergence"][0]["verdict"] == {"output": "rounding", "state": "differ"}
    (step,) = [step for step in doc["explain"] if step["of"] == "running_var"]
    assert step["share"] == 1.0
    assert step["cause"] == (
        "what no knob aligns: the variance estimator — PyTorch feeds the unbiased "
        "(n/(n − 1)) batch variance into its running variance, Keras 3 the biased"
    )
    # the headline quotes the channel that parts most, in the frameworks' own values
    rv = {e: np.array(runs["bessel"]["engines"][e]["running_var"]) for e in ("torch", "keras")}
    c = int(np.argmax(np.abs(rv["torch"] - rv["keras"]) / np.maximum(rv["torch"], rv["keras"])))
    assert f"channel {c}: {rv['torch'][c]:.6g} in PyTorch, {rv['keras'][c]:.6g}" in doc["headline"]


def test_keras2_fused_is_named_as_a_kernel_path_where_the_estimator_cannot_reach() -> None:
    """Keras 2 fused against non-fused, both in training: the outputs come from different
    kernels only; the estimator it also switches feeds the running variance alone."""
    doc = bnexplore.run(
        "?engines=keras2,keras&keras2_training=true&keras_training=true&input=normal"
        "&mean=300&shape=4,32,4,4",
        explain=True,
    )
    named = {(step["of"], step["knob"]): step for step in doc["explain"]}
    assert named[("output", "kernel path")]["share"] == 1.0
    assert named[("running_var", "variance estimator")]["share"] == 1.0
    assert ("output", "variance estimator") not in named
    assert "fused kernel" in named[("output", "kernel path")]["cause"]
