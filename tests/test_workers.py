"""Engines in worker processes: a caller that never crashes, and runs that queue and recover.

That the workers change no bit: tests/test_bits_workers.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import bnexplore
from bnexplore.runs import pool as workers
from bnexplore.runs.runner import compare
from bnexplore.runs.shipping import FILES, KEEP_AT_REST, PREFIX, shm_dir
from bnexplore.scenario.links import parse_link


def test_each_worker_names_bnexplore_and_its_engine_on_its_command_line() -> None:
    compare(parse_link("?shape=4,3&engines=torch,flax")[0], reference=False)
    for engine in ("torch", "flax"):
        (pid,) = workers.POOL.processes()[engine]
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"bnexplore.runs.worker" in words and engine.encode() in words, words


def _files_by_pid(before: set[str] = frozenset()) -> dict[int, int]:
    """Shared-memory files (those made since ``before``): bytes by the pid in their name."""
    held: dict[int, int] = {}
    for path in Path(shm_dir()).glob(PREFIX + "*"):
        if path.name not in before:
            pid = int(path.name.removeprefix(PREFIX).split("-")[0])
            held[pid] = held.get(pid, 0) + path.stat().st_size
    return held


def test_runs_keep_few_shared_memory_files_and_a_stopped_worker_leaves_none() -> None:
    """Between runs, each process keeps at most KEEP_AT_REST bytes of files for the next
    run; a worker's go when it is stopped, this process's when it exits."""
    before = {p.name for p in Path(shm_dir()).glob(PREFIX + "*")}
    for link in ("?input=normal&steps=2&engines=torch,keras,flax", "?shape=1,3", "?v=1"):
        compare(parse_link(link)[0])
    live = {os.getpid(), *(pid for pids in workers.POOL.processes().values() for pid in pids)}
    assert set(_files_by_pid(before)) <= live, (_files_by_pid(before), live)
    # kept ones included, whichever run made them (an earlier test's may be taken again)
    held = {pid: size for pid, size in _files_by_pid().items() if pid in live}
    assert all(size <= KEEP_AT_REST for size in held.values()), held
    assert held.get(os.getpid(), 0) > 0 and FILES.kept_bytes() <= KEEP_AT_REST  # the seed's batch
    (flax,) = workers.POOL.processes()["flax"]
    workers.POOL.stop(["flax"])
    assert flax not in _files_by_pid(before)
    compare(parse_link("?shape=1,3&engines=torch,flax")[0])  # a fresh Flax worker
    FILES.clear()
    assert os.getpid() not in _files_by_pid(before)


def test_runs_of_the_same_engine_queue_for_its_one_worker() -> None:
    links = [f"?shape=16,8,8&input=normal&seed={i}&steps=3&engines=torch" for i in range(6)]
    serial = [bnexplore.run(link) for link in links]
    results: dict[int, dict] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, bnexplore.run(links[i])))
        for i in range(len(links))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [results[i] for i in range(len(links))] == serial
    assert len(workers.POOL.processes()["torch"]) == 1


LINK = "?shape=8,4,5,5&input=normal&mean=3&seed=5&steps=3&engines=torch,keras_jax,flax"


def _kill(engine: str) -> int:
    """SIGKILL the engine's worker and wait until it has exited, every thread of it: a big
    process takes a while, longer on a busy machine, and a run started meanwhile would still
    find it there."""
    (pid,) = workers.POOL.processes()[engine]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


def _exited(pid: int) -> bool:
    """Has our child ``pid`` exited? Asked without reaping it (WNOWAIT): its Popen still does."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


def test_a_worker_killed_between_runs_is_restarted_with_the_same_numbers() -> None:
    before = bnexplore.run(LINK, reference=True)
    killed = _kill("keras_jax")
    after = bnexplore.run(LINK, reference=True)
    assert after == before
    assert workers.POOL.processes()["keras_jax"] != [killed]


def test_a_worker_killed_during_a_run_is_that_engines_error_and_the_next_run_recovers() -> None:
    slow = "?shape=64,16,16,16&input=normal&seed=1&steps=400&engines=torch,flax&flax_momentum=0.5"
    expected = bnexplore.run(LINK, reference=True)
    compare(parse_link(slow)[0], reference=False)  # warm: the workers exist
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(doc=bnexplore.run(slow)))
    run.start()
    time.sleep(1.0)
    killed = _kill("flax")
    run.join(timeout=300)
    doc = outcome["doc"]
    flax = doc["engines"]["flax"]
    assert flax["available"] and flax["error"].startswith("worker for Flax"), flax
    assert f"pid {killed}" in flax["error"] and "SIGKILL" in flax["error"], flax["error"]
    assert doc["engines"]["torch"]["error"] is None  # the other engine ran on
    (pair,) = doc["divergence"]
    assert "Flax raised an error" in pair["reason"]
    assert bnexplore.run(LINK, reference=True) == expected


def test_a_worker_that_hangs_past_the_time_limit_is_stopped_and_replaced(monkeypatch) -> None:
    expected = bnexplore.run(LINK)
    (pid,) = workers.POOL.processes()["flax"]
    os.kill(pid, signal.SIGSTOP)  # a hang, as the caller sees one
    monkeypatch.setenv("BNEXPLORE_TIME_LIMIT", "3")
    started = time.monotonic()
    doc = bnexplore.run(LINK)
    assert time.monotonic() - started < 60
    error = doc["engines"]["flax"]["error"]
    assert error.startswith("worker for Flax") and "time limit of 3 s" in error, error
    (torch_pid,) = workers.POOL.processes()["torch"]
    # the run is past its limit, so PyTorch stops too, but its healthy worker lives on
    assert doc["engines"]["torch"]["error"].startswith("stopped: the run reached its time limit")
    assert any("time limit of 3 s" in n for n in doc["notices"]), doc["notices"]
    monkeypatch.delenv("BNEXPLORE_TIME_LIMIT")
    assert bnexplore.run(LINK) == expected
    assert pid not in workers.POOL.processes()["flax"]
    assert workers.POOL.processes()["torch"] == [torch_pid]


def test_batches_reach_the_workers_through_shared_memory(monkeypatch) -> None:
    """The step messages carry a path, never the batch: a 1 MiB batch, messages of bytes."""
    sent: list[int] = []
    original = workers.Worker.send

    def measuring(self, message):
        sent.append(len(repr(message)))
        return original(self, message)

    monkeypatch.setattr(workers.Worker, "send", measuring)
    scenario = parse_link("?shape=64,16,16,16&input=normal&steps=2&engines=torch,keras")[0]
    result = compare(scenario, reference=False)
    assert result.results["torch"].output.nbytes == 64 * 16 * 16 * 16 * 4
    assert max(sent) < 4096, max(sent)


def test_outputs_from_workers_are_writable_arrays_of_the_scenarios_dtype() -> None:
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        link = f"?shape=32,4,30,30&input=normal&dtype={dtype}&engines=torch,keras,flax"
        comparison = compare(parse_link(link)[0], reference=False)
        for name, result in comparison.results.items():
            assert result.output.dtype.name == dtype, (name, dtype)
            assert result.output.flags.writeable, name  # mapped from shared memory, private
            assert result.output.shape == (32, 4, 30, 30)
            assert np.isfinite(result.output.astype(np.float64)).all(), (name, dtype)


def test_start_early_starts_the_links_workers_and_never_waits(monkeypatch) -> None:
    """app.py starts the link's workers before its own imports: one per engine that has
    none (PyTorch's too where Keras 3 starts from its state), never waiting for a busy one."""
    started: list[str] = []

    class Spawned:
        alive = True

        def __init__(self, engine: str) -> None:
            self.engine = engine
            started.append(engine)

    pool = workers.Pool()
    monkeypatch.setattr(workers, "POOL", pool)
    monkeypatch.setattr(workers, "Worker", Spawned)
    workers.start_early([("engines", "torch,flax")])
    assert sorted(started) == ["flax", "torch"]
    pool.acquire(["torch"])  # its only worker busy with a run: start_early goes on
    workers.start_early([("engines", "torch,keras")])
    assert sorted(started) == ["flax", "keras", "torch"]
    workers.start_early([("engines", "nonsense")])  # a bad link: its defaults, already up
    assert sorted(started) == ["flax", "keras", "torch"]
    monkeypatch.setattr(workers, "POOL", workers.Pool())
    workers.start_early([("engines", "keras_jax"), ("keras_init", "torch")])
    assert sorted(started[3:]) == ["keras_jax", "torch"]


def test_keras_runs_without_the_imports_its_worker_hides() -> None:
    """worker.UNUSED_IMPORTS: Keras 3 and Keras 2 on TensorFlow run with jax, pandas and
    IPython unimportable, as in their workers."""
    code = (
        "import sys\n"
        "from bnexplore.runs.worker import UNUSED_IMPORTS\n"
        "for module in UNUSED_IMPORTS['keras']: sys.modules[module] = None\n"
        "import bnexplore\n"
        "doc = bnexplore.run('?shape=4,3,2,2&input=normal&engines=keras,keras2&steps=1"
        "&loss=mse&keras_optimizer=adam&keras2_optimizer=adam')\n"
        "assert all(e['error'] is None for e in doc['engines'].values()), doc['engines']\n"
        "assert all(sys.modules[m] is None for m in ('jax', 'pandas', 'IPython'))\n"
    )
    env = {**os.environ, "BNEXPLORE_WORKERS": "0", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kept_files_are_the_most_recent_within_the_limit() -> None:
    """shipping.Files: a file of the same size is taken again; the oldest go first past the
    limit; one larger than the limit alone is deleted at once, and the others stay."""
    from bnexplore.runs.shipping import Files

    files = Files(keep=1000)
    a, b = files.take(400), files.take(400)
    files.give(a, 400)
    files.give(b, 400)
    assert files.take(400) == b and files.take(400) == a  # the most recent first, then the other
    files.give(a, 400)
    files.give(b, 400)
    big = files.take(5000)
    files.give(big, 5000)
    assert not Path(big).exists() and Path(a).exists() and files.kept_bytes() == 800
    c = files.take(300)
    files.give(c, 300)  # 1100 > 1000: the oldest, a, goes
    assert not Path(a).exists() and Path(b).exists() and files.kept_bytes() == 700
    files.clear()
    assert not Path(b).exists() and not Path(c).exists()


def test_a_worker_stopped_by_sigterm_deletes_its_files_and_orphans_are_swept() -> None:
    """A worker sent SIGTERM (a process group stopped from outside) deletes its shared-memory
    files; the files of a process that no longer runs are deleted once an hour old."""
    from bnexplore.runs.shipping import remove_orphans

    compare(parse_link("?v=1&engines=torch")[0])  # its output file is lent, then kept
    (pid,) = workers.POOL.processes()["torch"]
    assert list(Path(shm_dir()).glob(f"{PREFIX}{pid}-*"))
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    assert not list(Path(shm_dir()).glob(f"{PREFIX}{pid}-*"))

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(gone.stdout)
    old, young, ours = (
        Path(shm_dir()) / f"{PREFIX}{dead}-old",
        Path(shm_dir()) / f"{PREFIX}{dead}-young",
        Path(shm_dir()) / f"{PREFIX}{os.getpid()}-old",
    )
    for path in (old, young, ours):
        path.write_bytes(b"x")
    for path in (old, ours):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    try:
        assert remove_orphans() >= 1
        assert not old.exists() and young.exists() and ours.exists()
    finally:
        for path in (young, ours):
            path.unlink(missing_ok=True)


def _resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_worker_keeps_freed_buffers_during_a_run_and_hands_them_back_when_idle() -> None:
    """Buffers below MMAP_ABOVE stay on a worker's heap from pass to pass; once it has had no
    request for IDLE_TRIM_S, it hands them back (its resident memory returns to idle)."""
    from bnexplore.runs import worker

    link = "?engines=torch&shape=16,16,128,128&input=normal&steps=3"  # 16 MiB a tensor
    compare(parse_link(link)[0], reference=False)  # the worker up, its first-run costs paid
    (pid,) = workers.POOL.processes()["torch"]
    time.sleep(worker.IDLE_TRIM_S + 1.0)
    idle = _resident_mib(pid)
    compare(parse_link(link)[0], reference=False)
    held = _resident_mib(pid)  # no request since: within IDLE_TRIM_S the buffers are kept
    time.sleep(worker.IDLE_TRIM_S + 1.0)
    after = _resident_mib(pid)
    assert held > idle + 16, (idle, held)
    assert after < idle + 8, (idle, held, after)
