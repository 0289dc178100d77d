"""The engines' registry: one row per engine, the one place that says what an engine is.

Its name in links, its label, whose knobs it reads, whose conventions it follows, its colour
and line style on every chart, what it needs and where its class lives. Params, the charts,
the translator, the reproducer and explain all read these rows, so adding an engine is one
row here plus its module, and no chart can leave it out. Nothing of bnexplore's is
imported here: the scenario's parameters are built from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineInfo:
    """One engine, in one row: its name in links, its label on the page, whose knobs it
    reads and whose conventions it follows, how the charts draw it, what it needs and
    where its code lives."""

    name: str
    """The link's name for it: engines=torch,keras_jax, …"""
    label: str
    """What the page, the CLI and the documents call it."""
    knobs: str
    """The key prefix of its knobs: PyTorch on CUDA reads torch_eps, torch_mode, …; Keras 3
    on every backend the keras_* keys (the same layer, another kernel)."""
    convention: str
    """Whose conventions it follows, as the translator names them (Keras 2's are Keras
    3's, its fused path aside)."""
    color: str
    """Its colour on every chart."""
    stroke_width: float
    stroke_dash: tuple[float, ...]
    """Its line's width and dash pattern (empty: solid). Charts draw the engines in the
    registry's order: a solid line is narrower than the solid ones before it, a dashed one
    shows what it covers through its gaps, so identical lines stay visible on each other."""
    needs: str
    """The packages it needs, in words (the reproducer's header)."""
    process_backend: str | None
    """The backend its process is set to before Keras or JAX is imported, where it cannot
    share the TensorFlow and PyTorch process (the reproducer runs it in a child); None
    where it can."""
    code: str
    """Where its engine class lives: "module:Class", imported when the engine is loaded."""
    own_knobs: str | None = None
    """The key prefix of the knobs that it alone reads, beside ``knobs``: the ONNX engine
    reads the torch_* keys (the module it exports) and onnx_exporter; LiteRT the keras_* keys
    (the layer it converts) and litert_quantize."""


REGISTRY: tuple[EngineInfo, ...] = (
    EngineInfo(
        "torch",
        "PyTorch",
        knobs="torch",
        convention="PyTorch",
        color="#E4572E",
        stroke_width=5.0,
        stroke_dash=(),
        needs="torch",
        process_backend=None,
        code="bnexplore.engines.torch_engine:TorchEngine",
    ),
    EngineInfo(
        "keras",
        "Keras 3",
        knobs="keras",
        convention="Keras 3",
        color="#1F5FBF",
        stroke_width=2.5,
        stroke_dash=(),
        needs="tensorflow (Keras 3)",
        process_backend=None,
        code="bnexplore.engines.keras_engine:KerasEngine",
    ),
    EngineInfo(
        "keras2",
        "Keras 2",
        knobs="keras2",
        convention="Keras 3",
        color="#2A9D8F",
        stroke_width=1.2,
        stroke_dash=(),
        needs="tf_keras (Keras 2)",
        process_backend=None,
        code="bnexplore.engines.keras2_engine:Keras2Engine",
    ),
    EngineInfo(
        "torch_gpu",
        "PyTorch (CUDA)",
        knobs="torch",
        convention="PyTorch",
        color="#8E3B1F",
        stroke_width=1.8,
        stroke_dash=(6, 3),
        needs="torch",
        process_backend=None,
        code="bnexplore.engines.torch_engine:TorchGpuEngine",
    ),
    EngineInfo(
        "keras_jax",
        "Keras 3 (JAX)",
        knobs="keras",
        convention="Keras 3",
        color="#7B2CBF",
        stroke_width=3.5,
        stroke_dash=(8, 4),
        needs="jax and keras",
        process_backend="jax",
        code="bnexplore.engines.keras_jax_engine:KerasJaxEngine",
    ),
    EngineInfo(
        "keras_torch",
        "Keras 3 (PyTorch)",
        knobs="keras",
        convention="Keras 3",
        color="#D99A00",
        stroke_width=1.6,
        stroke_dash=(3, 2),
        needs="torch and keras",
        process_backend="torch",
        code="bnexplore.engines.keras_torch_engine:KerasTorchEngine",
    ),
    EngineInfo(
        "flax",
        "Flax",
        knobs="flax",
        convention="Flax",
        color="#C2185B",
        stroke_width=2.0,
        stroke_dash=(10, 3, 2, 3),
        needs="jax and flax",
        process_backend="jax",
        code="bnexplore.engines.flax_engine:FlaxEngine",
    ),
    EngineInfo(
        "onnx",
        "ONNX Runtime",
        knobs="torch",
        convention="PyTorch",
        color="#6A8D22",
        stroke_width=2.2,
        stroke_dash=(2, 2),
        needs="torch, onnx, onnxscript and onnxruntime",
        process_backend=None,
        code="bnexplore.engines.onnx_engine:OnnxEngine",
        own_knobs="onnx",
    ),
    EngineInfo(
        "litert",
        "LiteRT",
        knobs="keras",
        convention="Keras 3",
        color="#00A6D6",
        stroke_width=1.4,
        stroke_dash=(12, 4),
        needs="tensorflow (Keras 3) and ai-edge-litert",
        process_backend=None,
        code="bnexplore.engines.litert_engine:LiteRTEngine",
        own_knobs="litert",
    ),
)
"""One row per engine, in the order of the sidebar's choices and of every chart's legend."""

ENGINES: dict[str, EngineInfo] = {engine.name: engine for engine in REGISTRY}
"""Each engine's row, by name."""

LABELS: dict[str, str] = {engine.name: engine.label for engine in REGISTRY}

BY_LABEL: dict[str, EngineInfo] = {engine.label: engine for engine in REGISTRY}
"""Each engine's row, by label (what the charts' tables hold)."""
