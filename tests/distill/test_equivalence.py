"""Offline KD (logits from the store) equals online KD (the teacher run in memory).

With one view and fixed seeds both runs see the same batches of the same images; the only
difference is where the teacher's logits come from — ONNX Runtime at precompute time, stored in
float32, or the PyTorch checkpoint now. Per-step losses must agree within 1e-5.
"""

from __future__ import annotations

import math

from pipeline.distill import train_student
from pipeline.models import read_checkpoint

ATOL = 1e-5


def _run(tiny_run, *overrides: str) -> tuple[list[dict[str, float]], float]:
    steps: list[dict[str, float]] = []

    def record(epoch, step, terms):
        steps.append({k: float(v) for k, v in terms.items()})

    config = tiny_run.config("distill.method=kd", "distill.views=1", *overrides)
    path = train_student(config, progress=False, on_step=record)
    return steps, read_checkpoint(path).extra["test_acc"]


def _largest_gap(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) and a[0].keys() == b[0].keys()
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def test_offline_kd_equals_online_kd(tiny_run):
    store32 = f"distill.store={tiny_run.store32}"
    offline, acc_off = _run(tiny_run, store32, "distill.name=offline")
    online, acc_on = _run(tiny_run, "distill.teacher_source=online", "distill.name=online")
    assert len(offline) == 4 * 16  # 4 epochs of 16 steps
    assert all(math.isfinite(v) for step in offline for v in step.values())
    assert _largest_gap(offline, online) <= ATOL
    assert acc_off == acc_on


def test_the_equivalence_check_can_fail(tiny_run):
    """A float16 store is further than 1e-5 from the online teacher: the check above has teeth."""
    online, _ = _run(tiny_run, "distill.teacher_source=online", "distill.name=online16")
    stored16, _ = _run(tiny_run, "distill.name=offline16")
    assert _largest_gap(stored16, online) > ATOL


def test_an_online_student_of_another_teacher_is_not_finished(tiny_run, tmp_path):
    """An online run's teacher is part of what it was trained from: the same config pointed at
    a retrained teacher checkpoint is refused, not reported as already finished (the checkpoint
    was in no run's identity before 2026-11-27)."""
    import pytest
    import torch

    from pipeline.distill_inputs import DistillError
    from pipeline.models import load_model_from_checkpoint, save_checkpoint

    sets = ("distill.teacher_source=online", "distill.name=online-retrained", "distill.epochs=1")
    _run(tiny_run, *sets)
    ckpt = read_checkpoint(tiny_run.run_dir / "teacher.pt")
    teacher = load_model_from_checkpoint(tiny_run.run_dir / "teacher.pt")
    with torch.no_grad():
        next(teacher.parameters()).mul_(1.01)  # "retrained"
    other = save_checkpoint(
        tmp_path / "teacher.pt", teacher, model_name=ckpt.model_name, model_kwargs=ckpt.model_kwargs
    )
    with pytest.raises(DistillError, match=r"another teacher checkpoint .*teacher_sha256"):
        _run(tiny_run, *sets, f"teacher.checkpoint={other}")
    _run(tiny_run, *sets)  # the teacher it was trained from: finished, returned as it is
