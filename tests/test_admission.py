"""One memory budget for every run, a first-come queue, cancellation and shared flights."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import bnexplore
from bnexplore.page.view import ViewCache
from bnexplore.runs import admission, memory
from bnexplore.runs.admission import BUDGET, Cancelled, RunContext, Ticket
from bnexplore.runs.runner import compare
from bnexplore.runs.shipping import FILES, KEEP_AT_REST, PREFIX, shm_dir
from bnexplore.scenario.links import parse_link

SLOW = "?shape=32,16,16,16&input=normal&seed=9&steps=300&engines=torch,keras"


def _need(link: str) -> int:
    return memory.estimate(parse_link(link)[0], True)


def test_runs_wait_their_turn_first_come_and_never_exceed_the_budget(monkeypatch) -> None:
    monkeypatch.setenv("BNEXPLORE_MEMORY_LIMIT", "1000")
    order: list[str] = []
    words: dict[str, list[str]] = {"b": [], "c": []}
    peak = [0]
    first_in = threading.Event()

    def run(name: str, hold: float) -> None:
        context = RunContext(on_wait=lambda a, f: words[name].append(admission.waiting_words(a, f)))
        with BUDGET.admit(700, context):
            order.append(name)
            peak[0] = max(peak[0], BUDGET.in_flight_bytes())
            first_in.set()
            time.sleep(hold)

    a = threading.Thread(target=run, args=("a", 0.8))
    a.start()
    first_in.wait(5)
    b = threading.Thread(target=run, args=("b", 0.1))
    b.start()
    time.sleep(0.3)
    c = threading.Thread(target=run, args=("c", 0.1))
    c.start()
    for thread in (a, b, c):
        thread.join(10)
    assert order == ["a", "b", "c"]
    assert peak[0] <= 1000
    assert any(w.startswith("Waiting: next in line, 700 B in flight") for w in words["b"]), words
    assert any(w.startswith("Waiting: 1 run ahead") for w in words["c"]), words
    assert BUDGET.in_flight_bytes() == 0 and BUDGET.queued() == 0


def test_a_waiting_run_that_is_cancelled_leaves_the_queue(monkeypatch) -> None:
    monkeypatch.setenv("BNEXPLORE_MEMORY_LIMIT", "1000")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with BUDGET.admit(900, RunContext()):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(5)
    ticket = Ticket()
    outcome: list[str] = []

    def wait() -> None:
        try:
            with BUDGET.admit(900, RunContext(ticket=ticket)):
                outcome.append("admitted")
        except Cancelled:
            outcome.append("cancelled")

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert BUDGET.queued() == 1
    ticket.cancel()
    waiter.join(5)
    release.set()
    holder.join(5)
    assert outcome == ["cancelled"] and BUDGET.queued() == 0


def test_a_scenario_over_the_whole_budget_is_refused_at_once(monkeypatch) -> None:
    monkeypatch.setenv("BNEXPLORE_MEMORY_LIMIT", "64MiB")
    started = time.monotonic()
    doc = bnexplore.run("?shape=64,64,32,32&input=normal")
    assert time.monotonic() - started < 5
    assert any("over the memory limit of 64 MiB" in n for n in doc["notices"]), doc["notices"]


def test_a_cancelled_run_stops_within_two_seconds_and_lets_its_memory_go() -> None:
    compare(parse_link("?shape=4,3&engines=torch,keras")[0])  # the workers are up
    ticket = Ticket()
    outcome: dict = {}

    def run() -> None:
        try:
            with admission.running(RunContext(ticket=ticket)):
                outcome["result"] = compare(parse_link(SLOW)[0])
        except Cancelled:
            outcome["cancelled"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(2.0)
    assert BUDGET.in_flight_bytes() == _need(SLOW)
    cancelled_at = time.monotonic()
    ticket.cancel()
    thread.join(10)
    assert "cancelled" in outcome and outcome["cancelled"] - cancelled_at < 2.0
    assert BUDGET.in_flight_bytes() == 0
    # no file is left in flight: this process's are the ones it keeps for the next run
    held = sum(p.stat().st_size for p in Path(shm_dir()).glob(f"{PREFIX}{os.getpid()}-*"))
    assert held == FILES.kept_bytes() <= KEEP_AT_REST
    # the workers serve the next run
    assert (
        compare(parse_link("?shape=4,3&engines=torch,keras")[0]).results["keras"].output is not None
    )


def test_the_time_limit_counts_from_admission_not_from_the_queue(monkeypatch) -> None:
    monkeypatch.setenv("BNEXPLORE_TIME_LIMIT", "4")
    link = "?shape=8,3,4,4&input=normal&steps=2&engines=torch,keras"
    need = _need(link)
    monkeypatch.setenv("BNEXPLORE_MEMORY_LIMIT", str(need))
    compare(parse_link(link)[0])  # workers up
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with BUDGET.admit(need, RunContext()):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(5)
    threading.Timer(5.0, release.set).start()  # the run waits longer than its time limit
    doc = bnexplore.run(link)
    holder.join(10)
    assert not any("time limit" in n for n in doc["notices"]), doc["notices"]
    assert all(e["error"] is None for e in doc["engines"].values())


def test_one_flight_per_link_shared_by_its_sessions_and_cancelled_when_all_leave(
    monkeypatch,
) -> None:
    import bnexplore.page.view

    built: list[str] = []
    real = bnexplore.page.view.build_view

    def counting(comparison, *args):
        built.append(comparison.scenario.link)
        return real(comparison, *args)

    monkeypatch.setattr(bnexplore.page.view, "build_view", counting)
    cache = ViewCache()
    scenario = parse_link("?shape=16,8,8,8&input=normal&steps=40&seed=3&engines=torch,keras")[0]
    views: list = []
    threads = [threading.Thread(target=lambda: views.append(cache.view(scenario))) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(views) == 2 and views[0] is views[1]
    assert built == [scenario.link]  # computed once for both sessions

    # a session that stops waiting (Streamlit raises in its progress report) leaves the
    # flight; the last one to leave cancels it
    class Left(Exception):
        pass

    def leave(done: float, text: str) -> None:
        raise Left

    with pytest.raises(Left):
        cache.view(parse_link(SLOW)[0], report=leave)
    assert cache.flights() == 0
    deadline = time.monotonic() + 2.0
    while BUDGET.in_flight_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert BUDGET.in_flight_bytes() == 0
    assert len(built) == 1  # the slow view was never built
