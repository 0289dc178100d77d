"""A first answer while a framework imports: labelled as a prediction, then replaced.

The page asks ViewCache.view for a link; where an engine's worker is still importing its
framework, the ready engines run for real and the others' rules (the float64 NumPy reference)
stand in, and that view goes to ``preview`` only. The returned, cached view is the real run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch.testing

from bnexplore.judge.document import document
from bnexplore.page.view import ViewCache
from bnexplore.runs import pool as workers
from bnexplore.runs.metrics import measure
from bnexplore.runs.runner import PREDICTION_NOTE, QUANTITIES, array_key, compare
from bnexplore.scenario.links import parse_link

SEED = "?v=1"


def _ready(engine: str) -> None:
    """Start the engine's worker where it has none, and wait for its import."""
    workers.POOL.warm([engine])
    for worker in workers.POOL._all[engine]:
        assert worker.ready.wait(120), engine


def test_an_importing_engine_is_predicted_labelled_then_replaced_by_its_real_run() -> None:
    _ready("torch")
    workers.POOL.stop(["keras"])  # Keras 3's next worker imports TensorFlow: seconds
    scenario = parse_link(SEED)[0]
    assert workers.POOL.starting(scenario["engines"]) == {"keras"}
    cache, shown = ViewCache(), []
    view = cache.view(scenario, parts=frozenset(), preview=shown.append)

    (prediction,) = shown
    assert prediction.predicted == {"keras"}
    assert prediction.headline.startswith("Prediction while Keras 3 imports: max |Δ| = 0.9995")
    keras, torch_ = prediction.engines["keras"], prediction.engines["torch"]
    assert keras.device_note == PREDICTION_NOTE and keras.device == "not run yet"
    assert "prediction" in keras.version and torch_.version.startswith("torch")
    assert prediction.document["engines"]["keras"]["device"] == "not run yet"

    # the real run replaces it, and only it is kept: the cache, the document, the headline
    assert view.predicted == frozenset() and not view.headline.startswith("Prediction")
    assert view.engines["keras"].version.startswith("keras 3")
    assert view.engines["keras"].device != "not run yet"
    assert cache.get(scenario.run_link) is view
    assert view.document == document(compare(scenario, reference=False))  # bit for bit
    # the prediction is what Keras's rules give: the real figures within float32's tolerance
    torch.testing.assert_close(
        np.array([keras.output.mean, keras.output.max]),
        np.array([view.engines["keras"].output.mean, view.engines["keras"].output.max]),
        rtol=1.3e-6,
        atol=1e-5,
    )


def test_with_every_worker_ready_nothing_is_predicted() -> None:
    for engine in ("torch", "keras"):
        _ready(engine)
    shown = []
    view = ViewCache().view(parse_link(SEED)[0], parts=frozenset(), preview=shown.append)
    assert shown == [] and view.predicted == frozenset()


def test_a_prediction_is_never_kept_for_reuse() -> None:
    from bnexplore.runs.runner import Reuse

    _ready("torch")
    scenario = parse_link("?shape=4,3,2,2&input=normal&engines=torch,keras")[0]
    reuse = Reuse()
    first = compare(scenario, reference=False, reuse=reuse, predict=frozenset({"keras"}))
    assert first.predicted == {"keras"}
    assert first.results["keras"].device_note == PREDICTION_NOTE
    assert reuse.get(scenario, "keras") is None  # never handed on as Keras's own number
    assert reuse.get(scenario, "torch") is first.results["torch"]


def test_a_prediction_is_its_frameworks_float64_reference_even_through_a_port() -> None:
    """Keras 3 starting from the state PyTorch trained, Keras predicted: its prediction is bit
    for bit what Keras's reference engine gives beside a real run (both are ported PyTorch's
    real state). With PyTorch predicted too, Keras is ported PyTorch's predicted state: then
    it is within float32's tolerance of the real run, not bit for bit."""
    link = "?shape=6,3,4,4&input=normal&steps=2&keras_init=torch&engines=torch,keras"
    scenario = parse_link(link)[0]
    real = compare(scenario, reference=True)
    predicted = compare(scenario, reference=False, predict=frozenset({"keras"}))
    assert predicted.results["keras"].device == "not run yet"
    assert predicted.results["torch"].device == real.results["torch"].device
    assert predicted.results["keras"].output.tobytes() == real.references["keras"].output.tobytes()
    both = compare(scenario, reference=False, predict=frozenset({"torch", "keras"}))
    assert both.results["torch"].output.tobytes() == real.references["torch"].output.tobytes()
    torch.testing.assert_close(
        both.results["keras"].output.astype(np.float32), real.results["keras"].output
    )


def test_figures_begun_while_the_run_waits_are_those_measured_at_the_end() -> None:
    """compare begins each result's figures as it arrives (its summaries, and a pair's gap
    once both sides are here); the comparison's figures are measure's on all its arrays."""
    _ready("torch")
    _ready("keras")
    scenario = parse_link("?shape=8,16,48,48&input=normal&steps=2&loss=mse")[0]
    comparison = compare(scenario, reference=True)
    assert comparison.figures is not None and "keras:grad_x" in comparison.figures
    results = [*comparison.results.values(), *comparison.references.values()]
    arrays = {
        array_key(r.name, q): getattr(r, q)
        for r in results
        for q in QUANTITIES
        if getattr(r, q) is not None
    }
    pairs = [
        (array_key(a, q), array_key(b, q))
        for a, b in [("torch", "keras"), ("torch_reference", "torch"), ("keras_reference", "keras")]
        for q in QUANTITIES
        if array_key(a, q) in arrays and array_key(b, q) in arrays
    ]
    summaries, gaps = measure(arrays, pairs, "float32")
    assert comparison.summaries == summaries
    (pair,) = comparison.divergence
    assert dataclasses.replace(pair, grad=None, state=None) == gaps[0].renamed("torch", "keras")
    assert pair.grad["x"] == gaps[pairs.index(("torch:grad_x", "keras:grad_x"))].renamed(
        "torch", "keras"
    )
    assert (
        comparison.reference_gap("keras").max_abs
        == gaps[pairs.index(("keras_reference", "keras"))].max_abs
    )
