"""Record what bnexplore answers, to compare two commits on the same machine.

    python scripts/record_documents.py OUT.json            # record
    python scripts/record_documents.py OUT.json --against BEFORE.json

For every preset and 25 random links (tests.scenarios.random_links, seed 2312), the
JSON document of ``bnexplore.run(link, reference=True)`` and the reproducer script
(``python -m bnexplore script --link LINK``), through the public API and the CLI only,
so the same recorder runs before and after a restructure. ``--against`` prints every
link whose document or script differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def links() -> list[str]:
    from tests.scenarios import random_links

    presets = subprocess.run(
        [sys.executable, "-c", "from bnexplore import presets; print(*presets.PRESETS)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if not presets:  # after a move, the presets live with the scenario
        presets = subprocess.run(
            [
                sys.executable,
                "-c",
                "from bnexplore.scenario import presets as p; print(*p.PRESETS)",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    return [f"?preset={name}" for name in presets] + random_links(25, seed=2312)


def record() -> dict[str, dict]:
    import bnexplore

    found = {}
    for link in links():
        script = subprocess.run(
            [sys.executable, "-m", "bnexplore", "script", "--link", link],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found[link] = {"document": bnexplore.run(link, reference=True), "script": script}
        print(f"recorded {link[:90]}", file=sys.stderr)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--against", type=Path)
    args = parser.parse_args()
    found = record()
    args.out.write_text(json.dumps(found, indent=1, sort_keys=True))
    if not args.against:
        return 0
    before = json.loads(args.against.read_text())
    differ = [
        f"{link}: {what} differs"
        for link in sorted(set(before) | set(found))
        for what in ("document", "script")
        if before.get(link, {}).get(what) != json.loads(json.dumps(found.get(link, {}))).get(what)
    ]
    print("\n".join(differ) or f"all {len(found)} documents and scripts identical")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
