"""The benchmark: bnexplore's own cost against the bare framework calls doing the same work.

``python -m bnexplore bench [--json] [--repeat N] [--quick] [--no-browser]``

For each scenario, in one process and warm: (a) ``bnexplore.run(link)`` and
(b) the minimal PyTorch + Keras code that makes the same batches and runs the
same passes (written here, below), medians of ``repeat`` runs, and the ratio
(a)/(b). Then the whole-model audit of a ResNet-50-shaped file in four engines
(:func:`audit_row`), against the same passes in a bare process per engine
(bnexplore.tools.bare_audit; not with ``--quick``). Then: a cached link answered by the
app's cache; cold start, from process start to the first result, with the framework
imports timed apart; ``streamlit run`` to the first chart drawn in Chromium (where
Debian's chromium and Playwright exist); and the peak memory of this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

SCENARIOS = (
    ("seed", "?v=1"),
    ("10 random steps", "?input=normal&steps=10"),
    ("large tensor (32×256×56×56)", "?shape=32,256,56,56&input=normal"),
    ("training step (the seed, loss=mse, 1 step)", "?preset=seed&steps=1&loss=mse"),
)
SWEEP = (
    "20-point sweep (seed's shape)",
    "?sweep=keras_momentum&sweep_from=0.5&sweep_to=0.999&sweep_points=20",
)
CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium: the only browser used here (a downloaded one cannot be had)."""
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
"""Headless as root, and no calls out of a machine whose network is closed."""

TRAINING_STEP = ("?preset=seed&steps=1&loss=mse", "?preset=seed&steps=1")
"""A real training step (loss, backward, SGD) against the forward-only one, both bnexplore:
what a loss adds to a run (the training step's own row times it against the bare calls)."""

TARGETS = {
    "ratio": 1.2,
    "cached_ms": 50.0,
    "sweep_s": 3.0,
    "training_step_ratio": 3.0,
    "widget_change_p50_s": 0.3,
    "widget_change_p90_s": 0.5,
    "revisit_s": 0.15,
    "cold_start_to_headline_s": 5.0,
    "audit_ratio": 1.5,
    "audit_s": 5.0,
}
"""Issue 11's targets (the training step's from the training-step issue): the sweep's for
the 20-point sweep row, the last four for ``bench --browser``; the audit's for the
ResNet-50-shaped audit row (many small runs)."""

AUDIT_ENGINES = ("torch", "keras", "keras_jax", "flax")
AUDIT_ROW = "ResNet-50-shaped audit (53 layers, 4 engines, both ports)"
RESNET50_BLOCKS = ((64, 3), (128, 4), (256, 6), (512, 3))
"""torchvision's ResNet-50: (planes, bottleneck blocks) per stage."""


def _median_seconds(work: Callable[[], object], repeat: int) -> float:
    work()  # warm: layers, kernels and caches as a second visitor finds them
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_calls(link: str) -> Callable[[], dict[str, dict[str, np.ndarray]]]:
    """The minimal PyTorch + Keras 3 code doing the scenario's work, outputs to the host.

    The scenario's engines (torch, and keras where it is compared), fresh
    layers, the scenario's own batches drawn once; no statistics, no comparison,
    no bookkeeping. With loss=mse each training pass is ``L = mean((y − T)²)``, its
    gradients and one optimizer step; the measured pass takes dL/dx, dL/dγ and dL/dβ and
    no step, all fetched to the host. ``work()`` returns them, engine → quantity → array,
    channels-first (the tests check them against bnexplore's).
    """
    import torch

    from bnexplore.scenario.batches import targets
    from bnexplore.scenario.links import parse_link

    s, _ = parse_link(link)
    with_keras = "keras" in s["engines"]
    if with_keras:
        import keras
        import tensorflow as tf
    shape, steps, with_loss = s.shape, s["steps"], s["loss"] == "mse"
    modules = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }
    training = {"none": None, "true": True, "false": False}[s["keras_training"]]
    device = "cuda" if torch.cuda.is_available() and s["device"] != "cpu" else "cpu"

    def work() -> dict[str, dict[str, np.ndarray]]:
        rng = np.random.default_rng(s["seed"])
        bn = modules[len(shape)](
            shape[1], eps=s["torch_eps"], momentum=s["torch_momentum"], device=device
        )
        torch_sgd = _bare_optimizer(s, "torch", torch.optim, list(bn.parameters()))
        if with_keras:
            layer = keras.layers.BatchNormalization(
                momentum=s["keras_momentum"], epsilon=s["keras_eps"], dtype=s["dtype"]
            )
            keras_sgd = _bare_optimizer(s, "keras", keras.optimizers)
        fetched: dict[str, dict[str, np.ndarray]] = {"torch": {}}
        for k, target in zip(range(steps + 1), targets(s), strict=True):
            if s["input"] == "normal":
                x = (rng.standard_normal(shape) * s["std"] + s["mean"]).astype(s["dtype"])
            else:
                x = np.ones(shape, dtype=s["dtype"])
            measured = k == steps
            bn.train(not measured or s["torch_mode"] == "train")
            x_torch = torch.from_numpy(x).to(device)
            if not with_loss:
                with torch.no_grad():
                    torch_out = bn(x_torch)
            else:
                x_torch.requires_grad_(measured)
                bn.zero_grad()
                torch_out = bn(x_torch)
                t_torch = torch.from_numpy(target).to(device)
                torch.mean(torch.square(torch_out - t_torch)).backward()
                if measured:
                    grads = (x_torch.grad, bn.weight.grad, bn.bias.grad)
                    fetched["torch"] = {
                        name: g.cpu().numpy() for name, g in zip(GRADIENTS, grads, strict=True)
                    }
                else:
                    torch_sgd.step()
            if with_keras:
                x_last = tf.convert_to_tensor(np.moveaxis(x, 1, -1))
                mode = True if not measured else training
                if not with_loss:
                    keras_out = layer(x_last) if mode is None else layer(x_last, training=mode)
                    continue
                if not layer.built:
                    layer.build(x_last.shape)
                t_last = tf.convert_to_tensor(np.moveaxis(target, 1, -1))
                with tf.GradientTape() as tape:
                    tape.watch(x_last)
                    keras_out = layer(x_last) if mode is None else layer(x_last, training=mode)
                    loss = tf.reduce_mean(tf.square(keras_out - t_last))
                variables = list(layer.trainable_variables)
                grads = tape.gradient(loss, [x_last, *variables])
                if measured:
                    grad_x, *by_variable = (g.numpy() for g in grads)
                    arrays = (np.moveaxis(grad_x, -1, 1), *by_variable)
                    fetched["keras"] = dict(zip(GRADIENTS, arrays, strict=True))
                else:
                    keras_sgd.apply_gradients(zip(grads[1:], variables, strict=True))
        fetched["torch"]["output"] = torch_out.detach().cpu().numpy()
        if with_keras:
            fetched["keras"] = {
                **fetched.get("keras", {}),
                "output": np.moveaxis(keras_out.numpy(), -1, 1),
            }
        return fetched

    return work


GRADIENTS = ("grad_x", "grad_gamma", "grad_beta")


def _bare_optimizer(s, prefix: str, optimizers, parameters=None):
    """The scenario's optimizer, as a user would write it: SGD, Adam or AdamW, with the
    knobs the link sets (PyTorch's ``optimizer(parameters, lr=…)``, Keras's
    ``optimizer(learning_rate=…)``)."""
    if s["loss"] != "mse":
        return None
    kind = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[s[f"{prefix}_optimizer"]]
    rate = s[f"{prefix}_lr"]
    if parameters is None:  # Keras
        kwargs = {} if rate is None else {"learning_rate": rate}
        if kind == "SGD":
            kwargs["momentum"] = s[f"{prefix}_opt_momentum"]
        return getattr(optimizers, kind)(**kwargs)
    kwargs = {} if rate is None else {"lr": rate}
    if kind == "SGD":
        kwargs["momentum"] = s[f"{prefix}_opt_momentum"]
    return getattr(optimizers, kind)(parameters, **kwargs)


def _bare_sweep(link: str) -> Callable[[], None]:
    from bnexplore.runs import sweep
    from bnexplore.scenario.links import parse_link

    scenario, _ = parse_link(link)
    points = [sweep.at(scenario, scenario["sweep"], v)[0].link for v in sweep.values(scenario)]
    works = [bare_calls(point) for point in points]
    return lambda: [work() for work in works]


def resnet50_names() -> dict[str, int]:
    """torchvision's ResNet-50 BatchNorm names → channels: 53 layers, 26,560 channels."""
    names = {"bn1": 64}
    for stage, (planes, blocks) in enumerate(RESNET50_BLOCKS, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            names[f"{prefix}.bn1"] = planes
            names[f"{prefix}.bn2"] = planes
            names[f"{prefix}.bn3"] = 4 * planes
            if block == 0:
                names[f"{prefix}.downsample.1"] = 4 * planes
    return names


def resnet50_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A flat ResNet-50-shaped BatchNorm state_dict in torchvision's names, float32, seeded:
    γ ~ U(0.5, 1.5), β ~ N(0, 0.2), running means ~ N(0, 1), variances ~ lognormal(0, 1),
    and each layer's ``num_batches_tracked``."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, channels in resnet50_names().items():
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0.0, 0.2, channels).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0.0, 1.0, channels).astype(np.float32)
        state[f"{name}.running_var"] = rng.lognormal(0.0, 1.0, channels).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(450_360, np.int64)
    return state


@contextlib.contextmanager
def store_at(folder: str | os.PathLike) -> Iterator[None]:
    """BNEXPLORE_STORE set to ``folder`` while the block runs, then as it was."""
    before = os.environ.get("BNEXPLORE_STORE")
    os.environ["BNEXPLORE_STORE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BNEXPLORE_STORE", None)
        else:
            os.environ["BNEXPLORE_STORE"] = before


def stored_state(state: dict[str, np.ndarray], folder: str | os.PathLike) -> str:
    """``state`` saved as an .npz into the store (BNEXPLORE_STORE must name it): its digest."""
    from bnexplore.files.store import store_file

    path = Path(folder) / "state.npz"
    with open(path, "wb") as out:
        np.savez(out, **state)
    return store_file(path)


def audit_passes(scenario, run: bool = False) -> tuple[list, list[np.ndarray], list]:
    """The passes and batches the audit of ``scenario`` plans (bnexplore.judge.audit's own
    planning, caught where it hands them to infer_all), and with ``run`` their results (the
    audit run for real); without it nothing is run and the results are empty."""
    from bnexplore.engines import EngineResult
    from bnexplore.judge import audit as audit_module

    caught: dict = {}
    real = audit_module.infer_all

    def catching(passes, drawn, report=None):
        caught["passes"], caught["batches"] = list(passes), list(drawn)
        if run:
            results = real(passes, drawn, report)
        else:
            results = [EngineResult(p.engine, available=False, reason="planned") for p in passes]
        caught["results"] = results if run else []
        return results

    audit_module.infer_all = catching
    try:
        audit_module.audit(scenario)
    finally:
        audit_module.infer_all = real
    return caught.get("passes", []), caught.get("batches", []), caught.get("results", [])


def write_audit_plan(passes: list, batches: list[np.ndarray], path: str | os.PathLike) -> None:
    """The plan bnexplore.tools.bare_audit reads: per pass its engine, epsilon (the engine's
    own knob), channels and batch number; the states side by side; the batches."""
    from bnexplore.scenario.params import knobs

    names = ("weight", "bias", "running_mean", "running_var")
    with open(path, "wb") as out:
        np.savez(
            out,
            engine=np.array([p.engine for p in passes]),
            eps=np.array([p.scenario[f"{knobs(p.engine)}_eps"] for p in passes], np.float64),
            channels=np.array([len(p.state["running_var"]) for p in passes], np.int64),
            batch=np.array([p.batch for p in passes], np.int64),
            **{
                name: np.concatenate([np.asarray(p.state[name], np.float64) for p in passes])
                for name in names
            },
            **{f"x{k}": b for k, b in enumerate(batches)},
        )


def _bare_command(engine: str, plan: str | os.PathLike, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bnexplore.tools.bare_audit", engine, str(plan), *extra]


def _bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND",)}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2")}


def bare_audit_outputs(plan: str | os.PathLike, engine: str, folder: str | os.PathLike) -> dict:
    """``engine``'s bare outputs of the plan, {pass index: channels-first output}."""
    out = Path(folder) / f"bare-{engine}.npz"
    subprocess.run(
        _bare_command(engine, plan, "--outputs", str(out)),
        check=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
        env=_bare_env(),
        capture_output=True,
    )
    with np.load(out, allow_pickle=False) as saved:
        return {int(key[1:]): saved[key] for key in saved.files}


def bare_audit_seconds(
    plan: str | os.PathLike, engines: tuple[str, ...], repeat: int
) -> tuple[float, dict[str, float]]:
    """The bare side's wall time: a process per engine, each warm, all started on one ``go``
    line, until the last has answered; the median of ``repeat`` rounds, and each engine's
    own median (its process's time for its passes)."""
    import tempfile

    root = Path(__file__).parents[2]
    procs: dict[str, subprocess.Popen] = {}
    walls: list[float] = []
    own: dict[str, list[float]] = {e: [] for e in engines}
    with contextlib.ExitStack() as stack:
        logs = {e: stack.enter_context(tempfile.TemporaryFile(mode="w+")) for e in engines}
        stack.callback(_stop, procs)
        for e in engines:
            procs[e] = subprocess.Popen(
                _bare_command(e, plan),
                cwd=root,
                env=_bare_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logs[e],
                text=True,
            )

        def answer(e: str, expected: str) -> str:
            line = procs[e].stdout.readline()
            if not line.startswith(expected):
                procs[e].wait(timeout=60)
                logs[e].seek(0)
                raise RuntimeError(f"bare {e}: {line!r}; {logs[e].read()[-2000:]}")
            return line

        for e in engines:
            answer(e, "ready")
        for _ in range(repeat):
            start = time.perf_counter()
            for e in engines:
                procs[e].stdin.write("go\n")
                procs[e].stdin.flush()
            for e in engines:
                own[e].append(float(answer(e, "done").split()[1]))
            walls.append(time.perf_counter() - start)
    return statistics.median(walls), {e: statistics.median(t) for e, t in own.items()}


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    """End the bare processes: stdin closed (each then exits), killed after 30 s."""
    for p in procs.values():
        with contextlib.suppress(OSError):
            p.stdin.close()
    for p in procs.values():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def audit_row(repeat: int = 5, report: Callable[[str], None] = lambda text: None) -> dict:
    """The whole-model audit of a ResNet-50-shaped state in AUDIT_ENGINES, warm, against the
    same passes with the frameworks called directly (bnexplore.tools.bare_audit): medians of
    ``repeat`` runs, and the ratio. The state is stored in a temporary store of its own."""
    import tempfile

    from bnexplore.judge.audit import audit
    from bnexplore.scenario.links import parse_link

    with tempfile.TemporaryDirectory(prefix="bnexplore-bench-") as folder, store_at(folder):
        digest = stored_state(resnet50_state(), folder)
        link = f"?state={digest}&engines={','.join(AUDIT_ENGINES)}"
        scenario, _ = parse_link(link)
        report("bench: audit, bnexplore")
        ours = _median_seconds(lambda: audit(scenario), repeat)
        passes, batches, _ = audit_passes(scenario)
        plan = Path(folder) / "plan.npz"
        write_audit_plan(passes, batches, plan)
        report("bench: audit, bare framework calls")
        bare, per_engine = bare_audit_seconds(plan, AUDIT_ENGINES, repeat)
    return {
        "scenario": AUDIT_ROW,
        "link": f"?state={digest[:16]}…&engines={','.join(AUDIT_ENGINES)}",
        "layers": len(batches),
        "passes": len(passes),
        "passes_per_engine": {e: sum(p.engine == e for p in passes) for e in AUDIT_ENGINES},
        "bnexplore_s": ours,
        "bare_s": bare,
        "bare_per_engine_s": per_engine,
        "ratio": ours / bare,
    }


def _cold_start() -> dict:
    code = (
        "import json, time; t0 = time.perf_counter()\n"
        "import torch; t1 = time.perf_counter()\n"
        "import tensorflow, keras; t2 = time.perf_counter()\n"
        "import bnexplore; bnexplore.run('?v=1'); t3 = time.perf_counter()\n"
        "print(json.dumps({'torch_import_s': t1 - t0, 'tensorflow_import_s': t2 - t1,"
        " 'first_run_s': t3 - t2}))\n"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    return {
        "process_to_first_result_s": time.perf_counter() - start,
        **json.loads(done.stdout.strip().splitlines()[-1]),
    }


FIRST_CHART_DRAWN_JS = """() => Array.from(
    document.querySelectorAll("[data-testid='stVegaLiteChart']")
).some(chart => {
    if (chart.offsetParent === null) return false;
    const svg = chart.querySelector('svg');
    if (svg) return svg.querySelector('path, rect, line') !== null;
    const canvas = chart.querySelector('canvas');
    if (!canvas || !canvas.width || !canvas.height) return false;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return true;
    return false;
})"""
"""True once a visible chart has drawn marks (Streamlit draws Vega as SVG or canvas)."""


@contextlib.contextmanager
def served_app(
    env: dict[str, str] | None = None, script: str = "app.py", log: Path | None = None
) -> Iterator[tuple[str, float]]:
    """``streamlit run app.py`` (or ``script``) on a free port: (base URL, perf_counter at
    its start); its INFO log into ``log`` where given."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).parents[2]
    start = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            script,
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.fileWatcherType",
            "none",
            "--logger.level",
            "info" if log else "warning",
        ],
        cwd=root,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w") if log else subprocess.DEVNULL,  # noqa: SIM115 - the child's
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", start
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _browser_skip() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed"
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed"
    return None


def _goto_when_up(page, url: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            page.goto(url, timeout=5000)
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def _browser_first_chart() -> dict:
    """``streamlit run app.py`` to the first chart drawn in headless Chromium."""
    skipped = _browser_skip()
    if skipped:
        return {"skipped": skipped}
    from playwright.sync_api import sync_playwright

    with served_app() as (url, start), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        _goto_when_up(page, f"{url}/?v=1")
        # the Overview tab has no chart: the first one drawn is the Outputs tab's
        page.get_by_role("tab", name="Outputs").click(timeout=180_000)
        page.wait_for_function(FIRST_CHART_DRAWN_JS, timeout=180_000)
        seconds = time.perf_counter() - start
        browser.close()
    return {"streamlit_run_to_first_chart_s": seconds}


def settled_js(drawn: str) -> str:
    """A page-settled test for Playwright: the script idle, nothing stale, and either an
    exception box or the headline and the element ``drawn`` (a CSS selector)."""
    return f"""() => {{
    const app = document.querySelector("[data-testid='stApp']");
    if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
    if (document.querySelector("[data-stale='true'], [data-testid='stSkeleton']")) return false;
    if (document.querySelector("[data-testid='stException']")) return true;
    return document.querySelector("[data-testid='stMain'] h3") !== null
        && document.querySelector("{drawn}") !== null;
}}"""


SETTLED_JS = settled_js("[role='tabpanel']:not([hidden])")
"""The page is settled: the script idle, nothing stale, the headline and the open tab drawn."""

DESK_LINKS = (
    ("seed", "/?v=1"),
    ("32×64×28×28, normal, 3 steps", "/?v=1&shape=32,64,28,28&input=normal&steps=3"),
)
WIDGET_CHANGES = 10


def _settle(page, timeout_ms: float = 180_000) -> None:
    page.wait_for_function(SETTLED_JS, timeout=timeout_ms, polling=20)


def browser_desk(report: Callable[[str], None] = lambda text: None) -> dict:
    """The desk as a user feels it, in headless Chromium against a fresh server.

    For each link: ``streamlit run`` to its settled headline (cold start, the first
    link only), then 10 changes of Keras's epsilon in the sidebar, each timed from the
    key press to the settled page, then the first changed link revisited in a fresh
    page (its view cached by the server). Then the same on the Streamlit floor
    (bnexplore/page/floor_app.py): the page's shape with nothing computed.
    """
    skipped = _browser_skip()
    if skipped:
        return {"skipped": skipped}
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as folder:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        log = Path(folder) / "server.log"
        with served_app(log=log) as (url, start):
            began = time.time() - (time.perf_counter() - start)  # the same instant, by the clock
            rows = []
            for name, link in DESK_LINKS:
                report(f"bench: browser desk, {name}")
                rows.append(_desk_row(browser, url, name, link))
            imports = workers_ready(log.read_text(errors="replace"), began)
        report("bench: browser desk, the Streamlit floor")
        with served_app(script=str(Path(__file__).parents[1] / "page" / "floor_app.py")) as (
            url,
            _,
        ):
            floor = _desk_row(browser, url, FLOOR, "/")
        browser.close()
    cold = {  # the first link, from streamlit run
        "first_headline_s": rows[0]["headline_at"] - start,
        "real_headline_s": rows[0]["opened_s"] - start,
        "workers": imports,
        "slowest_worker_ready_s": max((w["ready_s"] for w in imports.values()), default=None),
    }
    for row in (*rows, floor):
        del row["opened_s"], row["headline_at"]
    return {
        "cold_start_to_headline_s": cold["first_headline_s"],
        "cold": cold,
        "links": rows,
        "floor": floor,
    }


READY_LINE = re.compile(r"worker (\w+) \(pid (\d+)\) ready: imported in ([\d.]+) s, at ([\d.]+)")
"""The server's INFO line when a worker has imported its framework (bnexplore.runs.pool)."""


def workers_ready(log: str, began: float) -> dict[str, dict]:
    """Each engine's first worker in the server's log: its import (Python and the framework,
    in the worker) and when it was ready, in seconds from ``began`` (streamlit run)."""
    ready: dict[str, dict] = {}
    for engine, _pid, seconds, at in READY_LINE.findall(log):
        ready.setdefault(engine, {"import_s": float(seconds), "ready_s": float(at) - began})
    return ready


FLOOR = "the Streamlit floor (nothing computed)"


def _desk_row(browser, url: str, name: str, link: str) -> dict:
    """One link's widget changes and revisit (see browser_desk)."""
    page = browser.new_context(viewport={"width": 1500, "height": 1000}).new_page()
    _goto_when_up(page, url + link)
    page.wait_for_selector("[data-testid='stMain'] h3", timeout=180_000)
    headline_at = time.perf_counter()  # the first headline: a prediction, or the real one
    _settle(page)
    opened = time.perf_counter()
    eps = page.locator(".st-key-w_keras_eps input")
    changes, revisit_link = [], None
    for i in range(WIDGET_CHANGES):
        value = f"{1e-3 + (i + 1) * 1e-4:.4g}"
        eps.fill(value)
        began = time.perf_counter()
        eps.press("Enter")
        page.wait_for_url(lambda u, v=value: f"keras_eps={v}" in u, timeout=60_000)
        _settle(page)
        changes.append(time.perf_counter() - began)
        revisit_link = revisit_link or page.url
    page.context.close()
    fresh = browser.new_context(viewport={"width": 1500, "height": 1000}).new_page()
    began = time.perf_counter()
    fresh.goto(revisit_link)
    _settle(fresh)
    revisit = time.perf_counter() - began
    fresh.context.close()
    return {
        "link": link,
        "name": name,
        "opened_s": opened,
        "headline_at": headline_at,
        "widget_change_s": changes,
        "p50_s": float(np.percentile(changes, 50)),
        "p90_s": float(np.percentile(changes, 90)),
        "revisit_s": revisit,
    }


def desk_table(desk: dict) -> str:
    """The browser desk as the README shows it (markdown)."""
    if "skipped" in desk:
        return f"browser desk: skipped ({desk['skipped']})"
    lines = [
        "| link | widget change p50 | p90 | revisited link |",
        "|---|---:|---:|---:|",
    ]
    for row in [*desk["links"], *([desk["floor"]] if "floor" in desk else [])]:
        lines.append(
            f"| {row['name']} | {row['p50_s'] * 1000:.0f} ms | {row['p90_s'] * 1000:.0f} ms | "
            f"{row['revisit_s'] * 1000:.0f} ms |"
        )
    lines += ["", f"- `streamlit run app.py` → headline: {desk['cold_start_to_headline_s']:.1f} s"]
    cold = desk.get("cold")
    if cold:
        ready = ", ".join(
            f"{engine} {w['import_s']:.1f} s (ready at {w['ready_s']:.1f} s)"
            for engine, w in cold["workers"].items()
        )
        lines += [
            f"- the real headline, every engine run: {cold['real_headline_s']:.1f} s",
            f"- the workers' imports, started with the server: {ready or 'not in the log'}",
        ]
    return "\n".join(lines)


def training_step(repeat: int) -> dict:
    """``bnexplore.run`` of the seed with one real training step (loss=mse) against the
    same scenario with a forward-only training pass: medians, and their ratio.

    The two are timed in turns (one of each, ``repeat`` times), so that load from other
    processes falls on both alike."""
    import bnexplore

    with_loss, forward_only = TRAINING_STEP
    times: dict[str, list[float]] = {with_loss: [], forward_only: []}
    for link in (with_loss, forward_only):  # warm
        bnexplore.run(link)
    for _ in range(repeat):
        for link in (with_loss, forward_only):
            start = time.perf_counter()
            bnexplore.run(link)
            times[link].append(time.perf_counter() - start)
    loss_s, baseline_s = (statistics.median(times[link]) for link in TRAINING_STEP)
    return {
        "link": with_loss,
        "baseline_link": forward_only,
        "loss_s": loss_s,
        "baseline_s": baseline_s,
        "ratio": loss_s / baseline_s,
    }


def bench(
    repeat: int = 5,
    quick: bool = False,
    browser: bool = True,
    report: Callable[[str], None] = lambda text: None,
) -> dict:
    """Run the benchmark; the result is the JSON document ``bench --json`` prints."""
    import bnexplore
    from bnexplore.engines import EngineUnavailable, load
    from bnexplore.page.view import ViewCache
    from bnexplore.scenario.links import parse_link

    load("torch")
    try:
        load("keras")
        alone = ""
    except EngineUnavailable as missing:  # a GPU machine may have PyTorch only
        report(f"bench: {missing}; timing PyTorch alone")
        alone = "&engines=torch"
    rows = []
    scenarios = SCENARIOS[:1] if quick else (*SCENARIOS, SWEEP)
    for name, base_link in scenarios:
        link = base_link + alone
        report(f"bench: {name}")
        is_sweep = "sweep=" in link
        ours = _median_seconds(
            (lambda link=link: bnexplore.sweep_run(link))
            if is_sweep
            else (lambda link=link: bnexplore.run(link)),
            1 if (quick or is_sweep) else repeat,
        )
        bare = _median_seconds(
            _bare_sweep(link) if is_sweep else bare_calls(link),
            1 if (quick or is_sweep) else repeat,
        )
        rows.append(
            {
                "scenario": name,
                "link": link,
                "bnexplore_s": ours,
                "bare_s": bare,
                "ratio": ours / bare,
            }
        )

    result_audit = None
    if not (alone or quick):  # its bare side starts a process per engine: a minute or more
        report(f"bench: {AUDIT_ROW}")
        result_audit = audit_row(repeat, report)

    report("bench: training step")
    result_training = training_step(1 if quick else repeat)

    report("bench: cached link")
    cache, (scenario, _) = ViewCache(), parse_link("?v=1")
    cache.view(scenario)
    cached_ms = 1000 * _median_seconds(lambda: cache.view(scenario), 1 if quick else 100)

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, "
        f"Python {platform.python_version()}",
        "versions": {e: load(e).version for e in (("torch",) if alone else ("torch", "keras"))},
        "device": bnexplore.run("?shape=4,3")["engines"]["torch"]["device"],
        "repeat": repeat,
        "scenarios": rows,
        "training_step": result_training,
        "audit": result_audit,
        "cached_link_ms": cached_ms,
        "targets": TARGETS,
    }
    if not quick:
        report("bench: cold start")
        result["cold_start"] = _cold_start()
        if browser:
            report("bench: streamlit run to first chart")
            try:
                result["browser"] = _browser_first_chart()
            except Exception as exc:  # noqa: BLE001 - a failed browser run is a note, not a lost bench
                result["browser"] = {"skipped": f"the browser run failed: {exc}"[:300]}
    result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def table(result: dict) -> str:
    """The bench as the README shows it (markdown)."""
    lines = [
        f"Machine: {result['machine']}; ran on {result['device']}; "
        f"{', '.join(result['versions'].values())}; medians of {result['repeat']} warm runs.",
        "",
        "| scenario | bnexplore.run | bare framework calls | ratio |",
        "|---|---:|---:|---:|",
    ]
    for row in result["scenarios"]:
        lines.append(
            f"| {row['scenario']} | {row['bnexplore_s'] * 1000:.0f} ms | "
            f"{row['bare_s'] * 1000:.0f} ms | {row['ratio']:.2f} |"
        )
    audited = result.get("audit")
    if audited:
        lines.append(
            f"| {audited['scenario']} | {audited['bnexplore_s'] * 1000:.0f} ms | "
            f"{audited['bare_s'] * 1000:.0f} ms | {audited['ratio']:.2f} |"
        )
    lines += ["", f"- cached link answered in {result['cached_link_ms']:.2f} ms"]
    step = result.get("training_step")
    if step:
        lines.append(
            f"- a loss's cost, both bnexplore: `{step['link']}` in {step['loss_s'] * 1000:.0f} ms "
            f"against `{step['baseline_link']}` in {step['baseline_s'] * 1000:.0f} ms, "
            f"{step['ratio']:.2f} ×"
        )
    cold = result.get("cold_start")
    if cold:
        lines.append(
            f"- cold start, process start to first result: "
            f"{cold['process_to_first_result_s']:.1f} s (importing torch "
            f"{cold['torch_import_s']:.1f} s, TensorFlow + Keras "
            f"{cold['tensorflow_import_s']:.1f} s, first run {cold['first_run_s']:.2f} s)"
        )
    browser = result.get("browser")
    if browser:
        shown = browser.get("streamlit_run_to_first_chart_s")
        lines.append(
            f"- `streamlit run app.py` to the first chart in Chromium: {shown:.1f} s"
            if shown is not None
            else f"- browser start: skipped ({browser['skipped']})"
        )
    lines.append(f"- peak memory of the bench process: {result['peak_memory_mib']:.0f} MiB")
    return "\n".join(lines)
