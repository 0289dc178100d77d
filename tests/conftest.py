"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def store_dir(tmp_path, monkeypatch) -> Path:
    """A store of the test's own, and a working folder (the current one) that stays out of
    the tree: storing must write nothing there."""
    folder = tmp_path / "store"
    monkeypatch.setenv("BNEXPLORE_STORE", str(folder))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return folder


@pytest.fixture
def lanes_started(monkeypatch) -> list[str]:
    """The engines each run starts in a worker, in order, recorded while the test runs."""
    import bnexplore.runs.pool

    started: list[str] = []
    real = bnexplore.runs.pool.start_sessions

    def counting(lanes, *args, **kwargs):
        started.extend(lanes.values())
        return real(lanes, *args, **kwargs)

    monkeypatch.setattr(bnexplore.runs.pool, "start_sessions", counting)
    return started


SLOW_MODULES = {
    "test_app",
    "test_audit",
    "test_backends",
    "test_bench_audit",
    "test_bits_workers",
    "test_charts",
    "test_cli",
    "test_browser",
    "test_deploy_engines",
    "test_explain",
    "test_golden_documents",
    "test_model_formats",
    "test_prediction",
    "test_presets",
    "test_robustness",
    "test_team_server",
    "test_training",
    "test_workers",
}
"""Modules outside the fast tier: browsers, servers, the app's AppTest runs, every chart
with every engine, the CLI's and the backends' fresh processes, worker kills and explain's
re-runs. Everything else is marked ``fast`` (``python -m pytest -m fast``)."""


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module not in SLOW_MODULES and item.get_closest_marker("browser") is None:
            item.add_marker(pytest.mark.fast)
