"""``distill`` under torchrun: 2 CPU processes (gloo) against one.

The plan first (no processes): ranks read disjoint blocks that cover every row once per epoch, in
the same number of steps. Then real 2-rank runs, each a ``python -m torch.distributed.run`` of
about 5-10 s on 2 cores (every process imports torch): the command line's KD run (accuracy band,
rank-0-only outputs, evaluation), one script run for CTKD and PS-KD (identical ranks, the step
equal to one process's on the same rows, the self-teacher store), a refusal, and kill + resume.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data import splits
from pipeline.distill import evaluate, output_dir, train_student
from pipeline.distill_data import Batch, EpochBatches, ViewParams
from pipeline.errors import UserError
from pipeline.models import build_model, read_checkpoint
from pipeline.sweep import run_sweep
from storage import open_store
from storage.errors import StoreError
from storage.sampler import BlockSampler
from tests.distill.conftest import ONE_THREAD, REPO, TINY, run_cli

RANKS = 2
TORCHRUN = (
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    f"--nproc_per_node={RANKS}",
)
# KD long enough to learn something on the tiny set: 1 process reaches 40-48 % over seeds 0-5,
# 2 processes 35-49 % (chance is 10 %).
KD = (
    "distill.method=kd",
    "distill.epochs=8",
    "distill.milestones=[6]",
    "distill.lr=0.1",
    "distill.eval_batch_size=48",  # 3 evaluation batches: rank 1 evaluates one of them
)
BAND_FLOOR = 25.0  # % top-1: 2.5 × chance
BAND_WIDTH = 15.0  # points between 1 and 2 processes: ~3 standard deviations over seeds
# CTKD on 250 rows (the teacher run online, so no store of that size is needed): 8 blocks of 32
# rows, 7 full and one of 26, so the ranks get 128 and 122 rows and unequal batches per step.
CTKD = (
    "distill.method=ctkd",
    "distill.teacher_source=online",
    "data.options.num_samples=250",
    "distill.student=mlp",  # no batch norm: the step is the one-process step on the same rows
    "distill.epochs=2",
    "distill.milestones=[1]",
    "distill.name=ddp-ctkd",
)
PSKD = ("distill.method=pskd", "distill.epochs=3", "distill.name=ddp-pskd")

KILLED = "distill.name=ddp-kd-killed"
KILL_AT = 3 * 16 + 5  # the 5th step of epoch 4 (16 steps an epoch)

# Runs under torchrun (argv: record folder, config, runs "mode|set|set...") in one process group
# that it makes itself. After each run every rank records the steps' temperatures, the rows it
# wrote to the self-teacher store and its final weights; mode "kill@STEP" has rank 1 SIGKILL
# itself after that optimizer step (torchrun then stops rank 0).
WORKER = """
import datetime, json, os, signal, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
import pipeline.distill as D
from pipeline.config import load_config
from pipeline.distill_pskd import BlockWriter
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank, record, config = dist.get_rank(), sys.argv[1], sys.argv[2]
built, written, taus = {}, {}, []
real_build, real_add = D.build_student, BlockWriter.add
def build(*args, **kw):
    built["student"], kwargs = real_build(*args, **kw)
    return built["student"], kwargs
def add(self, indices, logits):
    written.setdefault(self.store.path, []).extend(indices.tolist())
    real_add(self, indices, logits)
D.build_student, BlockWriter.add = build, add
for i, run in enumerate(sys.argv[3:]):
    mode, *sets = run.split("|")
    written.clear()
    taus.clear()
    def on_step(epoch, step, terms):
        if "tau" in terms:
            taus.append(float(terms["tau"]))
        if mode.startswith("kill@") and rank == 1 and step == int(mode[5:]):
            os.kill(os.getpid(), signal.SIGKILL)
    path = D.train_student(load_config(config, sets), progress=False, on_step=on_step)
    s = built["student"]
    torch.save({"model": s.model.state_dict(), "method": s.method.state_dict()},
               f"{path.parent}/rank{rank}.pt")
    with open(f"{record}/run{i}.rank{rank}.json", "w") as f:
        json.dump({"taus": taus, "written": written}, f)
dist.destroy_process_group()
"""


def _torchrun(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, *args],
        cwd=REPO,
        env={**os.environ, **ONE_THREAD},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cli(tiny_run, *overrides: str, quiet: bool = False) -> subprocess.CompletedProcess:
    argv = tiny_run.argv(*overrides)
    if not quiet:
        argv.remove("--quiet")
    return _torchrun("-m", "pipeline", *argv)


def _worker(tiny_run, tmp_path: Path, *runs: tuple[str, ...]) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = [str(script), str(tmp_path), str(TINY)]
    for mode, *sets in runs:
        argv.append("|".join([mode, *tiny_run.sets(*sets)]))
    return _torchrun(*argv)


# ---- the plan -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "block", "ranks", "batch", "window"),
    [(256, 32, 2, 16, 8), (250, 32, 2, 16, 3), (250, 32, 3, 16, 2), (1000, 16, 4, 50, 64)],
)
def test_ranks_read_disjoint_blocks_and_step_together(rows, block, ranks, batch, window):
    for policy in ("epoch", "block"):
        shards = [
            BlockSampler(
                rows, block, 3, window, seed=7, view_policy=policy, shard=r, num_shards=ranks
            )
            for r in range(ranks)
        ]
        whole = replace(shards[0], shard=0, num_shards=1)
        for epoch in range(3):
            blocks = [s.blocks(epoch) for s in shards]
            mine = np.concatenate(blocks)
            # Disjoint, and together exactly the one-reader epoch (same blocks, same views).
            assert len(np.unique(mine[:, 0])) == len(mine) == whole.num_blocks
            one = whole.blocks(epoch)
            np.testing.assert_array_equal(mine[np.argsort(mine[:, 0])], one[np.argsort(one[:, 0])])
            plan = shards[0].step_rows(epoch, batch)
            assert plan.shape == (ranks, -(-rows // batch))  # the one-process step count
            assert (plan >= 1).all()
            for r, share in enumerate(blocks):  # each rank's share of each step: its own rows
                assert plan[r].sum() == (share[:, 1] - share[:, 0]).sum()
                assert plan[r].max() - plan[r].min() <= 1
            # Each step trains on about the one-process batch, over all ranks.
            assert (np.abs(plan.sum(0) - rows / plan.shape[1]) <= ranks).all()


def test_one_reader_keeps_full_batches_and_a_short_last_one():
    plan = BlockSampler(250, 32).step_rows(0, 16)
    assert plan.tolist() == [[16] * 15 + [10]]


def test_a_rank_without_rows_for_a_step_is_refused():
    with pytest.raises(StoreError, match=r"use at most 8 processes, or a store with smaller"):
        BlockSampler(256, 32, num_shards=16).steps(16)


def test_each_rank_trains_its_rows_once_in_the_same_number_of_batches(tiny_run):
    config = tiny_run.config("data.options.num_samples=250")
    train, _ = splits(config)
    seen = []
    for rank in range(RANKS):
        sampler = BlockSampler(250, 32, 2, 8, seed=3, shard=rank, num_shards=RANKS)
        batches = list(EpochBatches(sampler, 16, train, ViewParams(train))(1))
        plan = sampler.step_rows(1, 16)
        assert [len(b.indices) for b in batches] == plan[rank].tolist()
        seen.append(np.concatenate([b.indices for b in batches]))
    assert len(seen[0]) != len(seen[1])  # 128 and 122 rows: unequal shares, equal steps
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(250))


# ---- 2 processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kd_two(tiny_run):
    """The command line's 2-rank KD run (rank 0 prints; its outputs)."""
    done = _cli(tiny_run, *KD, "distill.name=ddp-kd")
    assert done.returncode == 0, done.stderr[-3000:]
    return done, output_dir(tiny_run.config(*KD, "distill.name=ddp-kd"))


def test_two_processes_reach_the_accuracy_of_one(tiny_run, kd_two):
    _, out = kd_two
    two = read_checkpoint(out / "student.pt").extra["test_acc"]
    one_path = train_student(tiny_run.config(*KD, "distill.name=one-kd"), progress=False)
    one = read_checkpoint(one_path).extra["test_acc"]
    assert one >= BAND_FLOOR and two >= BAND_FLOOR, (one, two)
    assert abs(one - two) <= BAND_WIDTH, (one, two)


def test_rank_0_alone_writes_and_prints(tiny_run, kd_two):
    done, out = kd_two
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("distill: ")] == [
        f"distill: {out / 'student.pt'} (test top-1 "
        f"{read_checkpoint(out / 'student.pt').extra['test_acc']:.2f}%)"
    ]
    for epoch in range(1, 9):  # one line per epoch, not one per rank
        assert sum(f"epoch {epoch}/8:" in line for line in lines) == 1
    names = ["config.yaml", "metrics.jsonl", "student.pt"]
    assert sorted(p.name for p in out.iterdir()) == [".distill.lock", *names]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert all(r["world_size"] == RANKS for r in history)


def test_test_accuracy_is_a_one_process_evaluation_of_the_weights(tiny_run, kd_two):
    _, out = kd_two
    ckpt = read_checkpoint(out / "student.pt")
    model = build_model(ckpt.model_name, **ckpt.model_kwargs)
    model.load_state_dict(ckpt.state_dict)
    _, test = splits(tiny_run.config())
    assert evaluate(model, test, torch.device("cpu"), 48) == ckpt.extra["test_acc"]


@pytest.fixture(scope="module")
def scripted(tiny_run, tmp_path_factory):
    """One 2-rank launch (each costs seconds of start-up): CTKD on unequal shares, PS-KD, and a
    KD run killed in epoch 4. Returns the two finished runs' records of each rank, and the
    launch."""
    tmp = tmp_path_factory.mktemp("ddp")
    done = _worker(tiny_run, tmp, ("run", *CTKD), ("run", *PSKD), (f"kill@{KILL_AT}", *KD, KILLED))
    records = []
    for run in range(2):
        files = [tmp / f"run{run}.rank{r}.json" for r in range(RANKS)]
        assert all(f.is_file() for f in files), done.stderr[-3000:]
        records.append([json.loads(f.read_text()) for f in files])
    return records, done


def test_ctkd_ranks_keep_the_same_temperature_and_weights(tiny_run, scripted):
    taus = [r["taus"] for r in scripted[0][0]]
    assert len(taus[0]) == 2 * 16 and len(set(taus[0])) > 1  # it learns
    assert taus[0] == taus[1]  # bit for bit, every step
    out = output_dir(tiny_run.config(*CTKD))
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(RANKS))
    for part in ("model", "method"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), key
    saved = read_checkpoint(out / "student.pt")
    for key, tensor in saved.extra["method_state"].items():
        assert torch.equal(tensor, a["method"][key]), key


def test_two_ranks_take_the_one_process_step_on_the_same_rows(tiny_run, scripted, monkeypatch):
    """One process fed each step's rows of both ranks lands on the 2-rank weights: the loss
    weighting (unequal shares here) and the averaging of CTKD's temperature gradient are exact."""
    real = EpochBatches.__call__

    def both_ranks(self, epoch, previous=None):
        parts = [copy.copy(self) for _ in range(RANKS)]
        for r, part in enumerate(parts):
            part.sampler = replace(self.sampler, shard=r, num_shards=RANKS)
        for pair in zip(*(real(p, epoch, previous) for p in parts), strict=True):
            yield Batch(
                *(np.concatenate([getattr(b, k) for b in pair]) for k in ("indices", "views")),
                *(torch.cat([getattr(b, k) for b in pair]) for k in ("x", "y")),
            )

    monkeypatch.setattr(EpochBatches, "__call__", both_ranks)
    one = read_checkpoint(
        train_student(tiny_run.config(*CTKD[:-1], "distill.name=one-ctkd"), progress=False)
    )
    two = read_checkpoint(output_dir(tiny_run.config(*CTKD)) / "student.pt")
    gaps = [float((one.state_dict[k] - t).abs().max()) for k, t in two.state_dict.items()]
    assert max(gaps) < 1e-5, gaps
    theta = [c.extra["method_state"]["temperature.predictor.theta"] for c in (one, two)]
    assert abs(float(theta[0] - theta[1])) < 1e-5


def test_pskd_ranks_write_one_complete_self_teacher_store(tiny_run, scripted):
    out = output_dir(tiny_run.config(*PSKD))
    by_rank = [r["written"] for r in scripted[0][1]]
    for epoch in range(3):
        path = str(out / "pskd" / f"epoch{epoch:04d}.zarr")
        rows = [np.array(w[path]) for w in by_rank]
        assert all(len(r) for r in rows)  # both ranks wrote
        assert not set(rows[0] // 32) & set(rows[1] // 32)  # in disjoint blocks (shards)
        assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(256))
    assert sorted(p.name for p in (out / "pskd").iterdir()) == ["epoch0002.zarr"]
    with open_store(out / "pskd" / "epoch0002.zarr") as last:
        assert last.complete
        assert np.isfinite(last.read(np.arange(256))).all()


def test_a_refusal_is_one_line_from_rank_0(tiny_run):
    done = _cli(tiny_run, *PSKD[:-1], "precompute.backend=hdf5", "distill.name=ddp-h5")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert re.search(r"PS-KD under torchrun .* set precompute.backend=zarr", errors[0])
    # No traceback of ours (torchrun adds its own report of the failed ranks).
    assert str(REPO / "pipeline") not in done.stderr and str(REPO / "stages") not in done.stderr


def test_nproc_starts_the_ranks_and_a_refusal_is_its_one_line(tiny_run):
    """``distill --nproc 2``: torchrun's launcher, quiet: rank 0's line is all of stderr."""
    argv = tiny_run.argv(*PSKD[:-1], "precompute.backend=hdf5", "distill.name=ddp-h5n")
    done = run_cli([*argv, "--nproc", str(RANKS)])
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert re.fullmatch(r"error: PS-KD under torchrun .* set precompute.backend=zarr.*", line)
    for nproc in ("0", "-1"):
        refused = run_cli([*argv, "--nproc", nproc])
        assert (refused.returncode, refused.stderr) == (
            2,
            f"error: --nproc must be at least 1, got {nproc}\n",
        )


def test_a_sweep_started_under_torchrun_is_refused_once(tiny_run):
    """``torchrun -m pipeline sweep`` by mistake: every rank refuses, one prints the line."""
    done = _torchrun("-m", "pipeline", "sweep", *tiny_run.argv()[1:], timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: the sweep runs as one process and starts torchrun for each student itself: run "
        "`python -m pipeline sweep --nproc N` (make sweep NPROC=N), not under torchrun"
    ], done.stderr


def test_killed_under_torchrun_resumes_to_the_same_weights(tiny_run, kd_two, scripted):
    killed = scripted[1]
    assert killed.returncode != 0
    out = output_dir(tiny_run.config(*KD, KILLED))
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["ranks_rng"]) == RANKS  # epochs 1-3 saved
    assert not (out / "student.pt").exists()

    resumed = _cli(tiny_run, *KD, KILLED, quiet=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_checkpoint(p / "student.pt") for p in (kd_two[1], out))
    for key, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[key]), key
    ha, hb = (json.loads(c.extra["history"]) for c in (a, b))
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert a.extra["test_acc"] == b.extra["test_acc"]
    assert not (out / "state.pt").exists()


# ---- a sweep with every student under torchrun ----------------------------------------------


def test_sweep_trains_each_student_under_torchrun(tiny_run, monkeypatch, tmp_path):
    """``sweep --nproc 2``: each student is its own 2-rank torchrun; a student that fails (its
    store has a damaged chunk, which each run checks when it starts, not the sweep before the
    first) or diverges is reported and the others go on; a rerun finds the finished one."""
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_run.config().store_path, damaged)
    chunks = (p for p in (damaged / "logits" / "c").rglob("*") if p.is_file())
    chunk = max(chunks, key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    runs = (
        f"[{{method: kd, name: swp-kd}}, {{method: kd, name: swp-bad, store: {damaged}}}, "
        "{method: kd, name: swp-hot, lr: 1.0e+8}]"
    )
    sets = [*tiny_run.sets("distill.epochs=2", "distill.milestones=[1]"), f"sweep.runs={runs}"]
    argv = ["sweep", "--config", str(TINY), "--quiet", "--nproc", str(RANKS)]
    argv += [arg for item in [*sets, "sweep.seeds=[0]"] for arg in ("--set", item)]
    config = load_config(TINY, [*sets, "sweep.seeds=[0]"])
    kd_dir = config.run_path / "distill" / "swp-kd-s0"
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the sweep's subprocess writes its temps

    first = run_cli(argv)
    assert first.returncode == 1, first.stderr[-3000:]
    lines = [line for line in first.stdout.splitlines() if line.startswith("sweep ")]
    assert re.fullmatch(r"sweep 1/3 swp-kd-s0: trained, test top-1 [\d.]+% .*", lines[0]), lines
    assert lines[1] == (
        f"sweep 2/3 swp-bad-s0: FAILED: its {RANKS} processes under torchrun stopped with exit "
        "status 2 (the error is above); rerun the sweep to retry it"
    )
    assert lines[2] == (
        f"sweep 3/3 swp-hot-s0: DIVERGED: its loss became non-finite in epoch 1 ({RANKS} "
        "processes under torchrun; rank 0's line above says more)"
    )
    errors = first.stderr.splitlines()
    assert errors[0].startswith(f"error: store {damaged}"), errors  # rank 0's line
    assert errors[1].startswith("error: swp-hot-s0 diverged: its loss became non-finite"), errors
    # the ranks' own line names the run's sweep keys (distill.name does nothing in a sweep)
    assert errors[1].endswith(
        "lower sweep.runs[2].lr or the method's loss weights, under another sweep.runs[2].name "
        "(or delete this run's folder)"
    ), errors
    assert errors[2].startswith("error: 1 of 3 sweep runs failed (swp-bad-s0)"), errors
    assert len(errors) == 3, errors  # nothing from torchrun's launcher
    history = [json.loads(x) for x in (kd_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in history] == [RANKS, RANKS]
    assert not list(tmp_path.glob("logitbank-sweep-*.yaml"))  # the temporary configs: gone

    again = run_cli(argv)  # the resolved config round-trips: the same key, nothing retrained
    assert again.stdout.startswith("sweep 1/3 swp-kd-s0: already finished"), again.stdout
    # The diverged student is reported again without starting its ranks.
    assert re.search(
        r"^sweep 3/3 swp-hot-s0: DIVERGED: swp-hot-s0 diverged in an earlier run: its loss "
        r"became non-finite in epoch 1/2 ",
        again.stdout,
        re.M,
    ), again.stdout

    refused = run_cli([*argv[:5], "0", *argv[6:]])
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: --nproc must be at least 1, got 0"

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=r"not under torchrun"):
        run_sweep(config, progress=False)


@pytest.mark.parametrize("how", ["SIGTERM to the sweep", "Ctrl-C"])
def test_a_signal_stops_the_whole_sweep_and_its_ranks(tiny_run, how):
    """SIGTERM sent to ``sweep --nproc 2`` (a job runner) or Ctrl-C (SIGINT to its process
    group): the ranks stop, the sweep does not start its next student, and it ends by the signal
    (SIGTERM) or with 130 and one line (Ctrl-C)."""
    import psutil

    tag = "term" if how.startswith("SIGTERM") else "int"  # a run folder of its own
    runs = (
        f"[{{method: kd, name: sig-{tag}, epochs: 400, milestones: []}}, "
        f"{{method: kd, name: sig-{tag}-next}}]"
    )
    argv = ["sweep", "--config", str(TINY), "--quiet", "--nproc", str(RANKS)]
    for item in [*tiny_run.sets(), f"sweep.runs={runs}", "sweep.seeds=[0]"]:
        argv += ["--set", item]
    distill = tiny_run.run_dir / "distill"
    metrics = distill / f"sig-{tag}-s0" / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv],
        cwd=REPO,
        env={**os.environ, **ONE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job is
    )
    try:
        deadline = time.monotonic() + 120
        while not metrics.is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert metrics.is_file(), proc.communicate()[1][-2000:]
        family = psutil.Process(proc.pid).children(recursive=True)  # launcher and ranks
        assert len(family) >= 1 + RANKS
        if how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how == "Ctrl-C":
        assert proc.returncode == 130, err
        assert err.splitlines()[-1].startswith("interrupted: finished work is kept"), err
    else:
        assert proc.returncode == -signal.SIGTERM, err
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert not (distill / f"sig-{tag}-next-s0").exists()  # it stopped, not skipped ahead


def test_a_killed_rank_is_named_even_when_another_exited_with_a_code(monkeypatch, capsys):
    """Rank 1 SIGKILLed, rank 0 then stopping with its one line ("another rank stopped") and
    status 2: the launcher said nothing, so the kill was named nowhere (an audit, 2026-11-27)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from pipeline import launch

    signal_of_rank_1 = [-9]

    def failed(args):
        failures = {
            0: ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=""),
            1: ProcessFailure(local_rank=1, pid=2, exitcode=signal_of_rank_1[0], error_file=""),
        }
        raise ChildFailedError("pipeline", failures)

    monkeypatch.setattr(torchrun, "run", failed)
    assert launch.main(["2", "distill"]) == 2  # rank 0's status
    err = capsys.readouterr().err
    assert err.startswith("error: rank 1 of 2 was killed by SIGKILL"), err
    signal_of_rank_1[0] = -15  # torchrun's SIGTERM to the ranks left after rank 0 failed
    assert launch.main(["2", "distill"]) == 2
    assert capsys.readouterr().err == ""  # rank 0's own line is all there is
