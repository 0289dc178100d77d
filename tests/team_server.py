"""One streamlit server shared by many browser sessions, and the memory it holds.

The harness behind ``tests/test_team_server.py`` and ``scripts/team_server_measure.py``:

- :class:`TreeMemory` samples the resident memory of the server's process tree
  (the ``streamlit run`` process and every descendant: the engines' worker
  processes), every ~0.1 s in a background thread, for a bounded time.
- :func:`team_server` starts ``streamlit run app.py`` on a free port with a
  memory limit, a time limit and a store of its own, its log in a file.
- :func:`near_limit_link` picks a link whose estimate is a given share of the
  budget; :func:`open_sessions` opens links in pages at once and follows each
  page until it has settled, noting whether it ever showed "Waiting".

Resident memory is the sum of VmRSS (``/proc/PID/status``) over the tree: what
the kernel holds in RAM for those processes. Pages two processes share (a
shared-memory batch mapped by the server and a worker) count once per process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bnexplore.runs import memory
from bnexplore.scenario.links import parse_link
from bnexplore.tools import bench

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2

SERVER_START_S = 120
SAMPLE_EVERY_S = 0.1

SMALL_LINK = "/?v=1&engines=torch,keras&shape=16,8,6,6&input=normal&steps=2"
"""A seed-like link, small enough that its run adds nothing measurable: the warm-up."""

# The script run is over and the page drawn: either an exception box, or both the
# headline and the sidebar (the browser tests use it too).
SETTLED_JS = bench.settled_js("[data-testid='stSidebar'] .st-key-w_steps input")
# Latches, from the page's first script on, whether "Waiting" was ever in the page: a wait
# shorter than one round of polls over six busy pages is still seen.
WATCH_WAITING_JS = """
window.__sawWaiting = false;
new MutationObserver(() => {
    if (!window.__sawWaiting && document.body && document.body.textContent.includes('Waiting'))
        window.__sawWaiting = true;
}).observe(document, {childList: true, subtree: true, characterData: true});
"""
# One poll of a page: [settled, showed "Waiting" (now or since it opened), shows "over the
# memory limit"].
POLL_JS = (
    "() => { const text = document.body ? document.body.innerText : ''; return ["
    f"({SETTLED_JS})(), window.__sawWaiting === true || text.includes('Waiting'), "
    "text.includes('over the memory limit')]; }"
)
HEADLINE = "[data-testid='stMain'] h3"
EXCEPTION = "[data-testid='stException']"


# --- the server's memory ---------------------------------------------------------------


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone while we looked
        return None
    # the name, in parentheses, may hold spaces and parentheses: fields follow the last ')'
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def tree_pids(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def resident_bytes(pid: int) -> int:
    """VmRSS of one process in bytes; 0 once it is gone (or a zombie)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_resident_bytes(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, summed."""
    return sum(resident_bytes(pid) for pid in tree_pids(root))


def _label(pid: int, root: int) -> str:
    """'server', 'worker torch', … : who the process is, for a failure message."""
    if pid == root:
        return "server"
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    if "bnexplore.runs.worker" in words:
        return f"worker {words[words.index('bnexplore.runs.worker') + 1]} (pid {pid})"
    return f"{Path(words[0]).name} (pid {pid})"


def workers_of(root: int) -> dict[str, list[int]]:
    """The engines' worker processes in ``root``'s tree: engine → pids."""
    found: dict[str, list[int]] = {}
    for pid in tree_pids(root):
        who = _label(pid, root)
        if who.startswith("worker "):
            found.setdefault(who.split()[1], []).append(pid)
    return found


def tree_breakdown(root: int) -> dict[str, int]:
    """Resident bytes of each process of the tree, by who it is."""
    return {_label(pid, root): resident_bytes(pid) for pid in tree_pids(root)}


def breakdown_words(breakdown: dict[str, int]) -> str:
    return ", ".join(f"{who} {mib(size)}" for who, size in breakdown.items())


class TreeMemory:
    """Tree resident memory sampled every ``every`` s in a thread, for at most ``for_s`` s.

    ``with TreeMemory(pid) as mem: ...``; then ``mem.peak`` (and who held it:
    ``mem.peak_breakdown``), ``mem.samples`` ((monotonic time, bytes) pairs), and
    ``mem.now()`` for a fresh reading.
    """

    def __init__(self, root: int, every: float = SAMPLE_EVERY_S, for_s: float = 300.0) -> None:
        self.root, self.every, self.for_s = root, every, for_s
        self.samples: list[tuple[float, int]] = []
        self.peak_breakdown: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="tree-memory")

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        end = time.monotonic() + self.for_s
        while time.monotonic() < end:
            breakdown = tree_breakdown(self.root)
            total = sum(breakdown.values())
            if total > self.peak:
                self.peak_breakdown = breakdown
            self.samples.append((time.monotonic(), total))
            if self._stop.wait(self.every):
                return

    def now(self) -> int:
        return tree_resident_bytes(self.root)

    @property
    def peak(self) -> int:
        return max((size for _, size in self.samples), default=0)

    def since(self, start: float) -> list[tuple[float, int]]:
        return [(t, size) for t, size in self.samples if t >= start]


# --- the server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
            return r.status == 200 and r.read().decode().strip() == "ok"
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Server:
    url: str
    pid: int
    log_path: Path
    budget: int
    """BNEXPLORE_MEMORY_LIMIT in bytes, as the server reads it."""
    idle: int = 0
    """Tree resident bytes once the warm-up page is done and its workers are up."""
    rest: int = 0
    """Tree resident bytes once a near-limit page is done too (caches and free lists)."""
    rest_words: str = ""
    """Who holds ``rest``, process by process."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ServerFailed(RuntimeError):
    pass


@contextlib.contextmanager
def team_server(
    store: Path,
    log_path: Path,
    memory_limit: str = "600MiB",
    time_limit: float = 60.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``streamlit run app.py`` on a free port, INFO logs to ``log_path``; stopped after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "streamlit", "run", "app.py"]
    for option, value in (
        ("server.headless", "true"),
        ("server.port", str(port)),
        ("browser.gatherUsageStats", "false"),
        ("server.fileWatcherType", "none"),
        ("logger.level", "info"),
    ):
        command += [f"--{option}", value]
    env = {
        **os.environ,
        "BNEXPLORE_STORE": str(store),
        "BNEXPLORE_MEMORY_LIMIT": memory_limit,
        "BNEXPLORE_TIME_LIMIT": str(time_limit),
        **(extra_env or {}),
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, stopped as one
            env=env,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {proc.returncode}"
                    if proc.poll() is not None
                    else f"gave no health answer in {SERVER_START_S} s"
                )
                raise ServerFailed(f"streamlit server {why}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        with _env(BNEXPLORE_MEMORY_LIMIT=memory_limit):
            budget = memory.limit()
        yield Server(url, proc.pid, log_path, budget)
    finally:
        stop(proc)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group; kill it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    except ProcessLookupError:
        pass


def launch_chromium(playwright):
    """Debian's headless Chromium, as the browser tests launch it."""
    return playwright.chromium.launch(
        executable_path=bench.CHROMIUM, headless=True, args=bench.CHROMIUM_ARGS
    )


# --- links -----------------------------------------------------------------------------


def share_of_budget(link: str, budget: int) -> float:
    """The link's estimate over the budget, with the float64 references: the links here
    open on the Running statistics tab (HEAVIEST_TAB), which runs them."""
    return memory.estimate(parse_link(link)[0], True) / budget


HEAVIEST_TAB = "&tab=running"
"""The pages under load open where a run holds the most: beside the engines, their float64
references (view.PARTS_OF_TAB; Overview runs the engines alone)."""
AGREEING = "&torch_mode=eval&keras_momentum=0.9&keras_eps=1e-05"
"""PyTorch and Keras 3 set alike: the Explain step has no knob to align, so a page runs
the frameworks once (a differing pair re-runs them per knob)."""


def near_limit_link(budget: int, share: float, seed: int, steps: int = 0) -> str:
    """A torch + keras link of random normal input whose estimate is just under
    ``share`` of the budget: shape 16×16×S×S with the largest S that fits."""

    def link(side: int) -> str:
        return (
            f"/?v=1&engines=torch,keras&shape=16,16,{side},{side}&input=normal"
            f"&seed={seed}&steps={steps}{AGREEING}{HEAVIEST_TAB}"
        )

    side = 1
    while share_of_budget(link(side + 1), budget) <= share:
        side += 1
    return link(side)


# --- sessions --------------------------------------------------------------------------


@dataclass
class Session:
    """One page of one browser context, opened on ``link`` and followed until settled."""

    link: str
    context: object
    page: object
    opened: float = 0.0
    settled_s: float | None = None
    """Seconds from opening the link to the settled page; None while not settled."""
    saw_waiting: bool = False
    saw_over_limit: bool = False
    headline: str | None = None
    exceptions: list[str] = field(default_factory=list)


def open_sessions(
    browser, url: str, links: list[str], drawn_first: str | None = None
) -> list[Session]:
    """A fresh context and page per link, each sent to its link at once (not awaited).

    With ``drawn_first``, each page first opens that link (a cached one: nothing runs) and
    is followed until drawn, so that the browser has loaded the app's code before the links
    are opened. Six pages loading it at once on two cores take 15–35 s to draw, by which
    time a fast server has run and drained its queue, and no page could show "Waiting"."""
    sessions = []
    for link in links:
        context = browser.new_context(viewport={"width": 1300, "height": 900})
        context.set_default_timeout(30_000)
        context.add_init_script(WATCH_WAITING_JS)
        sessions.append(Session(link, context, context.new_page()))
    if drawn_first is not None:
        for session in sessions:
            session.page.goto(url + drawn_first, wait_until="commit")
        for session in sessions:
            session.page.wait_for_function(SETTLED_JS, timeout=180_000, polling=200)
    for session in sessions:
        session.opened = time.monotonic()
        session.page.goto(url + session.link, wait_until="commit")
    return sessions


def follow(sessions: list[Session], timeout_s: float, every_s: float = 0.2) -> None:
    """Poll every page until each has settled (or ``timeout_s`` passed), noting what
    each showed meanwhile; a settled page's headline and exception texts are kept."""
    deadline = time.monotonic() + timeout_s
    todo = list(sessions)
    while todo and time.monotonic() < deadline:
        for session in list(todo):
            try:
                settled, waiting, over_limit = session.page.evaluate(POLL_JS)
            except Exception:  # noqa: BLE001 — the page navigates or rerenders: poll again
                continue
            session.saw_waiting |= waiting
            session.saw_over_limit |= over_limit
            if settled:
                session.settled_s = time.monotonic() - session.opened
                page = session.page
                session.exceptions = page.locator(EXCEPTION).all_inner_texts()
                headline = page.locator(HEADLINE)
                session.headline = headline.first.inner_text() if headline.count() else None
                todo.remove(session)
        if todo:
            todo[0].page.wait_for_timeout(every_s * 1000)


def close_sessions(sessions: list[Session]) -> None:
    for session in sessions:
        with contextlib.suppress(Exception):  # already closed
            session.context.close()


def warm_up(browser, server: Server, mem_settle_s: float = 3.0) -> int:
    """Open the small link (its workers start), let memory settle; the idle bytes."""
    sessions = open_sessions(browser, server.url, [SMALL_LINK])
    try:
        follow(sessions, timeout_s=SERVER_START_S + 60)
        session = sessions[0]
        if session.settled_s is None or session.exceptions or not session.headline:
            raise ServerFailed(
                f"the warm-up page did not complete: settled after {session.settled_s} s, "
                f"headline {session.headline!r}, exceptions {session.exceptions}\n"
                + server.log()[-3000:]
            )
    finally:
        close_sessions(sessions)
    server.idle = settle_reading(server, mem_settle_s)
    return server.idle


def settle_reading(server: Server, settle_s: float = 2.0) -> int:
    """Tree resident bytes after ``settle_s`` of quiet: the highest of five readings."""
    time.sleep(settle_s)
    readings = []
    for _ in range(5):
        readings.append(tree_resident_bytes(server.pid))
        time.sleep(0.2)
    return max(readings)


def mib(size: float) -> str:
    return f"{size / MIB:.0f} MiB"


# --- the six-session scenario ----------------------------------------------------------

SIX_SHARES = (0.72, 0.76, 0.80, 0.84, 0.88, 0.92)
"""Each link's estimate as a share of the budget: no two fit beside each other."""
SIX_SEEDS = range(11, 17)


@dataclass
class SixSessions:
    sessions: list[Session]
    shares: list[float]
    idle: int
    peak: int
    peak_breakdown: dict[str, int]
    budget: int


def six_sessions(browser, server: Server, timeout_s: float = 150.0) -> SixSessions:
    """Six contexts open six different near-limit links at once; followed until settled
    (or ``timeout_s``) while the tree's memory is sampled. The pages are left open."""
    links = [
        near_limit_link(server.budget, share, seed)
        for share, seed in zip(SIX_SHARES, SIX_SEEDS, strict=True)
    ]
    with TreeMemory(server.pid, for_s=timeout_s + 30) as mem:
        sessions = open_sessions(browser, server.url, links, drawn_first=SMALL_LINK)
        follow(sessions, timeout_s)
    return SixSessions(
        sessions=sessions,
        shares=[share_of_budget(link, server.budget) for link in links],
        idle=server.idle,
        peak=mem.peak,
        peak_breakdown=mem.peak_breakdown,
        budget=server.budget,
    )


def six_table(result: SixSessions) -> str:
    """The numbers as a Markdown table, for the README."""
    rows = [
        f"budget {mib(result.budget)} · idle {mib(result.idle)} · peak {mib(result.peak)} "
        f"(idle + {(result.peak - result.idle) / result.budget:.0%} of the budget)",
        f"at the peak: {breakdown_words(result.peak_breakdown)}",
        "",
        "| page | link's estimate | saw Waiting | completed after |",
        "|---:|---:|:---:|---:|",
    ]
    for number, (session, share) in enumerate(zip(result.sessions, result.shares, strict=True), 1):
        seconds = "—" if session.settled_s is None else f"{session.settled_s:.1f} s"
        waiting = "yes" if session.saw_waiting else "no"
        rows.append(f"| {number} | {share:.0%} of the budget | {waiting} | {seconds} |")
    return "\n".join(rows)
