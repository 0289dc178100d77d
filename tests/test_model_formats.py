"""Whole-model checkpoints: read_model on every format, with the file's own eps and
momentum, the framework it names, and the refusals of the new formats (legacy Keras .h5,
ONNX). The files are real: exported by torch, Keras 3 and tf_keras (tests/checkpoints.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from bnexplore.files import store
from bnexplore.files.formats import (
    NO_BN_NODE,
    FileProblem,
    ModelFile,
    read_layers,
    read_model,
    sniff,
)
from tests import checkpoints
from tests.team_server import TreeMemory

SECRET = b"API_TOKEN=sk-model-formats-0123456789abcdef-never-to-be-read\n" * 4


@pytest.fixture(scope="module")
def cnn():
    return checkpoints.small_cnn()


@pytest.fixture(scope="module")
def files(cnn, tmp_path_factory) -> Path:
    """The small CNN in every format bnexplore reads."""
    folder = tmp_path_factory.mktemp("checkpoints")
    checkpoints.save_state_dict(cnn, folder / "m.pt")
    checkpoints.save_npz(cnn, folder / "m.npz")
    checkpoints.save_onnx(cnn, folder / "m.onnx")
    checkpoints.save_onnx(cnn, folder / "legacy.onnx", dynamo=False)
    checkpoints.save_keras(cnn, folder / "m.keras")
    checkpoints.save_keras_h5(cnn, folder / "m.h5")
    checkpoints.save_keras_h5(cnn, folder / "w.h5", weights_only=True)
    return folder


def read(path: Path) -> ModelFile:
    with open(path, "rb") as f:
        return read_model(f)


TORCH_NAMES = ["bn1", "bn2", "bn3", "bn4"]


@pytest.mark.parametrize(
    ("name", "fmt", "source", "eps", "momentum"),
    [
        ("m.pt", "pytorch", "torch", None, None),
        ("m.npz", "npz", "torch", None, None),
        ("m.onnx", "onnx", "torch", 1e-5, 0.9),
        ("legacy.onnx", "onnx", "torch", 1e-5, 0.9),
        ("m.keras", "keras", "keras", 1e-5, 0.9),
        ("m.h5", "keras_h5", "keras2", 1e-5, 0.9),
        ("w.h5", "keras_weights", "keras2", None, None),
    ],
)
def test_every_format_gives_the_torch_layers(cnn, files, name, fmt, source, eps, momentum):
    model = read(files / name)
    assert (model.format, model.source) == (fmt, source)
    assert [layer.name for layer in model.layers] == TORCH_NAMES
    want = checkpoints.bn_layers(cnn)
    for layer in model.layers:
        assert layer.problem is None
        assert (layer.eps, layer.momentum) == (eps, momentum)
        for key, value in want[layer.name].items():
            np.testing.assert_array_equal(layer.state[key], value.astype(np.float64))
    with open(files / name, "rb") as f:
        again = read_layers(f)
    assert [(x.name, x.channels, x.eps) for x in again] == [
        (x.name, x.channels, x.eps) for x in model.layers
    ]
    if eps is None and fmt.startswith("keras"):
        assert any("no config" in notice for notice in model.notices)


def test_the_tiny_layer_has_tiny_variances(cnn) -> None:
    var = checkpoints.bn_layers(cnn)[checkpoints.TINY_LAYER]["running_var"]
    assert var.min() >= 1e-5 and var.max() <= 1e-3
    others = [v["running_var"] for n, v in checkpoints.bn_layers(cnn).items() if n != "bn3"]
    assert min(v.min() for v in others) > 1e-2


def test_a_keras_port_with_torch_momentum_and_mutations(cnn, tmp_path) -> None:
    checkpoints.save_keras(cnn, tmp_path / "m01.keras", momentum=checkpoints.AS_TORCH)
    assert {layer.momentum for layer in read(tmp_path / "m01.keras").layers} == {0.1}
    layers = checkpoints.bn_layers(cnn)
    swapped = checkpoints.swap_mean_var(layers, "bn2")
    assert swapped["bn2"]["running_var"] is not layers["bn2"]["running_var"]
    np.testing.assert_array_equal(swapped["bn2"]["running_var"], layers["bn2"]["running_mean"])
    np.testing.assert_array_equal(swapped["bn1"]["running_var"], layers["bn1"]["running_var"])
    np.testing.assert_array_equal(
        checkpoints.swap_gamma_beta(layers, "bn1")["bn1"]["weight"], layers["bn1"]["bias"]
    )
    np.testing.assert_allclose(
        checkpoints.std_for_var(layers, "bn4")["bn4"]["running_var"] ** 2,
        layers["bn4"]["running_var"],
        rtol=1e-6,
    )
    assert list(checkpoints.drop_layer(layers, "bn3")) == ["bn1", "bn2", "bn4"]
    checkpoints.save_keras(checkpoints.std_for_var(layers, "bn4"), tmp_path / "std.keras")
    found = {layer.name: layer for layer in read(tmp_path / "std.keras").layers}
    np.testing.assert_allclose(
        found["bn4"].state["running_var"], np.sqrt(layers["bn4"]["running_var"]), rtol=1e-6
    )
    assert found["bn1"].eps == 1e-5 and found["bn1"].momentum == 0.9
    checkpoints.save_keras_h5(checkpoints.drop_layer(layers, "bn1"), tmp_path / "d.h5")
    assert [layer.name for layer in read(tmp_path / "d.h5").layers] == ["bn2", "bn3", "bn4"]


def test_resnet50_state(tmp_path) -> None:
    state = checkpoints.resnet50_state()
    layers = checkpoints.bn_layers(state)
    assert len(layers) == 53 and sum(len(v["running_var"]) for v in layers.values()) == 26_560
    assert list(layers)[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert "layer4.0.downsample.1" in layers and "layer4.2.bn3" in layers
    checkpoints.save_npz(state, tmp_path / "r.npz")
    checkpoints.save_torch(state, tmp_path / "r.pt")
    for name in ("r.npz", "r.pt"):
        model = read(tmp_path / name)
        assert model.source == "torch"
        assert [layer.name for layer in model.layers] == list(layers)
        assert all(layer.problem is None for layer in model.layers)


def save_safetensors(state: dict[str, np.ndarray], path: Path, pad: int = 0) -> None:
    """A .safetensors file written by its spec (an 8-byte little-endian header length, a
    JSON header, the tensors' bytes); ``pad`` spaces lengthen the header."""
    import json

    header, offset, blobs = {}, 0, []
    for name, array in state.items():
        data = np.ascontiguousarray(array).tobytes()
        dtype = {"float32": "F32", "int64": "I64"}[array.dtype.name]
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_a_whole_resnet50_checkpoint_reads_past_its_convolutions(tmp_path) -> None:
    """A real checkpoint holds convolution and fc weights far over the channel cap beside its
    BatchNorms: a P.weight whose P has no running statistics is not a BatchNorm's, so it is
    neither read nor held to the cap, in every name-to-array format."""
    state = checkpoints.resnet50_state()
    bns = list(checkpoints.bn_layers(state))
    state["conv1.weight"] = np.ones((64, 3, 7, 7), np.float32)
    state["layer3.0.conv2.weight"] = np.ones((256, 256, 3, 3), np.float32)  # 589,824 values
    state["fc.weight"] = np.ones((1000, 2048), np.float32)
    state["fc.bias"] = np.ones(1000, np.float32)
    checkpoints.save_npz(state, tmp_path / "r.npz")
    checkpoints.save_torch(state, tmp_path / "r.pt")
    save_safetensors(state, tmp_path / "r.safetensors")
    for name in ("r.npz", "r.pt", "r.safetensors"):
        model = read(tmp_path / name)
        assert [layer.name for layer in model.layers] == bns, name
        assert model.source == "torch" and all(layer.problem is None for layer in model.layers)


def test_a_safetensors_header_whose_length_begins_like_a_pickle(tmp_path) -> None:
    """A header of 0x180 bytes starts the file with 0x80, a pickle's first byte."""
    state = checkpoints.flat_state(checkpoints.bn_layers(checkpoints.resnet50_state()))
    state = {k: v for k, v in state.items() if k.startswith("bn1.")}
    plain = tmp_path / "plain.safetensors"
    save_safetensors(state, plain)
    length = int.from_bytes(plain.read_bytes()[:8], "little")
    padded = tmp_path / "padded.safetensors"
    save_safetensors(state, padded, pad=0x180 - length if length < 0x180 else 0x280 - length)
    assert padded.read_bytes()[:1] == b"\x80"
    with open(padded, "rb") as f:
        assert sniff(f) == "safetensors"
    assert [layer.name for layer in read(padded).layers] == ["bn1"]


def test_keras_names_in_a_name_file_mean_keras(tmp_path) -> None:
    arrays = {"b.moving_mean": np.zeros(3), "b.moving_variance": np.ones(3)}
    np.savez(tmp_path / "k.npz", **arrays)
    model = read(tmp_path / "k.npz")
    assert (model.format, model.source, model.layers[0].eps) == ("npz", "keras", None)


STATE_ORDER = ("weight", "bias", "running_mean", "running_var")


def test_a_keras3_cnns_bare_weights_give_its_batchnorms(tmp_path) -> None:
    """model.save_weights("m.weights.h5") of a whole CNN: Keras 3 files each layer's variables
    under its class's name (layers/batch_normalization_1/vars), so its BatchNorms are read
    among the convolutions and dense layers, by their own names, nested ones too."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    inner = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(name="ibn"),
        ]
    )
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn_a"),
            inner,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(name="bn_b"),
        ]
    )
    rng = np.random.default_rng(3)
    for layer in (model.get_layer("bn_a"), inner.get_layer("ibn"), model.get_layer("bn_b")):
        layer.set_weights([rng.uniform(0.5, 2, w.shape) for w in layer.get_weights()])
    model.save_weights(tmp_path / "m.weights.h5")
    weights = read(tmp_path / "m.weights.h5")
    assert (weights.format, weights.source) == ("keras_weights", "keras")
    assert sorted(layer.name for layer in weights.layers) == ["bn_a", "bn_b", "ibn"]
    for layer in weights.layers:
        keras_layer = inner.get_layer("ibn") if layer.name == "ibn" else model.get_layer(layer.name)
        gamma, beta, mean, var = keras_layer.get_weights()
        for ours, theirs in zip(STATE_ORDER, (gamma, beta, mean, var), strict=True):
            np.testing.assert_array_equal(layer.state[ours], theirs)


# --- legacy Keras .h5 -----------------------------------------------------------------------


def test_a_nested_tf_keras_model(tmp_path) -> None:
    import tf_keras as k

    inner_in = k.Input((4, 4, 3))
    x = k.layers.Conv2D(4, 3, padding="same", name="iconv")(inner_in)
    x = k.layers.BatchNormalization(name="ibn", epsilon=1e-4, momentum=0.8, scale=False)(x)
    inner = k.Model(inner_in, x, name="inner")
    model = k.Sequential(
        [
            k.Input((4, 4, 3)),
            k.layers.BatchNormalization(name="bn0", epsilon=2e-3, momentum=0.95),
            inner,
            k.layers.BatchNormalization(name="bn2", center=False),
        ]
    )
    ibn = model.get_layer("inner").get_layer("ibn")
    ibn.set_weights([np.full(4, 0.5), np.arange(4.0), np.full(4, 3.0)])
    model.save(tmp_path / "n.h5")
    model.save_weights(tmp_path / "nw.h5")
    full, weights = read(tmp_path / "n.h5"), read(tmp_path / "nw.h5")
    assert [layer.name for layer in full.layers] == ["bn0", "ibn", "bn2"]
    assert [layer.name for layer in weights.layers] == ["bn0", "ibn", "bn2"]
    assert [(layer.eps, layer.momentum) for layer in full.layers] == [
        (2e-3, 0.95),
        (1e-4, 0.8),
        (1e-3, 0.99),
    ]
    inner_layer = full.layers[1]
    np.testing.assert_array_equal(inner_layer.state["weight"], np.ones(4))  # scale=False
    np.testing.assert_array_equal(inner_layer.state["bias"], np.full(4, 0.5))
    np.testing.assert_array_equal(inner_layer.state["running_var"], np.full(4, 3.0))
    np.testing.assert_array_equal(full.layers[2].state["bias"], np.zeros(4))  # center=False
    assert weights.format == "keras_weights" and weights.layers[1].eps is None


def test_a_keras3_legacy_h5_is_keras(tmp_path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.BatchNormalization(name="bn", epsilon=1e-5)]
    )
    model.save(tmp_path / "k3.h5")
    found = read(tmp_path / "k3.h5")
    assert (found.format, found.source) == ("keras_h5", "keras")
    assert [(layer.name, layer.eps, layer.momentum) for layer in found.layers] == [
        ("bn", 1e-5, 0.99)
    ]


def legacy_h5(path: Path, **extra) -> None:
    """A hand-made weights-only legacy .h5: one BatchNorm "bn" of 3 channels."""
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["layer_names"] = ["bn"]
        group = h5.create_group("bn")
        group.attrs["weight_names"] = ["bn/moving_mean:0", "bn/moving_variance:0"]
        group.create_dataset("bn/moving_mean:0", data=np.zeros(3, "f4"))
        if "external" in extra:
            group.create_dataset(
                "bn/moving_variance:0", shape=(3,), dtype="f4", external=[extra["external"]]
            )
        else:
            group.create_dataset("bn/moving_variance:0", data=np.ones(3, "f4"))
        if "link" in extra:
            h5["elsewhere"] = h5py.ExternalLink(extra["link"], "/")


def test_a_hand_made_legacy_h5_and_its_hostile_twins(tmp_path) -> None:
    legacy_h5(tmp_path / "ok.h5")
    model = read(tmp_path / "ok.h5")
    assert (model.format, model.source, [layer.name for layer in model.layers]) == (
        "keras_weights",
        "keras2",
        ["bn"],
    )
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    legacy_h5(tmp_path / "ext.h5", external=(str(secret), 0, 12))
    with pytest.raises(FileProblem, match="external file") as refused:
        read(tmp_path / "ext.h5")
    assert "API_TOKEN" not in str(refused.value)
    legacy_h5(tmp_path / "link.h5", link=str(tmp_path / "ok.h5"))
    with pytest.raises(FileProblem, match="external link"):
        read(tmp_path / "link.h5")
    with h5py.File(tmp_path / "none.h5", "w") as h5:
        h5.create_dataset("x", data=np.zeros(3))
    with pytest.raises(FileProblem, match="neither Keras 3's layers/…/vars"):
        read(tmp_path / "none.h5")


def test_a_legacy_model_config_is_bounded(files, monkeypatch) -> None:
    monkeypatch.setenv("BNEXPLORE_MAX_CONFIG_BYTES", "1KiB")
    with pytest.raises(FileProblem, match=r"model_config holds more than 1 KiB|1,024"):
        read(files / "m.h5")


# --- ONNX -----------------------------------------------------------------------------------


def test_a_folded_onnx_is_refused_with_the_way_out(cnn, tmp_path) -> None:
    checkpoints.save_onnx(cnn, tmp_path / "folded.onnx", optimize=True)
    checkpoints.save_onnx(cnn, tmp_path / "folded_legacy.onnx", optimize=True, dynamo=False)
    for name in ("folded.onnx", "folded_legacy.onnx"):
        with pytest.raises(FileProblem) as refused:
            read(tmp_path / name)
        assert NO_BN_NODE in str(refused.value)
        assert (
            "no BatchNormalization node: exporters fold eval BatchNorm into the Conv or Gemm "
            "before it; "
            "re-export with optimize=False"
        ) in str(refused.value)


def test_onnx_eps_is_float32_read_as_its_shortest_decimal(files) -> None:
    import onnx

    model = onnx.load(files / "m.onnx", load_external_data=False)
    (eps,) = {
        a.f
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
        for a in n.attribute
        if a.name == "epsilon"
    }
    assert eps == np.float32(1e-5) and eps != 1e-5  # 9.99999975e-06 as stored
    assert {layer.eps for layer in read(files / "m.onnx").layers} == {1e-5}


def edited_onnx(files: Path, edit) -> bytes:
    import onnx

    model = onnx.load(files / "m.onnx", load_external_data=False)
    edit(model, onnx)
    return model.SerializeToString()


def test_onnx_constant_and_computed_inputs(files) -> None:
    def constant(model, onnx):
        (tensor,) = [t for t in model.graph.initializer if t.name == "bn2.running_var"]
        model.graph.initializer.remove(tensor)
        node = onnx.helper.make_node("Constant", [], ["bn2.running_var"], value=tensor)
        model.graph.node.insert(0, node)

    layers = read_model(io.BytesIO(edited_onnx(files, constant))).layers
    assert [layer.name for layer in layers] == TORCH_NAMES and layers[1].problem is None

    def computed(model, onnx):
        (tensor,) = [t for t in model.graph.initializer if t.name == "bn2.running_var"]
        tensor.name = "raw_var"
        node = onnx.helper.make_node("Abs", ["raw_var"], ["bn2.running_var"])
        model.graph.node.insert(0, node)

    layers = read_model(io.BytesIO(edited_onnx(files, computed))).layers
    assert "computed in the graph" in layers[1].problem and layers[0].problem is None


@pytest.mark.parametrize(
    ("producer", "source"), [("pytorch", "torch"), ("tf2onnx", "keras2"), ("onnx-example", None)]
)
def test_an_onnx_files_producer_names_its_source(files, producer, source) -> None:
    """PyTorch's exporter means torch, tf2onnx (a Keras 2 / tf.keras model) keras2; any
    other producer says nothing (the audit then takes PyTorch, or the link's source=)."""

    def produced_by(model, onnx):
        model.producer_name = producer

    model = read_model(io.BytesIO(edited_onnx(files, produced_by)))
    assert model.format == "onnx" and model.source == source
    assert [layer.name for layer in model.layers] == TORCH_NAMES


def test_an_unknown_onnx_producer_is_said_and_the_audit_says_what_it_assumed(
    files, store_dir
) -> None:
    """An ONNX file from a producer that names no framework (the model zoo's MXNet files)
    says so, and the audit, taking PyTorch as the source, says that too."""
    import bnexplore

    def produced_by(model, onnx):
        model.producer_name, model.producer_version = "MXNet", "1.0"

    data = edited_onnx(files, produced_by)
    assert any("'MXNet 1.0'" in n for n in read_model(io.BytesIO(data)).notices)
    (store_dir.parent / "mxnet.onnx").write_bytes(data)
    digest = bnexplore.store_file(store_dir.parent / "mxnet.onnx")
    done = bnexplore.audit(f"?state={digest}&engines=torch,keras")
    assert done["source"] == "torch"
    assert any("does not say which framework" in n for n in done["notices"]), done["notices"]
    named = bnexplore.audit(f"?state={digest}&engines=torch,keras&source=torch")
    assert not any("does not say which framework" in n for n in named["notices"])


def test_a_pytorch_onnx_files_momentum_is_pytorchs_own_decimal(files, store_dir) -> None:
    """ONNX stores PyTorch's momentum 0.1 as Keras's 0.9 (float32): the audit takes it back
    as 0.1, not as 1.0 − 0.9 = 0.09999999999999998, so a layer's link carries no
    torch_momentum (it is the default)."""
    import bnexplore

    digest = bnexplore.store_file(files / "m.onnx")
    done = bnexplore.audit(f"?state={digest}&engines=torch,keras")
    assert {layer["momentum"] for layer in done["layers"]} == {0.1}
    assert not any("torch_momentum" in layer["link"] for layer in done["layers"])


def test_an_averaged_copy_of_the_weights_is_read_once(cnn, tmp_path) -> None:
    """timm's {"state_dict", "state_dict_ema"} and torchvision's {"model", "model_ema"}
    (an AveragedModel's ``module.`` names, beside its n_averaged) hold the model twice: its
    BatchNorms are read once, from the weights, with a notice. Two branches of a model
    (no averaged copy) both stay."""
    import torch

    state = cnn.state_dict()
    count = len(read_model(checkpoints.save_state_dict(cnn, tmp_path / "m.pt").open("rb")).layers)
    ema = {k: v * 0.5 for k, v in state.items()}
    averaged = {f"module.{k}": v for k, v in ema.items()}
    cases = {
        "timm.pth.tar": ({"state_dict": state, "state_dict_ema": ema, "epoch": 3}, "state_dict"),
        "tv.pth": (
            {
                "model": state,
                "model_ema": {"n_averaged": torch.tensor(7), **averaged},
            },
            "model",
        ),
    }
    for name, (checkpoint, main) in cases.items():
        torch.save(checkpoint, tmp_path / name)
        model = read_model((tmp_path / name).open("rb"))
        assert len(model.layers) == count, name
        assert all(layer.name.startswith(f"{main}.") for layer in model.layers), name
        assert any("an averaged copy" in n and repr(main) in n for n in model.notices), name
        first = model.layers[0]
        key = first.name.removeprefix(f"{main}.")
        np.testing.assert_array_equal(
            first.state["running_var"], state[f"{key}.running_var"].double().numpy()
        )
    torch.save({"branch_a": state, "branch_b": ema}, tmp_path / "two.pt")
    assert len(read_model((tmp_path / "two.pt").open("rb")).layers) == 2 * count


def test_keras_files_without_a_batchnorm_say_so_in_kerass_words(tmp_path) -> None:
    """A Keras model with no BatchNormalization (ConvNeXt's LayerNorms) is refused in
    Keras's words, in every format, never with PyTorch's running_mean names."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tf_keras

    def convnet(k):
        inputs = k.Input((4, 4, 3))
        x = k.layers.Conv2D(8, 3, name="conv")(inputs)
        x = k.layers.LayerNormalization(name="norm")(x)
        return k.Model(inputs, x)

    keras3, keras2 = convnet(keras), convnet(tf_keras)
    keras3.save(tmp_path / "m.keras")
    keras3.save_weights(tmp_path / "m.weights.h5")
    keras2.save(tmp_path / "k2.h5", save_format="h5")
    keras2.save_weights(tmp_path / "k2w.h5", save_format="h5")
    said = {}
    for name in ("m.keras", "m.weights.h5", "k2.h5", "k2w.h5"):
        with pytest.raises(store.FileProblem) as refused:
            read_model((tmp_path / name).open("rb"))
        said[name] = str(refused.value)
        assert "running_mean" not in said[name], said
    assert "config.json lists none" in said["m.keras"]
    assert "no group is named after a BatchNormalization" in said["m.weights.h5"]
    assert all("no BatchNormalization layer" in said[n] for n in ("k2.h5", "k2w.h5"))


def test_keras3_weights_of_batchnorms_without_gamma_or_beta(tmp_path) -> None:
    """A Keras 3 .weights.h5 keeps a BatchNormalization's vectors in the order γ, β, mean,
    variance, leaving out γ where scale=False and β where center=False: with neither, γ is
    1 and β 0; with one of them (InceptionV3's scale=False), the file does not say which,
    and it is refused with the way out."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    rng = np.random.default_rng(0)

    def saved(name: str, **options) -> Path:
        inputs = keras.Input((4, 4, 5))
        bn = keras.layers.BatchNormalization(name="bn", **options)
        model = keras.Model(inputs, bn(inputs))
        weights = [w.copy() for w in bn.get_weights()]
        weights[-2] = rng.normal(size=5).astype("f4")
        weights[-1] = rng.uniform(0.5, 2, size=5).astype("f4")
        bn.set_weights(weights)
        model.save_weights(tmp_path / name)
        return tmp_path / name, weights

    path, (mean, var) = saved("bare.weights.h5", scale=False, center=False)
    (layer,) = read_model(path.open("rb")).layers
    np.testing.assert_array_equal(layer.state["running_mean"], mean)
    np.testing.assert_array_equal(layer.state["running_var"], var)
    assert list(layer.state["weight"]) == [1.0] * 5 and list(layer.state["bias"]) == [0.0] * 5
    path, _ = saved("beta_only.weights.h5", scale=False)
    with pytest.raises(store.FileProblem, match="which of γ and β it kept"):
        read_model(path.open("rb"))


def test_onnx_external_data_is_never_followed(files, tmp_path, store_dir) -> None:
    (tmp_path / "secret.bin").write_bytes(SECRET)

    def external(model, onnx):
        for tensor in model.graph.initializer:
            if tensor.name == "bn1.running_var":
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", "../../secret.bin"), ("offset", "0")):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value

    data = edited_onnx(files, external)
    (store_dir / "a" / "b").mkdir(parents=True)
    (store_dir / "secret.bin").write_bytes(SECRET)  # where ../../ from inside the store points
    with pytest.raises(FileProblem) as refused:
        store.store_bytes(data)
    message = str(refused.value)
    assert "external_data=False" in message and "API_TOKEN" not in message
    assert not any(chunk in message.encode() for chunk in (SECRET[:12], SECRET[20:32]))


def test_onnx_enormous_dims_are_refused_without_allocating(files) -> None:
    def enormous(model, onnx):
        for tensor in model.graph.initializer:
            if tensor.name in ("bn3.running_var", "conv2.weight"):
                del tensor.dims[:]
                tensor.dims.append(2**40)

    data = edited_onnx(files, enormous)
    with TreeMemory(os.getpid(), every=0.02, for_s=60) as memory:
        start = memory.now()
        with pytest.raises(FileProblem, match=r"declares dims \[1099511627776\]"):
            read_model(io.BytesIO(data))
    assert memory.peak - start < 256 * 1024**2


def test_onnx_vectors_count_against_the_channel_cap(files, monkeypatch) -> None:
    monkeypatch.setenv("BNEXPLORE_MAX_CHANNELS", "12")
    with pytest.raises(FileProblem, match="over the limit of 12 channels"):
        read(files / "m.onnx")


def test_sniff_tells_onnx_by_parsing_it_last(files) -> None:
    with open(files / "m.onnx", "rb") as f:
        assert sniff(f) == "onnx"
    for junk in (b"\x08\x07" + b"\x00" * 40, b"hello, not a model at all", b"\x08"):
        with pytest.raises(FileProblem, match="not a file bnexplore reads, or a truncated one"):
            sniff(io.BytesIO(junk))
    with pytest.raises(FileProblem, match=r"^an empty file$"):
        sniff(io.BytesIO(b""))


# --- the store ------------------------------------------------------------------------------


def test_store_model_is_cached(files, store_dir) -> None:
    digest = store.store_file(files / "m.h5")
    first = store.model(digest)
    assert first is store.model(digest)
    assert (first.format, first.source) == ("keras_h5", "keras2")
    assert store.layers(digest) is first.layers
    assert store._footprint(first) >= sum(8 * 4 * layer.channels for layer in first.layers)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _onnx_of(graph: bytes) -> bytes:
    """A ModelProto: ir_version 8, producer "pytorch", the given GraphProto bytes."""
    return b"\x08\x08" + _field(2, b"pytorch") + _field(7, graph)


@pytest.mark.parametrize(
    ("graph", "refusal"),
    [
        (_field(1, b"") * 1_000_000, "more than 20,000 objects"),  # a million empty nodes
        (_field(5, b"\x08\x04" + _field(7, b"\x00" * 20_000_000)), "its own size"),  # int64s
        (_field(1, _field(5, _field(1, b"e")) * 600_000), "its own size"),  # attributes
    ],
    ids=["nodes", "packed-varints", "messages"],
)
def test_onnx_bombs_are_refused_before_protobuf_parses_them(graph, refusal) -> None:
    data = _onnx_of(graph)
    assert sniff(io.BytesIO(data)) == "onnx"
    with TreeMemory(os.getpid(), every=0.02, for_s=60) as memory:
        start = memory.now()
        with pytest.raises(FileProblem, match=refusal):
            read_model(io.BytesIO(data))
    assert memory.peak - start < 128 * 1024**2
