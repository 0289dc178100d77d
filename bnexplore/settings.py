"""The settings read from the environment, in one place, with their defaults.

Sizes take bytes or a number with KiB, MiB, GiB (or kB, MB, GB); counts take a
whole number. An unset or unreadable value is the default.

- ``BNEXPLORE_MEMORY_LIMIT`` (2 GiB): every run of the process, estimated before allocating.
- ``BNEXPLORE_STORE`` (``bnexplore/store`` in the user's cache folder): uploaded files.
- ``BNEXPLORE_STORE_FILE_LIMIT`` (200 MiB): one stored file (Streamlit's maxUploadSize).
- ``BNEXPLORE_STORE_LIMIT`` (2 GiB): the whole store; the oldest files go first.
- ``BNEXPLORE_MAX_CHANNELS`` (262,144): channels of one layer in a file.
- ``BNEXPLORE_MAX_STATE_BYTES`` (256 MiB): a file's BatchNorm vectors, as stored.
- ``BNEXPLORE_MAX_CONFIG_BYTES`` (16 MiB): a model's config (a ``.keras``'s config.json).
- ``BNEXPLORE_MAX_OBJECTS`` (20,000): groups, datasets, members or tensors in one file.
- ``BNEXPLORE_PARSED_CACHE`` (512 MiB): what the server keeps of parsed files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}

MAX_ELEMENTS = 50_000_000
"""Most values one batch may hold; a larger shape is refused before allocation (fixed,
not read from the environment, like the dims below)."""
MAX_DIMS = 5
MIN_DIMS = 2

DEFAULT_MEMORY_LIMIT = 2 * 1024**3
DEFAULT_FILE_LIMIT = 200 * 1024 * 1024
"""Streamlit's default ``server.maxUploadSize`` (200 "MB", counted as 1024² bytes)."""
DEFAULT_STORE_LIMIT = 2 * 1024**3
DEFAULT_MAX_CHANNELS = 1 << 18
DEFAULT_MAX_STATE_BYTES = 256 * 1024**2
DEFAULT_MAX_CONFIG_BYTES = 16 * 1024**2
DEFAULT_MAX_OBJECTS = 20_000
DEFAULT_PARSED_CACHE = 512 * 1024**2


def size_from_env(name: str, default: int) -> int:
    """A size in bytes from an environment variable (bytes, or a number with KiB, MiB,
    GiB, kB, MB or GB), or ``default`` when it is unset or unreadable."""
    text = os.environ.get(name, "").strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", text)
    if not match:
        return default
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def count_from_env(name: str, default: int) -> int:
    """A positive whole number from an environment variable, or ``default``."""
    text = os.environ.get(name, "").strip().replace("_", "").replace(",", "")
    return int(text) if text.isdigit() and int(text) > 0 else default


def memory_limit() -> int:
    return size_from_env("BNEXPLORE_MEMORY_LIMIT", DEFAULT_MEMORY_LIMIT)


def store_folder() -> Path:
    """BNEXPLORE_STORE, else ``bnexplore/store`` in the user's cache folder
    (``$XDG_CACHE_HOME``, else ``~/.cache`` on Linux)."""
    given = os.environ.get("BNEXPLORE_STORE", "").strip()
    if given:
        return Path(given).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("bnexplore", appauthor=False)) / "store"


def store_file_limit() -> int:
    return size_from_env("BNEXPLORE_STORE_FILE_LIMIT", DEFAULT_FILE_LIMIT)


def store_limit() -> int:
    return size_from_env("BNEXPLORE_STORE_LIMIT", DEFAULT_STORE_LIMIT)


def max_channels() -> int:
    return count_from_env("BNEXPLORE_MAX_CHANNELS", DEFAULT_MAX_CHANNELS)


def max_state_bytes() -> int:
    return size_from_env("BNEXPLORE_MAX_STATE_BYTES", DEFAULT_MAX_STATE_BYTES)


def max_config_bytes() -> int:
    return size_from_env("BNEXPLORE_MAX_CONFIG_BYTES", DEFAULT_MAX_CONFIG_BYTES)


def max_objects() -> int:
    return count_from_env("BNEXPLORE_MAX_OBJECTS", DEFAULT_MAX_OBJECTS)


def parsed_cache_bytes() -> int:
    return size_from_env("BNEXPLORE_PARSED_CACHE", DEFAULT_PARSED_CACHE)


def words(size: int) -> str:
    """Bytes for people: '2.7 GiB', '310 MiB'."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} B"


def exact_words(size: int) -> str:
    """Bytes for a limit's message, exact enough to tell 1,048,577 from 1 MiB:
    '1,048,577 bytes (1 MiB)'."""
    return f"{size:,} bytes" + (f" ({words(size)})" if size >= 1024 else "")
