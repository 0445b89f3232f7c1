"""precompute on a real dask.distributed cluster: a `dask scheduler` and two `dask worker`
processes started as a user starts them, and `python -m pipeline precompute --scheduler ...`.

The cluster's store must equal a single-process store array by array, bit for bit; both workers
must have done work (the scheduler's task stream and the workers' pids say so); a worker-side
error must reach the command line as one line; a worker SIGKILLed mid-run must not change the
result; and every process started here must be gone afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.data import splits
from pipeline.distill_inputs import open_teacher_store
from pipeline.precompute import TeacherLogits, precompute
from storage import open_store
from storage.parallel import task_resources
from tests.stages.common import ROOT, TINY, assert_same_store, build_tiny_run, raw_arrays

DASK = Path(sys.executable).parent / "dask"
# float32: bit-exact comparisons are about the logits, not float16 rounding; 2 chunks of 32 rows
# per shard: 4 shards per view, 8 tasks for two workers. One ONNX Runtime thread per process:
# the machine running the tests may have 2 cores.
SETTINGS = [
    "precompute.encoding=float32",
    "precompute.chunks_per_shard=2",
    "precompute.threads=1",
]


def _args(stage: str, run_dir: Path | str) -> list[str]:
    sets = [f"run_dir={run_dir}", *SETTINGS]
    return [stage, "--config", str(TINY), *[a for s in sets for a in ("--set", s)]]


def _copy_teacher(run: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("teacher.onnx", "teacher.onnx.parity.json"):
        shutil.copy2(run / name, dest / name)
    return dest


# ---- producers the workers import from this module (PYTHONPATH=ROOT on the workers) ----------
@dataclass
class OnnxMissingOnWorkers(TeacherLogits):
    """A worker machine where the ONNX file's folder is not mounted: the path it receives does
    not exist there (the coordinator read the real file)."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if "not-mounted" not in self.onnx_path:  # dask may pickle a pickled copy again
            missing = Path(self.onnx_path).parent / "not-mounted" / "teacher.onnx"
            state["onnx_path"] = str(missing)
        return state


@dataclass
class SlowTeacherLogits(TeacherLogits):
    """Announces each task (a file named after its worker's pid) and takes its time, so that the
    test can SIGKILL a worker while it computes."""

    def __call__(self, view: int, start: int, stop: int):
        markers = Path(self.onnx_path).parent / "started"
        markers.mkdir(exist_ok=True)
        (markers / f"{os.getpid()}-{view}-{start}").touch()
        time.sleep(0.5)
        return super().__call__(view, start, stop)


def _sessions_kept() -> int:
    import pipeline.precompute

    return len(pipeline.precompute._LOADED)


# ---- the cluster ---------------------------------------------------------------------------------
class Cluster:
    """`dask scheduler` + two `dask worker` processes, each in its own process session so that it
    and its children (the nanny's worker process) are stopped together."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scheduler_file = root / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.client = None

    def _spawn(self, name: str, *argv: str, env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),  # this test module, for the producers defined above
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        self.procs.append(
            subprocess.Popen(
                [str(DASK), *argv],
                cwd=self.root,  # not the project: paths that reach workers must be absolute
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()

    def start(self) -> None:
        from distributed import Client

        self._spawn(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(self.scheduler_file),
        )
        deadline = time.monotonic() + 60
        while not self.scheduler_file.is_file():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start: {self.logs()}")
            time.sleep(0.1)
        # The README's recipe: one worker per GPU, pinned with CUDA_VISIBLE_DEVICES and offering
        # a GPU resource (here there is no GPU: ONNX Runtime's auto provider falls back to CPU).
        for i in range(2):
            self._spawn(
                f"worker{i}",
                "worker",
                "--resources",
                "GPU=1",
                "--scheduler-file",
                str(self.scheduler_file),
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--death-timeout",
                "30",
                "--name",
                f"w{i}",
                "--local-directory",
                str(self.root / f"w{i}"),
                env={"CUDA_VISIBLE_DEVICES": str(i)},
            )
        self.client = Client(scheduler_file=str(self.scheduler_file), timeout="30s")
        self.client.wait_for_workers(2, timeout=90)

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def worker_pids(self) -> dict[str, int]:
        """Worker address → pid of the process that runs its tasks."""
        return self.client.run(os.getpid)

    def logs(self) -> str:
        return " | ".join(
            f"{p.name}: {p.read_text(errors='replace')[-600:]}" for p in self.root.glob("*.log")
        )

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        sessions = [p.pid for p in self.procs]
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        # The nannies' worker processes share their sessions; none may outlive the test.
        deadline = time.monotonic() + 15
        while (left := _alive_in(sessions)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        assert not _alive_in(sessions), f"processes left behind: {_alive_in(sessions)}"


def _alive_in(sessions: list[int]) -> list[int]:
    """Live (non-zombie) processes of these process sessions."""
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(proc.pid) in sessions and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Teacher, export, and the single-process store every cluster store must equal."""
    quiet = lambda stage, run_dir: [*_args(stage, run_dir), "--quiet"]
    return build_tiny_run(tmp_path_factory.mktemp("tiny"), quiet)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        started.start()
        yield started
    finally:
        started.stop()


# ---- tests ---------------------------------------------------------------------------------------
def test_cluster_store_equals_one_process(run: Path, cluster: Cluster, tmp_path: Path) -> None:
    _copy_teacher(run, tmp_path / "cluster")
    cluster.client.get_task_stream()  # the scheduler records tasks from now on
    t0 = time.time()
    # Exactly the user's command, from another directory, with a relative run_dir: the workers
    # (started elsewhere) must get absolute paths.
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            *_args("precompute", "cluster"),
            "--scheduler",
            cluster.address,
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:] + cluster.logs()
    assert_same_store(tmp_path / "cluster" / "store.zarr", run / "store.zarr")

    # The scheduler ran the tasks on both workers, and they are two other processes.
    pids = cluster.worker_pids()
    stream = cluster.client.get_task_stream(start=t0)
    by_worker: dict[str, int] = {}
    for task in stream:
        if str(task["key"]).startswith("produce_and_write"):
            by_worker[task["worker"]] = by_worker.get(task["worker"], 0) + 1
    assert set(by_worker) == set(pids), (by_worker, pids)
    assert sum(by_worker.values()) == 8
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    workers = cluster.client.scheduler_info()["workers"]
    assert all(w["resources"] == {"GPU": 1} for w in workers.values()), workers
    # The workers dropped their sessions when the run ended.
    assert set(cluster.client.run(_sessions_kept).values()) == {0}
    # The coordinator's summary names the same worker processes.
    summary = next(line for line in child.stdout.splitlines() if line.startswith("dask: "))
    assert "8 shard(s) on 2 worker(s)" in summary, summary
    assert {int(p) for p in re.findall(r"pid (\d+)", summary)} == set(pids.values()), summary
    # A rerun has nothing left to do and changes nothing.
    rerun = [*_args("precompute", tmp_path / "cluster"), "--quiet", "--scheduler", cluster.address]
    assert main(rerun) == 0
    assert_same_store(tmp_path / "cluster" / "store.zarr", run / "store.zarr")


def test_worker_side_error_is_one_line(
    run: Path, cluster: Cluster, tmp_path: Path, monkeypatch, capsys
) -> None:
    _copy_teacher(run, tmp_path / "unmounted")
    monkeypatch.setattr("pipeline.precompute.TeacherLogits", OnnxMissingOnWorkers)
    argv = [*_args("precompute", tmp_path / "unmounted"), "--quiet", "--scheduler", cluster.address]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in ("not-mounted/teacher.onnx", "is not readable on", "dask worker tcp://"):
        assert needle in err, err
    assert re.search(r"view \d rows \d+\.\.\d+", err), err
    with open_store(tmp_path / "unmounted" / "store.zarr") as store:
        assert not store.done.any()  # nothing was marked done; a rerun starts over


def test_worker_killed_mid_run_gives_the_same_store(
    run: Path, cluster: Cluster, tmp_path: Path, monkeypatch
) -> None:
    run_dir = _copy_teacher(run, tmp_path / "killed")
    monkeypatch.setattr("pipeline.precompute.TeacherLogits", SlowTeacherLogits)
    config = load_config(
        TINY, [f"run_dir={run_dir}", *SETTINGS, f"precompute.scheduler={cluster.address}"]
    )
    before = cluster.worker_pids()
    errors: list[BaseException] = []

    def coordinator() -> None:
        try:
            precompute(config, progress=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=coordinator)
    thread.start()
    markers = run_dir / "started"
    deadline = time.monotonic() + 120
    while not (markers.is_dir() and any(markers.iterdir())):
        assert time.monotonic() < deadline and thread.is_alive(), (errors, cluster.logs())
        time.sleep(0.05)
    victim = int(next(markers.iterdir()).name.split("-")[0])
    assert victim in before.values()
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=240)
    assert not thread.is_alive()
    print(f"killed worker pid {victim}; the run ended with {errors or 'no error'}")
    if errors:  # the run may end in an error; a rerun must then resume and finish
        assert "rerun" in str(errors[0]), errors
        precompute(config, progress=False)
    assert_same_store(run_dir / "store.zarr", run / "store.zarr")
    # The killed worker's shard was started again by another process.
    started = [m.name.split("-", 1) for m in markers.iterdir()]
    shard = next(s for p, s in started if int(p) == victim)
    assert any(s == shard and int(p) != victim for p, s in started), started
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    # The nanny replaced the killed worker process, and both workers took part again.
    cluster.client.wait_for_workers(2, timeout=60)
    assert victim not in cluster.worker_pids().values()


def test_a_store_url_from_the_cluster_is_read_by_distill(
    run: Path, cluster: Cluster, tmp_path: Path
) -> None:
    """`precompute.store` takes an fsspec URL: the workers write it, distill reads it."""
    run_dir = _copy_teacher(run, tmp_path / "run")
    url = f"file://{tmp_path}/shared/store.zarr"
    argv = [*_args("precompute", run_dir), "--quiet", "--set", f"precompute.store={url}"]
    assert main([*argv, "--scheduler", cluster.address]) == 0
    assert_same_store(tmp_path / "shared" / "store.zarr", run / "store.zarr")
    assert not (run_dir / "store.zarr").exists()
    # One process into an object store (memory:// stands in for s3://), then distill's reader.
    memory = f"memory://logitbank-{tmp_path.name}/store.zarr"
    assert (
        main([*_args("precompute", run_dir), "--quiet", "--set", f"precompute.store={memory}"]) == 0
    )
    want = raw_arrays(run / "store.zarr")
    for name, got in raw_arrays(memory).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    for store_url in (url, memory):
        config = load_config(TINY, [f"run_dir={run_dir}", *SETTINGS, f"distill.store={store_url}"])
        train, _ = splits(config)
        store, views, _ = open_teacher_store(config, train)
        with store:
            assert store.path == store_url and views == 2
            rows = np.arange(len(train))
            np.testing.assert_array_equal(store.read(rows, view=1), want["logits"][1])


def test_a_worker_builds_its_session_once_per_run(run: Path) -> None:
    """Each task gets its own unpickled producer; the worker's session and dataset are reused
    across them, and dropped by release()."""
    config = load_config(TINY, [f"run_dir={run}", *SETTINGS])
    train, _ = splits(config)
    with open_store(run / "store.zarr") as store:
        sha = store.fingerprint["onnx_sha256"]
    produce = TeacherLogits(str(run / "teacher.onnx"), train, 64, "cpu", 1, onnx_sha256=sha)
    try:
        first, second = (pickle.loads(pickle.dumps(produce)) for _ in range(2))
        logits, params = first(0, 0, 64)
        second(1, 0, 64)
        assert second.runner is first.runner and second.split is first.split
        TeacherLogits.release()
        third = pickle.loads(pickle.dumps(produce))
        again, params_again = third(0, 0, 64)
        assert third.runner is not first.runner
        np.testing.assert_array_equal(again, logits)
        np.testing.assert_array_equal(params_again, params)
        np.testing.assert_array_equal(again, raw_arrays(run / "store.zarr")["logits"][0, :64])
    finally:
        TeacherLogits.release()


def test_gpu_workers_get_one_task_per_gpu() -> None:
    """Workers started with `--resources GPU=1` get precompute tasks one per GPU at a time, and
    workers without a GPU none; a cluster without GPUs has no constraint."""
    gpu = {"resources": {"GPU": 1}}
    cpu = {"resources": {}}
    assert task_resources({"a": gpu, "b": cpu}) == {"GPU": 1}
    assert task_resources({"a": cpu, "b": {}}) is None
