"""The CLI prints the same document as the Python API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bnexplore
from bnexplore.scenario.presets import PRESETS
from bnexplore.tools.cli import link_of, main


def test_cli_json_is_the_api_document(capsys) -> None:
    link = "?input=uniform&low=-1&high=2&steps=2&shape=5,3,4&seed=3"
    assert main(["run", "--link", link, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == bnexplore.run(link)


def test_cli_preset_with_link_lets_link_keys_win() -> None:
    assert link_of("seed", "http://host/?steps=2") == "?preset=seed&steps=2"
    assert bnexplore.run(link_of("seed", "?steps=2"))["scenario"]["steps"] == 2


def test_cli_table_is_readable(capsys) -> None:
    main(["run", "--link", "?shape=1,3&foo=1"])
    out = capsys.readouterr().out
    assert "notice: foo" in out
    assert "raised: Expected more than 1 value per channel" in out
    assert "torch vs keras: not compared" in out


def test_python_dash_m_preset_seed_json_in_a_fresh_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bnexplore", "run", "--preset", "seed", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    doc = json.loads(done.stdout)
    assert doc["engines"]["torch"]["output"]["max"] == 0.0
    assert round(doc["engines"]["keras"]["output"]["max"], 7) == 0.9995004


def test_cli_script_prints_a_standalone_reproducer(capsys) -> None:
    assert main(["script", "--link", "?steps=2&foo=1"]) == 0
    captured = capsys.readouterr()
    compile(captured.out, "repro", "exec")
    assert "import bnexplore" not in captured.out and "S_LINK = '?v=1&steps=2'" in captured.out
    assert "notice: foo" in captured.err


def test_cli_explain_adds_the_steps(capsys) -> None:
    main(["run", "--preset", "both-inference", "--explain"])
    out = capsys.readouterr().out
    assert "explain (exact Shapley values over 2 knobs" in out  # eps, momentum
    assert "  [output] eps: 100% of the gap" in out


def test_cli_table_shows_the_training_step(capsys) -> None:
    main(["run", "--preset", "weight-decay"])
    out = capsys.readouterr().out
    assert "PyTorch loss " in out and "dL/dx mean" in out
    assert "dL/dgamma" in out and "gamma" in out and "(NOT allclose)" in out


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_in_the_cli(name: str, capsys) -> None:
    assert main(["run", "--preset", name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["notices"] == [] and doc["engines"]


def test_bench_quick_reports_ratios_against_bare_calls(capsys) -> None:
    """The bench runs and reports; its numbers are measurements, not asserted targets."""
    assert main(["bench", "--quick", "--json", "--no-browser"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["scenarios"]
    assert row["scenario"] == "seed" and row["bare_s"] > 0
    assert row["ratio"] == pytest.approx(row["bnexplore_s"] / row["bare_s"])
    assert result["cached_link_ms"] >= 0 and result["peak_memory_mib"] > 0
    step = result["training_step"]
    assert step["link"] == "?preset=seed&steps=1&loss=mse"
    assert step["baseline_link"] == "?preset=seed&steps=1"
    assert step["ratio"] == pytest.approx(step["loss_s"] / step["baseline_s"])


def test_the_desk_table_shows_each_link_and_the_streamlit_floor() -> None:
    from bnexplore.tools.bench import FLOOR, desk_table

    def row(name: str, p50: float, p90: float, revisit: float) -> dict:
        return {"name": name, "p50_s": p50, "p90_s": p90, "revisit_s": revisit}

    table = desk_table(
        {
            "cold_start_to_headline_s": 7.24,
            "links": [row("seed", 0.45, 0.506, 2.446)],
            "floor": row(FLOOR, 0.16, 0.218, 1.722),
        }
    )
    assert "| seed | 450 ms | 506 ms | 2446 ms |" in table
    assert f"| {FLOOR} | 160 ms | 218 ms | 1722 ms |" in table
    assert "headline: 7.2 s" in table


def test_the_bench_reads_each_workers_import_from_the_servers_log() -> None:
    from bnexplore.tools.bench import desk_table, workers_ready

    log = (
        "2026-12-07 01:00:00,100 INFO bnexplore.runs.pool: worker torch (pid 11) ready: "
        "imported in 2.50 s, at 1000.75\n"
        "2026-12-07 01:00:05,100 INFO bnexplore.runs.pool: worker keras (pid 12) ready: "
        "imported in 7.25 s, at 1005.50\n"
        "2026-12-07 01:09:00,100 INFO bnexplore.runs.pool: worker keras (pid 13) ready: "
        "imported in 6.00 s, at 1540.00\n"
    )
    ready = workers_ready(log, began=998.0)
    assert ready == {  # each engine's first worker: the one the server started
        "torch": {"import_s": 2.5, "ready_s": 2.75},
        "keras": {"import_s": 7.25, "ready_s": 7.5},
    }
    cold = {"first_headline_s": 3.1, "real_headline_s": 8.9, "workers": ready}
    table = desk_table({"cold_start_to_headline_s": 3.1, "cold": cold, "links": []})
    assert "headline: 3.1 s" in table and "every engine run: 8.9 s" in table
    assert "keras 7.2 s (ready at 7.5 s)" in table
