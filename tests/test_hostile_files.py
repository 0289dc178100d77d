"""Hostile uploads: nothing in a file may point outside it, and nothing is materialized
before it is bounded. Each file is built here, as an attacker would build it, and goes
through the store (as the CLI's ``store`` and the app's uploaders do) and a run.

Every test runs under :class:`TreeMemory`: the peak resident memory of this process
tree (pytest and the engines' workers), sampled from /proc, may grow by at most
``GROWTH`` while hostile files are read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import bnexplore
from bnexplore import settings
from bnexplore.files import store
from bnexplore.files.formats import FileProblem
from bnexplore.tools.cli import main
from tests.team_server import TreeMemory

SECRET = b"API_TOKEN=sk-hostile-0123456789abcdef-never-to-be-read\n" * 2
GROWTH = 512 * 1024**2
"""Most the process tree may grow while hostile files are read (each attack below took
2–3.4 GiB before it was bounded)."""


@pytest.fixture
def store_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "store"
    monkeypatch.setenv("BNEXPLORE_STORE", str(folder))
    return folder


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file on 'the server' that no upload may read."""
    path = tmp_path / "server" / "secrets.env"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


@pytest.fixture(scope="module")
def warm_workers() -> None:
    """The workers the runs below use, started before any memory is measured."""
    bnexplore.run("?shape=4,3&engines=torch,keras")


@pytest.fixture
def bounded_memory(warm_workers):
    with TreeMemory(os.getpid(), every=0.05, for_s=600) as memory:
        start = memory.now()
        yield
    grown = memory.peak - start
    assert grown < GROWTH, f"the process tree grew by {grown / 2**20:.0f} MiB"


def secret_values() -> list[float]:
    return [float(b) for b in SECRET[:16]]


def holds_secret(value) -> bool:
    """Whether any list of numbers in a document (or any text) carries the secret."""
    text = json.dumps(value) if not isinstance(value, str) else value
    if "API_TOKEN" in text or "sk-hostile" in text:
        return True
    wanted = secret_values()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            numbers = [v for v in item if isinstance(v, int | float)]
            if len(numbers) >= len(wanted):
                for i in range(len(numbers) - len(wanted) + 1):
                    if numbers[i : i + len(wanted)] == wanted:
                        return True
            stack.extend(v for v in item if isinstance(v, dict | list))
    return False


def refused(path: Path, match: str) -> str:
    """Store ``path`` as an upload: it must be refused with a message matching ``match``,
    nothing kept; then the same bytes planted in the store behind bnexplore's back must
    give a notice and a fresh layer, and the secret nowhere."""
    with pytest.raises(FileProblem, match=match) as problem:
        bnexplore.store_file(path)
    message = str(problem.value)
    assert not holds_secret(message)
    assert "weights_only=False" not in message
    folder = store.root()
    assert not folder.exists() or not any(p for p in folder.iterdir() if len(p.name) == 64)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / digest).write_bytes(data)
    doc = bnexplore.run(f"?state={digest}&init=state&shape=4,3&engines=torch,keras")
    assert doc["scenario"]["init"] == "fresh", doc["notices"]
    assert any(n.startswith("state: ") for n in doc["notices"]), doc["notices"]
    assert not holds_secret(doc)
    (folder / digest).unlink()
    return message


def keras_weights(path: Path, make_vector, groups: int = 1, name_attr: bool = True) -> Path:
    """A Keras 3 ``.weights.h5``: ``groups`` BatchNorm layers, each vector made by
    ``make_vector(group, index, key)`` (which creates the dataset)."""
    with h5py.File(path, "w") as h5:
        for g in range(groups):
            layer = h5.create_group(f"layers/bn{g}")
            variables = layer.create_group("vars")
            if name_attr:
                variables.attrs["name"] = f"bn{g}"
            for k in range(4):
                make_vector(variables, k, str(k))
    return path


def keras_file(path: Path, weights: bytes, config: bytes | None = None) -> Path:
    config = (
        config
        or json.dumps(
            {
                "class_name": "Sequential",
                "config": {
                    "layers": [
                        {"class_name": "BatchNormalization", "config": {"name": "bn0"}},
                    ]
                },
            }
        ).encode()
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")
        archive.writestr("config.json", config)
        archive.writestr("model.weights.h5", weights)
    return path


# --- nothing points outside the file ---------------------------------------------------------


def test_hdf5_external_storage_is_refused_before_reading_the_servers_file(
    tmp_path, secret, store_dir, bounded_memory
) -> None:
    def external(group, k, key):
        # declared larger than the file: HDF5 would zero-fill, the attacker needs no size
        group.create_dataset(key, shape=(35,), dtype="u1", external=[(str(secret), 0, 1000)])

    path = keras_weights(tmp_path / "evil.weights.h5", external)
    message = refused(path, "external file")
    assert "bn0/vars/0" in message
    keras = keras_file(tmp_path / "evil.keras", path.read_bytes())
    refused(keras, "external file")


def test_hdf5_external_link_is_refused(tmp_path, secret, store_dir, bounded_memory) -> None:
    other = tmp_path / "server" / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["vars/0"] = np.frombuffer(SECRET[:35], np.uint8).astype(np.float64)

    def linked(group, k, key):
        group[key] = h5py.ExternalLink(str(other), "/vars/0")

    path = keras_weights(tmp_path / "link.weights.h5", linked)
    refused(path, "an external link at 'layers/bn0/vars/0'")


def test_hdf5_soft_link_is_refused(tmp_path, store_dir, bounded_memory) -> None:
    def soft(group, k, key):
        if k == 0:
            group.create_dataset(key, data=np.ones(3))
        else:
            group[key] = h5py.SoftLink(group.name + "/0")

    refused(keras_weights(tmp_path / "soft.weights.h5", soft), "a soft link")


def test_hdf5_virtual_dataset_is_refused(tmp_path, secret, store_dir, bounded_memory) -> None:
    other = tmp_path / "server" / "data.h5"
    with h5py.File(other, "w") as h5:
        h5["secret"] = np.frombuffer(SECRET[:35], np.uint8).astype(np.float64)

    def virtual(group, k, key):
        layout = h5py.VirtualLayout(shape=(35,), dtype="f8")
        layout[:] = h5py.VirtualSource(str(other), "secret", shape=(35,))
        group.create_virtual_dataset(key, layout)

    refused(keras_weights(tmp_path / "vds.weights.h5", virtual), "virtual dataset")


# --- bounded memory before anything is materialized ------------------------------------------


def test_a_stride_0_expanded_tensor_is_refused_by_its_shape(
    tmp_path, store_dir, bounded_memory
) -> None:
    huge = torch.zeros(1).expand(2**26)
    path = tmp_path / "expand.pt"
    torch.save({"bn.running_mean": huge, "bn.running_var": huge}, path)
    assert path.stat().st_size < 4000
    refused(path, r"67,108,864 values, over the limit of 262,144 channels.*MAX_CHANNELS")


def test_a_deflated_npz_of_zeros_is_refused_before_it_is_inflated(
    tmp_path, store_dir, bounded_memory
) -> None:
    path = tmp_path / "bomb.npz"
    zeros = np.zeros(2**27, np.float32)  # 512 MiB, about 0.5 MiB deflated
    np.savez_compressed(path, **{"bn.running_mean": zeros, "bn.running_var": zeros})
    del zeros
    assert path.stat().st_size < 4 * 2**20
    refused(path, "134,217,728 values, over the limit")


def test_unallocated_fill_value_datasets_are_refused_by_their_shape(
    tmp_path, store_dir, bounded_memory
) -> None:
    def unallocated(group, k, key):
        group.create_dataset(key, shape=(2**24,), dtype="f8")  # no data: HDF5 fills on read

    path = keras_weights(tmp_path / "fill.weights.h5", unallocated, groups=8)
    assert path.stat().st_size < 100_000
    refused(path, "16,777,216 values, over the limit")


def test_a_state_whose_vectors_pass_the_state_bytes_cap_is_refused(
    tmp_path, store_dir, monkeypatch, bounded_memory
) -> None:
    monkeypatch.setenv("BNEXPLORE_MAX_STATE_BYTES", "1MiB")
    arrays = {
        f"bn{k}.{n}": np.ones(50_000) for k in range(4) for n in ("running_mean", "running_var")
    }
    np.savez(tmp_path / "many.npz", **arrays)
    refused(tmp_path / "many.npz", r"more than 1,048,576 bytes \(1 MiB\).*MAX_STATE_BYTES")


def test_a_keras_config_bomb_is_refused_before_it_unpacks(
    tmp_path, store_dir, bounded_memory
) -> None:
    path = tmp_path / "config-bomb.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("metadata.json", "{}")
        with archive.open("config.json", "w") as config:
            config.write(b"[")
            chunk = b" " * (1 << 20)
            for _ in range(1000):  # 1000 MiB of JSON whitespace
                config.write(chunk)
            config.write(b"]")
        archive.writestr("model.weights.h5", b"")
    assert path.stat().st_size < 8 * 2**20
    refused(path, r"config.json unpacks to more than 16,777,216 bytes")


def test_a_file_of_many_groups_is_refused_at_the_object_cap(
    tmp_path, store_dir, monkeypatch, bounded_memory
) -> None:
    monkeypatch.setenv("BNEXPLORE_MAX_OBJECTS", "2000")

    def vector(group, k, key):
        group.create_dataset(key, data=np.ones(2))

    path = keras_weights(tmp_path / "groups.weights.h5", vector, groups=600)
    refused(path, r"more than 2,000 objects.*MAX_OBJECTS")


def test_groups_without_a_name_attribute_are_named_by_their_layer_group(
    tmp_path, store_dir
) -> None:
    def vector(group, k, key):
        group.create_dataset(key, data=np.full(3, 1.0 + k))

    path = keras_weights(tmp_path / "nameless.weights.h5", vector, groups=3, name_attr=False)
    digest = bnexplore.store_file(path)
    assert [layer.name for layer in store.layers(digest)] == ["bn0", "bn1", "bn2"]


def test_the_default_channel_cap_is_well_above_real_models() -> None:
    assert settings.max_channels() == 262_144


def test_a_large_state_with_a_matching_shape_is_refused_by_the_memory_guard() -> None:
    doc = bnexplore.run("?shape=2,10000000&engines=torch,keras")
    for engine in doc["engines"].values():
        assert engine["available"] is False and "memory limit" in engine["reason"]


# --- validated when stored -------------------------------------------------------------------


def test_a_truncated_npy_batch_is_refused_when_stored(tmp_path, store_dir) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (50_000, 1000)}
    )
    path = tmp_path / "cut.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(64))
    assert path.stat().st_size < 300
    with pytest.raises(FileProblem, match=r"truncated .npy.*200,000,000 bytes"):
        bnexplore.store_file(path)


def test_a_truncated_npz_batch_is_refused_when_stored(tmp_path, store_dir) -> None:
    np.save(tmp_path / "b.npy", np.ones((64, 3), np.float32))
    data = (tmp_path / "b.npy").read_bytes()[:200]
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as archive:
        archive.writestr("batch_0.npy", data)
    with pytest.raises(FileProblem, match=r"truncated \.npz: batch_0\.npy"):
        bnexplore.store_file(tmp_path / "cut.npz")


def test_a_0_channel_state_is_refused_when_stored(tmp_path, store_dir) -> None:
    np.savez(
        tmp_path / "empty.npz", **{"bn.running_mean": np.ones(0), "bn.running_var": np.ones(0)}
    )
    with pytest.raises(FileProblem, match="0 channels"):
        bnexplore.store_file(tmp_path / "empty.npz")


# --- messages a user understands -------------------------------------------------------------


def test_a_file_one_byte_over_the_limit_says_so_to_the_byte(
    tmp_path, store_dir, monkeypatch
) -> None:
    monkeypatch.setenv("BNEXPLORE_STORE_FILE_LIMIT", "1MiB")
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(1_048_577))
    with pytest.raises(FileProblem, match=r"1,048,577 bytes.*over the limit of 1,048,576 bytes"):
        bnexplore.store_file(path)


def test_a_bfloat16_safetensors_is_read(tmp_path, store_dir) -> None:
    from safetensors.torch import save_file

    state = {
        "bn.weight": torch.tensor([1.0, 2.0, 0.5], dtype=torch.bfloat16),
        "bn.bias": torch.tensor([0.0, 0.25, -1.0], dtype=torch.bfloat16),
        "bn.running_mean": torch.tensor([3.0, -2.0, 0.125], dtype=torch.bfloat16),
        "bn.running_var": torch.tensor([0.5, 4.0, 1e-3], dtype=torch.bfloat16),
    }
    save_file(state, tmp_path / "bf16.safetensors")
    (layer,) = store.layers(bnexplore.store_file(tmp_path / "bf16.safetensors"))
    for key, tensor in state.items():
        np.testing.assert_array_equal(layer.state[key.split(".")[1]], tensor.double().numpy())


def test_safetensors_offsets_past_the_file_are_refused(tmp_path, store_dir) -> None:
    header = json.dumps(
        {
            "bn.running_mean": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "bn.running_var": {"dtype": "F32", "shape": [1000], "data_offsets": [16, 4016]},
        }
    ).encode()
    path = tmp_path / "lying.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(32))
    with pytest.raises(FileProblem, match=r"claims bytes 16–4,016 of 32"):
        bnexplore.store_file(path)


def test_a_torchscript_file_is_refused_without_advising_weights_only_false(
    tmp_path, store_dir, capsys
) -> None:
    module = torch.jit.script(torch.nn.BatchNorm2d(3))
    module.save(str(tmp_path / "scripted.pt"))
    assert main(["store", str(tmp_path / "scripted.pt")]) == 1
    err = capsys.readouterr().err
    assert "TorchScript" in err and "save the state_dict instead" in err
    assert "weights_only=False" not in err


def test_a_full_model_pickle_is_refused_as_one(tmp_path, store_dir) -> None:
    torch.save(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), tmp_path / "model.pt")
    with pytest.raises(FileProblem, match=r"full-model file.*Save the state_dict instead"):
        bnexplore.store_file(tmp_path / "model.pt")


@pytest.mark.parametrize("kind", ["torch", "keras config", "safetensors header"])
def test_deep_nesting_is_named_as_such(kind, tmp_path, store_dir) -> None:
    if kind == "torch":
        nested: dict = {"running_mean": torch.ones(2), "running_var": torch.ones(2)}
        for _ in range(200):
            nested = {"inner": nested}
        torch.save(nested, tmp_path / "deep.pt")
        path = tmp_path / "deep.pt"
    elif kind == "keras config":
        path = keras_file(tmp_path / "deep.keras", b"", b"[" * 100_000 + b"]" * 100_000)
    else:
        header = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
        path = tmp_path / "deep.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(FileProblem, match="nested too deeply") as problem:
        bnexplore.store_file(path)
    assert "RecursionError" not in str(problem.value)
