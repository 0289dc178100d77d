"""bnexplore: why PyTorch and Keras BatchNorm layers give different numbers.

``bnexplore.run(link)`` runs the scenario a link describes for real in each
framework and returns the document the app and the CLI show.
``bnexplore.store_file(path)`` keeps a BatchNorm state (or a batch) in the store and
returns its digest, for ``state=`` (or ``file=``) in a link.

The rooms, lowest first (a subpackage each):

- ``settings`` and ``engines.registry``: the environment's settings, what an engine is;
- ``files``: the store and the file formats (``store``, ``formats``);
- ``scenario``: the parameter table, presets, the link codec, batches, the frameworks'
  conventions (``params``, ``presets``, ``links``, ``batches``, ``conventions``);
- ``engines``: one module per framework behind one interface;
- ``runs``: the runner and its typed results, memory, admission, the worker pool and
  the worker, shipping, metrics, sweeps (``runner``, ``memory``, ``admission``, ``pool``,
  ``worker``, ``shipping``, ``metrics``, ``sweep``);
- ``judge``: verdicts, explain, the document (``verdicts``, ``explain``, ``document``);
- ``porting``: the translator and the reproducer scripts (``translate``, ``script``);
- ``page``: widgets, the view, charts, the server's start (``widgets``, ``view``, ``charts``,
  ``model``, ``serving``, ``floor_app``);
- the edge: this package's public API and the tools (``tools.cli``, ``tools.bench``,
  ``tools.docs``).

The dependency rule: a module imports only from its own room or lower ones, so the
run layer never imports the judging or the page, the judging never imports the page,
and only the edge imports the page. No import circles. tests/test_layout.py walks the
imports (lazy ones too) and keeps it.
"""

from bnexplore.files.store import store_file
from bnexplore.judge.audit import audit as audit_model
from bnexplore.judge.document import document, headline_pair
from bnexplore.judge.explain import explain as explain_steps
from bnexplore.runs.runner import compare, strict_json
from bnexplore.runs.sweep import sweep_link as sweep_run
from bnexplore.scenario.links import Scenario, parse_link

__all__ = [
    "Scenario",
    "audit",
    "compare",
    "document",
    "parse_link",
    "run",
    "store_file",
    "sweep_run",
]


def audit(link: str = "") -> dict:
    """Audit every BatchNorm of the model in the link's ``state=…`` (and check the port in
    ``port=…``), for real in each engine: the document of ``audit --json`` (strict JSON;
    bnexplore.judge.audit)."""
    scenario, notices = parse_link(link)
    return audit_model(scenario, notices).to_dict()


def run(link: str = "", reference: bool = False, explain: bool = False) -> dict:
    """Run the scenario a link describes and return the document (strict JSON).

    ``link`` is a full URL of the app or only its query string (``?a=1&b=2``).
    With ``reference``, the document's "reference" holds each engine's float64
    reference and its gap from it (the app always shows them).
    With ``explain``, the document's "explain" lists the first pair's gap
    cause by cause (see bnexplore.judge.explain), each step re-run for real.
    """
    scenario, notices = parse_link(link)
    comparison = compare(scenario, notices, reference)
    doc = document(comparison)
    if explain:
        steps = explain_steps(scenario, headline_pair(comparison))
        doc["explain"] = strict_json([step.to_dict() for step in steps])
    return doc
