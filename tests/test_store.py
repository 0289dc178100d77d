"""Your own layer: BatchNorm states from files, the store, and no unsafe unpickling.

Every file here is written by the framework that owns the format (torch.save,
keras's model.save, safetensors, np.savez) and stored through the CLI or the API.
Outputs are checked against the float64 formula with the file's statistics and
each engine's own eps, under assert_close's dtype tolerances with the mean's
rounding propagated (as in test_engines).
"""

from __future__ import annotations

import io
import os
import runpy
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import bnexplore
from bnexplore.files import store
from bnexplore.files.formats import FileProblem
from bnexplore.page.charts import layer_statistics, layer_variance_chart
from bnexplore.porting.script import reproducer
from bnexplore.runs.metrics import TOLERANCES
from bnexplore.runs.runner import Comparison, compare
from bnexplore.scenario.batches import batches
from bnexplore.scenario.links import parse_link
from bnexplore.tools.cli import main

ROOT = Path(__file__).parents[1]
EPS = {"torch": 1e-5, "keras": 1e-3, "keras2": 1e-3}
"""Each engine's default eps: the one a scenario without eps keys runs."""


pytestmark = pytest.mark.usefixtures("store_dir")  # the shared fixture: tests/conftest.py


@pytest.fixture
def files(tmp_path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    return folder


def trained_state(channels: int, seed: int) -> dict[str, np.ndarray]:
    """Random γ, β and statistics; the first three variances near 1e-6, where eps decides."""
    rng = np.random.default_rng(seed)
    variance = rng.uniform(0.01, 4.0, channels)
    variance[:3] = [1e-6, 2.5e-6, 7e-7]
    return {
        "weight": rng.normal(1.0, 0.5, channels),
        "bias": rng.normal(0.0, 1.0, channels),
        "running_mean": rng.normal(0.0, 1.0, channels),
        "running_var": variance,
    }


def load_into(module: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, value in state.items():
            getattr(module, name).copy_(torch.from_numpy(value))


def store_with_cli(path: Path, capsys) -> tuple[str, list[str]]:
    """``python -m bnexplore store FILE``: the digest from its first line, then the rest."""
    assert main(["store", str(path)]) == 0
    first, *rest = capsys.readouterr().out.splitlines()
    key, digest = first.split("=")
    assert key == "state" and len(digest) == 64
    return digest, rest


def formula(x: np.ndarray, state: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """y = (x − running_mean)/√(running_var + eps)·γ + β, in float64."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    s = {k: np.asarray(v, np.float64).reshape(shape) for k, v in state.items()}
    return (x - s["running_mean"]) / np.sqrt(s["running_var"] + eps) * s["weight"] + s["bias"]


def assert_follows_formula(output, x, state, eps, dtype, what) -> None:
    """|y − y_formula| ≤ atol + rtol·(|y_formula| + g_c), g_c = |mean|·|γ|/√(var + eps):
    the channel's rounded mean, amplified (the reference engine's rounding gain)."""
    rtol, atol = TOLERANCES[dtype]
    y, want = np.asarray(output, np.float64), formula(x, state, eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gain = np.abs(state["running_mean"] * state["weight"]) / np.sqrt(state["running_var"] + eps)
    allowed = atol + rtol * (np.abs(want) + gain.reshape(shape))
    excess = np.abs(y - want) - allowed
    assert np.all(excess <= 0), f"{what}: worst excess {excess.max():.3g}"


def check_every_engine_starts_from(
    link: str, state: dict[str, np.ndarray], engines=("torch", "keras")
) -> Comparison:
    """PyTorch eval and Keras inference each follow the formula with their own eps."""
    scenario, notices = parse_link(link + "&torch_mode=eval&engines=" + ",".join(engines))
    assert notices == [] and scenario["init"] == "state", notices
    comparison = compare(scenario)
    x = list(batches(scenario))[-1].astype(np.float64)
    for name in engines:
        result = comparison.results[name]
        assert result.error is None, (name, result.error)
        dtype = scenario["dtype"]
        assert_follows_formula(result.output, x, state, EPS[name], dtype, name)
        reference = comparison.references[name]
        assert_follows_formula(reference.output, x, state, EPS[name], "float64", f"{name} ref")
    return comparison


# --- must show: a BatchNorm2d state_dict, stored through the CLI ----------------------------


def test_torch_state_dict_stored_through_the_cli_starts_every_engine(files, capsys) -> None:
    state = trained_state(6, seed=1)
    module = torch.nn.BatchNorm2d(6)
    load_into(module, state)
    torch.save(module.state_dict(), files / "bn.pt")
    digest, layers = store_with_cli(files / "bn.pt", capsys)
    assert layers == ["layer (top level): 6 channels"]
    comparison = check_every_engine_starts_from(
        f"?state={digest}&init=state&shape=5,6,4,3&input=normal",
        state,
        engines=("torch", "keras", "keras2"),
    )
    # eps decides the small-variance channels: the engines differ there, by √((v+1e-5)/(v+1e-3))
    torch_out, keras_out = (comparison.results[e].output for e in ("torch", "keras"))
    assert not np.allclose(torch_out[:, 0], keras_out[:, 0], rtol=0.5)
    assert np.allclose(torch_out[:, 5], keras_out[:, 5], rtol=1e-2, atol=1e-2)


def test_a_link_reads_any_unique_prefix_of_at_least_16_hex_characters(files) -> None:
    state = trained_state(4, seed=2)
    np.savez(files / "bn.npz", **{f"bn.{k}": v for k, v in state.items()})
    digest = bnexplore.store_file(files / "bn.npz")
    for given in (digest, digest[:16], digest[:40].upper()):
        scenario, notices = parse_link(f"?state={given}&init=state&shape=4,4")
        assert notices == [] and scenario["state"] == digest
        assert f"state={digest}" in scenario.link  # the canonical link writes all 64
    scenario, notices = parse_link(f"?state={digest[:15]}&init=state&shape=4,4")
    assert scenario["state"] is None and scenario["init"] == "fresh"
    assert any(n.startswith("state: ") and "16 to 64 hex" in n for n in notices)


def test_an_unknown_digest_gets_a_notice_and_the_fresh_layer() -> None:
    doc = bnexplore.run("?state=3f2a" + "0" * 60 + "&init=state&shape=4,3")
    assert doc["scenario"]["state"] is None and doc["scenario"]["init"] == "fresh"
    assert (
        "state: 3f2a000000000000… is not on this server: upload the file; ignored"
        in (doc["notices"])
    )
    assert any(n.startswith("init: ") for n in doc["notices"])
    assert doc["engines"]["torch"]["output"] is not None  # the rest of the scenario ran


def test_a_prefix_shared_by_two_stored_files_is_refused(store_dir) -> None:
    store_dir.mkdir()
    for tail in ("a", "b"):
        (store_dir / ("ab" * 10 + tail * 44)).write_bytes(b"x")
    scenario, notices = parse_link("?state=" + "ab" * 10)
    assert scenario["state"] is None
    assert any("matches 2 files" in n for n in notices)


# --- must show: a whole model, layer= choosing each, in each format ----------------------------


def small_model(seed: int) -> tuple[torch.nn.Module, dict[str, dict[str, np.ndarray]]]:
    """Convolutions and two BatchNorm layers (5 and 7 channels), with trained states."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3),
        torch.nn.BatchNorm2d(5),
        torch.nn.ReLU(),
        torch.nn.Conv2d(5, 7, 3),
        torch.nn.BatchNorm2d(7),
    )
    states = {"1": trained_state(5, seed), "4": trained_state(7, seed + 1)}
    for name, state in states.items():
        load_into(model.get_submodule(name), state)
    return model, states


def save_model(fmt: str, folder: Path, seed: int) -> tuple[Path, dict]:
    model, states = small_model(seed)
    named = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if fmt == "pt":
        path = folder / "model.pt"
        torch.save(model.state_dict(), path)
    elif fmt == "npz":
        path = folder / "model.npz"
        np.savez(path, **named)
    else:
        from safetensors.numpy import save_file

        path = folder / "model.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in named.items()}, str(path))
    return path, states


@pytest.mark.parametrize("fmt", ["pt", "npz", "safetensors"])
def test_a_whole_models_state_with_layer_choosing_each(fmt, files, capsys) -> None:
    path, states = save_model(fmt, files, seed=10)
    digest, layers = store_with_cli(path, capsys)
    assert layers == ["layer 1: 5 channels", "layer 4: 7 channels"]
    for name, channels in (("1", 5), ("4", 7)):
        check_every_engine_starts_from(
            f"?state={digest}&layer={name}&init=state&shape=4,{channels},3,3&input=normal",
            states[name],
        )


def test_without_layer_the_first_is_used_with_a_notice_listing_the_others(files) -> None:
    path, _ = save_model("pt", files, seed=3)
    digest = bnexplore.store_file(path)
    scenario, notices = parse_link(f"?state={digest}&init=state&shape=4,5,3,3")
    assert scenario["layer"] == "1" and scenario["init"] == "state"
    assert notices == ["layer: not given; using 1, the first of 2 in the file (also 4)"]
    assert parse_link(scenario.link) == (scenario, [])  # the canonical link names it
    _, notices = parse_link(f"?state={digest}&layer=bn9&shape=4,5,3,3")
    assert notices[0].startswith("layer: 'bn9' is not a BatchNorm in the file ('1', '4')")


def test_a_checkpoint_dict_holding_a_state_dict_is_flattened(files) -> None:
    model, _ = small_model(seed=4)
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, files / "ckpt.pth")
    digest = bnexplore.store_file(files / "ckpt.pth")
    assert [(layer.name, layer.channels) for layer in store.layers(digest)] == [
        ("state_dict.1", 5),
        ("state_dict.4", 7),
    ]


def keras_model():
    """A small Keras model: convolutions, and two BatchNormalization layers (one without γ)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(name="bn_a"),
            keras.layers.Conv2D(5, 3),
            keras.layers.BatchNormalization(name="bn_b", scale=False),
        ]
    )
    states = {"bn_a": trained_state(4, seed=20), "bn_b": trained_state(5, seed=21)}
    states["bn_b"]["weight"] = np.ones(5)  # scale=False: no γ saved, so 1
    for name, state in states.items():
        layer = model.get_layer(name)
        weights = [state["bias"], state["running_mean"], state["running_var"]]
        if layer.scale:
            weights.insert(0, state["weight"])
        layer.set_weights(weights)
    return model, states


def test_a_keras_file_saved_by_keras_is_read_with_h5py_without_a_model(files, capsys) -> None:
    model, states = keras_model()
    model.save(files / "model.keras")
    digest, layers = store_with_cli(files / "model.keras", capsys)
    assert layers == ["layer bn_a: 4 channels", "layer bn_b: 5 channels"]
    for name, channels in (("bn_a", 4), ("bn_b", 5)):
        check_every_engine_starts_from(
            f"?state={digest}&layer={name}&init=state&shape=3,{channels},2,2&input=normal",
            states[name],
        )


def test_a_bare_weights_h5_needs_four_vectors_per_layer(files) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    model, _ = keras_model()
    model.save_weights(files / "model.weights.h5")
    with pytest.raises(FileProblem, match=r"Upload the \.keras file"):
        bnexplore.store_file(files / "model.weights.h5")
    only_bn = keras.Sequential([keras.Input((3, 4)), keras.layers.BatchNormalization(name="b")])
    state = trained_state(4, seed=5)
    only_bn.layers[0].set_weights(
        [state[k] for k in ("weight", "bias")]
        + [
            state["running_mean"],
            state["running_var"],
        ]
    )
    only_bn.save_weights(files / "bn.weights.h5")
    (layer,) = store.layers(bnexplore.store_file(files / "bn.weights.h5"))
    assert layer.name == "b" and layer.channels == 4
    np.testing.assert_allclose(layer.state["running_var"], state["running_var"], rtol=1e-7)


# --- must show: what is refused, with a message ---------------------------------------------


class RunsCode:
    """A pickle that, if ever unpickled, creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pt_whose_pickle_would_run_code_is_refused_and_the_code_never_runs(
    how, files, tmp_path, capsys, store_dir
) -> None:
    marker = tmp_path / "PWNED"
    payload = {"weight": torch.ones(3), "payload": RunsCode(marker)}
    if how == "torch.save":  # a zip holding data.pkl
        torch.save(payload, files / "evil.pt")
    else:  # a bare pickle stream, as PyTorch's legacy format starts
        import pickle

        (files / "evil.pt").write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    assert main(["store", str(files / "evil.pt")]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "weights_only=True" in err and "GLOBAL" in err
    with pytest.raises(FileProblem, match="Nothing in it was executed"):
        bnexplore.store_file(files / "evil.pt")
    assert not marker.exists()
    assert not store_dir.exists() or not any(store_dir.iterdir())  # nothing kept
    # the same bytes put in the store behind bnexplore's back: a notice, never run
    store_dir.mkdir(exist_ok=True)
    data = (files / "evil.pt").read_bytes()
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    (store_dir / digest).write_bytes(data)
    doc = bnexplore.run(f"?state={digest}&init=state&shape=4,3")
    assert any(n.startswith("state: ") and "refused" in n for n in doc["notices"])
    assert doc["scenario"]["init"] == "fresh" and doc["engines"]["torch"]["output"]
    assert not marker.exists()


def test_a_truncated_file_is_refused_with_a_message(files) -> None:
    path, _ = save_model("pt", files, seed=6)
    data = path.read_bytes()
    for cut, name in ((len(data) // 2, "half.pt"), (40, "head.pt")):
        (files / name).write_bytes(data[:cut])
        with pytest.raises(FileProblem, match="truncated or malformed"):
            bnexplore.store_file(files / name)
    np.savez(files / "x.npz", batch_0=np.ones((4, 3)))
    (files / "cut.npz").write_bytes((files / "x.npz").read_bytes()[:-30])
    with pytest.raises(FileProblem, match="truncated or malformed"):
        bnexplore.store_file(files / "cut.npz")


def test_a_file_over_the_cap_is_refused_naming_the_limit(files, monkeypatch, store_dir) -> None:
    monkeypatch.setenv("BNEXPLORE_STORE_FILE_LIMIT", "1KiB")
    np.savez(files / "big.npz", batch_0=np.ones((40, 10)))
    too_big = r"over the limit of 1,024 bytes \(1 KiB\).*BNEXPLORE_STORE_FILE_LIMIT"
    with pytest.raises(FileProblem, match=too_big):
        bnexplore.store_file(files / "big.npz")
    assert not store_dir.exists()


def test_an_npz_holding_an_object_array_is_refused(files, capsys) -> None:
    np.savez(
        files / "obj.npz",
        **{
            "bn.running_mean": np.zeros(3),
            "bn.running_var": np.array([1.0, "x", None], dtype=object),
        },
    )
    assert main(["store", str(files / "obj.npz")]) == 1
    assert "'bn.running_var' is an object array" in capsys.readouterr().err


def test_nan_statistics_are_named_and_the_scenario_runs_fresh(files) -> None:
    state = trained_state(3, seed=7)
    state["running_var"][1] = np.nan
    np.savez(files / "nan.npz", **{f"bn.{k}": v for k, v in state.items()})
    digest = bnexplore.store_file(files / "nan.npz")  # kept: the app shows the layer
    (layer,) = store.layers(digest)
    assert layer.problem == "running_var holds 1 non-finite value (NaN)"
    state["running_var"][2] = -1.0  # every problem is named, not only the first
    np.savez(files / "nan_negative.npz", **{f"bn.{k}": v for k, v in state.items()})
    (both,) = store.layers(bnexplore.store_file(files / "nan_negative.npz"))
    assert both.problem == (
        "running_var holds 1 non-finite value (NaN); running_var is negative in 1 channel"
    )
    doc = bnexplore.run(f"?state={digest}&init=state&shape=4,3")
    assert (
        "init: state layer bn: running_var holds 1 non-finite value (NaN); using fresh"
        in (doc["notices"])
    )
    assert doc["engines"]["keras"]["output"] is not None


def test_a_channel_count_that_does_not_match_the_batch_file_is_named(files) -> None:
    np.savez(files / "bn.npz", **{f"bn.{k}": v for k, v in trained_state(5, seed=8).items()})
    digest = bnexplore.store_file(files / "bn.npz")
    np.save(files / "x.npy", np.ones((4, 3)))  # a drawn batch would take the layer's 5
    batch = bnexplore.store_file(files / "x.npy")
    doc = bnexplore.run(f"?state={digest}&init=state&input=file&file={batch}")
    assert (
        "init: state layer bn has 5 channels, the batch 3 (shape 4,3); using fresh"
        in (doc["notices"])
    )
    assert doc["engines"]["torch"]["output"] is not None


def test_keras_names_in_an_npz_and_missing_gamma_beta_mean_one_and_zero(files) -> None:
    state = trained_state(4, seed=9)
    np.savez(
        files / "k.npz",
        **{"m.moving_mean": state["running_mean"], "m.moving_variance": state["running_var"]},
    )
    (layer,) = store.layers(bnexplore.store_file(files / "k.npz"))
    assert layer.name == "m" and layer.problem is None
    np.testing.assert_array_equal(layer.state["weight"], np.ones(4))
    np.testing.assert_array_equal(layer.state["bias"], np.zeros(4))


# --- batches from a file ------------------------------------------------------------------


def test_an_npz_of_batches_feeds_the_passes_in_order_and_sets_the_shape(files) -> None:
    rng = np.random.default_rng(0)
    stored = [rng.normal(size=(6, 3, 4)).astype(np.float32) for _ in range(2)]
    np.savez(files / "b.npz", batch_0=stored[0], batch_1=stored[1])
    digest = bnexplore.store_file(files / "b.npz")
    scenario, notices = parse_link(f"?input=file&file={digest}&steps=3&shape=4,3")
    assert scenario.shape == (6, 3, 4)
    assert notices == ["shape: follows the batch file, 6,3,4; 4,3 ignored"]
    assert parse_link(scenario.link) == (scenario, [])
    passes = list(batches(scenario))
    for k, want in enumerate([stored[0], stored[1], stored[1], stored[1]]):
        np.testing.assert_array_equal(passes[k], want)
    comparison = compare(scenario)
    for name in ("torch", "keras"):
        gap = comparison.reference_gap(name)
        assert gap.allclose, (name, gap)


def test_input_file_without_a_file_falls_back_with_a_notice() -> None:
    scenario, notices = parse_link("?input=file")
    assert scenario["input"] == "ones"
    assert notices == ["input: file needs a batch file (file=…); using ones"]


# --- the store itself -----------------------------------------------------------------------


def test_the_file_cap_is_streamlits_max_upload_size() -> None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 1024 * 1024 == store.DEFAULT_FILE_LIMIT
    assert store.file_limit() == store.DEFAULT_FILE_LIMIT


def test_the_store_drops_its_oldest_files_first(files, monkeypatch, store_dir) -> None:
    digests = []
    for k in range(3):
        np.save(files / f"b{k}.npy", np.full((50, 3), float(k)))  # 1328 bytes each
        digests.append(bnexplore.store_file(files / f"b{k}.npy"))
        os.utime(store_dir / digests[-1], (1000 + k, 1000 + k))
    monkeypatch.setenv("BNEXPLORE_STORE_LIMIT", "3000")
    np.save(files / "b3.npy", np.full((50, 3), 3.0))
    newest = bnexplore.store_file(files / "b3.npy")
    assert sorted(p.name for p in store_dir.iterdir()) == sorted([digests[2], newest])


def test_storing_writes_nothing_outside_the_store(files, store_dir, tmp_path) -> None:
    path, _ = save_model("pt", files, seed=11)
    before = {p for p in tmp_path.rglob("*") if store_dir not in p.parents}
    digest = bnexplore.store_file(path)
    bnexplore.run(f"?state={digest}&layer=4&init=state&shape=2,7,2,2")
    after = {p for p in tmp_path.rglob("*") if store_dir not in p.parents and p != store_dir}
    assert after == before
    assert [p.name for p in store_dir.iterdir()] == [digest]


# --- the chart, and the reproducer ----------------------------------------------------------


def test_the_variance_chart_marks_each_engines_eps_on_a_log_axis() -> None:
    state = trained_state(6, seed=12)
    state["running_var"][3] = 0.0  # a dead channel: drawn at the floor
    eps = {"PyTorch": 1e-5, "Keras 3": 1e-3}
    stats = layer_statistics(state, eps)
    assert list(stats["eps_matters"]) == [True, True, True, True, False, False]
    assert stats["eps_scale"][0] == pytest.approx(np.sqrt((1e-6 + 1e-5) / (1e-6 + 1e-3)))
    spec = layer_variance_chart(stats, eps, "bn").to_dict()
    points, rules = spec["layer"]
    assert points["encoding"]["y"]["scale"]["type"] == "log"
    assert rules["mark"]["type"] == "rule"
    assert "4 of 6 channels" in str(spec["title"])


@pytest.mark.parametrize(
    "rest",
    [
        "init=state&shape=4,3,2&input=normal&steps=2",
        # the Model tab's layer links: batches drawn from the layer's own statistics
        "layer=bn&init=state&shape=4,3,2&input=running&torch_mode=eval&keras_training=false",
        "layer=bn&shape=4,3,5&input=running&steps=1",
    ],
)
def test_the_reproducer_carries_the_layer_and_gives_the_same_numbers(rest, files, capsys) -> None:
    """An uploaded layer travels in the script: its state (init=state), and its running
    statistics where the batches are drawn from them (input=running)."""
    state = trained_state(3, seed=13)
    state["running_mean"] = state["running_mean"] * 40 + 7  # far from a normal batch
    np.savez(files / "bn.npz", **{f"bn.{k}": v for k, v in state.items()})
    digest = bnexplore.store_file(files / "bn.npz")
    link = f"?state={digest}&{rest}"
    script = files / "repro.py"
    script.write_text(reproducer(parse_link(link)[0]))
    runpy.run_path(str(script), run_name="__main__")
    import json

    printed = json.loads(capsys.readouterr().out)
    doc = bnexplore.run(link)
    for name in ("torch", "keras"):
        assert printed["engines"][name]["output"] == doc["engines"][name]["output"], name


def test_describe_reads_bytes_without_a_name(files) -> None:
    path, _ = save_model("safetensors", files, seed=14)
    layers, batch_info = store.describe(io.BytesIO(path.read_bytes()))
    assert [layer.channels for layer in layers] == [5, 7] and batch_info is None


def test_run_link_in_the_cli_uses_the_store(files, capsys) -> None:
    state = trained_state(3, seed=15)
    np.savez(files / "bn.npz", **{f"bn.{k}": v for k, v in state.items()})
    digest, _ = store_with_cli(files / "bn.npz", capsys)
    assert (
        main(["run", "--link", f"?state={digest[:20]}&init=state&shape=4,3&torch_mode=eval"]) == 0
    )
    out = capsys.readouterr().out
    assert f"state={digest}&init=state" in out and "notice:" not in out


def test_the_memory_guard_counts_a_batch_files_arrays(files, monkeypatch) -> None:
    np.save(files / "x.npy", np.ones((64, 8, 16, 16)))  # 1 MiB in float64
    digest = bnexplore.store_file(files / "x.npy")
    scenario, _ = parse_link(f"?input=file&file={digest}")
    from bnexplore.runs import memory

    drawn = memory.estimate(parse_link("?shape=64,8,16,16&input=ones")[0], False)
    assert memory.estimate(scenario, False) - drawn == 1024**2  # the stored float64 array
    monkeypatch.setenv("BNEXPLORE_MEMORY_LIMIT", "1MiB")
    doc = bnexplore.run(f"?input=file&file={digest}")
    assert all(not e["available"] for e in doc["engines"].values())
    assert "BNEXPLORE_MEMORY_LIMIT" in doc["notices"][-1]


def test_with_init_state_training_steps_run_from_the_loaded_statistics(files) -> None:
    """Unlike keras_init's port, init=state keeps every engine's own training steps."""
    state = trained_state(4, seed=16)
    np.savez(files / "bn.npz", **{f"bn.{k}": v for k, v in state.items()})
    digest = bnexplore.store_file(files / "bn.npz")
    link = f"?state={digest}&init=state&shape=8,4,3&input=normal&steps=1&torch_mode=eval"
    scenario, notices = parse_link(link)
    assert notices == []
    comparison = compare(scenario)
    first = next(batches(scenario)).astype(np.float64)
    batch_mean = first.mean(axis=(0, 2))
    rtol, atol = TOLERANCES["float32"]
    for name, kept in (("torch", 0.9), ("keras", 0.99)):  # torch m = 0.1, Keras μ = 0.99
        want = kept * state["running_mean"] + (1 - kept) * batch_mean
        np.testing.assert_allclose(comparison.results[name].running_mean, want, rtol, atol)
        assert comparison.reference_gap(name).allclose, name
