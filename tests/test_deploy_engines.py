"""What the deployed layer computes: the PyTorch module exported to ONNX and run in ONNX Runtime
(engine ``onnx``), beside PyTorch and against ONNX's own float64 rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bnexplore
from bnexplore.runs.metrics import TOLERANCES
from bnexplore.runs.runner import compare
from bnexplore.scenario.links import parse_link
from tests.test_engines import assert_matches_reference

FLOAT32_ULP_AT_1 = 2.0**-24


@pytest.fixture(scope="module")
def seed() -> dict:
    return bnexplore.run("?v=1&engines=torch,onnx", explain=True)


def test_the_seed_exported_by_default_is_an_inference_node_giving_0_999995(seed: dict) -> None:
    torch, onnx = seed["engines"]["torch"], seed["engines"]["onnx"]
    assert torch["output"]["min"] == torch["output"]["max"] == 0.0
    assert onnx["error"] is None, onnx
    expected = 1 / math.sqrt(1 + float(np.float32(1e-5)))  # the node's float32 epsilon
    for bound in ("min", "max"):
        assert abs(onnx["output"][bound] - expected) <= 2 * FLOAT32_ULP_AT_1, onnx["output"]
    assert f"{onnx['output']['max']:.6f}" == "0.999995"
    assert "dynamo=True" in onnx["detail"] and "training_mode=0" in onnx["detail"], onnx
    assert "opset" in onnx["detail"] and "CPUExecutionProvider" in onnx["detail"]
    assert onnx["version"].startswith("onnxruntime 1.32.0") and "torch 2.13" in onnx["version"]
    # an inference node updates nothing: the running statistics stay the fresh module's
    np.testing.assert_array_equal(onnx["running_mean"], [0.0] * 100)
    np.testing.assert_array_equal(onnx["running_var"], [1.0] * 100)


def test_explain_names_exported_as_inference_as_the_seeds_cause(seed: dict) -> None:
    output = [step for step in seed["explain"] if step["of"] == "output"]
    assert output[0]["knob"] == "export" and output[0]["share"] == 1.0, output
    assert output[0]["cause"].startswith("exported as inference"), output[0]
    assert "onnx_exporter=torchscript" in output[0]["link"]


def test_the_torchscript_exporter_emits_a_training_node_giving_0() -> None:
    doc = bnexplore.run("?v=1&engines=torch,onnx&onnx_exporter=torchscript")
    onnx = doc["engines"]["onnx"]
    assert onnx["error"] is None, onnx
    assert onnx["output"]["min"] == onnx["output"]["max"] == 0.0
    assert "dynamo=False" in onnx["detail"] and "training_mode=1" in onnx["detail"], onnx
    # the running statistics are the module's before the pass, then ONNX's update (ORT's)
    np.testing.assert_allclose(onnx["running_var"], [0.9] * 100, rtol=1.3e-6)
    np.testing.assert_allclose(onnx["running_mean"], [0.1] * 100, rtol=1.3e-6)


def test_a_raw_training_export_writes_the_running_statistics_one_batch_ahead() -> None:
    """What the engine works around: TrainingMode.TRAINING traces one training pass, which
    updates the module's running statistics before they are written into the file."""
    import io
    import warnings

    import onnx
    import onnx.numpy_helper
    import torch

    module = torch.nn.BatchNorm2d(3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.ones(4, 3, 2, 2),),
            buffer,
            dynamo=False,
            training=torch.onnx.TrainingMode.TRAINING,
        )
    model = onnx.load_from_string(buffer.getvalue())
    written = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(written["running_var"], [0.9] * 3, rtol=1e-6)
    np.testing.assert_allclose(module.running_var.numpy(), [0.9] * 3, rtol=1e-6)  # advanced too


def random_state(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "weight": rng.uniform(0.5, 2.0, channels),
        "bias": rng.normal(0.0, 1.0, channels),
        "running_mean": rng.normal(0.0, 2.0, channels),
        "running_var": rng.uniform(0.05, 4.0, channels),
    }


STATE_CASES = [
    (seed, shape, dtype, exporter)
    for seed, shape, dtype, exporter in (
        (0, (8, 3), "float32", "dynamo"),
        (1, (4, 5, 7), "float64", "dynamo"),
        (2, (4, 3, 5, 6), "float32", "torchscript"),
        (3, (2, 3, 2, 3, 4), "float64", "torchscript"),
        (4, (6, 16, 4, 4), "float32", "dynamo"),
    )
]


@pytest.mark.parametrize(("seed", "shape", "dtype", "exporter"), STATE_CASES)
def test_a_random_trained_state_in_eval_runs_as_pytorch_eval_and_as_its_reference(
    store_dir, tmp_path, seed, shape, dtype, exporter
) -> None:
    rng = np.random.default_rng(seed)
    path = tmp_path / "bn.npz"
    np.savez(path, **{f"bn.{k}": v for k, v in random_state(rng, shape[1]).items()})
    digest = bnexplore.store_file(path)
    link = (
        f"?state={digest}&init=state&shape={','.join(map(str, shape))}&input=normal&seed={seed}"
        f"&mean=0.5&std=2&dtype={dtype}&torch_mode=eval&engines=torch,onnx"
        f"&onnx_exporter={exporter}"
    )
    scenario, notices = parse_link(link)
    assert notices == []
    comparison = compare(scenario)
    torch, onnx = comparison.results["torch"], comparison.results["onnx"]
    assert onnx.error is None, onnx.error
    assert onnx.output.dtype.name == dtype and onnx.output.shape == shape
    assert "training_mode=0" in onnx.detail
    assert_matches_reference(onnx.output, torch.output, dtype, "onnx against torch eval")
    reference = comparison.references["onnx"]
    assert_matches_reference(onnx.output, reference.output, dtype, "onnx against its reference")
    for stat in ("running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(onnx, stat), getattr(torch, stat))


def test_torchscript_train_mode_feeds_onnxs_population_variance(store_dir, tmp_path) -> None:
    rng = np.random.default_rng(7)
    shape, momentum = (4, 3, 5, 6), 0.25
    state = random_state(rng, shape[1])
    np.savez(tmp_path / "bn.npz", **state)
    digest = bnexplore.store_file(tmp_path / "bn.npz")
    link = (
        f"?state={digest}&init=state&shape=4,3,5,6&input=normal&seed=3&std=3"
        f"&torch_momentum={momentum}&engines=torch,onnx&onnx_exporter=torchscript"
    )
    comparison = compare(parse_link(link)[0])
    torch, onnx = comparison.results["torch"], comparison.results["onnx"]
    assert onnx.error is None, onnx.error
    batch = np.random.default_rng(3).standard_normal(shape) * 3
    batch = batch.astype(np.float32).astype(np.float64)
    n = batch.size // shape[1]
    var_b = batch.var(axis=(0, 2, 3))  # the population variance
    rtol, atol = TOLERANCES["float32"]
    expected = (1 - momentum) * state["running_var"] + momentum * var_b
    np.testing.assert_allclose(onnx.running_var, expected, rtol, atol)
    np.testing.assert_allclose(
        torch.running_var,
        (1 - momentum) * state["running_var"] + momentum * var_b * n / (n - 1),
        rtol,
        atol,
    )
    # the gap is the n/(n − 1) on the batch variance's part, nothing else
    np.testing.assert_allclose(
        torch.running_var - onnx.running_var, momentum * var_b / (n - 1), rtol=1e-4, atol=1e-6
    )
    assert_matches_reference(onnx.output, torch.output, "float32", "both normalize with the batch")
    reference = comparison.references["onnx"]
    assert_matches_reference(onnx.running_var, reference.running_var, "float32", "running_var")
    assert_matches_reference(onnx.output, reference.output, "float32", "output")


def test_explain_names_the_variance_estimator_of_a_training_export() -> None:
    doc = bnexplore.run(
        "?shape=8,3,4,4&input=normal&engines=torch,onnx&onnx_exporter=torchscript", explain=True
    )
    (step,) = doc["explain"]
    assert step["of"] == "running_var" and step["knob"] == "what remains", step
    assert "variance estimator" in step["cause"] and "ONNX Runtime the biased" in step["cause"]


def test_training_steps_run_in_pytorch_then_the_trained_module_is_exported() -> None:
    link = (
        "?shape=8,3&input=normal&steps=3&loss=mse&target=normal&torch_optimizer=adam"
        "&torch_lr=0.1&torch_mode=eval&engines=torch,onnx"
    )
    comparison = compare(parse_link(link)[0])
    torch, onnx = comparison.results["torch"], comparison.results["onnx"]
    assert onnx.error is None, onnx.error
    for name in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(onnx.trained_state[name], torch.trained_state[name])
    assert_matches_reference(onnx.output, torch.output, "float32", "output")
    assert_matches_reference(onnx.grad_x, torch.grad_x, "float32", "dL/dx")
    assert math.isclose(onnx.loss, torch.loss, rel_tol=1e-5)
    reference = comparison.references["onnx"]
    assert_matches_reference(onnx.output, reference.output, "float32", "output vs reference")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_a_clear_error(dtype: str) -> None:
    onnx = bnexplore.run(f"?shape=4,3&engines=torch,onnx&dtype={dtype}")["engines"]["onnx"]
    assert onnx["available"] is True
    assert "float32 and float64 only" in onnx["error"] and dtype in onnx["error"], onnx


def test_cuda_is_unavailable_the_wheel_is_cpu_only() -> None:
    onnx = bnexplore.run("?shape=4,3&engines=onnx&device=cuda")["engines"]["onnx"]
    assert onnx["available"] is False
    assert "CPU-only" in onnx["reason"], onnx


def test_exports_are_cached_by_what_shapes_them() -> None:
    import torch

    from bnexplore.engines import onnx_engine

    scenario, _ = parse_link("?shape=4,3&onnx_exporter=torchscript&torch_mode=eval")
    module = torch.nn.BatchNorm1d(3).eval()
    x = torch.ones(4, 3)
    first = onnx_engine.exported(scenario, module, x)
    assert onnx_engine.exported(scenario, module, x) is first
    with torch.no_grad():
        module.running_var.fill_(2.0)
    assert onnx_engine.exported(scenario, module, x) is not first


def test_onnx_exporter_is_in_the_engine_links_of_pytorch_configured_engines_only() -> None:
    scenario, _ = parse_link("?engines=torch,onnx,keras&onnx_exporter=torchscript")
    assert "onnx_exporter=torchscript" in scenario.engine_link("onnx")
    assert "onnx_exporter" not in scenario.engine_link("keras")
    default, _ = parse_link("?engines=torch,onnx,keras")
    assert default.engine_link("onnx") != scenario.engine_link("onnx")


# --- LiteRT: the Keras 3 layer converted, folded into a multiply and an add ---------------


def test_the_seed_through_litert_gives_0_9995004_and_says_what_ran() -> None:
    doc = bnexplore.run("?v=1&engines=torch,onnx,keras,litert")
    engines = doc["engines"]
    expected = float(np.float32(1 / math.sqrt(1 + 1e-3)))
    litert = engines["litert"]
    assert litert["error"] is None, litert
    for bound in ("min", "max"):
        assert abs(litert["output"][bound] - expected) <= 2 * FLOAT32_ULP_AT_1, litert["output"]
    assert "TFLiteConverter.from_keras_model" in litert["detail"] and "MUL" in litert["detail"]
    assert "ai_edge_litert.interpreter.Interpreter" in litert["version"]
    assert "ai-edge-litert 2.3.0" in litert["version"]
    assert engines["torch"]["output"]["max"] == 0.0
    assert f"{engines['onnx']['output']['max']:.6f}" == "0.999995"


def keras_state_link(store_dir, tmp_path, seed: int, shape: tuple[int, ...], extra: str) -> str:
    rng = np.random.default_rng(seed)
    path = tmp_path / "bn.npz"
    np.savez(path, **{f"bn.{k}": v for k, v in random_state(rng, shape[1]).items()})
    digest = bnexplore.store_file(path)
    return (
        f"?state={digest}&init=state&shape={','.join(map(str, shape))}&input=normal&seed={seed}"
        f"&mean=0.5&std=2&engines=keras,litert{extra}"
    )


@pytest.mark.parametrize(
    ("seed", "shape", "steps"),
    [(0, (8, 3), 0), (1, (4, 5, 7), 0), (2, (4, 3, 5, 6), 2), (3, (2, 3, 2, 3, 4), 0)],
)
def test_a_random_trained_state_through_litert_runs_as_keras_inference_and_its_reference(
    store_dir, tmp_path, seed, shape, steps
) -> None:
    link = keras_state_link(store_dir, tmp_path, seed, shape, f"&steps={steps}")
    comparison = compare(parse_link(link)[0])
    keras, litert = comparison.results["keras"], comparison.results["litert"]
    assert litert.error is None, litert.error
    assert litert.output.dtype.name == "float32" and litert.output.shape == shape
    assert_matches_reference(litert.output, keras.output, "float32", "litert against keras")
    reference = comparison.references["litert"]
    assert_matches_reference(litert.output, reference.output, "float32", "litert vs reference")
    for stat in ("running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(litert, stat), getattr(keras, stat))


def test_float16_quantization_is_within_float16_of_its_reference_and_explained(
    store_dir, tmp_path
) -> None:
    link = keras_state_link(store_dir, tmp_path, 5, (8, 6, 3, 3), "&litert_quantize=float16")
    scenario, _ = parse_link(link)
    comparison = compare(scenario)
    keras, litert = comparison.results["keras"], comparison.results["litert"]
    assert litert.error is None, litert.error
    assert "float16 constants" in litert.detail and "DEQUANTIZE" in litert.detail
    reference = comparison.references["litert"]
    assert_matches_reference(litert.output, reference.output, "float16", "float16 vs reference")
    gap = float(np.abs(litert.output.astype(np.float64) - keras.output).max())
    assert gap > 1e-4, gap  # beyond float32's tolerance: the constants' rounding
    steps = bnexplore.explain_steps(scenario, comparison.divergence[0])
    output = [step for step in steps if step.of == "output"]
    assert output[0].knob == "quantize" and output[0].share == 1.0, output
    assert output[0].cause.startswith("quantized to float16"), output[0]


def test_litert_runs_float32_inference_only() -> None:
    doc = bnexplore.run("?shape=4,3&engines=keras,litert&keras_training=true")
    assert doc["engines"]["litert"]["error"].startswith("LiteRT runs inference only")
    doc = bnexplore.run("?shape=4,3&engines=keras,litert&dtype=float64")
    assert doc["engines"]["litert"]["error"].startswith("LiteRT runs inference only")


def test_litert_quantize_is_in_the_engine_links_of_keras_configured_engines_only() -> None:
    scenario, _ = parse_link("?engines=torch,litert&litert_quantize=float16")
    assert "litert_quantize=float16" in scenario.engine_link("litert")
    assert "litert_quantize" not in scenario.engine_link("torch")
    assert "onnx_exporter" not in scenario.engine_link("litert")


def test_the_reproducer_exports_converts_and_runs_the_same_way(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from bnexplore.porting.script import reproducer

    link = (
        "?engines=onnx,litert&shape=4,3,2,2&input=normal&steps=1"
        "&onnx_exporter=torchscript&litert_quantize=float16"
    )
    scenario, _ = parse_link(link)
    script = tmp_path / "reproduce.py"
    script.write_text(reproducer(scenario), encoding="utf-8")
    ran = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True
    )
    printed = json.loads(ran.stdout)["engines"]
    doc = bnexplore.run(link)["engines"]
    for name in ("onnx", "litert"):
        assert printed[name].get("error") is None, printed[name]
        for key in ("min", "max", "mean"):
            assert math.isclose(
                printed[name]["output"][key], doc[name]["output"][key], rel_tol=1e-6, abs_tol=1e-6
            ), (name, key, printed[name]["output"], doc[name]["output"])
        np.testing.assert_allclose(printed[name]["running_var"], doc[name]["running_var"], 1e-6)


def test_the_exporter_and_quantize_widgets_show_only_where_their_engine_is_compared() -> None:
    from bnexplore.scenario.params import BY_KEY, read_by_any

    exporter, quantize = BY_KEY["onnx_exporter"], BY_KEY["litert_quantize"]
    assert not read_by_any(exporter, ("torch", "keras"))
    assert not read_by_any(quantize, ("torch", "keras"))
    assert read_by_any(exporter, ("keras", "onnx")) and read_by_any(quantize, ("litert",))
    assert read_by_any(BY_KEY["torch_eps"], ("onnx",)) and read_by_any(
        BY_KEY["keras_eps"], ("litert",)
    )
