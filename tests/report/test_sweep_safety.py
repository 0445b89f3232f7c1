"""Sweep, launch, CLI, Makefile and report under misuse: two trainers of one student folder,
a retrained teacher's store, disk and folder errors inside a sweep, out-of-range seeds, quoted or
spaced run folders, SET words with shell characters, a stopped ``sweep --nproc``, damaged
metrics files. Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.__main__ import main
from tests.report.conftest import REPO, TINY, argv

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# ---- 1. sweep: a student of another teacher store is not "already finished" ----------------


def test_a_student_whose_store_moved_away_is_not_of_another_config(tiny_store, tmp_path, capsys):
    """Its store moved away (e.g. to free disk): distill and sweep say the store is missing; they
    said "a finished run with another config ... delete the folder", which would throw away a
    finished student (the key fell back to the config's chunk_rows without a store)."""
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store / "store.zarr", store)
    run = tmp_path / "run"
    sets = (
        f"distill.store={store}",
        "distill.method=kd",
        "distill.epochs=1",
        "precompute.chunk_rows=null",
    )
    assert main(argv("distill", run, *sets)) == 0
    store.rename(tmp_path / "moved.zarr")
    capsys.readouterr()
    for stage, extra in (
        ("distill", ()),
        ("sweep", ("sweep.runs=[{method: kd, epochs: 1}]", "sweep.seeds=[0]")),
    ):
        assert main(argv(stage, run, *sets, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(
            f"{store} does not exist: give the path of a store made by precompute (a .zarr "
            "directory or an .h5 file)"
        ), err
        assert "another config" not in err


def test_sweep_does_not_skip_a_student_of_another_teacher_store(tiny_store, tmp_path, capsys):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store / "store.zarr", store)
    run = tmp_path / "run"
    sets = (f"distill.store={store}", "sweep.runs=[{method: kd, epochs: 1}]", "sweep.seeds=[0]")
    assert main(argv("sweep", run, *sets)) == 0
    # The teacher retrained and precompute rerun with --overwrite: another onnx_sha256.
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["fingerprint"]["onnx_sha256"] = "0" * 64
    meta.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(argv("sweep", run, *sets)) == 2  # as `distill` refuses it, before any run trains
    err = capsys.readouterr().err
    assert "sweep.runs[0] (kd, seed 0)" in err and "from another teacher store" in err, err
    # A refused sweep changes nothing, the last sweep's marker included (make reruns the sweep
    # anyway: precompute.done, which it depends on, is newer after a rerun of precompute).
    assert (run / "sweep.done").exists()


def test_a_folder_holding_another_configs_student_is_refused_before_any_run_trains(
    tiny_store, tmp_path, capsys
):
    """The second run's folder holds a finished student of another config: the sweep stops
    before the first run trains, not after it (hours, on real data)."""
    run = tmp_path / "run"
    store = f"distill.store={tiny_store / 'store.zarr'}"
    first = ("sweep.runs=[{method: kd, epochs: 1, name: b}]", "sweep.seeds=[0]")
    assert main(argv("sweep", run, store, *first)) == 0
    two = "sweep.runs=[{method: ce, epochs: 1, name: a}, {method: kd, epochs: 1, lr: 0.5, name: b}]"
    capsys.readouterr()
    assert main(argv("sweep", run, store, two, "sweep.seeds=[0]")) == 2
    err = capsys.readouterr().err
    assert "sweep.runs[1] (kd, seed 0)" in err and "finished run with another config" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (run / "a-s0").exists()  # nothing trained


# ---- 2. one process per student folder -------------------------------------------------------


def test_a_second_run_of_a_student_being_trained_is_refused(tiny_store, tmp_path):
    run = tmp_path / "run"
    sets = [f"distill.store={tiny_store / 'store.zarr'}", "distill.epochs=400"]
    sets += ["distill.milestones=[300]", "distill.device=cpu"]
    args = ["distill", "--config", str(TINY), "--quiet", "--set", f"run_dir={run}"]
    args += [a for s in sets for a in ("--set", s)]
    first = _cli(*args, env=ENV)
    try:
        metrics = run / "distill" / "small_cnn-kd-s0" / "metrics.jsonl"
        _wait_for(metrics.exists)  # the first one is training
        second = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]  # not trained alongside
        assert first.poll() is None, "the first run ended before the second was tried"
        (line,) = second.stderr.strip().splitlines()
        assert "is being trained by another process" in line, line
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


# ---- 3. sweep: an OSError a user fixes is one line, as in `distill` ---------------------------


def test_a_sweep_run_hitting_a_file_in_the_way_is_one_line(tiny_store, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "distill").mkdir(parents=True)
    (run / "distill" / "small_cnn-ce-s5").write_text("in the way\n")
    sets = (f"distill.store={tiny_store / 'store.zarr'}", "sweep.runs=[{method: ce, epochs: 1}]")
    assert main(argv("sweep", run, *sets, "sweep.seeds=[5]")) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert "FAILED: a file is in the way of a folder to create" in out, out


# ---- 4. seeds the generators refuse are refused before anything trains -----------------------


@pytest.mark.parametrize(
    "override", ["sweep.seeds=[-1]", "sweep.seeds=[0, 18446744073709551616]", "distill.seed=-1"]
)
def test_seeds_out_of_range_are_one_line_before_training(tiny_store, tmp_path, capsys, override):
    stage = "distill" if override.startswith("distill") else "sweep"
    store = f"distill.store={tiny_store / 'store.zarr'}"
    assert main(argv(stage, tmp_path / "run", store, override)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "distill").exists()


# ---- 5. a sweep stopped by SIGTERM leaves no temporary config -------------------------------


def test_sigterm_to_a_sweep_under_torchrun_leaves_no_temporary_config(tiny_store, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    run = tmp_path / "run"
    sets = [f"distill.store={tiny_store / 'store.zarr'}", "distill.device=cpu"]
    sets += ["sweep.runs=[{method: kd, epochs: 400, milestones: [300]}]", "sweep.seeds=[0]"]
    args = ["sweep", "--config", str(TINY), "--quiet", "--nproc", "1", "--set", f"run_dir={run}"]
    args += [a for s in sets for a in ("--set", s)]
    sweep = _cli(*args, env={**ENV, "TMPDIR": str(temp)})
    try:
        _wait_for((run / "distill" / "small_cnn-kd-s0" / "metrics.jsonl").exists)
        assert list(temp.glob("logitbank-sweep-*.yaml"))  # the student's config, in use
        sweep.send_signal(signal.SIGTERM)
        sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == -signal.SIGTERM
    assert not list(temp.glob("logitbank-sweep-*.yaml"))


# ---- 6. report: a damaged metrics.jsonl --------------------------------------------------------


def test_a_damaged_metrics_file_is_one_line_and_a_rerun_repairs_it(tiny_store, tmp_path, capsys):
    run = tmp_path / "run"
    store = f"distill.store={tiny_store / 'store.zarr'}"
    sets = (store, "distill.epochs=2", "distill.milestones=[1]")
    assert main(argv("distill", run, *sets)) == 0
    metrics = run / "distill" / "small_cnn-kd-s0" / "metrics.jsonl"
    good = metrics.read_bytes()
    for damage in (b"\xff\xfe not text", good[:-30]):  # not UTF-8; a truncated last line
        metrics.write_bytes(damage)
        capsys.readouterr()
        assert main(argv("report", run, *sets)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "rerun its student" in err, err
        # ... and rerunning the finished student does repair it, as the message says: by
        # distill, or by the sweep that trained it (it only said "already finished" before).
        rerun = ("distill", ()) if damage == good[:-30] else ("sweep", SWEEP_OF_IT)
        assert main(argv(rerun[0], run, *sets, *rerun[1])) == 0
        assert metrics.read_bytes() == good
        assert main(argv("report", run, *sets)) == 0


#: A sweep of one run: the student ``distill`` trains with ``sets`` above.
SWEEP_OF_IT = ("sweep.runs=[{method: kd}]", "sweep.seeds=[0]")


# ---- 7. Makefile ---------------------------------------------------------------------------------


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


def test_make_skips_a_finished_export_after_a_settings_change(tmp_path):
    common = [f"CONFIG={TINY}", f"RUN_DIR={tmp_path / 'run'}"]
    assert _make("precompute", *common).returncode == 0
    assert _make("precompute", *common, "SET=distill.epochs=1").returncode == 0
    again = _make("precompute", *common, "SET=distill.epochs=1")
    assert again.returncode == 0, again.stderr
    assert "pipeline export" not in again.stdout, again.stdout  # nothing changed since


def test_make_reads_a_quoted_run_dir(tmp_path):
    config = tmp_path / "quoted.yaml"
    run = tmp_path / "run"
    text = TINY.read_text().replace("run_dir: runs/tiny", f'run_dir: "{run}"  # quoted')
    config.write_text(text)
    assert _make("precompute", f"CONFIG={config}").returncode == 0
    again = _make("precompute", f"CONFIG={config}")
    assert again.returncode == 0, again.stderr
    assert "pipeline" not in again.stdout, again.stdout  # every stage finished: none runs


def test_make_refuses_a_run_dir_with_a_space_in_one_line(tmp_path):
    result = _make("precompute", f"CONFIG={TINY}", f"RUN_DIR={tmp_path / 'a b'}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "space" in line, line
    assert not (REPO / "b").exists() and not (tmp_path / "a b").exists()


def test_make_passes_set_words_to_the_stage_unchanged(tmp_path):
    run = tmp_path / "run"
    sets = 'SET=distill.method_options={"beta":6} distill.name=it\'s'
    result = _make("precompute", f"CONFIG={TINY}", f"RUN_DIR={run}", sets)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load((run / "precompute.config.yaml").read_text())
    assert resolved["distill"]["method_options"] == {"beta": 6}
    assert resolved["distill"]["name"] == "it's"


def test_make_refuses_run_dir_in_set(tmp_path):
    """The stages wrote to SET's run_dir, make's stamps went to RUN_DIR's: every call reran."""
    result = _make("precompute", f"CONFIG={TINY}", f"SET=run_dir={tmp_path / 'x'}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "RUN_DIR=" in line, line
    assert not (tmp_path / "x").exists()


def test_make_reruns_precompute_when_its_store_is_gone(tmp_path):
    """precompute.done was trusted after the store was deleted: make did nothing, and distill
    then found no store."""
    common = [f"CONFIG={TINY}", f"RUN_DIR={tmp_path / 'run'}"]
    assert _make("precompute", *common).returncode == 0
    shutil.rmtree(tmp_path / "run" / "store.zarr")
    again = _make("precompute", *common)
    assert again.returncode == 0, again.stderr
    assert "pipeline precompute" in again.stdout and (tmp_path / "run" / "store.zarr").is_dir()


def test_make_forgets_a_sweep_whose_students_are_gone(tmp_path):
    run = tmp_path / "run"
    (run / "distill" / "a").mkdir(parents=True)
    (run / "distill" / "a" / "student.pt").write_bytes(b"")
    (run / "sweep.done").write_text("a\nb\n")  # b's folder deleted (as a divergence advises)
    assert _make("-n", "sweep", f"CONFIG={TINY}", f"RUN_DIR={run}").returncode == 0
    assert not (run / "sweep.done").exists()


def test_make_distill_of_another_runs_store_builds_no_teacher_here(tmp_path):
    """distill.store names another run's store: this folder's teacher, export and store were
    built all the same (days for a large teacher). Its own store named there still is."""
    run = tmp_path / "run"
    for store, built in ((tmp_path / "other" / "store.zarr", False), (run / "store.zarr", True)):
        plan = _make(
            "-n", "distill", f"CONFIG={TINY}", f"RUN_DIR={run}", f"SET=distill.store={store}"
        )
        assert plan.returncode == 0, plan.stderr
        assert "pipeline distill" in plan.stdout, plan.stdout
        for stage in ("teacher", "export", "precompute"):
            assert (f"pipeline {stage}" in plan.stdout) == built, (store, plan.stdout)


def test_make_never_deletes_a_teacher_a_ctrl_c_stopped_after(tmp_path):
    """make deletes a target whose recipe an interrupt stopped after the file changed: a
    teacher.pt saved just before the stage exited (days of training) would have gone."""
    run = tmp_path / "run"
    listing = _make("-pn", "help", f"CONFIG={TINY}", f"RUN_DIR={run}")
    (precious,) = [line for line in listing.stdout.splitlines() if line.startswith(".PRECIOUS:")]
    assert set(precious.split()[1:]) >= {f"{run}/teacher.pt", f"{run}/teacher.onnx"}
