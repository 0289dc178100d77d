"""The link codec: canonical links, presets, bounds, and bad values that never crash."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnexplore.scenario.links import Scenario, format_value, parse_link
from bnexplore.scenario.params import BY_KEY, DEFAULTS, MAX_ELEMENTS, PARAMS


def test_defaults_give_the_shortest_link() -> None:
    assert Scenario().link == "?v=1"
    assert parse_link("") == (Scenario(), [])


def test_full_url_and_query_string_read_the_same() -> None:
    a = parse_link("https://bnexplore.example/?steps=3&torch_mode=eval#top")
    b = parse_link("?steps=3&torch_mode=eval")
    c = parse_link("steps=3&torch_mode=eval")
    assert a == b == c
    assert a[0].link == "?v=1&steps=3&torch_mode=eval"


def test_canonical_link_lists_only_changed_keys_in_table_order() -> None:
    scenario, _ = parse_link("?keras_eps=1e-5&shape=8,4&v=1&torch_momentum=none&dtype=float64")
    assert scenario.link == "?v=1&shape=8,4&dtype=float64&torch_momentum=none&keras_eps=1e-05"


def test_preset_expands_and_explicit_keys_win() -> None:
    scenario, notices = parse_link("?preset=seed&steps=2")
    assert notices == []
    assert scenario["steps"] == 2
    assert "preset" not in scenario.link


def scenario_values():
    """Any valid scenario, drawn from the parameter table itself."""

    def value(p):
        if p.kind in ("digest", "name"):  # stored files: tests/test_store.py
            return st.none()
        if p.kind == "shape":
            return st.lists(st.integers(1, 6), min_size=2, max_size=5).map(tuple)
        if p.kind == "choice":  # not the choices that need a stored file
            return st.sampled_from([c for c in p.choices if c not in NEEDS_A_FILE.get(p.key, ())])
        if p.kind == "choices":
            return st.lists(st.sampled_from(p.choices), min_size=1, unique=True).map(tuple)
        if p.kind == "bool":
            return st.booleans()
        if p.kind == "int":
            return st.integers(int(p.low), int(p.high))
        low = p.low if p.low is not None else -1e6
        floats = st.floats(
            low, p.high if p.high is not None else 1e6, exclude_min=p.low_open, allow_nan=False
        )
        return st.none() | floats if p.kind == "momentum" else floats

    def ordered(v: dict) -> dict:
        low, high = sorted((v["low"], v["high"]))
        return {**v, "low": low, "high": high}

    # drawn valid rather than filtered: Hypothesis's health check fails a test whose
    # strategy throws most draws away (it did, now and then, on CI)
    return (
        st.fixed_dictionaries({p.key: value(p) for p in PARAMS})
        .map(ordered)
        .filter(
            lambda v: (
                v["low"] < v["high"]
                and (v["sweep_scale"] == "linear" or min(v["sweep_from"], v["sweep_to"]) > 0)
            )
        )
    )


NEEDS_A_FILE = {"input": ("file", "running"), "init": ("state",)}
"""Choices that need a stored file (tests/test_store.py covers them)."""


@settings(max_examples=300, deadline=None)
@given(scenario_values())
def test_link_round_trip(values) -> None:
    scenario = Scenario(values)
    again, notices = parse_link(scenario.link)
    assert notices == []
    assert again == scenario
    assert again.link == scenario.link


@pytest.mark.parametrize(
    ("link", "key", "fallback"),
    [
        ("?steps=abc", "steps", 0),
        ("?steps=nan", "steps", 0),
        ("?steps=2.5", "steps", 0),
        ("?torch_eps=0", "torch_eps", 1e-5),
        ("?torch_eps=-1", "torch_eps", 1e-5),
        ("?keras_eps=inf", "keras_eps", 1e-3),
        ("?mean=-inf", "mean", 0.0),
        ("?std=NaN", "std", 1.0),
        ("?input=zeros", "input", "ones"),
        ("?dtype=", "dtype", "float32"),
        ("?keras_trainable=maybe", "keras_trainable", True),
        ("?shape=20", "shape", (20, 100, 35, 45)),
        ("?shape=1,2,3,4,5,6", "shape", (20, 100, 35, 45)),
        ("?shape=4,0,3", "shape", (20, 100, 35, 45)),
        ("?shape=4,-3", "shape", (20, 100, 35, 45)),
        ("?shape=a,b", "shape", (20, 100, 35, 45)),
        ("?torch_momentum=fast", "torch_momentum", 0.1),
        ("?device=tpu", "device", "auto"),
        ("?seed=" + "9" * 5000, "seed", 0),
    ],
)
def test_bad_value_falls_back_with_a_notice_naming_the_key(link, key, fallback) -> None:
    scenario, notices = parse_link(link)
    assert scenario[key] == fallback
    assert len(notices) == 1 and notices[0].startswith(key), notices


@pytest.mark.parametrize(
    ("link", "kept", "said"),
    [
        ("?engines=torch,torch", ("torch",), "torch given more than once, kept once"),
        ("?engines=keras,TORCH,keras", ("keras", "torch"), "keras given more than once"),
        ("?engines=torch,nope,keras", ("torch", "keras"), "'nope' ignored; choose from torch"),
    ],
)
def test_engines_given_twice_or_unknown_are_dropped_with_a_notice(link, kept, said) -> None:
    scenario, notices = parse_link(link)
    assert scenario["engines"] == kept
    assert len(notices) == 1 and notices[0].startswith("engines: ") and said in notices[0]


@pytest.mark.parametrize(
    ("link", "key", "clamped"),
    [
        ("?steps=5000", "steps", 1000),
        ("?steps=-3", "steps", 0),
        ("?keras_momentum=1.5", "keras_momentum", 1.0),
        ("?torch_momentum=-0.5", "torch_momentum", 0.0),
        ("?std=-2", "std", 0.0),
        ("?seed=-1", "seed", 0),
    ],
)
def test_out_of_range_value_is_clamped_with_a_notice(link, key, clamped) -> None:
    scenario, notices = parse_link(link)
    assert scenario[key] == clamped
    assert len(notices) == 1 and notices[0].startswith(key) and "clamped" in notices[0]


def test_low_not_below_high_falls_back_naming_both() -> None:
    scenario, notices = parse_link("?input=uniform&low=3&high=1")
    assert (scenario["low"], scenario["high"]) == (0.0, 1.0)
    assert len(notices) == 1 and notices[0].startswith("low/high")


def test_huge_shape_is_refused_at_once_naming_the_limit() -> None:
    tracemalloc.start()
    scenario, notices = parse_link("?shape=1000,1000,1000")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # nothing of the 10⁹ values was made
    assert scenario["shape"] == DEFAULTS["shape"]
    assert f"{MAX_ELEMENTS:,}" in notices[0] and notices[0].startswith("shape")


@pytest.mark.parametrize(
    ("link", "key"),
    [
        ("?foo=1", "foo"),
        ("?preset=nope", "preset"),
        ("?v=99", "v"),
        ("?v=x", "v"),
        ("?steps=1&steps=2", "steps"),
    ],
)
def test_odd_keys_get_a_notice(link, key) -> None:
    _, notices = parse_link(link)
    assert any(key in n for n in notices), notices


def test_repeated_key_uses_the_last_value() -> None:
    assert parse_link("?steps=1&steps=2")[0]["steps"] == 2


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([*BY_KEY, "v", "preset", "zz", ""]), st.text()), max_size=8)
)
def test_any_pairs_give_a_valid_scenario(pairs) -> None:
    from urllib.parse import urlencode

    scenario, notices = parse_link("?" + urlencode(pairs))
    again, more = parse_link(scenario.link)
    assert more == [] and again == scenario
    assert all(isinstance(n, str) and n for n in notices)


def test_the_docs_link_reference_is_the_generated_one() -> None:
    from bnexplore.tools.docs import LINKS_PAGE, link_reference

    page = LINKS_PAGE.read_text(encoding="utf-8")
    assert link_reference() in page, "run: python -m bnexplore docs"
    for p in PARAMS:
        assert f"| `{p.key}` | `{format_value(p, p.default)}` |" in link_reference()


def test_docs_check_finds_a_stale_links_page_and_docs_rewrites_it(tmp_path) -> None:
    from bnexplore.tools.docs import BEGIN, END, LINKS_PAGE, link_reference, refresh_links_page

    page = tmp_path / "links.md"
    page.write_text(f"# Links\n\n{BEGIN}\n| stale |\n{END}\n\nafter\n", encoding="utf-8")
    assert refresh_links_page(page, check=True) is False
    assert "| stale |" in page.read_text(encoding="utf-8")
    assert refresh_links_page(page) is False
    text = page.read_text(encoding="utf-8")
    assert link_reference() in text and text.endswith("\n\nafter\n") and "| stale |" not in text
    assert refresh_links_page(page, check=True) is True
    assert refresh_links_page(LINKS_PAGE, check=True) is True


def test_memory_guard_refuses_at_once_naming_the_estimate_and_the_limit(monkeypatch) -> None:
    import bnexplore
    from bnexplore.runs import runner

    def never(*args, **kwargs):
        raise AssertionError("a refused run drew a batch or took a worker")

    monkeypatch.setenv("BNEXPLORE_MEMORY_LIMIT", "64MiB")
    with monkeypatch.context() as patched:  # refused before anything is drawn or started
        patched.setattr(runner, "batches", never)
        patched.setattr(runner.workers.POOL, "acquire", never)
        doc = bnexplore.run("?shape=4000,1000,3&input=normal&engines=torch,keras,keras2")
    assert doc["headline"].startswith("Nothing ran: Refused before allocating"), doc["headline"]
    for engine in doc["engines"].values():
        assert engine["available"] is False
        assert "refused before allocating" in engine["reason"]
        assert "over the memory limit of 64 MiB" in engine["reason"]
    assert any("needs about" in n for n in doc["notices"])
    # the reference alone is dropped where the frameworks would fit
    monkeypatch.setenv("BNEXPLORE_MEMORY_LIMIT", "180MiB")  # frameworks ~115 MiB, with refs ~206
    doc = bnexplore.run("?shape=1000,1000,3&input=normal", reference=True)
    assert "reference" not in doc or not doc["reference"]
    assert any(n.startswith("reference:") for n in doc["notices"])
    assert doc["engines"]["torch"]["output"] is not None
