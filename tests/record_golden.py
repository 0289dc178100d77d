"""Record the golden documents that pin torch, keras and keras2 results bit for bit.

Run ``python -m tests.record_golden`` only when a change of numbers is intended
(a framework upgrade, say), and say so in the commit. Each golden file holds, for
one link, ``bnexplore.run(link, reference=True)``'s document and the SHA-256 of
every engine's raw output bytes, with the thread counts the frameworks used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bnexplore.runner import compare
from bnexplore.scenario import parse_link
from tests.scenarios import random_links

GOLDEN = Path(__file__).parent / "golden"

LINKS = [
    "?v=1",
    "?preset=train-then-eval",
    "?preset=momentum-drift",
    "?preset=matched",
    "?shape=4,3&engines=torch,keras,keras2",
    "?shape=8,5&input=normal&seed=3&steps=5&torch_mode=eval&engines=torch,keras,keras2",
    "?shape=2,3,4&input=uniform&low=-2&high=3&steps=2&dtype=float64&engines=torch,keras2",
    "?shape=2,4,3,3&input=normal&mean=2&std=3&steps=3&dtype=float16&keras_training=true",
    "?shape=2,3,2,2,2&input=normal&steps=4&dtype=bfloat16&engines=keras,torch,keras2",
    "?shape=6,2,5&input=constant&value=0.37&steps=1&torch_momentum=none&keras_init=torch",
    "?shape=1,3",
    "?shape=3,4&input=constant&value=1e39&engines=torch,keras,keras2",
    "?shape=16,8,6,6&input=normal&mean=1000&seed=4&steps=2&engines=torch,keras,keras2",
    *random_links(12, seed=77),
]


def outputs_sha256(link: str) -> dict[str, str | None]:
    comparison = compare(parse_link(link)[0], reference=False)
    return {
        name: None if r.output is None else hashlib.sha256(r.output.tobytes()).hexdigest()
        for name, r in comparison.results.items()
    }


def thread_counts() -> dict[str, int]:
    import tensorflow as tf
    import torch

    return {
        "torch_intra_op": torch.get_num_threads(),
        "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def record() -> None:
    import bnexplore

    GOLDEN.mkdir(exist_ok=True)
    entries = []
    for link in LINKS:
        entries.append(
            {
                "link": link,
                "document": bnexplore.run(link, reference=True),
                "output_sha256": outputs_sha256(link),
            }
        )
    payload = {"threads": thread_counts(), "entries": entries}
    (GOLDEN / "documents.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    print(f"recorded {len(entries)} links into {GOLDEN / 'documents.json'}")


if __name__ == "__main__":
    record()
