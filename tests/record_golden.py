"""Record the golden documents: what ``bnexplore.run(link, reference=True)`` says that no
processor changes.

Run ``python -m tests.record_golden`` only when a change of numbers is intended (a framework
upgrade, a changed rule), and say so in the commit. TensorFlow's and PyTorch's CPU kernels round
differently with the vector width, the thread count and the kernel a library picks for the
processor, so an entry keeps, for one link, its document with

- the canonical link, the notices, each engine's words (version, device, error) and each
  count (non-finite values) as they are;
- each pair's verdicts with "agree" and "rounding" as one class (a last bit decides between
  them), and the headline without its figures (see ``headline_words``);
- every other figure as it is: tests/test_golden_documents.py compares them within the dtype's
  tolerance, with the mean's rounding propagated through each engine's rounding gain, which
  the entry records from the engine's float64 reference (see docs/testing.md);
- no ``max_rel``: a ratio to the elements nearest zero, whose rounding noise has no bound;
- no scenario: the canonical link says it.

That the workers change no bit is tested on the machine that runs the tests, against the same
links run in-process (tests/test_bits_workers.py).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from bnexplore.judge.document import document as make_document
from bnexplore.judge.verdicts import VERDICT_WORDS
from bnexplore.runs.runner import Comparison, compare
from bnexplore.scenario.links import parse_link
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

WITHIN_ROUNDING = "agree or rounding"
"""The verdicts "agree" and "rounding" as one class: which of the two a pair gets can turn on
one last bit, and so on the processor."""

_FIGURE = re.compile(r"(?<![\w.])(?<!Keras )[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")
"""A number in a headline, not in a word (float16) nor a label (Keras 3)."""
_WITHIN_ROUNDING_WORDS = {
    VERDICT_WORDS["agree"]: "agree or differ only by rounding",
    VERDICT_WORDS["rounding"]: "agree or differ only by rounding",
    "; so do their running statistics, γ and β": "; their state agrees or differs by rounding",
    "; their running statistics, γ and β agree to rounding": (
        "; their state agrees or differs by rounding"
    ),
}
"""story.headline's words for a pair's outputs, and its state, that agree exactly or to
rounding: each pair of phrases becomes one."""
_WITHIN_ROUNDING_PHRASE = re.compile("|".join(map(re.escape, _WITHIN_ROUNDING_WORDS)))


@functools.cache
def comparison(link: str) -> Comparison:
    """The link's run through the workers, with its references, as ``bnexplore.run(link,
    reference=True)`` makes it; kept, so the golden and the bit-for-bit tests share one run."""
    scenario, notices = parse_link(link)
    return compare(scenario, notices, reference=True)


def verdict_class(verdict: str) -> str:
    return WITHIN_ROUNDING if verdict in ("agree", "rounding") else verdict


def headline_words(headline: str) -> str:
    """The headline with each figure as "#" and "agree exactly" and "differ only by rounding"
    (of the outputs, or of the running statistics, γ and β) as one phrase."""
    headline = _WITHIN_ROUNDING_PHRASE.sub(lambda m: _WITHIN_ROUNDING_WORDS[m[0]], headline)
    return _FIGURE.sub("#", headline)


def without_max_rel(value):
    """A nested document part with every ``max_rel`` left out."""
    if isinstance(value, dict):
        return {k: without_max_rel(v) for k, v in value.items() if k != "max_rel"}
    if isinstance(value, list):
        return [without_max_rel(v) for v in value]
    return value


def rounding_gains(comparison: Comparison) -> dict[str, float | None]:
    """Each engine's largest rounding gain over the channels, |mean|·|γ|/√(var + eps) of its
    reference's measured pass: how much y amplifies a relative error in a channel's mean
    (None where the reference has none, or none finite)."""
    gains = {}
    for name, reference in comparison.references.items():
        gain = reference.rounding_gain
        finite = None if gain is None else gain[np.isfinite(gain)]
        gains[name] = None if finite is None or not finite.size else float(finite.max())
    return gains


def pinned(comparison: Comparison, document: dict | None = None) -> dict:
    """What a golden entry keeps of a run (its document, or ``document`` in its place): see
    the module's docstring."""
    if document is None:
        document = make_document(comparison)
    kept = {
        "link": document["link"],
        "dtype": document["scenario"]["dtype"],
        "notices": document["notices"],
        "headline": headline_words(document["headline"]),
        "headline_about": document["headline_about"],
        "rounding_gain": rounding_gains(comparison),
        "engines": document["engines"],
        "divergence": [
            {
                **without_max_rel(pair),
                "verdict": {of: verdict_class(v) for of, v in pair["verdict"].items()},
            }
            for pair in document["divergence"]
        ],
    }
    if "reference" in document:
        kept["reference"] = without_max_rel(document["reference"])
    return kept


def record() -> None:
    GOLDEN.mkdir(exist_ok=True)
    entries = [{"link": link, "document": pinned(comparison(link))} for link in LINKS]
    payload = {"entries": entries}
    text = json.dumps(payload, indent=1, allow_nan=False, ensure_ascii=False)
    (GOLDEN / "documents.json").write_text(text + "\n", encoding="utf-8")
    print(f"recorded {len(entries)} links into {GOLDEN / 'documents.json'}")


if __name__ == "__main__":
    record()
