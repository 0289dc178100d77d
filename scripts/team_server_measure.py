"""Six browser sessions on one team server: the memory it holds and how long each waits.

Starts ``streamlit run app.py`` with a memory limit, opens a small torch + keras
page first (idle: the server and both workers up), then six headless Chromium
sessions at once on six different links each needing 70–92 % of the budget, and
prints the budget, idle and peak resident memory of the server's process tree,
and each page's seconds to completion, as a Markdown table for the README.

Usage (from the repository root):
    python scripts/team_server_measure.py [--limit 600MiB] [--time-limit 120]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import team_server as ts  # importable now that the repository root is on the path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", default="600MiB", help="BNEXPLORE_MEMORY_LIMIT")
    parser.add_argument("--time-limit", type=float, default=120.0, help="BNEXPLORE_TIME_LIMIT")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        with (
            ts.team_server(
                Path(folder) / "store", log, memory_limit=args.limit, time_limit=args.time_limit
            ) as server,
            sync_playwright() as pw,
        ):
            browser = ts.launch_chromium(pw)
            try:
                ts.warm_up(browser, server)
                result = ts.six_sessions(browser, server)
                ts.close_sessions(result.sessions)
            finally:
                browser.close()
        print(ts.six_table(result))
        problems = [
            f"page {number}: {'did not complete' if s.settled_s is None else s.exceptions}"
            for number, s in enumerate(result.sessions, 1)
            if s.settled_s is None or s.exceptions
        ]
        for problem in problems:
            print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
