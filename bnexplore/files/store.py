"""The store: uploaded files on the server's disk, each kept under its SHA-256.

- ``BNEXPLORE_STORE``: the folder, by default ``bnexplore/store`` under the user's
  cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``).
- ``BNEXPLORE_STORE_FILE_LIMIT``: the most one file may hold, by default 200 MiB:
  Streamlit's ``server.maxUploadSize`` (200, in Streamlit's megabytes of 1024²
  bytes; ``.streamlit/config.toml`` sets the same).
- ``BNEXPLORE_STORE_LIMIT``: the most the whole store may hold, by default 2 GiB;
  the oldest files are dropped first when a new one would pass it.

A link names a file by its digest: 64 hex characters in the canonical link, any
unique prefix of at least 16 when read. A file is checked before it is kept (it
must hold a BatchNorm state or a batch), and nothing is written outside the
folder: each file goes to a temporary name there, then is renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
from pathlib import Path

import cachetools
import numpy as np

from bnexplore import settings
from bnexplore.files.formats import (
    BatchInfo,
    FileProblem,
    Layer,
    ModelFile,
    batch_info,
    check_batch_data,
    read_batches,
    read_layers,
    read_model,
    sniff,
)

DEFAULT_FILE_LIMIT = settings.DEFAULT_FILE_LIMIT
DEFAULT_STORE_LIMIT = settings.DEFAULT_STORE_LIMIT
MIN_PREFIX = 16
DIGEST = re.compile(r"[0-9a-f]{64}")
_lock = threading.Lock()


class NotStored(LookupError):
    """A digest that names no file, or more than one, on this server."""


def root() -> Path:
    """The store's folder (not created until a file is stored)."""
    return settings.store_folder()


def file_limit() -> int:
    """Bytes one stored file may hold: BNEXPLORE_STORE_FILE_LIMIT, or 200 MiB."""
    return settings.store_file_limit()


def store_limit() -> int:
    """Bytes the whole store may hold: BNEXPLORE_STORE_LIMIT, or 2 GiB."""
    return settings.store_limit()


def short(digest: str) -> str:
    """A digest as notices show it: its first 16 characters and an ellipsis."""
    return digest[:MIN_PREFIX] + ("…" if len(digest) > MIN_PREFIX else "")


def store_file(path: str | os.PathLike) -> str:
    """Keep a file in the store and return its digest; raises FileProblem if unusable."""
    path = Path(path)
    size, cap = path.stat().st_size, file_limit()
    if size > cap:
        raise FileProblem(_too_big(size, cap))
    return store_bytes(path.read_bytes())


def store_bytes(data: bytes) -> str:
    """Keep bytes in the store (checked first: a BatchNorm state or a batch); their digest."""
    cap = file_limit()
    if len(data) > cap:
        raise FileProblem(_too_big(len(data), cap))
    describe(io.BytesIO(data))  # raises FileProblem: nothing is kept
    digest = hashlib.sha256(data).hexdigest()
    folder = root()
    with _lock:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / digest
        if target.exists():
            os.utime(target)  # stored again: the newest, last to be dropped
        else:
            fd, temporary = tempfile.mkstemp(dir=folder, prefix=".upload-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.chmod(temporary, 0o644)  # the app's server may run as another user
                os.replace(temporary, target)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        _prune(folder, keep=digest)
    return digest


def _too_big(size: int, cap: int) -> str:
    return (
        f"the file holds {settings.exact_words(size)}, over the limit of "
        f"{settings.exact_words(cap)} per file (BNEXPLORE_STORE_FILE_LIMIT)"
    )


def _prune(folder: Path, keep: str) -> None:
    """Drop the oldest files until the store holds at most its limit (never ``keep``)."""
    files = [(p.stat().st_mtime, p) for p in folder.iterdir() if DIGEST.fullmatch(p.name)]
    total, most = sum(p.stat().st_size for _, p in files), store_limit()
    for _, path in sorted(files):
        if total <= most:
            break
        if path.name != keep:
            total -= path.stat().st_size
            path.unlink(missing_ok=True)


def resolve(prefix: str) -> str:
    """The full digest a link's prefix names; raises NotStored (a message) if none or several.

    Reads the store's listing only: safe while parsing a link.
    """
    folder = root()
    try:
        names = [n for n in os.listdir(folder) if DIGEST.fullmatch(n) and n.startswith(prefix)]
    except OSError:
        names = []
    if not names:
        raise NotStored(f"{short(prefix)} is not on this server: upload the file")
    if len(names) > 1:
        raise NotStored(
            f"{short(prefix)} matches {len(names)} files on this server: give more characters"
        )
    return names[0]


def path_of(digest: str) -> Path:
    return root() / digest


def describe(f) -> tuple[tuple[Layer, ...], BatchInfo | None]:
    """What a file holds: its BatchNorm layers and its batches (either may be missing).

    Raises FileProblem when it holds neither, naming both problems.
    """
    found, layer_problem = _guarded(read_layers, f)
    info, batch_problem = _guarded(batch_info, f)
    if info is not None:
        _, batch_problem = _guarded(lambda f: check_batch_data(f, info), f)
        info = None if batch_problem else info
    if found and all(layer.channels == 0 for layer in found):
        names = ", ".join(layer.label for layer in found[:4])
        layer_problem = (
            f"every BatchNorm layer in it has 0 channels ({names}): its vectors are empty"
        )
        found = None
    if not found and info is None:
        if sniff(f) == "npz" and layer_problem != batch_problem:
            raise FileProblem(f"as a model: {layer_problem}; as batches: {batch_problem}")
        raise FileProblem(layer_problem if sniff(f) != "npy" else batch_problem)
    return found or (), info


def _guarded(reader, f):
    """(answer, None) or (None, the problem in words): a stranger's file never raises past here."""
    try:
        return reader(f), None
    except FileProblem as problem:
        return None, str(problem)
    except RecursionError:
        return None, "nested too deeply to be a BatchNorm state"
    except Exception as exc:  # noqa: BLE001 - any failure of a parser is the file's problem
        return None, f"a malformed file ({type(exc).__name__}: {exc})"


def layers(digest: str) -> tuple[Layer, ...]:
    """The BatchNorm layers of a stored file; raises FileProblem."""
    return model(digest).layers


def model(digest: str) -> ModelFile:
    """A stored file as a whole checkpoint: its format, the framework it names, its
    BatchNorm layers and notices (cached with the parsed files); raises FileProblem."""
    return _answer(_read(digest, read_model))


def batches_info(digest: str) -> BatchInfo:
    """Count, shape and dtype of a stored batch file, from its headers; raises FileProblem."""
    return _answer(_read(digest, batch_info))


def _answer(found):
    if isinstance(found, FileProblem):
        raise FileProblem(str(found))  # a fresh one: a cached exception's traceback would grow
    return found


def _read(digest: str, reader):
    """A reader's answer for a stored file, or its FileProblem: both cached, as a digest's
    content never changes (a file missing now is not cached: it may be uploaded again)."""
    if not path_of(digest).is_file():
        return FileProblem("no longer on this server: upload the file")
    return _read_cached(digest, reader)


def _footprint(value) -> int:
    """Bytes a cached answer holds: its arrays, and a little for everything else."""
    if isinstance(value, np.ndarray):
        return value.nbytes + 128
    if isinstance(value, Layer):
        return sum(_footprint(v) for v in value.state.values()) + 512
    if isinstance(value, ModelFile):
        return _footprint(value.layers) + sum(len(n) for n in value.notices) + 512
    if isinstance(value, tuple):
        return sum(_footprint(v) for v in value) + 64
    return 512


_parsed: cachetools.LRUCache = cachetools.LRUCache(
    maxsize=settings.parsed_cache_bytes(), getsizeof=_footprint
)
"""What the server keeps of parsed files, bounded in bytes (BNEXPLORE_PARSED_CACHE):
a digest's content never changes, so its answer (or its problem) is kept."""
_parsed_lock = threading.Lock()


@cachetools.cached(_parsed, key=lambda digest, reader: (digest, reader.__name__), lock=_parsed_lock)
def _read_cached(digest: str, reader):
    try:
        with _open(digest) as f:
            return reader(f)
    except FileProblem as problem:
        return problem
    except RecursionError:
        return FileProblem("nested too deeply to be a BatchNorm state")
    except Exception as exc:  # noqa: BLE001 - a stranger's file: any failure is its problem
        return FileProblem(f"a malformed file ({type(exc).__name__}: {exc})")


@cachetools.cached(_parsed, key=lambda digest: (digest, "batches"), lock=_parsed_lock)
def batches(digest: str) -> tuple[np.ndarray, ...]:
    """The batches of a stored batch file, read-only (cached with the parsed files)."""
    with _open(digest) as f:
        arrays = read_batches(f)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _open(digest: str):
    try:
        return open(path_of(digest), "rb")
    except OSError:
        raise FileProblem("no longer on this server: upload the file") from None


def find_layer(digest: str, name: str | None) -> Layer:
    """The layer called ``name`` (None: the first) of a stored file; raises FileProblem."""
    found = layers(digest)
    if name is None:
        return found[0]
    for layer in found:
        if layer.name == name:
            return layer
    raise FileProblem(f"no BatchNorm layer {name!r} in the file")
