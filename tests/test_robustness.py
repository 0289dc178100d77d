"""Robustness on the real frameworks: bad links, huge shapes, threads, processes, missing
frameworks, non-finite numbers and hostile values.

Bad links come from one generator (:func:`make_link`) over every key of the parameter table,
``v``, ``preset`` and unknown keys, with garbage values. :func:`expect` is this file's own
reading of the README's link rules (a bad value is dropped or clamped with a notice naming the
key; a valid one is used without a notice); it decodes the query string with the standard
library only and shares no parsing code with ``bnexplore.scenario.links``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import random
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, reject, settings
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest

import bnexplore
from bnexplore.runs.runner import compare
from bnexplore.scenario.links import MAX_VALUE_CHARS, parse_link
from bnexplore.scenario.params import BY_KEY, DEFAULTS, LINK_VERSION, MAX_ELEMENTS, PARAMS
from bnexplore.scenario.presets import PRESETS

ROOT = Path(__file__).parents[1]
APP = str(ROOT / "app.py")
CAP = f"{MAX_ELEMENTS:,}"  # 50,000,000, as notices write it

# --- the bad-link generator ---------------------------------------------------------------

PARAM_KEYS = [p.key for p in PARAMS]
PLAIN_KEYS = [*PARAM_KEYS, "v", "preset"]
SPACED_KEYS = [" steps", "dtype ", "\tinput", " shape ", "keras_eps\n"]
"""Keys with spaces around them: read as the key itself (keys are stripped)."""
UNKNOWN_KEYS = [
    "foo",
    "STEPS",
    "Shape",
    "ste ps",
    "torch eps",
    "",
    "ümlaut",
    "🦄",
    "שלום",
    "a\x00b",
    "k" * 300,
    "__class__",
    "../../etc/passwd",
    "{{7*7}}",
    "x=y",
    "v2",
]

PAYLOADS = [
    "__import__('os').system('echo hacked')",
    "../../etc/passwd",
    "{{7*7}}",
    "${7*7}",
    "%s%n%x",
    "' OR 1=1 --",
]

GARBAGE = [
    "",
    " ",
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-inf",
    "Infinity",
    "+inf",
    "-1",
    "-0.5",
    "-1e-300",
    "-0",
    "0",
    "1e308",
    "-1e308",
    "1" + "0" * 400,  # 10**400 as text
    "1e400",
    "x" * 10240,  # a 10 kB value
    "9" * 10240,
    "abc",
    "true",
    "FALSE",
    "yes",
    "none",
    "None",
    "null",
    "maybe",
    "[1, 2]",
    "{}",
    "()",
    "1,2,3",
    "4x3",
    "(4, 3)",
    "4,3,",
    ",,",
    "3.5",
    "1e3",
    " 7 ",
    "1_0",
    "0x10",
    "1e-400",
    "5e-324",
    "2",
    "99",
    "4294967296",
    "1001",
    "51",
    "0.5",
    "1.5",
    "ümlaut",
    "🙂",
    "\u202eevil\u202c",  # right-to-left override
    "שלום",
    "مرحبا",
    "\x00",
    "1\x00",
    "²",
    "4,²",
    "①",
    "١",
    "٣,٤",
    "ＴＲＵＥ",
    "torch,keras,nope",
    "=",
    "==",
    "&",
    "#frag",
    "?x=1",
    "a=b&c=d",
    *PAYLOADS,
]
"""Decoded value texts; most are bad for most keys, some are fine for some."""

MALFORMED = ["%zz", "%E2%82", "%", "%%", "%2", "abc%", "%u00e9", "%ZZ%20", "%E2%82%AC", "%00"]
"""Raw, undecoded: malformed percent-encoding as it appears in an address bar."""

VERSIONS = ["1", "2", "999", "0", "-1", "1.0", "", "x", "1" + "0" * 400, " 1 "]
"""``v`` values, including ones from the future."""


def _valid_values(key: str) -> list[str]:
    """A few values each key accepts (some out of range: those are clamped)."""
    p = BY_KEY[key]
    if p.kind == "shape":
        return [
            *["4,3", "2,3,4", "2x3x2x2", "(4, 3)", "1,1", "3 2"],  # valid
            *["20", "4,0", "100000,100000", "1,2,3,4,5,6", "4,²", "①,3", "٣,٤"],  # not
        ]
    if p.kind == "choice":
        return [*p.choices, p.choices[-1].upper(), f" {p.choices[0]} "]
    if p.kind == "choices":
        first, *others = p.choices
        return [first, ",".join(others), f"{first},{first}", "keras, bogus", "KERAS", ",,keras2"]
    if p.kind == "bool":
        return ["true", "false", "1", "0", "ON", "no"]
    if p.kind == "digest":
        return ["3f2a" + "0" * 60, "3F2A" + "9" * 12, "abc", "none", "g" * 64]
    if p.kind == "name":
        return ["bn1", "features.0.bn", "none", "a\x00b"]
    values = ["0.5", "-3.25", "1e-7", "0", "7"]
    if p.low is not None:
        values += [repr(p.low), repr(p.low - 1)]
    if p.high is not None:
        values += [repr(p.high), repr(p.high + 1)]
    if p.kind == "int":
        values += ["3", "2", " 4 ", "5.0"]
    if p.kind == "momentum":
        values += ["none", "NONE"]
    return values


VALID = {key: _valid_values(key) for key in PARAM_KEYS}


def _encode(rng: random.Random, text: str) -> str:
    """Text as it may appear in an address bar: literal, %-encoded, or + for spaces."""
    literal_ok = bool(text) and all(
        c.isprintable() and not c.isspace() and c not in "&=#+%:/?;" for c in text
    )
    how = rng.randrange(3)
    if how == 0 and literal_ok:
        return text
    if how == 1:
        return quote_plus(text, safe="")
    return quote(text, safe="")


def _value_for(rng: random.Random, key: str, extra: Sequence[str]) -> str:
    if key == "v" and rng.random() < 0.6:
        return rng.choice(VERSIONS)
    if key == "preset" and rng.random() < 0.6:
        return rng.choice([*PRESETS, "SEED", " matched ", "nope", "../../etc/passwd"])
    if key in VALID and rng.random() < 0.45:
        return rng.choice(VALID[key])
    return rng.choice([*GARBAGE, *extra])


def make_link(rng: random.Random, extra: Sequence[str] = ()) -> str:
    """A bad link: 0 to 8 pairs of every kind, repeated keys, '&&', '==', bare keys."""
    extra = list(extra)
    tokens: list[str] = []
    keys: list[str] = []
    for _ in range(rng.randrange(9)):
        r = rng.random()
        if keys and r < 0.12:
            key = rng.choice(keys)  # a repeated key
        elif r < 0.75:
            key = rng.choice(PLAIN_KEYS)
        elif r < 0.85:
            key = rng.choice(SPACED_KEYS)
        else:
            key = rng.choice([*UNKNOWN_KEYS, *extra])
        keys.append(key)
        k = _encode(rng, key)
        form = rng.random()
        if form < 0.07:
            tokens.append(k)  # no '=': an empty value
        elif form < 0.15:
            tokens.append(f"{k}={rng.choice(MALFORMED)}")
        elif form < 0.21:
            tokens.append(f"{k}=={_encode(rng, _value_for(rng, key.strip(), extra))}")
        else:
            tokens.append(f"{k}={_encode(rng, _value_for(rng, key.strip(), extra))}")
        if rng.random() < 0.06:
            tokens.append(rng.choice(["", "=", "==", "&"]))  # '&&', a lone '=' or '=='
    return "?" + "&".join(tokens)


def pairs_of(link: str) -> list[tuple[str, str]]:
    """The decoded pairs of a generated link (standard library only)."""
    return parse_qsl(link.removeprefix("?"), keep_blank_values=True)


# --- this file's reading of the README's link rules -----------------------------------------

OK, CLAMPED, BAD = "ok", "clamped", "bad"
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _clamp(p, x):
    y = x
    if p.low is not None and x < p.low:
        y = type(x)(p.low)
    if p.high is not None and x > p.high:
        y = type(x)(p.high)
    return (OK, x) if y == x else (CLAMPED, y)


def read(key: str, raw: str) -> tuple[str, Any]:
    """(OK | CLAMPED | BAD, value) for one link value of a parameter."""
    p = BY_KEY[key]
    t = raw.strip()
    if not t or len(t) > MAX_VALUE_CHARS:
        return BAD, None
    if p.kind == "shape":
        pieces = [s for s in re.split(r"[,x×\s]+", t.strip("()[] ")) if s]
        ascii_digits = all(re.fullmatch(r"[0-9]+", s) for s in pieces)  # not "٣", "²", "①"
        if not 2 <= len(pieces) <= 5 or not ascii_digits:
            return BAD, None
        dims = tuple(int(s) for s in pieces)
        if min(dims) < 1 or math.prod(dims) > MAX_ELEMENTS:
            return BAD, None
        return OK, dims
    if p.kind == "choice":
        return (OK, t.lower()) if t.lower() in p.choices else (BAD, None)
    if p.kind == "choices":
        pieces = [s.strip().lower() for s in t.split(",")]
        named = [s for s in pieces if s in p.choices]
        known = tuple(dict.fromkeys(named))
        if not known:
            return BAD, None
        # an unknown name is dropped, a repeated one kept once: either way, a notice
        changed = any(s and s not in p.choices for s in pieces) or len(named) > len(known)
        return (CLAMPED if changed else OK), known
    if p.kind == "bool":
        if t.lower() in TRUE_WORDS:
            return OK, True
        return (OK, False) if t.lower() in FALSE_WORDS else (BAD, None)
    if p.kind in ("momentum", "digest", "name") and t.lower() == "none":
        return OK, None
    if p.kind == "digest":  # hex of 16 to 64 is looked up; this test's store holds nothing
        return BAD, None
    if p.kind == "name":
        return (OK, t) if t.isprintable() else (BAD, None)
    x = _number(t)
    if x is None:
        return BAD, None
    if p.kind == "int":
        return _clamp(p, int(x)) if x == int(x) else (BAD, None)
    if p.low_open and x <= p.low:
        return BAD, None
    return _clamp(p, x)


@dataclass
class Expected:
    values: dict[str, Any]
    given: set[str] = field(default_factory=set)
    """Every key in the link (stripped), v and preset included."""
    noticed: set[str] = field(default_factory=set)
    """Keys whose value was not used as given: each must be named in a notice."""


def expect(pairs: list[tuple[str, str]]) -> Expected:
    """What a link's pairs must give: the scenario's values and the keys owed a notice."""
    raw: dict[str, str] = {}
    exp = Expected(dict(DEFAULTS))
    for key, value in pairs:
        key = key.strip()
        if key in raw:
            exp.noticed.add(key)  # repeated: the last value is used, with a notice
        raw[key] = value
    exp.given = set(raw)
    if "v" in raw:
        try:
            current = int(raw["v"]) == LINK_VERSION
        except ValueError:
            current = False
        if not current:
            exp.noticed.add("v")
    if "preset" in raw:
        name = raw["preset"].strip().lower()
        if name in PRESETS:
            exp.values.update(PRESETS[name].values)
        else:
            exp.noticed.add("preset")
    for key, text in raw.items():
        if key in ("v", "preset"):
            continue
        if key not in BY_KEY:
            exp.noticed.add(key)
            continue
        status, value = read(key, text)
        if status == BAD:
            exp.noticed.add(key)
            continue
        exp.values[key] = value
        if status == CLAMPED:
            exp.noticed.add(key)
    v = exp.values
    # with no stored file: input=file or running, layer= and init=state fall back, each
    # with a notice
    if v["input"] in ("file", "running"):
        v["input"] = (
            PRESETS[raw["preset"].strip().lower()].values.get("input", "ones")
            if ("preset" in raw and raw["preset"].strip().lower() in PRESETS)
            else DEFAULTS["input"]
        )
        exp.noticed.add("input")
    if v["layer"] is not None:
        v["layer"] = None
        exp.noticed.add("layer")
    if v["init"] == "state":
        v["init"] = "fresh"
        exp.noticed.add("init")
    if v["sweep_scale"] == "log" and min(v["sweep_from"], v["sweep_to"]) <= 0:
        v["sweep_scale"] = "linear"
        exp.noticed.add("sweep_scale")
    if not v["low"] < v["high"]:
        exp.noticed |= {k for k in ("low", "high") if k in raw} or {"low", "high"}
        v["low"], v["high"] = DEFAULTS["low"], DEFAULTS["high"]
    return exp


PLAIN_KEY = re.compile(r"[A-Za-z0-9_]{1,40}")


def names(notice: str, key: str) -> bool:
    """Whether a notice names a key: ``key: …`` (or ``low/high: …``), an odd key quoted."""
    if PLAIN_KEY.fullmatch(key):
        return key in notice.split(": ", 1)[0].split("/")
    shown = key if len(key) <= 40 else key[:40] + "…"
    return repr(shown) in notice or (bool(key) and key in notice)


def unnamed(exp: Expected, notices: list[str]) -> list[str]:
    """Keys owed a notice that no notice names."""
    return sorted(k for k in exp.noticed if not any(names(n, k) for n in notices))


def wrongly_named(exp: Expected, notices: list[str]) -> list[str]:
    """Keys used as given that a notice names all the same."""
    return sorted(
        k
        for k in exp.given - exp.noticed
        if PLAIN_KEY.fullmatch(k) and any(names(n, k) for n in notices)
    )


def nameless(exp: Expected, notices: list[str]) -> list[str]:
    """Notices that name none of the link's keys."""
    return [n for n in notices if not any(names(n, k) for k in exp.given)]


def notice_problems(exp: Expected, notices: list[str]) -> list[str]:
    """Each way the notices fail the expectation, in words (empty: they meet it)."""
    return (
        [f"{k!r} not named in a notice" for k in unnamed(exp, notices)]
        + [f"valid {k!r} got a notice" for k in wrongly_named(exp, notices)]
        + [f"notice names no key: {n!r}" for n in nameless(exp, notices)]
    )


# --- 1. thousands of bad links -----------------------------------------------------------


BAD_LINKS = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LINKS = st.builds(
    make_link, st.randoms(use_true_random=False), st.lists(st.text(max_size=12), max_size=3)
)
KNOWN_LINKS = [
    "?shape=4,%C2%B2",  # a superscript two: a digit to str.isdigit, not to int()
    "?shape=%E2%91%A0,3",  # a circled one, likewise
    "?=&=",  # an empty key, twice
    "?v=999&steps=%zz&&==&dtype=%E2%82&shape=100000,100000&seed=%",
    "?steps=1e308&seed=-1&keras_momentum=nan&torch_eps=0&input=%F0%9F%99%82&foo%20bar=1"
    "&preset=..%2F..%2Fetc%2Fpasswd",
    "?value=1" + "0" * 400 + "&mean=-inf&std=-1&engines=" + "x" * 10240,
    "?%20steps=3&steps%20=4&dtype=%00&device=%E2%80%AEuda",
    "?input=uniform&low=3",
    "?sweep_scale=log&sweep_from=-1&sweep_points=1000",
]
"""Bad links checked on every run, besides the generated ones."""


def check_parses_and_reencodes(link: str) -> None:
    scenario, notices = parse_link(link)  # must not raise
    assert dict(scenario.values) == expect(pairs_of(link)).values, link
    assert all(isinstance(n, str) and n for n in notices)
    again, more = parse_link(scenario.link)
    assert more == [], (link, scenario.link, more)
    assert again == scenario, (link, scenario.link)


def check_notices(link: str, notices: list[str]) -> None:
    exp = expect(pairs_of(link))
    assert unnamed(exp, notices) == [], (link, notices)
    assert wrongly_named(exp, notices) == [], (link, notices)
    assert nameless(exp, notices) == [], (link, notices)


@BAD_LINKS
@given(LINKS)
def test_bad_links_never_raise_and_reencode_to_themselves(link: str) -> None:
    note(f"link: {link!r}")
    check_parses_and_reencodes(link)


@BAD_LINKS
@given(LINKS)
def test_bad_links_name_every_unused_key_in_a_notice(link: str) -> None:
    note(f"link: {link!r}")
    try:
        _, notices = parse_link(link)
    except Exception:  # noqa: BLE001 - raising is the test above's failure
        reject()
    check_notices(link, notices)


@pytest.mark.parametrize("link", KNOWN_LINKS)
def test_known_bad_links_parse_reencode_and_name_every_unused_key(link: str) -> None:
    check_parses_and_reencodes(link)
    check_notices(link, parse_link(link)[1])


def tiny(link: str) -> str:
    """The link, forced to run in milliseconds: a 4×3 batch unless it has a tiny one, ≤ 2 steps."""
    values = expect(pairs_of(link)).values
    if math.prod(values["shape"]) > 256:  # absent, invalid, or a preset's larger shape
        link += "&shape=4,3"
    if values["steps"] > 2:
        link += "&steps=2"
    return link


def bad_tiny_links(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [tiny(make_link(rng)) for _ in range(count)]


def engine_problems(doc: dict) -> list[str]:
    problems = []
    for name, e in doc["engines"].items():
        if not e["available"]:
            if not (isinstance(e.get("reason"), str) and e["reason"]):
                problems.append(f"{name}: unavailable without a reason")
        elif (e["output"] is None) == (e["error"] is None):
            problems.append(f"{name}: output {e['output']!r} with error {e['error']!r}")
    return problems


def test_bad_links_through_run_give_strict_json_and_notices() -> None:
    failures = []
    for link in bad_tiny_links(1000, seed=20240601):
        try:
            doc = bnexplore.run(link)
            json.dumps(doc, allow_nan=False)
        except Exception as exc:  # noqa: BLE001 - every link's failure is collected
            failures.append(f"{link!r}: {type(exc).__name__}: {exc}")
            continue
        problems = notice_problems(expect(pairs_of(link)), doc["notices"]) + engine_problems(doc)
        if parse_link(doc["link"])[1]:
            problems.append(f"canonical link {doc['link']} has notices")
        if problems:
            failures.append(f"{link!r}: {problems}")
    assert not failures, f"{len(failures)} of 1000 links failed:\n" + "\n".join(failures[:20])


# --- 2. the app opened from bad links ---------------------------------------------------------


def app_link(link: str) -> list[tuple[str, str]]:
    """A tiny bad link's pairs as the app gets them: grouped by key, no sweep to run."""
    pairs = pairs_of(link)
    if expect(pairs).values["sweep"] != "none":
        pairs.append(("sweep", "none"))  # a sweep runs the scenario up to 50 times
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return [(k, v) for k, values in grouped.items() for v in values]


def test_app_opens_from_bad_links_with_a_warning_naming_each_key() -> None:
    failures = []
    links = bad_tiny_links(40, seed=777)
    for link in links:
        pairs = app_link(link)
        at = AppTest.from_file(APP, default_timeout=300)
        for key, value in pairs:
            at.query_params.setdefault(key, []).append(value)
        try:
            at.run()
        except Exception as exc:  # noqa: BLE001 - every link's failure is collected
            failures.append(f"{link!r}: AppTest raised {type(exc).__name__}: {exc}")
            continue
        if at.exception:
            failures.append(f"{link!r}: {[e.value for e in at.exception]}")
            continue
        exp = expect(pairs)
        warnings = [w.value for w in at.warning if w.value.startswith("Parts of the link")]
        if exp.noticed and not warnings:
            failures.append(f"{link!r}: no warning for {sorted(exp.noticed)}")
            continue
        notices = [line.removeprefix("- ") for w in warnings for line in w.splitlines()[2:]]
        missing = [k for k in exp.noticed if not any(names(n, k) for n in notices)]
        if missing:
            failures.append(f"{link!r}: warning does not name {missing}: {notices}")
    assert not failures, f"{len(failures)} of {len(links)} links:\n" + "\n".join(failures)


@pytest.mark.parametrize("link", ["?shape=4,%C2%B2", "?shape=%E2%91%A0,3"])
def test_app_opens_from_a_shape_with_non_decimal_digits_with_a_warning(link: str) -> None:
    """Generated links above always end in a valid shape; these keep the bad one last."""
    at = AppTest.from_file(APP, default_timeout=300)
    for key, value in pairs_of(link):
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(
        w.value.startswith("Parts of the link") and "- shape:" in w.value for w in at.warning
    )


# --- 3. a huge shape ----------------------------------------------------------------------


HUGE = "?shape=100000,100000"


def test_huge_shape_is_refused_before_allocating_with_a_notice_naming_the_cap() -> None:
    tracemalloc.start()
    scenario, notices = parse_link(HUGE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # nothing of the 10^10 values was made
    assert scenario["shape"] == DEFAULTS["shape"]
    assert len(notices) == 1 and notices[0].startswith("shape:") and CAP in notices[0]
    doc = bnexplore.run(HUGE)
    json.dumps(doc, allow_nan=False)
    assert any(n.startswith("shape:") and CAP in n for n in doc["notices"]), doc["notices"]
    assert doc["scenario"]["shape"] != [100000, 100000]


def test_huge_shape_answers_on_the_default_shape_without_allocating_it() -> None:
    """The refused shape is dropped like any bad value: the link's other keys run on the
    default shape, and nothing of the refused size is ever allocated."""
    import resource

    bnexplore.run("?shape=4,3")  # the frameworks are loaded: their import is not timed
    bnexplore.run(HUGE)  # the default shape's first run, warm from here on
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    doc = bnexplore.run(HUGE)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert doc["scenario"]["shape"] == list(DEFAULTS["shape"])
    assert grown_kib < 400 * 1024, "the refused 10^10-value shape would need 40 GB"


# --- 4. threads -------------------------------------------------------------------------

PARALLEL_LINKS = [
    "?shape=4,3&engines=torch,keras,keras2",
    "?shape=8,5&input=normal&seed=3&steps=5&torch_mode=eval&engines=torch,keras,keras2",
    "?shape=2,3,4&input=uniform&low=-2&high=3&steps=2&dtype=float64&engines=torch,keras2",
    "?shape=2,4,3,3&input=normal&mean=2&std=3&steps=3&dtype=float16&keras_training=true",
    "?shape=2,3,2,2,2&input=normal&steps=4&dtype=bfloat16&engines=keras,torch,keras2",
    "?shape=6,2,5&input=constant&value=0.37&steps=1&torch_momentum=none&keras_init=torch",
    "?shape=4,2,3,3&input=uniform&seed=7&steps=5&keras2_fused=false&keras2_training=true"
    "&engines=torch,keras2",
    "?shape=1,3",  # PyTorch raises: an error result
    "?shape=3,4&input=constant&value=1e39&engines=torch,keras,keras2",  # inf and NaN
]


def bits_problems(where: str, a: np.ndarray | None, b: np.ndarray | None) -> list[str]:
    """Bitwise comparison of two arrays (None: absent on both sides)."""
    if a is None or b is None:
        return [] if a is None and b is None else [f"{where}: {a!r} vs {b!r}"]
    if a.dtype != b.dtype or a.shape != b.shape:
        return [f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"]
    if np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
    ):
        return []
    close = np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True)
    return [f"{where}: not bit for bit equal (equal as numbers with NaN = NaN: {close})"]


def comparison_problems(link: str, serial, parallel) -> list[str]:
    problems = []
    for group in ("results", "references"):
        s, p = getattr(serial, group), getattr(parallel, group)
        if list(s) != list(p):
            problems.append(f"{link} {group}: {list(s)} vs {list(p)}")
            continue
        for name in s:
            a, b = s[name], p[name]
            for attr in ("available", "reason", "error", "version", "device", "detail"):
                if getattr(a, attr) != getattr(b, attr):
                    problems.append(
                        f"{link} {name}.{attr}: {getattr(a, attr)!r} vs {getattr(b, attr)!r}"
                    )
            for attr in ("output", "running_mean", "running_var"):
                problems += bits_problems(
                    f"{link} {name}.{attr}", getattr(a, attr), getattr(b, attr)
                )
            for k in a.history or {}:
                problems += bits_problems(
                    f"{link} {name}.history[{k}]", a.history[k], (b.history or {}).get(k)
                )
    return problems


def test_parallel_runs_equal_serial_runs_bit_for_bit() -> None:
    scenarios = [parse_link(link)[0] for link in PARALLEL_LINKS]
    serial = [compare(s) for s in scenarios]
    serial_docs = [bnexplore.run(link) for link in PARALLEL_LINKS]
    assert serial[7].results["torch"].error, "?shape=1,3 should make PyTorch raise"
    assert serial[8].results["torch"].output is not None
    problems = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for round_ in range(3):
            order = list(range(len(scenarios)))
            random.Random(round_).shuffle(order)
            futures = {i: pool.submit(compare, scenarios[i]) for i in order}
            docs = {i: pool.submit(bnexplore.run, PARALLEL_LINKS[i]) for i in order}
            for i in order:
                problems += comparison_problems(PARALLEL_LINKS[i], serial[i], futures[i].result())
                if docs[i].result() != serial_docs[i]:
                    problems.append(f"round {round_}: document of {PARALLEL_LINKS[i]} differs")
    assert not problems, "\n".join(problems)


# --- 5. processes ---------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def test_same_link_gives_identical_json_in_fresh_processes() -> None:
    links = [
        "?shape=8,3,5&input=normal&mean=0.5&std=2&seed=11&steps=4&engines=torch,keras,keras2",
        "?shape=6,4,3&input=uniform&low=-1&high=2&seed=5&steps=2&dtype=bfloat16"
        "&engines=torch,keras,keras2",
    ]
    procs = {
        (link, hashseed): subprocess.Popen(
            [sys.executable, "-m", "bnexplore", "run", "--link", link, "--json"],
            cwd=ROOT,
            env=_env(PYTHONHASHSEED=hashseed),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for link in links
        for hashseed in ("1", "2")
    }
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[key] = stdout
    for link in links:
        first, second = out[(link, "1")], out[(link, "2")]
        doc = json.loads(first)
        assert all(e["output"] is not None for e in doc["engines"].values()), doc["engines"]
        assert first == second, f"{link}: the two processes printed different documents"


# --- 6. a framework that cannot be imported -------------------------------------------------

HIDE_TF = "import sys\nfor m in ('tensorflow', 'keras', 'tf_keras'):\n    sys.modules[m] = None\n"
HIDE_TORCH = "import sys\nsys.modules['torch'] = None\n"
RUN_THREE = (
    "import json\nimport bnexplore\n"
    "doc = bnexplore.run('?shape=4,3&engines=torch,keras,keras2', reference=True)\n"
    "print(json.dumps(doc, allow_nan=False))\n"
)
APP_SCRIPT = f"""
import json
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({APP!r}, default_timeout=300)
at.query_params["shape"] = "4,3"
at.run()
tables = [m.value for m in at.markdown if m.value.startswith("| engine")]
print(json.dumps({{
    "exceptions": [e.value for e in at.exception],
    "errors": [e.value for e in at.error],
    "table": tables[0] if tables else None,
}}))
"""


IMPORT_FAILED = re.compile(r"could not be loaded: (ModuleNotFound|Import)Error: ")
"""How an engine whose framework fails to import says so."""


def _python(code: str, hide: str, tmp: Path) -> subprocess.Popen:
    """A fresh process running ``code`` where the modules ``hide`` names cannot be
    imported, nor in the engines' worker processes it starts: a sitecustomize on
    PYTHONPATH, which every child process inherits."""
    hidden = tmp / f"hide-{abs(hash(hide))}"
    hidden.mkdir(exist_ok=True)
    (hidden / "sitecustomize.py").write_text(hide)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(PYTHONPATH=os.pathsep.join([str(hidden), str(ROOT)])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _last_json(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def degraded(tmp_path_factory) -> dict[str, dict]:
    """Three fresh processes at once: TensorFlow hidden, torch hidden, the app without TF."""
    tmp = tmp_path_factory.mktemp("degraded")
    procs = {
        "no_tf": _python(RUN_THREE, HIDE_TF, tmp),
        "no_torch": _python(RUN_THREE, HIDE_TORCH, tmp),
        "app_no_tf": _python(APP_SCRIPT, HIDE_TF, tmp),
    }
    return {name: _last_json(proc) for name, proc in procs.items()}


def _has_numbers(engine: dict) -> bool:
    out = engine.get("output") or {}
    return engine["available"] and engine["error"] is None and out.get("mean") is not None


def test_without_tensorflow_torch_runs_and_keras_says_why(degraded) -> None:
    doc = degraded["no_tf"]
    json.dumps(doc, allow_nan=False)
    engines = doc["engines"]
    assert _has_numbers(engines["torch"]), engines["torch"]
    assert engines["torch"]["running_mean"] is not None
    for name in ("keras", "keras2"):
        assert engines[name]["available"] is False, engines[name]
        reason = engines[name]["reason"]
        assert IMPORT_FAILED.search(reason) and "keras" in reason, reason
    pairs = {(d["a"], d["b"]): d for d in doc["divergence"]}
    assert set(pairs) == {("torch", "keras"), ("torch", "keras2"), ("keras", "keras2")}
    for pair in pairs.values():
        assert pair["max_abs"] is None and "did not run" in pair["reason"], pair
    assert list(doc.get("reference", {})) == ["torch"]


def test_without_torch_keras_runs_alone(degraded) -> None:
    doc = degraded["no_torch"]
    engines = doc["engines"]
    assert engines["torch"]["available"] is False
    reason = engines["torch"]["reason"]
    assert IMPORT_FAILED.search(reason) and "torch" in reason, reason
    assert _has_numbers(engines["keras"]) and _has_numbers(engines["keras2"]), engines
    pairs = {(d["a"], d["b"]): d for d in doc["divergence"]}
    assert pairs[("keras", "keras2")].get("reason") is None
    assert pairs[("keras", "keras2")]["max_abs"] is not None
    for pair in (("torch", "keras"), ("torch", "keras2")):
        assert "PyTorch did not run" in pairs[pair]["reason"], pairs[pair]
    assert list(doc.get("reference", {})) == ["keras", "keras2"]


def test_app_without_tensorflow_shows_pytorch_and_an_error(degraded) -> None:
    page = degraded["app_no_tf"]
    assert page["exceptions"] == []
    assert any("Keras 3 is missing" in e and IMPORT_FAILED.search(e) for e in page["errors"]), page
    table = page["table"] or ""
    row = re.search(r"^\| PyTorch \| ([^|]+) \| ([^|]+) \|", table, re.MULTILINE)
    assert row and _number(row.group(1)) is not None, table
    assert "| Keras 3 | not run:" in table, table


# --- 7. non-finite numbers ---------------------------------------------------------------------


def test_overflow_to_inf_is_counted_not_hidden() -> None:
    doc = bnexplore.run("?input=constant&value=1e39&dtype=float32&shape=4,3", reference=True)
    json.dumps(doc, allow_nan=False)
    assert doc["notices"] == []
    for name, engine in doc["engines"].items():
        assert engine["available"] and engine["error"] is None, (name, engine)
        assert engine["output"]["nonfinite"] > 0, (name, engine["output"])
    for name, ref in doc["reference"].items():
        assert ref["output"]["nonfinite"] > 0, (name, ref["output"])


# --- 8. hostile values ---------------------------------------------------------------------

SAFETY_KEYS = [
    "input",
    "dtype",
    "preset",
    "engines",
    "device",
    "keras_init",
    "seed",
    "value",
    "v",
    "sweep",
    "file",
]


def _listing() -> set[str]:
    skip = {".git", "__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache"}
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        found |= {os.path.relpath(os.path.join(folder, f), ROOT) for f in files}
    return found


def test_hostile_values_are_never_evaluated_or_used_as_paths(tmp_path, monkeypatch, capfd) -> None:
    from bnexplore.porting.script import reproducer

    opened: list[str] = []
    real_open = open

    def watching_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    marker = "__import__('pathlib').Path('PWNED').touch()"
    before = _listing()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("builtins.open", watching_open)
    default = parse_link("?shape=4,3")[0].to_dict()
    problems = []
    for payload in [*PAYLOADS, marker]:
        scenario, notices = parse_link(f"?shape={quote(payload, safe='')}")
        if scenario["shape"] != DEFAULTS["shape"] or not any(names(n, "shape") for n in notices):
            problems.append(f"shape={payload!r}: {notices}")
        for key in SAFETY_KEYS:
            link = f"?shape=4,3&{key}={quote(payload, safe='')}"
            doc = bnexplore.run(link)
            json.dumps(doc, allow_nan=False)
            if doc["scenario"] != default:
                problems.append(f"{link}: not the defaults: {doc['scenario']}")
            if not any(names(n, key) for n in doc["notices"]):
                problems.append(f"{link}: no notice names {key}: {doc['notices']}")
            if "49" in " ".join(doc["notices"]):
                problems.append(f"{link}: a notice holds 49: {doc['notices']}")
            script = reproducer(parse_link(link)[0])
            if payload in script or "passwd" in script or "__import__" in script:
                problems.append(f"{link}: the reproducer script carries the value")
    monkeypatch.undo()
    captured = capfd.readouterr()
    assert not problems, "\n".join(problems)
    assert "hacked" not in captured.out + captured.err
    assert not [p for p in opened if "passwd" in p or "PWNED" in p], opened
    assert list(tmp_path.iterdir()) == []
    assert _listing() - before == set()
