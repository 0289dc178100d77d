"""The training step (loss=mse): each framework, run for real, against the float64
computation of its own rules — BatchNorm's backward and each optimizer's convention."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from bnexplore.engines.reference import adam_step_bound
from bnexplore.judge.document import document
from bnexplore.runs.runner import compare
from bnexplore.scenario.links import parse_link
from bnexplore.scenario.params import OPTIMIZER_DEFAULTS
from tests.scenarios import random_training_links
from tests.test_engines import (
    assert_matches_reference,
    assert_output_matches_reference,
    assert_running_stat_matches_reference,
    assert_running_stats_match_reference,
)

TRAINING_LINKS = random_training_links(40, seed=909)


@pytest.mark.parametrize("link", TRAINING_LINKS)
def test_every_engine_trains_by_its_frameworks_rules(link: str) -> None:
    """Output, γ, β, running statistics, loss and the gradients w.r.t. x, γ and β within
    the dtype's assert_close tolerance of the float64 reference (the output with the
    mean's rounding propagated, the running statistics once per stored update, as in
    tests/test_engines.py). Keras's float32 lr, weight decay, momentum and β bases are
    part of its rules (see ReferenceOptimizer), so float64 layers need no wider tolerance."""
    scenario, notices = parse_link(link)
    assert notices == []
    comparison = compare(scenario)
    dtype = scenario["dtype"]
    for name, result in comparison.results.items():
        reference = comparison.references[name]
        assert result.error is None and reference.error is None, (name, result.error)
        assert reference.unpredictable is None  # a normal target: no exact zero gradient
        assert_output_matches_reference(result.output, reference, dtype, f"{name} output")
        assert_running_stats_match_reference(result, reference, scenario, name)
        assert_matches_reference(result.loss, reference.loss, dtype, f"{name} loss")
        assert result.grad_x.dtype.name == dtype and result.grad_x.shape == scenario.shape
        for quantity in ("gamma", "beta", "grad_x", "grad_gamma", "grad_beta"):
            got, want = getattr(result, quantity), getattr(reference, quantity)
            assert (got is None) == (want is None), (name, quantity)
            if want is not None:
                assert_matches_reference(got, want, dtype, f"{name} {quantity}")
        for quantity in ("gamma", "beta"):
            history = result.parameter_history or {}
            expected = reference.parameter_history or {}
            assert (quantity in history) == (quantity in expected), (name, quantity)
            if quantity in expected:
                assert_matches_reference(
                    history[quantity], expected[quantity], dtype, f"{name} {quantity} history"
                )


def test_frozen_layers_compute_no_parameter_gradient() -> None:
    link = (
        "?shape=4,3,5&input=normal&steps=2&loss=mse&target=normal&engines=torch,keras"
        "&torch_requires_grad=false&keras_trainable=false&keras_training=true"
    )
    comparison = compare(parse_link(link)[0])
    for name, result in comparison.results.items():
        assert result.grad_gamma is None and result.grad_beta is None, name
        np.testing.assert_array_equal(result.gamma, np.ones(3))  # no step taken
        assert result.grad_x is not None
    # PyTorch still normalizes with the batch: its gradient w.r.t. x sums to 0 per channel
    torch_grad = comparison.results["torch"].grad_x.astype(np.float64)
    np.testing.assert_allclose(torch_grad.sum(axis=(0, 2)), 0.0, atol=1e-6)
    # Keras infers: dL/dx = γ/√(moving_var + eps)·dy, which does not
    keras_grad = comparison.results["keras"].grad_x.astype(np.float64)
    assert np.abs(keras_grad.sum(axis=(0, 2))).max() > 1e-3


def test_loss_none_reports_parameters_but_no_gradients() -> None:
    comparison = compare(parse_link("?shape=4,3&input=normal&steps=2")[0])
    doc = document(comparison)
    for engine in doc["engines"].values():
        assert engine["loss"] is None and engine["grad"] is None
        assert engine["gamma"] == [1.0] * 3 and engine["beta"] == [0.0] * 3
    assert doc["divergence"][0]["grad"] is None
    assert set(doc["divergence"][0]["state"]) == {"gamma", "beta", "running_mean", "running_var"}


def test_optimizer_defaults_are_the_libraries_own() -> None:
    import keras
    import tf_keras
    import torch

    torch_classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    for kind, cls in torch_classes.items():
        signature = inspect.signature(cls).parameters
        table = OPTIMIZER_DEFAULTS["torch"][kind]
        assert signature["lr"].default == table["lr"]
        assert signature["weight_decay"].default == table["weight_decay"]
        if kind != "sgd":
            assert signature["eps"].default == table["adam_eps"]
    for prefix, module in (("keras", keras.optimizers), ("keras2", tf_keras.optimizers)):
        for kind, cls in (("sgd", module.SGD), ("adam", module.Adam), ("adamw", module.AdamW)):
            signature = inspect.signature(cls.__init__).parameters
            table = OPTIMIZER_DEFAULTS[prefix][kind]
            assert signature["learning_rate"].default == table["lr"]
            assert (signature["weight_decay"].default or 0.0) == table["weight_decay"]
            if kind != "sgd":
                assert signature["epsilon"].default == table["adam_eps"]


@pytest.mark.parametrize("prefix", ["keras", "keras2"])
def test_keras_float64_optimizer_rounds_its_hyperparameters_to_float32(prefix: str) -> None:
    """Measured: Keras casts lr, β₁ and β₂ (and wd, μ) through float32 even for float64
    variables. The all-float64 formula is then 1e-6 to 1e-5 (relative to the distance
    moved) from Keras's γ; the reference, which follows Keras, within float64 rounding."""
    link = (
        f"?shape=8,3&input=normal&steps=3&loss=mse&target=normal&dtype=float64"
        f"&engines={prefix}&{prefix}_training=true&{prefix}_optimizer=adam&{prefix}_lr=0.1"
    )
    comparison = compare(parse_link(link)[0])
    got, reference = comparison.results[prefix].gamma, comparison.references[prefix].gamma
    np.testing.assert_allclose(got, reference, rtol=1e-13, atol=1e-15)

    from bnexplore.engines import reference as rules
    from bnexplore.scenario.batches import batches, targets

    exact = rules.REFERENCES[prefix](comparison.scenario)
    exact_optimizer = rules.ReferenceOptimizer("torch", comparison.scenario, prefix)
    exact.optimizer.lr = exact_optimizer.lr
    exact.optimizer.beta_bases = exact_optimizer.beta_bases

    scenario = comparison.scenario
    for k, (batch, target) in enumerate(zip(batches(scenario), targets(scenario), strict=True)):
        exact.step(k, batch, target)
    all_float64 = exact.finish().gamma
    relative = np.abs(got - all_float64) / np.abs(all_float64 - 1.0)
    assert 1e-6 < relative.max() < 1e-5


def test_adam_step_bound_is_about_one_for_the_first_steps() -> None:
    assert adam_step_bound(1) == pytest.approx(1.0)
    assert all(1.0 <= adam_step_bound(t) < 1.01 for t in range(1, 5))


def test_torch_adam_on_float16_parameters_divides_by_zero() -> None:
    """Finding: PyTorch's Adam keeps v in the parameters' dtype. In float16, v = 0.001·g²
    underflows to 0 for small gradients and ε = 1e-8 rounds to 0, so m/(√v̂ + ε) is m/0:
    γ and β become ±inf or NaN after one step. Keras adds its ε as a double to √v and stays
    finite; a larger PyTorch ε (1e-4, representable in float16) does too."""
    link = "?shape=8,3&input=normal&steps=1&loss=mse&dtype=float16&torch_optimizer=adam"
    comparison = compare(parse_link(link + "&keras_optimizer=adam&keras_training=true")[0])
    torch_beta = comparison.results["torch"].beta.astype(np.float64)
    assert not np.all(np.isfinite(torch_beta))
    assert np.all(np.isfinite(comparison.results["keras"].beta.astype(np.float64)))
    assert np.all(np.isfinite(comparison.references["torch"].beta))  # the formula does not
    safe = compare(parse_link(link + "&torch_adam_eps=1e-4&engines=torch")[0])
    assert np.all(np.isfinite(safe.results["torch"].beta.astype(np.float64)))


def _on_other_backends(link: str, index: int) -> str:
    """The same training scenario on Keras 3's JAX and PyTorch backends and on Flax (its
    optimizer knobs drawn like the others'; the two-pass variance, so that the fast one's
    error stays out of this test, which tests/test_backends.py bounds)."""
    rng = np.random.default_rng(index)
    kept = [p for p in link.split("&") if not p.startswith("engines=")]
    optimizer = ("sgd", "adam", "adamw")[index % 3]
    flax = {
        "engines": "keras_jax,keras_torch,flax",
        "flax_use_fast_variance": "false",
        "flax_use_running_average": ["false", "true"][index % 2],
        "flax_momentum": float(rng.choice([0.99, 0.9, 0.5])),
        "flax_optimizer": optimizer,
        "flax_use_scale": ["true", "false"][int(rng.random() < 0.15)],
    }
    if rng.random() < 0.5:
        flax["flax_lr"] = float(rng.choice([0.05, 0.2, 0.001]))
    if rng.random() < 0.4:
        flax["flax_weight_decay"] = float(rng.choice([0.0, 0.01, 0.3]))
    if optimizer == "sgd" and rng.random() < 0.5:
        flax["flax_opt_momentum"] = 0.9
    return "&".join(kept + [f"{k}={v}" for k, v in flax.items()])


BACKEND_TRAINING_LINKS = [_on_other_backends(link, i) for i, link in enumerate(TRAINING_LINKS[:24])]


@pytest.mark.parametrize("link", BACKEND_TRAINING_LINKS)
def test_keras_on_jax_and_pytorch_and_flax_train_by_their_rules(link: str) -> None:
    """As above, for the engines in worker processes of other backends. Keras 3 on JAX and
    PyTorch computes a float64 layer in float32 (tests/test_backends.py), so float32's
    tolerances judge those; Keras on PyTorch keeps its fast variance, whose error at these
    shapes is far below them (bounded in tests/test_backends.py)."""
    from tests.test_backends import compute_dtype

    scenario, notices = parse_link(link)
    assert notices == []
    comparison = compare(scenario)
    for name, result in comparison.results.items():
        dtype = compute_dtype(name, scenario["dtype"])
        judged = scenario.replace(dtype=dtype)
        reference = comparison.references[name]
        assert result.error is None and reference.error is None, (name, result.error)
        assert_output_matches_reference(result.output, reference, dtype, f"{name} output")
        for stat in ("running_mean", "running_var"):
            assert_running_stat_matches_reference(
                getattr(result, stat), getattr(reference, stat), judged, name, f"{name} {stat}"
            )
        assert_matches_reference(result.loss, reference.loss, dtype, f"{name} loss")
        for quantity in ("gamma", "beta", "grad_x", "grad_gamma", "grad_beta"):
            got, want = getattr(result, quantity), getattr(reference, quantity)
            assert (got is None) == (want is None), (name, quantity)
            if want is not None:
                assert_matches_reference(got, want, dtype, f"{name} {quantity}")
