"""The issue's own team-server measurement, repeated: four sessions at once on 24×256×64×64.

BNEXPLORE_MEMORY_LIMIT=2GiB; four headless Chromium sessions each open a 24×256×64×64
normal scenario (seeds 1–4) at once. Prints idle and peak resident memory of the
server's process tree, whether each page said "Waiting", each page's seconds to
completion; then one more such page closed mid-run, and how long until the tree's
memory is back within 15 % of the budget of where it rested.

Usage (from the repository root): python scripts/team_server_four.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import team_server as ts  # importable now that the repository root is on the path

LINK = "/?v=1&shape=24,256,64,64&input=normal&seed={seed}&engines=torch,keras"


def main() -> int:
    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory() as folder,
        ts.team_server(Path(folder) / "store", Path(folder) / "log", memory_limit="2GiB") as server,
        sync_playwright() as pw,
    ):
        browser = ts.launch_chromium(pw)
        idle = ts.warm_up(browser, server)
        links = [LINK.format(seed=seed) for seed in (1, 2, 3, 4)]
        with ts.TreeMemory(server.pid, for_s=400) as mem:
            sessions = ts.open_sessions(browser, server.url, links)
            ts.follow(sessions, timeout_s=360)
        ts.close_sessions(sessions)
        rest = ts.settle_reading(server, 3.0)
        print(
            f"budget 2048 MiB · idle {ts.mib(idle)} · peak {ts.mib(mem.peak)} "
            f"(idle + {(mem.peak - idle) / 2**31:.0%} of the budget) · rest {ts.mib(rest)}"
        )
        for number, s in enumerate(sessions, 1):
            print(
                f"page {number}: done in {s.settled_s} s, waiting shown: {s.saw_waiting}, "
                f"exceptions: {len(s.exceptions)}"
            )
        heavy = LINK.format(seed=9) + "&steps=30"
        with ts.TreeMemory(server.pid, for_s=120) as mem:
            (session,) = ts.open_sessions(browser, server.url, [heavy])
            deadline = time.monotonic() + 90
            while mem.now() < rest + 2**29 and time.monotonic() < deadline:
                time.sleep(0.1)
            before = mem.now()
            closed = time.monotonic()
            ts.close_sessions([session])
            freed_s = None
            while time.monotonic() - closed < 10:
                if mem.now() <= rest + 0.15 * 2**31:
                    freed_s = time.monotonic() - closed
                    break
                time.sleep(0.1)
        print(
            f"closed mid-run at {ts.mib(before)}; back within rest + 15 % of the budget "
            f"after {freed_s} s (rest {ts.mib(rest)}, now {ts.mib(mem.now())})"
        )
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
