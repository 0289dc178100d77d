"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def lanes_started(monkeypatch) -> list[str]:
    """The engines each run starts in a worker, in order, recorded while the test runs."""
    import bnexplore.workers

    started: list[str] = []
    real = bnexplore.workers.start_sessions

    def counting(lanes, *args, **kwargs):
        started.extend(lanes.values())
        return real(lanes, *args, **kwargs)

    monkeypatch.setattr(bnexplore.workers, "start_sessions", counting)
    return started
