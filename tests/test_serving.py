"""The workers start with the server, once: ``streamlit run app.py`` serves app.py's st.App,
whose lifespan (bnexplore.page.serving) starts the default link's workers before any page
opens; every page after that uses them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.web.server.app_discovery import discover_asgi_app

from bnexplore.runs.shipping import PREFIX, shm_dir
from bnexplore.tools import bench
from tests import team_server as ts

REPO = Path(__file__).resolve().parents[1]
READY = bench.READY_LINE
"""The server's line for each worker's import: (engine, pid, seconds, when)."""


def test_streamlit_run_finds_the_app_and_its_lifespan() -> None:
    found = discover_asgi_app(REPO / "app.py")
    assert found.is_asgi_app and found.import_string == "app:app", found


@pytest.mark.browser
def test_the_workers_start_with_the_server_once_for_every_page(tmp_path) -> None:
    if not Path(ts.bench.CHROMIUM).exists():
        pytest.skip(f"{ts.bench.CHROMIUM} is missing (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with ts.team_server(tmp_path / "store", tmp_path / "server.log") as server:
        deadline = time.monotonic() + 60
        while len(READY.findall(server.log())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        # no page has opened, and the default link's engines are imported and waiting
        assert "computing" not in server.log()
        started = ts.workers_of(server.pid)
        assert {e: len(p) for e, p in started.items()} == {"torch": 1, "keras": 1}, started
        assert sorted(line[:2] for line in READY.findall(server.log())) == sorted(
            (engine, str(pid)) for engine, (pid,) in started.items()
        )
        links = ["/?v=1", "/?v=1&shape=8,4,5,5&input=normal&steps=2", "/?v=1&keras_eps=1e-5"]
        with sync_api.sync_playwright() as pw:
            browser = ts.launch_chromium(pw)
            try:
                sessions = ts.open_sessions(browser, server.url, links)
                ts.follow(sessions, timeout_s=120)
                for session in sessions:
                    assert session.settled_s is not None, f"{session.link} did not complete"
                    assert not session.exceptions, session.exceptions
                    assert "max |Δ|" in session.headline, session.headline
                    assert not session.headline.startswith("Prediction"), session.headline
                ts.close_sessions(sessions)
            finally:
                browser.close()
        # three pages, and still the same two workers, each started and imported once
        assert ts.workers_of(server.pid) == started
        assert len(READY.findall(server.log())) == 2, server.log()[-3000:]
        tree = [server.pid, *(pid for pids in started.values() for pid in pids)]
    # stopped (SIGTERM to its process group): the server and its workers leave no shared memory
    left = [p.name for pid in tree for p in Path(shm_dir()).glob(f"{PREFIX}{pid}-*")]
    assert left == []
