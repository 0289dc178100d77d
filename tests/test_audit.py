"""The whole-model audit and the port check, on checkpoints of a small CNN trained for real
(tests/checkpoints.py), in the real frameworks' workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bnexplore
from bnexplore.judge.audit import audit, eps_sensitive, port_causes
from bnexplore.judge.ports import match, normalised
from bnexplore.runs.metrics import Divergence
from bnexplore.scenario.batches import running_batch
from bnexplore.scenario.links import parse_link
from tests import checkpoints as ck

REPO = Path(__file__).resolve().parents[1]
ENGINES = "torch,keras,keras_jax"


@pytest.fixture(scope="module")
def cnn():
    return ck.small_cnn()


@pytest.fixture(scope="module")
def files(cnn, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    layers = ck.bn_layers(cnn)
    broken = ck.swap_mean_var(layers, "bn1")
    broken = ck.swap_gamma_beta(broken, "bn2")
    broken = ck.std_for_var(broken, "bn3")
    broken = ck.drop_layer(broken, "bn4")
    return {
        "pt": ck.save_state_dict(cnn, folder / "m.pt"),
        "keras": ck.save_keras(cnn, folder / "m.keras"),
        "h5": ck.save_keras_h5(cnn, folder / "m.h5"),
        "onnx": ck.save_onnx(cnn, folder / "m.onnx"),
        "broken": ck.save_keras(broken, folder / "broken.keras"),
        "momentum": ck.save_keras(cnn, folder / "m01.keras", momentum=ck.AS_TORCH),
        "keras_momentum": ck.save_keras(cnn, folder / "m099.keras", momentum=0.99),
        "eps": ck.save_keras(cnn, folder / "eps.keras", eps=1e-3),
    }


def _audit(link: str):
    scenario, notices = parse_link(link)
    return audit(scenario, notices)


@pytest.mark.parametrize("kind", ["pt", "keras", "h5", "onnx"])
def test_the_eps_sensitive_layer_ranks_first_and_the_faithful_port_agrees(
    kind, files, store_dir
) -> None:
    """Every format of the same trained CNN: bn3 (variances about 1e-5 … 1e-3) is the worst
    naive port, eps is named as its cause where the target's default eps differs, and the
    faithful port (the source's eps) agrees within float32's tolerance on every layer."""
    digest = bnexplore.store_file(files[kind])
    result = _audit(f"?state={digest}&engines={ENGINES}")
    assert len(result.layers) == 4, result.notices
    assert normalised(result.worst_first()[0].name) == ck.TINY_LAYER
    tiny = result.worst_first()[0]
    assert float(tiny.layer.state["running_var"].min()) < 1e-3
    biting = [e for e in result.engines[1:] if tiny.naive[e].allclose is False]
    assert biting, "some target's default eps must move bn3"
    for engine in biting:
        knobs = [c.knob for c in tiny.causes["naive"][engine]]
        assert knobs[0].endswith("_eps") and tiny.causes["naive"][engine][0].share > 0.5
        assert tiny.sensitive[engine] > 0
    for layer in result.layers:
        for engine, d in layer.faithful.items():
            assert d.allclose, (kind, layer.name, engine, d)


def test_the_source_and_eps_come_from_the_file(files, store_dir) -> None:
    formats = {}
    for kind in ("pt", "keras", "h5", "onnx"):
        doc = bnexplore.audit(f"?state={bnexplore.store_file(files[kind])}&engines=torch,keras")
        formats[kind] = (doc["format"], doc["source"], doc["layers"][0]["eps_from"])
        assert doc["engines"][0] == {"torch": "torch", "keras": "keras"}.get(
            doc["source"], doc["source"]
        )
    assert formats["pt"] == ("pytorch", "torch", "link")
    assert formats["keras"] == ("keras", "keras", "file")
    assert formats["h5"][0] == "keras_h5" and formats["h5"][2] == "file"
    assert formats["onnx"] == ("onnx", "torch", "file")


def test_a_layers_link_reproduces_its_audit_figures(files, store_dir) -> None:
    """The link of a layer is its single-layer scenario: run for real, the source and the
    naive target give the audit's figures bit for bit."""
    digest = bnexplore.store_file(files["pt"])
    doc = bnexplore.audit(f"?state={digest}&engines=torch,keras")
    layer = doc["layers"][2]
    assert "input=running" in layer["link"] and "init=state" in layer["link"]
    run = bnexplore.run(layer["link"])
    (pair,) = run["divergence"]
    assert (pair["a"], pair["b"]) == ("torch", "keras")
    assert pair["max_abs"] == layer["naive"]["keras"]["max_abs"]
    assert pair["rmse"] == layer["naive"]["keras"]["rmse"]


def test_the_port_check_names_and_locates_each_mistake(files, store_dir) -> None:
    source = bnexplore.store_file(files["pt"])
    findings = {
        f["layer"]: f
        for f in bnexplore.audit(
            f"?state={source}&port={bnexplore.store_file(files['broken'])}&engines=torch,keras"
        )["port"]["findings"]
    }
    assert findings["bn1"]["problems"] == ["swapped_mean_var"]
    assert findings["bn2"]["problems"] == ["swapped_gamma_beta"]
    assert findings["bn3"]["problems"] == ["std_for_var"]
    assert findings["bn4"]["problems"] == ["missing"] and findings["bn4"]["port_layer"] is None
    for name in ("bn1", "bn2", "bn3"):
        assert findings[name]["matched_by"] == "name"
        assert findings[name]["evidence"]
    # bn1's swapped statistics leave a negative variance: no framework runs that layer
    assert findings["bn1"]["gap"]["verdict"] == "not compared"
    assert "negative" in findings["bn1"]["gap"]["reason"]
    # and the Model tab's table says so, and its summary names the problems
    from bnexplore.page.model import findings_table, port_verdicts

    broken = _audit(
        f"?state={source}&port={bnexplore.store_file(files['broken'])}&engines=torch,keras"
    )
    table = findings_table(broken).set_index("layer")
    assert table.loc["bn1", "at inference"].startswith("not compared: ")
    assert "negative" in table.loc["bn1", "at inference"]
    assert table.loc["bn2", "at inference"] == "outputs differ"
    (said,) = [words for words, _ in port_verdicts(broken) if words.startswith("the port file")]
    assert said == (
        "the port file: 4 of 4 layers wrong (swapped_mean_var in 1, swapped_gamma_beta in 1, "
        "std_for_var in 1, missing in 1)"
    )
    for name in ("bn2", "bn3"):
        assert findings[name]["gap"]["verdict"] == "differ", findings[name]

    momentum = bnexplore.audit(
        f"?state={source}&port={bnexplore.store_file(files['momentum'])}&engines=torch,keras"
    )["port"]["findings"]
    assert {tuple(f["problems"]) for f in momentum} == {("momentum_convention",)}
    assert all(f["gap"]["verdict"] != "differ" for f in momentum)  # inference ignores it

    # a port left at Keras's default momentum: right at inference, another rate in training
    scenario, notices = parse_link(
        f"?state={source}&port={bnexplore.store_file(files['keras_momentum'])}&engines=torch,keras"
    )
    port = audit(scenario, notices).port
    assert {f.problems for f in port.findings} == {("momentum_differs",)}
    assert all("0.99 where the source's is 0.9" in f.evidence for f in port.findings)
    assert port.wrong() == (0, len(port.findings))

    eps = bnexplore.audit(
        f"?state={source}&port={bnexplore.store_file(files['eps'])}&engines=torch,keras"
    )["port"]["findings"]
    assert {tuple(f["problems"]) for f in eps} == {("eps_differs",)}
    bn3 = next(f for f in eps if f["layer"] == ck.TINY_LAYER)
    assert bn3["gap"]["verdict"] == "differ"


def test_a_correct_port_is_ok_on_every_layer_even_with_onnx_eps_rounding(files, store_dir) -> None:
    """The .keras port of the ONNX export: ONNX stores 1e-5 as float32 (9.99999975e-06), the
    Keras file as a float64 1e-5; the same in float32, so no eps_differs."""
    doc = bnexplore.audit(
        f"?state={bnexplore.store_file(files['onnx'])}"
        f"&port={bnexplore.store_file(files['keras'])}&engines=torch,keras"
    )
    assert any("9.99999975e-06" in n for n in doc["notices"])
    assert np.float32(doc["layers"][0]["eps"]) == np.float32(1e-5)
    assert [f["problems"] for f in doc["port"]["findings"]] == [["ok"]] * 4
    assert all(f["gap"]["verdict"] != "differ" for f in doc["port"]["findings"])


def test_layers_whose_names_differ_are_matched_by_their_statistics(store_dir, tmp_path) -> None:
    """A ResNet-like pair: the port renames every layer and swaps one layer's statistics."""
    state = ck.resnet50_state()
    layers = ck.bn_layers(state)
    names = list(layers)[:12]
    source = {n: layers[n] for n in names}
    port = {f"block_{i}_norm": v for i, v in enumerate(source.values())}
    port = ck.swap_mean_var(port, "block_5_norm")
    port = dict(reversed(list(port.items())))  # the file order differs too
    ck.save_npz(ck.flat_state(source), tmp_path / "source.npz")
    ck.save_npz(ck.flat_state(port), tmp_path / "port.npz")
    doc = bnexplore.audit(
        f"?state={bnexplore.store_file(tmp_path / 'source.npz')}"
        f"&port={bnexplore.store_file(tmp_path / 'port.npz')}&engines=torch,flax"
    )
    found = {f["layer"]: f for f in doc["port"]["findings"]}
    for i, name in enumerate(names):
        assert found[name]["port_layer"] == f"block_{i}_norm", found[name]
        assert found[name]["matched_by"] == "statistics"
        expected = ["swapped_mean_var"] if i == 5 else ["ok"]
        assert found[name]["problems"] == expected


def test_matching_prefers_names_then_the_closest_statistics() -> None:
    from bnexplore.files.formats import Layer

    def layer(name, mean):
        c = len(mean)
        return Layer(
            name,
            c,
            {
                "weight": np.ones(c),
                "bias": np.zeros(c),
                "running_mean": np.asarray(mean, float),
                "running_var": np.ones(c),
            },
        )

    sources = [layer("a.bn", [0, 0]), layer("b.bn", [5, 5]), layer("c.bn", [1, 1, 1])]
    ports = [layer("x", [5.1, 5]), layer("a/bn", [9, 9]), layer("y", [0, 0]), layer("z", [2])]
    found = [(s and s.name, p and p.name, how) for s, p, how in match(sources, ports)]
    assert found == [
        ("a.bn", "a/bn", "name"),
        ("b.bn", "x", "statistics"),
        ("c.bn", None, None),
        (None, "y", None),
        (None, "z", None),
    ]


def test_the_running_input_follows_each_channels_statistics() -> None:
    mean, var = np.array([-3.0, 0.0, 500.0]), np.array([1e-4, 1.0, 4e4])
    batch = running_batch(mean, var, (4000, 3, 4, 4), np.random.default_rng(0))
    per_channel = batch.transpose(1, 0, 2, 3).reshape(3, -1)
    n = per_channel.shape[1]
    # the sample mean is within 6 standard errors, the sample variance within 6 of its own
    assert np.all(np.abs(per_channel.mean(1) - mean) < 6 * np.sqrt(var / n))
    assert np.all(np.abs(per_channel.var(1) / var - 1) < 6 * np.sqrt(2 / n))


def test_eps_sensitivity_and_the_causes_follow_their_formulas() -> None:
    var = np.array([1e-6, 1e-4, 1.0, 100.0])
    # √((v + 1e-3)/(v + 1e-5)) − 1 = 30.6, 3.8, 5e-4, 5e-6
    assert eps_sensitive(var, 1e-3, 1e-5) == 2
    assert eps_sensitive(var, 1e-5, 1e-5) == 0

    def gap(max_abs, allclose):
        return Divergence("a", "b", max_abs, max_abs, max_abs, 0.1, allclose, 1.3e-6, 1e-5)

    assert port_causes(gap(1e-7, True), gap(1e-7, True), "keras_eps") == []
    (cause,) = port_causes(gap(0.5, False), gap(1e-6, True), "keras_eps")
    assert (cause.knob, cause.share, cause.widens) == ("keras_eps", 1.0, False)
    eps, rest = port_causes(gap(0.5, False), gap(0.1, False), "keras_eps")
    assert eps.share == pytest.approx(0.8) and (rest.knob, rest.share) == (
        "what remains",
        pytest.approx(0.2),
    )


def test_the_cli_audits_a_file_and_its_port(files, store_dir) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnexplore",
            "audit",
            str(files["pt"]),
            "--port",
            str(files["broken"]),
            "--link",
            "?engines=torch,keras&audit_n=4",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    doc = json.loads(out.stdout)
    assert doc["format"] == "pytorch" and doc["port"]["format"] == "keras"
    assert [layer["name"] for layer in doc["layers"]] == ["bn1", "bn2", "bn3", "bn4"]
    assert "shape=4," in doc["layers"][0]["link"]
    assert "audit_n=4" in doc["link"]


def test_the_cli_table_names_long_layers_whole_and_says_when_none_ran(
    tmp_path, store_dir, capsys
) -> None:
    from bnexplore.tools.cli import main

    name = "model.backbone.stage4.block12.downsample.norm"
    np.savez(
        tmp_path / "long.npz",
        **{f"{name}.running_mean": np.zeros(3), f"{name}.running_var": np.ones(3)},
    )
    assert (
        main(["audit", str(tmp_path / "long.npz"), "--link", "?engines=torch,keras&audit_n=2"]) == 0
    )
    assert f"\n{name} " in capsys.readouterr().out
    np.savez(
        tmp_path / "nan.npz",
        **{"bn.running_mean": np.zeros(3), "bn.running_var": np.full(3, np.nan)},
    )
    assert (
        main(["audit", str(tmp_path / "nan.npz"), "--link", "?engines=torch,keras&audit_n=2"]) == 1
    )
    said = capsys.readouterr()
    assert "notice: layer bn: running_var holds 3 non-finite values (NaN)" in said.out
    assert "no BatchNorm layer of this file could be audited" in said.err


def _tensorflow_rounds_a_product_before_its_sum(inv: np.float32) -> bool:
    """Whether TensorFlow's float32 x·inv + c rounds x·inv first (its x86 wheels are built
    without FMA), as Keras's formula then does, or fuses them (a build for a CPU with it)."""
    import tensorflow as tf

    x = np.arange(1, 65, dtype=np.float32) * np.float32(1e-4) + np.float32(1)
    c = -inv
    separate = (x * inv).astype(np.float32) + c
    fused = (x.astype(np.float64) * np.float64(inv) + np.float64(c)).astype(np.float32)
    assert not np.array_equal(separate, fused)  # the probe tells the two apart
    return np.array_equal((tf.constant(x) * inv + c).numpy(), separate)


def test_a_near_dead_channels_faithful_keras_port_rounds_at_the_scale_of_mean_over_std(
    tmp_path, store_dir
) -> None:
    """Keras's x·inv + (β − μ·inv): with μ = 1 and var = 1e-6 (ε 1e-5), both terms are about
    301.5 and rounded at that scale, while the output is a few tenths. The faithful port's
    gap is bounded by one ulp of μ·inv, and lies far above the output's own rounding;
    Flax, which does not cancel, stays at the output's rounding."""
    channels, ones = 8, np.ones(8, np.float32)
    state = {}
    for name, var in (("dead", 1e-6), ("healthy", 1.0)):
        state |= {f"{name}.weight": ones, f"{name}.bias": 0 * ones, f"{name}.running_mean": ones}
        state[f"{name}.running_var"] = np.full(channels, var, np.float32)
    np.savez(tmp_path / "m.npz", **state)
    digest = bnexplore.store_file(tmp_path / "m.npz")
    layers = {
        layer["name"]: layer
        for layer in bnexplore.audit(f"?state={digest}&engines=torch,keras,flax")["layers"]
    }
    inv = np.float32(1) / np.sqrt(np.float32(1e-6) + np.float32(1e-5))
    term_ulp = float(np.spacing(inv))  # 3.05e-5: the rounding of x·inv and of μ·inv
    output_ulp = float(np.spacing(np.float32(8.0)))  # |y| stays far below 8 here
    keras = layers["dead"]["faithful"]["keras"]["max_abs"]
    assert keras <= term_ulp, keras
    if _tensorflow_rounds_a_product_before_its_sum(inv):  # a CPU whose kernels fuse does not
        assert 4 * output_ulp < keras, keras
    if "flax" in layers["dead"]["faithful"]:  # Flax installed
        assert layers["dead"]["faithful"]["flax"]["max_abs"] <= output_ulp
    for gap in layers["healthy"]["faithful"].values():
        assert gap["verdict"] in ("agree", "rounding"), gap


def test_an_audit_without_a_file_says_so() -> None:
    doc = bnexplore.audit("?engines=torch,keras")
    assert doc["layers"] == [] and any("needs a model file" in n for n in doc["notices"])


def test_a_wrapped_checkpoints_layers_are_matched_to_their_port_by_name(files, store_dir, tmp_path):
    """A checkpoint saved as {"model": DataParallel's state_dict, "epoch": …}: its layers are
    model.module.bn1 … and still match the port's bn1 … by name, mistakes and all."""
    import torch

    state = torch.load(files["pt"], weights_only=True)
    wrapped = {"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    doc = bnexplore.audit(
        f"?state={bnexplore.store_file(tmp_path / 'wrapped.pt')}"
        f"&port={bnexplore.store_file(files['broken'])}&engines=torch,keras"
    )
    found = {f["layer"]: f for f in doc["port"]["findings"]}
    assert set(found) == {
        "model.module.bn1",
        "model.module.bn2",
        "model.module.bn3",
        "model.module.bn4",
    }
    for name, problem in [
        ("bn1", "swapped_mean_var"),
        ("bn2", "swapped_gamma_beta"),
        ("bn3", "std_for_var"),
    ]:
        finding = found[f"model.module.{name}"]
        assert (finding["port_layer"], finding["matched_by"], finding["problems"]) == (
            name,
            "name",
            [problem],
        )
    assert found["model.module.bn4"]["problems"] == ["missing"]


def test_names_are_unwrapped_of_the_prefix_every_layer_shares() -> None:
    from bnexplore.judge.ports import unwrapped

    assert unwrapped(["model.module.layer1.0.bn1", "model.module.bn1"]) == ["layer1_0_bn1", "bn1"]
    assert unwrapped(["features/0/bn"]) == ["bn"]
    assert unwrapped(["bn1", "bn2"]) == ["bn1", "bn2"]
    assert unwrapped(["a.bn", "b.bn"]) == ["a_bn", "b_bn"]
    # a bare index left over is no name: bn_1 and layer_1 are not the same layer
    assert unwrapped(["bn_1", "bn_2"]) == ["bn_1", "bn_2"]
    assert unwrapped(["model.bn.1", "model.bn.2"]) == ["bn_1", "bn_2"]
    assert unwrapped([]) == []
