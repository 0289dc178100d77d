"""Random scenarios as links, reproducible from a seed: a failing case is a link to open."""

from __future__ import annotations

import numpy as np

SHAPES_BY_RANK = {
    2: [(8, 3), (32, 5), (2, 4), (16, 1)],
    3: [(4, 3, 7), (2, 6, 5), (8, 2, 1)],
    4: [(4, 3, 5, 6), (2, 8, 3, 3), (6, 2, 4, 1)],
    5: [(2, 3, 2, 3, 4)],
}


def random_links(count: int, seed: int, ranks=(2, 3, 4, 5)) -> list[str]:
    """``count`` links spanning shapes, input kinds, modes, momenta, eps, steps, trainable."""
    rng = np.random.default_rng(seed)
    links = []
    for i in range(count):
        rank = ranks[i % len(ranks)]
        shapes = SHAPES_BY_RANK[rank]
        shape = shapes[rng.integers(len(shapes))]
        kind = ["ones", "constant", "normal", "uniform"][rng.integers(4)]
        params = {
            "shape": ",".join(map(str, shape)),
            "input": kind,
            "seed": int(rng.integers(0, 10_000)),
            "steps": int(rng.choice([0, 1, 2, 5, 12])),
            "torch_mode": ["train", "eval"][rng.integers(2)],
            "keras_training": ["none", "true", "false"][rng.integers(3)],
            "torch_eps": float(rng.choice([1e-5, 1e-3, 1e-1])),
            "keras_eps": float(rng.choice([1e-5, 1e-3, 1e-1])),
            "torch_momentum": rng.choice(["0.1", "0.5", "1.0", "0.0", "none"]),
            "keras_momentum": float(rng.choice([0.99, 0.9, 0.5, 0.0, 1.0])),
            "keras_trainable": ["true", "false"][int(rng.random() < 0.25)],
            "torch_track_running_stats": ["true", "false"][int(rng.random() < 0.2)],
            "dtype": rng.choice(["float32"] * 5 + ["float64"] * 3 + ["float16", "bfloat16"]),
            "engines": "torch,keras,keras2",
            "keras2_training": ["none", "true", "false"][rng.integers(3)],
            "keras2_eps": float(rng.choice([1e-6, 1e-3, 1e-1])),
            "keras2_momentum": float(rng.choice([0.99, 0.9, 0.0])),
            "keras2_trainable": ["true", "false"][int(rng.random() < 0.2)],
            "keras2_fused": ["auto", "auto", "true", "false"][rng.integers(4)],
            "keras_init": rng.choice(["fresh"] * 8 + ["torch", "torch_swapped"]),
        }
        if kind == "constant":
            params["value"] = float(rng.choice([0.5, 2.0, -3.0, 0.37]))
        if kind == "normal":
            params["mean"] = round(float(rng.uniform(-2, 2)), 3)
            params["std"] = round(float(rng.uniform(0.5, 3)), 3)
        if kind == "uniform":
            low = round(float(rng.uniform(-2, 1)), 3)
            params["low"], params["high"] = low, round(low + float(rng.uniform(0.5, 3)), 3)
        links.append("?v=1&" + "&".join(f"{k}={v}" for k, v in params.items()))
    return links


def random_backend_links(count: int, seed: int, ranks=(2, 3, 4, 5)) -> list[str]:
    """Links for Keras 3 on JAX and on PyTorch, and Flax, over the same spread of scenarios:
    Keras's knobs from ``random_links``, Flax's drawn here."""
    rng = np.random.default_rng(seed + 1)
    links = []
    for link in random_links(count, seed, ranks):
        flax = {
            "engines": "keras_jax,keras_torch,flax",
            "flax_use_running_average": ["false", "true"][int(rng.random() < 0.4)],
            "flax_momentum": float(rng.choice([0.99, 0.9, 0.5, 0.0, 1.0])),
            "flax_eps": float(rng.choice([1e-5, 1e-3, 1e-1])),
            "flax_use_bias": ["true", "false"][int(rng.random() < 0.2)],
            "flax_use_scale": ["true", "false"][int(rng.random() < 0.2)],
            "flax_use_fast_variance": ["true", "false"][int(rng.random() < 0.3)],
        }
        kept = [p for p in link.split("&") if not p.startswith("engines=")]
        links.append("&".join(kept + [f"{k}={v}" for k, v in flax.items()]))
    return links


TRAINING_SHAPES = {2: [(8, 3), (6, 4)], 3: [(4, 3, 5), (3, 2, 6)], 4: [(4, 3, 3, 2), (2, 4, 3, 3)]}


def random_training_links(count: int, seed: int) -> list[str]:
    """``count`` links with loss=mse and target=normal: 2-D to 4-D, float32 and float64,
    every optimizer in every framework with default and explicit values, frozen layers,
    both modes, 1 to 4 steps."""
    rng = np.random.default_rng(seed)
    links = []
    for i in range(count):
        rank = (2, 3, 4)[i % 3]
        shapes = TRAINING_SHAPES[rank]
        params = {
            "shape": ",".join(map(str, shapes[rng.integers(len(shapes))])),
            "input": ["normal", "uniform"][rng.integers(2)],
            "seed": int(rng.integers(0, 10_000)),
            "dtype": ["float32", "float64"][i % 2],
            "engines": "torch,keras,keras2",
            "steps": int(rng.integers(1, 5)),
            "loss": "mse",
            "target": "normal",
            "torch_mode": ["train", "eval"][rng.integers(2)],
            "keras_training": ["none", "true", "false"][rng.integers(3)],
            "keras2_training": ["none", "true", "false"][rng.integers(3)],
            "torch_momentum": rng.choice(["0.1", "0.5", "none"]),
            "keras_momentum": float(rng.choice([0.99, 0.9, 0.5])),
            "torch_requires_grad": ["true", "false"][int(rng.random() < 0.2)],
            "torch_affine": ["true", "false"][int(rng.random() < 0.1)],
            "keras_trainable": ["true", "false"][int(rng.random() < 0.2)],
            "keras2_trainable": ["true", "false"][int(rng.random() < 0.2)],
            "keras_center": ["true", "false"][int(rng.random() < 0.15)],
            "keras_scale": ["true", "false"][int(rng.random() < 0.15)],
            "keras2_center": ["true", "false"][int(rng.random() < 0.15)],
            "keras2_scale": ["true", "false"][int(rng.random() < 0.15)],
        }
        for prefix in ("torch", "keras", "keras2"):
            optimizer = ("sgd", "adam", "adamw")[(i + rng.integers(3)) % 3]
            params[f"{prefix}_optimizer"] = optimizer
            if rng.random() < 0.5:
                params[f"{prefix}_lr"] = float(rng.choice([0.05, 0.2, 0.001]))
            if rng.random() < 0.4:
                params[f"{prefix}_weight_decay"] = float(rng.choice([0.0, 0.01, 0.3]))
            if optimizer != "sgd" and rng.random() < 0.4:
                params[f"{prefix}_adam_eps"] = float(rng.choice([1e-3, 1e-6, 1e-8]))
            if optimizer == "sgd" and rng.random() < 0.5:
                params[f"{prefix}_opt_momentum"] = float(rng.choice([0.5, 0.9]))
        if params["input"] == "normal":
            params["mean"] = round(float(rng.uniform(-2, 2)), 3)
            params["std"] = round(float(rng.uniform(0.5, 3)), 3)
        else:
            low = round(float(rng.uniform(-2, 1)), 3)
            params["low"], params["high"] = low, round(low + float(rng.uniform(0.5, 3)), 3)
        links.append("?v=1&" + "&".join(f"{k}={v}" for k, v in params.items()))
    return links
