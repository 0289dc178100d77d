"""The bench's audit row: its bare side (bnexplore.tools.bare_audit) computes what the audit's
passes compute, engine by engine, on the audit's own batches. Not a timing test."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from bnexplore.files.store import store_file
from bnexplore.scenario.links import parse_link
from bnexplore.tools import bench

ENGINES = bench.AUDIT_ENGINES


def small_state() -> dict[str, np.ndarray]:
    """Two small layers with ResNet-like statistics (a few tiny variances, where epsilon
    bites)."""
    rng = np.random.default_rng(7)
    state = {}
    for name, channels in (("bn1", 4), ("layer1.0.bn1", 6)):
        var = rng.lognormal(0.0, 1.0, channels)
        var[0] = 1e-6
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0.0, 0.2, channels).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0.0, 1.0, channels).astype(np.float32)
        state[f"{name}.running_var"] = var.astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(10, np.int64)
    return state


def test_the_resnet50_shaped_state_has_torchvisions_53_layers():
    names = bench.resnet50_names()
    assert len(names) == 53 and sum(names.values()) == 26_560
    assert "layer4.0.downsample.1" in names and names["layer4.2.bn3"] == 2048
    state = bench.resnet50_state()
    assert len(state) == 5 * 53
    assert all(v.dtype == np.float32 for k, v in state.items() if "num_batches" not in k)
    assert min(state[f"{n}.running_var"].min() for n in names) > 0


def test_the_bare_audit_computes_the_audits_outputs(store_dir, tmp_path):
    for framework in ("tensorflow", "keras", "jax", "flax"):
        if importlib.util.find_spec(framework) is None:
            pytest.skip(f"{framework} is not installed")
    path = tmp_path / "state.npz"
    np.savez(path, **small_state())
    digest = store_file(path)
    scenario, _ = parse_link(f"?state={digest}&engines={','.join(ENGINES)}")
    passes, batches, results = bench.audit_passes(scenario, run=True)

    # per layer: torch once, Keras on TensorFlow and on JAX naive and faithful, Flax once
    assert len(batches) == 2 and len(passes) == len(results) == 2 * 6
    assert sorted({p.engine for p in passes}) == sorted(ENGINES)
    plan = tmp_path / "plan.npz"
    bench.write_audit_plan(passes, batches, plan)
    for engine in ENGINES:
        bare = bench.bare_audit_outputs(plan, engine, tmp_path)
        mine = [i for i, p in enumerate(passes) if p.engine == engine]
        assert sorted(bare) == mine
        for i in mine:
            assert results[i].error is None and results[i].output is not None, results[i]
            assert bare[i].shape == batches[passes[i].batch].shape
            torch.testing.assert_close(
                torch.from_numpy(bare[i]), torch.from_numpy(results[i].output)
            )
