"""Keras 3 on JAX and on PyTorch, and Flax: each run for real in its own worker process."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bnexplore
from bnexplore.runs.metrics import TOLERANCES
from bnexplore.runs.runner import compare
from bnexplore.scenario.links import parse_link
from tests.scenarios import random_backend_links
from tests.test_engines import (
    assert_output_matches_reference,
    assert_running_stat_matches_reference,
)

FLOAT32_ULP_AT_1 = 2.0**-24  # spacing of float32 just below 1


def compute_dtype(engine: str, dtype: str) -> str:
    """The dtype an engine computes in. Found here (Keras 3.15): on JAX and PyTorch, Keras's
    ``result_type("float64", "float32")`` is float32, so a float64 BatchNormalization
    computes in float32 there (TensorFlow's computes in float64); its tolerances are
    float32's."""
    if engine in ("keras_jax", "keras_torch") and dtype == "float64":
        return "float32"
    return dtype


@pytest.fixture(scope="module")
def seed() -> dict:
    return bnexplore.run("?engines=torch,keras,keras_jax,keras_torch,flax")


def test_seed_through_every_engine_gives_0_and_0_9995004(seed: dict) -> None:
    engines = seed["engines"]
    expected = np.float32(1 / math.sqrt(1 + 1e-3))  # 0.9995004, rounded to float32
    for name in ("torch", "flax"):
        assert engines[name]["error"] is None, engines[name]
        out = engines[name]["output"]
        assert out["min"] == out["max"] == 0.0, (name, out)
    for name in ("keras", "keras_jax", "keras_torch"):
        assert engines[name]["error"] is None, engines[name]
        out = engines[name]["output"]
        assert abs(out["max"] - float(expected)) <= 2 * FLOAT32_ULP_AT_1, (name, out)
        assert f"{out['mean']:.6f}" == "0.999500", (name, out)
    # Flax trained on the ones like PyTorch, with Keras's momentum: 0.99·1 + 0.01·0
    np.testing.assert_allclose(engines["flax"]["running_var"], [0.99] * 100, rtol=1.3e-6)
    np.testing.assert_allclose(engines["flax"]["running_mean"], [0.01] * 100, rtol=1.3e-6)


def test_each_engine_says_where_and_what_it_ran(seed: dict) -> None:
    engines = seed["engines"]
    assert "JAX" in engines["keras_jax"]["version"]
    assert "torch" in engines["keras_torch"]["version"]
    assert engines["flax"]["version"].startswith("flax ")
    for name in ("keras_jax", "keras_torch", "flax"):
        assert engines[name]["device"] in ("cpu", "gpu") or "cuda" in engines[name]["device"]


@pytest.mark.parametrize("link", random_backend_links(36, seed=2027))
def test_every_backend_engine_follows_its_frameworks_rules(link: str) -> None:
    scenario, notices = parse_link(link)
    assert notices == []
    comparison = compare(scenario)
    for name, result in comparison.results.items():
        dtype = compute_dtype(name, scenario["dtype"])
        assert result.available, result.reason
        reference = comparison.references.get(name)
        if reference is None or reference.error:  # no state to port
            assert result.error and "no state to port" in result.error, (name, result.error)
            continue
        assert result.error is None, (name, result.error)
        assert result.output.dtype.name == scenario["dtype"]
        assert result.output.shape == scenario.shape
        assert_output_matches_reference(result.output, reference, dtype, f"{name} output")
        fed = (reference.variance_error or {}).get("running")
        for stat in ("running_mean", "running_var"):
            extra = float(fed.max()) if fed is not None and stat == "running_var" else 0.0
            assert_running_stat_matches_reference(
                getattr(result, stat),
                getattr(reference, stat),
                scenario.replace(dtype=dtype),
                name,
                stat,
                extra,
            )
        np.testing.assert_array_equal(result.history["step"], reference.history["step"])


def test_flax_feeds_the_biased_variance_with_kerass_momentum_convention() -> None:
    link = (
        "?shape=4,1&input=uniform&low=0&high=3&seed=1&steps=1&engines=flax,torch&flax_momentum=0.9"
    )
    comparison = compare(parse_link(link)[0], reference=False)
    batch = np.random.default_rng(1).uniform(0, 3, (4, 1))
    var_b = batch.var()
    flax, torch = comparison.results["flax"], comparison.results["torch"]
    rtol, atol = TOLERANCES["float32"]
    np.testing.assert_allclose(flax.history["running_var"][0], 0.9 + 0.1 * var_b, rtol, atol)
    np.testing.assert_allclose(torch.history["running_var"][0], 0.9 + 0.1 * var_b * 4 / 3, rtol)


def test_keras_on_pytorch_loses_the_variance_at_a_large_mean_and_jax_does_not() -> None:
    link = (
        "?shape=20,8,35,45&input=normal&mean=1000&engines=keras_jax,keras_torch,flax"
        "&keras_training=true"
    )
    comparison = compare(parse_link(link)[0])
    errors = {
        name: float(np.abs(r.output.astype(np.float64) - comparison.references[name].output).max())
        for name, r in comparison.results.items()
    }
    assert errors["keras_jax"] < 1e-3, errors
    assert errors["keras_torch"] > 0.1 and errors["flax"] > 0.1, errors
    # and the derived bound covers what the fast variance did
    for name in ("keras_torch", "flax"):
        bound = comparison.references[name].variance_error["output"]
        assert errors[name] <= bound.max(), (name, errors[name], bound.max())


def test_keras_3_float64_computes_in_float32_on_jax_and_pytorch_but_not_tensorflow() -> None:
    doc = bnexplore.run("?shape=4,3&dtype=float64&engines=keras,keras_jax,keras_torch")
    exact = 1 / math.sqrt(1 + 1e-3)
    got = {name: e["output"]["max"] for name, e in doc["engines"].items()}
    assert abs(got["keras"] - exact) < 1e-15, got
    for name in ("keras_jax", "keras_torch"):
        assert 1e-9 < abs(got[name] - exact) < 2 * FLOAT32_ULP_AT_1, (name, got)
        assert got[name] == float(np.float32(got[name])), (name, got)  # a float32 value
