"""The workers change no bit: each golden link, run through the engines' workers and run
in-process on the machine that runs the tests, at the workers' thread counts, gives the same
results bit for bit (every array's dtype, shape and bytes; every other field equal).

PyTorch, Keras 3 on TensorFlow and Keras 2 run in this process (``BNEXPLORE_WORKERS=0``). Keras
3 on JAX and on PyTorch, and Flax, cannot run beside them (a Keras backend is chosen once per
process; TensorFlow imports JAX, for TFLite, before Flax can enable float64), so each runs in a
process of its own, started with its worker's environment. See docs/testing.md."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bnexplore import engines
from bnexplore.engines import EngineResult
from bnexplore.runs import pool as workers
from bnexplore.runs.runner import compare
from bnexplore.runs.worker import thread_counts
from bnexplore.scenario.links import Scenario, parse_link
from tests.record_golden import LINKS, comparison

IN_THIS_PROCESS = ("torch", "keras", "keras2")
IN_OWN_PROCESS = ("keras_jax", "keras_torch", "flax")
THREAD_KEYS = ("torch_intra_op", "tf_intra_op", "tf_inter_op")


def worker_thread_counts(engine: str) -> dict[str, int]:
    """The thread counts the engine's worker (started if need be) runs with now."""
    (worker,) = workers.POOL.acquire([engine]).values()
    try:
        worker.send(("ping", 0))
        info = worker.reply(0, time.monotonic() + 120)[2]
    finally:
        workers.POOL.release([worker])
    return {key: info[key] for key in THREAD_KEYS if key in info}


def worker_environment(engine: str) -> dict[str, str]:
    """The environment the engine's worker was started with, as the kernel keeps it."""
    worker_thread_counts(engine)  # a worker is up
    (pid, *_) = workers.POOL.processes()[engine]
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


def use_thread_counts(counts: dict[str, int]) -> dict[str, int]:
    """Set the frameworks this process imported to ``counts`` (a worker's); what they use now.

    TensorFlow takes a new count only before its runtime starts; a count it cannot take shows
    in the answer."""
    torch, tf = sys.modules.get("torch"), sys.modules.get("tensorflow")
    if torch is not None and counts.get("torch_intra_op", torch.get_num_threads()) != (
        torch.get_num_threads()
    ):
        torch.set_num_threads(counts["torch_intra_op"])
    if tf is not None:
        threading = tf.config.threading
        for key, kind in (("tf_intra_op", "intra_op"), ("tf_inter_op", "inter_op")):
            now = getattr(threading, f"get_{kind}_parallelism_threads")()
            if key in counts and now != counts[key]:
                with contextlib.suppress(RuntimeError):  # its runtime started: the answer says so
                    getattr(threading, f"set_{kind}_parallelism_threads")(counts[key])
    now = thread_counts()
    return {key: now[key] for key in counts if key in now}


def value_problems(expected, actual, where: str) -> list[str]:
    """Where two values differ in any bit: arrays in dtype, shape or bytes, floats in their
    64 bits, dicts key by key, anything else in type or value."""
    if type(expected) is not type(actual):
        return [f"{where}: {type(expected).__name__} then, {type(actual).__name__} now"]
    if isinstance(expected, dict):
        if list(expected) != list(actual):
            return [f"{where}: keys {list(expected)} then, {list(actual)} now"]
        return [p for k in expected for p in value_problems(expected[k], actual[k], f"{where}.{k}")]
    if isinstance(expected, np.ndarray | np.generic):
        expected, actual = np.asarray(expected), np.asarray(actual)
        if (expected.dtype, expected.shape) != (actual.dtype, actual.shape):
            then, now = f"{expected.dtype}{expected.shape}", f"{actual.dtype}{actual.shape}"
            return [f"{where}: {then} then, {now} now"]
        bits = f"u{expected.dtype.itemsize}"
        apart = np.ascontiguousarray(expected).view(bits) != np.ascontiguousarray(actual).view(bits)
        if not apart.any():
            return []
        first = tuple(int(i) for i in np.argwhere(apart)[0])
        return [
            f"{where}: {int(apart.sum())} of {apart.size} elements differ in their bits "
            f"(first at {first}: {expected[first]!r} then, {actual[first]!r} now)"
        ]
    if isinstance(expected, float):
        same = struct.pack("<d", expected) == struct.pack("<d", actual)
    else:
        same = expected == actual
    return [] if same else [f"{where}: {expected!r} then, {actual!r} now"]


def bit_problems(expected: dict[str, EngineResult], actual: dict[str, EngineResult]) -> list[str]:
    """Where two runs' results (engine → result) differ in any bit of any field."""
    if list(expected) != list(actual):
        return [f"engines {list(expected)} then, {list(actual)} now"]
    return [
        p
        for name, result in expected.items()
        for field in dataclasses.fields(EngineResult)
        for p in value_problems(
            getattr(result, field.name), getattr(actual[name], field.name), f"{name}.{field.name}"
        )
    ]


@pytest.fixture(scope="module")
def workers_thread_counts_here():
    """This process's PyTorch and TensorFlow, loaded, at the thread counts of their workers."""
    wanted: dict[str, int] = {}
    for engine in IN_THIS_PROCESS:
        for key, count in worker_thread_counts(engine).items():
            assert wanted.setdefault(key, count) == count, (engine, key, wanted[key], count)
        engines.load(engine)
    torch_before = sys.modules["torch"].get_num_threads()
    assert use_thread_counts(wanted) == wanted, "this process cannot take the workers' counts"
    yield wanted
    sys.modules["torch"].set_num_threads(torch_before)


def bits_apart_from_in_process(link: str, through_workers: dict, monkeypatch) -> list[str]:
    """The link's results through the workers against the same run in this process."""
    with monkeypatch.context() as patched:
        patched.setenv("BNEXPLORE_WORKERS", "0")
        in_process = compare(parse_link(link)[0], reference=False).results
    return bit_problems(in_process, through_workers)


@pytest.mark.parametrize("link", LINKS, ids=lambda link: link[:60])
def test_torch_keras_and_keras2_give_in_their_workers_the_bits_they_give_in_process(
    link: str, workers_thread_counts_here, monkeypatch
) -> None:
    assert workers.workers_per_engine() > 0  # comparison(link) runs in the workers
    through_workers = comparison(link).results
    assert set(through_workers) <= set(IN_THIS_PROCESS)
    assert bits_apart_from_in_process(link, through_workers, monkeypatch) == []


def alone(engine: str, link: str) -> Scenario:
    """The link's scenario with ``engine`` its one engine (a port still takes PyTorch's state)."""
    return parse_link(link)[0].replace(engines=(engine,))


def run_in_own_process(engine: str, counts: dict[str, int], out: Path) -> None:
    """In a process of its own: the golden links with ``engine`` alone, in-process, at the
    workers' thread counts; their results and the counts used, pickled into ``out``."""
    os.environ["BNEXPLORE_WORKERS"] = "0"
    scenarios = {link: alone(engine, link) for link in LINKS}
    engines.load(engine)
    if any(s.ports for s in scenarios.values()):
        engines.load("torch")  # the port's source runs here too
    use_thread_counts(counts)
    results = {link: compare(s, reference=False).results for link, s in scenarios.items()}
    out.write_bytes(pickle.dumps({"threads": thread_counts(), "results": results}))


@pytest.mark.parametrize("engine", IN_OWN_PROCESS)
def test_keras_on_jax_and_on_torch_and_flax_give_in_their_workers_the_bits_of_their_own_process(
    engine: str, tmp_path: Path
) -> None:
    engine_counts = worker_thread_counts(engine)
    counts = {**worker_thread_counts("torch"), **engine_counts}  # torch: a port's source
    out, log = tmp_path / "in_process.pickle", tmp_path / "stderr.txt"
    code = "import sys; from tests.test_bits_workers import main; main(sys.argv[1:])"
    with log.open("w") as stderr:
        own = subprocess.Popen(
            [sys.executable, "-c", code, engine, json.dumps(counts), str(out)],
            env={**worker_environment(engine), "BNEXPLORE_WORKERS": "0"},
            cwd=workers.PACKAGE_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:  # the workers' side meanwhile
        through_workers = {
            link: compare(alone(engine, link), reference=False).results for link in LINKS
        }
        own.wait(timeout=600)
    finally:
        own.kill()
    assert own.returncode == 0, log.read_text()[-3000:]
    in_process = pickle.loads(out.read_bytes())
    used = in_process["threads"]
    assert engine_counts.items() <= used.items() and used == {k: counts[k] for k in used}
    problems = [
        f"{link}: {p}"
        for link in LINKS
        for p in bit_problems(in_process["results"][link], through_workers[link])
    ]
    assert problems == []


def one_ulp_up(array: np.ndarray, index: int = 0) -> np.ndarray:
    """A copy with one element moved to the next float towards +inf."""
    nudged = array.copy()
    nudged.flat[index] = np.nextafter(nudged.flat[index], np.inf, dtype=nudged.dtype)
    return nudged


def test_one_ulp_in_one_element_of_an_output_or_a_running_statistic_is_reported() -> None:
    link = "?shape=4,3,2&input=normal&steps=2&engines=torch,keras,keras2"
    results = compare(parse_link(link)[0], reference=False).results
    assert bit_problems(results, dict(results)) == []
    for name, result in results.items():
        for field in ("output", "running_mean", "running_var"):
            nudged = dataclasses.replace(result, **{field: one_ulp_up(getattr(result, field), 1)})
            problems = bit_problems(results, {**results, name: nudged})
            assert len(problems) == 1 and problems[0].startswith(f"{name}.{field}: 1 of"), problems


def test_a_worker_output_one_ulp_off_fails_the_comparison_with_the_in_process_run(
    workers_thread_counts_here, monkeypatch
) -> None:
    """The worker's Keras 2 output comes back with its last element one ulp up: the same
    comparison as the golden links' finds it, and nothing else."""
    link = "?shape=8,3,4&input=normal&seed=2&steps=1&engines=torch,keras,keras2"
    received = workers.received

    def one_ulp_off(message):
        message = received(message)
        if message[0] != "result" or message[2].name != "keras2":
            return message
        result = message[2]
        return (*message[:2], dataclasses.replace(result, output=one_ulp_up(result.output, -1)))

    with monkeypatch.context() as patched:
        patched.setattr(workers, "received", one_ulp_off)
        through_workers = compare(parse_link(link)[0], reference=False).results
    (problem,) = bits_apart_from_in_process(link, through_workers, monkeypatch)
    assert problem.startswith("keras2.output: 1 of 96 elements differ in their bits"), problem


def test_workers_keep_each_frameworks_default_thread_counts() -> None:
    """worker.py sets no thread count: a worker's are those its framework picks by itself in a
    fresh process on this machine (PyTorch's intra-op count; TensorFlow's 0, its runtime's own
    choice), which the in-process runs above take."""
    env = {**os.environ, "PYTHONPATH": workers.PACKAGE_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for framework, engines_of_it in (
        ("torch", ("torch", "keras_torch")),
        ("tensorflow", ("keras", "keras2")),
    ):
        code = (
            f"import json, {framework}\n"
            "from bnexplore.runs.worker import thread_counts\n"
            "print(json.dumps(thread_counts()))\n"
        )
        fresh = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert fresh.returncode == 0, fresh.stderr[-2000:]
        defaults = json.loads(fresh.stdout.splitlines()[-1])
        for engine in engines_of_it:
            assert worker_thread_counts(engine) == defaults, engine


def main(argv: list[str]) -> None:
    engine, counts, out = argv
    run_in_own_process(engine, json.loads(counts), Path(out))
