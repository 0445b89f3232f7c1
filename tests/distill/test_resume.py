"""A run killed with SIGKILL and started again ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from pipeline.distill import output_dir, train_student
from pipeline.models import read_checkpoint
from tests.distill.conftest import ONE_THREAD, REPO, TINY

# Trains in a child process and SIGKILLs it (no cleanup of any kind) after optimizer step AT.
KILLED = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from pipeline.config import load_config
from pipeline.distill import train_student
config, at = load_config(sys.argv[1], sys.argv[3:]), int(sys.argv[2])
def kill(epoch, step, terms):
    if step == at:
        os.kill(os.getpid(), signal.SIGKILL)
train_student(config, progress=False, on_step=kill)
raise SystemExit("not killed")
"""

STEPS_PER_EPOCH = 256 // 16  # tiny: 256 training rows, batch 16


def _kill_at(tiny_run, step: int, *overrides: str) -> subprocess.CompletedProcess:
    sets = tiny_run.sets(*overrides)
    env = {**os.environ, **ONE_THREAD}
    return subprocess.run(
        [sys.executable, "-c", KILLED, str(TINY), str(step), *sets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ctkd: a learned temperature in the method state; pskd: the self-teacher store on disk.
@pytest.mark.parametrize("method", ["ctkd", "pskd"])
def test_sigkill_and_resume_is_bit_identical(tiny_run, method):
    common = (f"distill.method={method}", "distill.epochs=3")
    whole = train_student(tiny_run.config(*common, f"distill.name=whole-{method}"), progress=False)

    killed = tiny_run.config(*common, f"distill.name=killed-{method}")
    out = output_dir(killed)
    done = _kill_at(tiny_run, STEPS_PER_EPOCH + 5, *common, f"distill.name=killed-{method}")
    assert done.returncode == -signal.SIGKILL, done.stderr
    # Killed in the middle of epoch 2: epoch 1's state is there, no final checkpoint.
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 0 and not (out / "student.pt").exists()
    if method == "pskd":
        assert (out / "pskd" / "epoch0000.zarr").is_dir()  # complete, read by epoch 2
        assert (out / "pskd" / "epoch0001.zarr").is_dir()  # half-written when killed

    resumed = train_student(killed, progress=False)
    a, b = read_checkpoint(whole), read_checkpoint(resumed)
    assert a.state_dict.keys() == b.state_dict.keys()
    for key, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[key]), key
    for key, tensor in a.extra["method_state"].items():
        assert torch.equal(tensor, b.extra["method_state"][key]), key
    assert a.extra["test_acc"] == b.extra["test_acc"]
    ha, hb = json.loads(a.extra["history"]), json.loads(b.extra["history"])
    for ra, rb in zip(ha, hb, strict=True):
        assert ra["loss"] == rb["loss"] and ra["train_acc"] == rb["train_acc"]
    if method == "pskd":
        left = sorted(p.name for p in (out / "pskd").iterdir())
        assert left == ["epoch0002.zarr"]
