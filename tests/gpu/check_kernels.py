"""GPU check of the fused Triton loss kernels against the float64 oracle, in one run.

    python -m tests.gpu.check_kernels [--out DIR] [--budget 150] [--jobs 8] [--only kd] [--seed 0]
    python -m tests.gpu.check_kernels --interpret      # the same checks on CPU, small sizes
    python -m tests.gpu.check_kernels --list           # the cases (487 on CUDA, 334 on CPU)

On CUDA the real kernels are compiled (``TRITON_INTERPRET`` is removed from the environment
before triton is imported) and every case calls the public dispatcher ``pipeline.kernels`` with
``impl="triton"``; the expected values and gradients come from ``tests.kernels.oracle`` (float64,
autograd), computed on the same device from the exact values of the same inputs. Cases:

- dispatch: ``impl="auto"`` takes the fused kernels for CUDA tensors (and the reference for a
  float64 student or an ATS temperature that needs a gradient);
- core: every C, float32 teacher: KD, LS (z-score KD), DKD, DKD+LS, ATS at fixed temperatures,
  KD/LS/DKD with per-sample temperatures that get a gradient, CTKD's global
  ``tau = 1 + 20 sigmoid(theta)`` through KD and DKD, ATS with per-sample temperatures, decode;
- dtype: float16, bfloat16 and int8 (per-row scale/offset) teachers, every C;
- extreme: ±100 logits at T = 1 (targets at +100 for the teacher, -100 for the student), and a
  500-wide gap for DKD;
- edge: -inf teacher logits (p = 0, at a non-target class, at the target, every 7th class,
  every class but the target: no non-target mass, NCKD 0) for
  KD, DKD, their fused-CE forms and ATS, with per-sample temperatures that get a gradient; and
  constant rows z-scored with eps = 0 (zeros, not 0 / 0) for LS, DKD+LS and their CE forms;
- odd_b: batches that are not a multiple of the rows-per-program tile, and C = 50257 (a partial
  last column block);
- student: float16 and bfloat16 students (gradient in the student's dtype);
- methods: the registry's methods (``pipeline.methods``) on CUDA against the same method in
  float64 (which the dispatcher sends to the PyTorch reference).

Inputs are fresh random values (never zeros; seeded per case from ``--seed``); every output the
kernels allocate is poisoned with NaN and followed by a canary region, so an element the kernel
did not write fails the finiteness check and a write past the end fails the canary check.

Pass criterion per tensor: finite, and ``max|actual - expected| <= rtol * max(max|expected|,
floor)``, where the floor is the size of the terms the result is a difference of (as in
tests/kernels/test_fused.py): T²/10 for losses, go·T (/(std+eps) under z-score) for dL/ds,
max(2·go·loss/T, 0.2·go·T) for dL/dT (see ``_temp_checks``). rtol is 1e-4 for float32 results
(the compiled kernels use the GPU's approximate exp/log/div, so this is looser than the
interpreter tests' 1e-5) and 1e-2 for gradients stored in float16/bfloat16; decoded teachers must
be exact (int8: 1e-6). "rel" printed per case is the worst max error over that scale; "tol" the
worst error over what is allowed (<= 1 passes).

The triton compiles (about 300 kernel specializations) dominate the run, so on CUDA the cases
are shared among ``--jobs`` worker processes (default min(8, CPUs/2)), each case group of one
(C, B, dtypes) in one worker; a worker whose CUDA context breaks loses only its own cases. New
cases stop at ``--budget`` seconds (150 on CUDA) and workers are killed 45 s later.

Prints one line per case and a summary table, writes ``check_kernels.json`` and
``check_kernels.txt`` into ``--out``, and exits 1 if any case failed (0 otherwise; cases left out
for ``--budget`` are listed as SKIP, not failures). Imports only torch, triton and the store-free
parts of the project (no zarr/dask/h5py: see tests/gpu/light_imports.py); importing any of them
is itself a failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tests.gpu.light_imports import heavy_modules, isolate_storage

RTOL = 1e-4  # float32 results
RTOL_HALF = 1e-2  # gradients stored in float16 / bfloat16
DECODE_RTOL_INT8 = 1e-6  # q * scale + offset in float32 (an FMA) against the exact value
CANARY = -4096.0  # exactly representable in every float dtype the kernels write
CANARY_LEN = 4096  # >= ROWS * C of the widest masked-row overrun (ROWS * BLOCK <= 2048)
TEACHERS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i8": torch.int8}
STUDENTS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FUSED_MODULES = ("kd", "dkd", "ats", "decode")


@dataclass(frozen=True)
class Profile:
    """Problem sizes: ``full`` on a GPU, ``small`` for the CPU interpreter."""

    classes: tuple[int, ...]
    batch: dict[int, int]  # C -> B (multiple of the rows-per-program tile)
    odd_batch: dict[int, int]  # C -> B not a multiple of the tile (or a partial column block)
    student_classes: tuple[int, ...]
    methods_shape: tuple[int, int]  # (B, C) of the registry checks


PROFILES = {
    "full": Profile(
        classes=(2, 10, 100, 1000, 32768, 131072),
        # B * C <= 2^22; B a multiple of the rows per program (512 // next_pow2(C) below C = 513,
        # else 1: triton_common.launch_config).
        batch={2: 4096, 10: 2048, 100: 1024, 1000: 512, 32768: 64, 131072: 32},
        # tiles: C=2 -> 256 rows, 10 -> 32, 100 -> 4 (a partial last tile each); 1000 -> 1 row
        # and a partial column block; 50257 = 24.5 blocks of 2048
        odd_batch={2: 1000, 10: 333, 100: 77, 1000: 31, 50257: 7},
        student_classes=(10, 1000, 32768),
        methods_shape=(64, 100),
    ),
    "small": Profile(
        classes=(2, 10, 100, 1000),
        batch={2: 16, 10: 8, 100: 8, 1000: 4},
        odd_batch={2: 5, 10: 3, 100: 5, 1000: 3},
        student_classes=(10, 100),
        methods_shape=(6, 10),
    ),
}


@dataclass(frozen=True)
class Case:
    group: str
    method: str  # kd ls dkd dkd_ls ats decode ctkd_kd ctkd_dkd kd_ce ls_ce ctkd_kd_ce dkd_ce
    # dkd_ls_ce ctkd_dkd_ce ats_ce dispatch method:<name>
    classes: int = 0
    batch: int = 0
    teacher: str = "f32"
    student: str = "f32"
    temp: str = "T"  # T (float), T_b (per-sample, with grad), theta (CTKD global), T_vec (ATS)
    inputs: str = "randn"  # randn, extreme (±100), gap (DKD, 500 wide), neginf, constant
    eps: float = 1e-7  # z-score's (0: a constant row's std + eps is 0)

    @property
    def name(self) -> str:
        if self.group == "dispatch":
            return f"dispatch C={self.classes}"
        return (
            f"{self.group:<8} {self.method:<16} C={self.classes:<6} B={self.batch:<5} "
            f"t={self.teacher:<4} s={self.student:<4} {self.temp:<5} {self.inputs}"
            + ("" if self.eps == 1e-7 else f" eps={self.eps:g}")
        )


@dataclass
class Check:
    quantity: str
    ok: bool
    rel: float  # max error / scale (scale = max(max|expected|, floor))
    rtol: float
    note: str = ""
    tol: float = 0.0  # max error / allowed error: <= 1 passes (inf for a failed yes/no check)


@dataclass
class Record:
    case: Case
    status: str  # PASS FAIL SKIP
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def rel(self) -> float:
        return max((c.rel for c in self.checks), default=0.0)

    @property
    def tol(self) -> float:
        return max((c.tol for c in self.checks), default=0.0)


# ----------------------------------------------------------------------------- poisoned outputs


class PoisonedTorch:
    """Stands for ``torch`` inside the fused modules: ``empty``/``empty_like`` give NaN-filled
    tensors followed by a canary region; everything else is torch's own."""

    def __init__(self) -> None:
        self.buffers: list[tuple[torch.Tensor, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= int(n)
        buf = torch.empty(numel + CANARY_LEN, dtype=dtype, device=device)
        if dtype.is_floating_point:
            buf[:numel].fill_(float("nan"))
            buf[numel:].fill_(CANARY)
        else:
            buf.fill_(-1)
        self.buffers.append((buf, numel))
        return buf[:numel].view(shape)

    def empty(self, *size: Any, dtype: torch.dtype | None = None, device: Any = None, **_: Any):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        return self._alloc(shape, dtype or torch.get_default_dtype(), device)

    def empty_like(self, x: torch.Tensor, *, dtype: torch.dtype | None = None, **_: Any):
        return self._alloc(tuple(x.shape), dtype or x.dtype, x.device)

    def canaries_intact(self) -> bool:
        ok = True
        for buf, numel in self.buffers:
            if buf.dtype.is_floating_point:
                ok = ok and bool((buf[numel:] == CANARY).all())
        self.buffers.clear()
        return ok


# ----------------------------------------------------------------------------- inputs and checks


@dataclass
class Env:
    kernels: ModuleType  # pipeline.kernels
    oracle: ModuleType  # tests.kernels.oracle
    device: torch.device
    seed: int
    poison: PoisonedTorch


def _seed(env: Env, case: Case) -> torch.Generator:
    key = f"{env.seed}|{case.name}"
    value = sum((i + 1) * ord(ch) for i, ch in enumerate(key)) % (2**31)
    return torch.Generator(device=env.device).manual_seed(value)


def _rand(g: torch.Generator, *shape: int, env: Env) -> torch.Tensor:
    return torch.rand(*shape, generator=g, device=env.device)


def _randn(g: torch.Generator, *shape: int, env: Env) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=env.device)


def make_inputs(env: Env, case: Case, g: torch.Generator):
    """(student leaf, stored teacher, target, scale, offset) for a case."""
    b, c = case.batch, case.classes
    target = torch.randint(0, c, (b,), generator=g, device=env.device)
    rows = torch.arange(b, device=env.device)
    if case.inputs == "randn":
        spread = 0.5 + 4.5 * _rand(g, b, 1, env=env)  # a different logit scale per row
        student = _randn(g, b, c, env=env) * spread
        teacher = 0.8 * student + 1.5 * _randn(g, b, c, env=env) + 0.5
    elif case.inputs == "extreme":  # ±100 at T = 1, target +100 (teacher) / -100 (student)
        student = (_rand(g, b, c, env=env) > 0.5).float() * 200 - 100
        teacher = (_rand(g, b, c, env=env) > 0.5).float() * 200 - 100
        teacher[rows, target] = 100.0
        student[rows, target] = -100.0
    elif case.inputs == "gap":  # DKD: the target 500 above (teacher) / below (student) the rest
        teacher = -250.0 + 10.0 * _randn(g, b, c, env=env)
        student = 250.0 + 10.0 * _randn(g, b, c, env=env)
        teacher[rows, target] = 250.0
        student[rows, target] = -250.0
    elif case.inputs in ("neginf", "constant"):
        student = _randn(g, b, c, env=env) * 3.0
        teacher = 0.8 * student + 1.5 * _randn(g, b, c, env=env) + 0.5
        if case.inputs == "neginf":  # p = 0: row 0 at a non-target class, row 1 at its target,
            if c > 2:  # row 2 at every 7th class (C = 2: no non-target mass left, NCKD is 0 / 0)
                teacher[0, (target[0] + 1) % c] = float("-inf")
            teacher[1 % b, target[1 % b]] = float("-inf")
            if b > 2 and c > 2:
                teacher[2, ::7] = float("-inf")
                teacher[2, target[2]] = 1.0
            if b > 3:  # no non-target mass: NCKD 0 (it was NaN before 2026-11-27, third session)
                teacher[3] = float("-inf")
                teacher[3, target[3]] = 2.0
        else:  # z-scores to zeros: row 0's teacher, row 1's student, both of row 2
            teacher[0] = 2.5
            student[1 % b] = -1.5
            if b > 2:
                teacher[2], student[2] = 0.75, 4.0
    else:
        raise ValueError(case.inputs)
    scale = offset = None
    if case.teacher == "i8":
        teacher, scale, offset = env.oracle.encode_int8(teacher)
    else:
        teacher = teacher.to(TEACHERS[case.teacher])
    student = student.to(STUDENTS[case.student]).requires_grad_()
    return student, teacher, target, scale, offset


def compare(
    quantity: str, actual: torch.Tensor, expected: torch.Tensor, floor: float, rtol: float
) -> Check:
    expected = expected.detach().double()
    if actual.shape != expected.shape:
        msg = f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        return Check(quantity, False, float("inf"), rtol, msg)
    finite = bool(torch.isfinite(actual).all())
    if actual.numel() == 0:
        return Check(quantity, finite, 0.0, rtol)
    err = (actual.detach().double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), floor)
    rel = err / scale if scale > 0 else err
    ok = finite and bool(torch.isfinite(expected).all()) and err <= rtol * scale
    note = "" if finite else f"{int((~torch.isfinite(actual)).sum())} non-finite"
    rel = rel if rel == rel else float("inf")  # NaN -> inf
    tol = err / (rtol * scale) if rtol * scale > 0 else (0.0 if err == 0 else float("inf"))
    return Check(quantity, ok, rel, rtol, note, tol if tol == tol else float("inf"))


def flag(quantity: str, ok: bool, note: str = "") -> Check:
    """A yes/no check (rel 0 when it holds, inf when not)."""
    if ok:
        return Check(quantity, True, 0.0, 0.0, "", 0.0)
    return Check(quantity, False, float("inf"), 0.0, note, float("inf"))


def _temperature(env: Env, case: Case, g: torch.Generator, value: float):
    """(argument for the kernel, extra leaves, float64 temperature for the oracle, its leaves)."""
    b = case.batch
    if case.temp == "T":
        return value, [], torch.full((b,), value, dtype=torch.float64, device=env.device), []
    if case.temp == "T_b":
        temp = (1.0 + 10.0 * _rand(g, b, env=env)).requires_grad_()
        temp64 = temp.detach().double().requires_grad_()
        return temp, [temp], temp64, [temp64]
    if case.temp == "theta":  # CTKD global: tau = 1 + 20 sigmoid(theta), one theta
        theta = (4.0 * _rand(g, 1, env=env)[0] - 2.0).requires_grad_()
        theta64 = theta.detach().double().requires_grad_()
        tau, tau64 = 1.0 + 20.0 * torch.sigmoid(theta), 1.0 + 20.0 * torch.sigmoid(theta64)
        return tau, [theta], tau64, [theta64]
    raise ValueError(case.temp)


def _row_temps(temp64: torch.Tensor, b: int) -> torch.Tensor:
    return temp64.detach().reshape(-1).expand(b)


#: Inputs judged at T = 1 (ATS at 1, 1, 1): saturated logits, where a larger T hides nothing.
HARD_INPUTS = ("extreme", "gap")


def _grad_floor(student: torch.Tensor, go: torch.Tensor, temp: torch.Tensor, zs: bool) -> float:
    scale = go.double() * temp
    if zs:  # a constant row's z-score gradient is 0 (eps = 0) or its own size (eps): not a floor
        sd = student.detach().double().std(dim=1)
        scale = torch.where(sd > 0, scale / (sd + 1e-7), 0.0)
    return scale.max().item()


def _rtol_grad(case: Case) -> float:
    return RTOL if case.student == "f32" else RTOL_HALF


def _temp_checks(
    checks: list[Check],
    case: Case,
    grads: tuple,
    refs: tuple,
    go: torch.Tensor,
    go_loss: torch.Tensor,
    temp64: torch.Tensor,
    total64: torch.Tensor,
) -> None:
    """dL/dT (per sample) or dL/dtheta (CTKD global) against the oracle's.

    dL/dT = 2T·KL - T·(...) nearly cancels near the loss's stationary temperature, so it is judged
    on the size of its first term, 2·go·loss/T, and on what the loss's own tolerance allows: an
    error d in KL (the loss floor, T²/10, allows d = rtol/10 nats) moves dL/dT by 2T·go·d, hence
    the second floor 0.2·go·T.
    """
    go = go.detach().double()
    if case.temp == "T_b":
        t = temp64.detach()
        first = (2 * go_loss.detach().double() / t).abs().max().item()
        floor = max(first, (0.2 * go * t).max().item())
        checks.append(compare("grad_T", grads[1], refs[1], floor, RTOL))
    elif case.temp == "theta":
        tau = temp64.detach().reshape(-1)[0]
        sig = (tau - 1.0) / 20.0
        dtau = 20 * sig * (1 - sig)  # dtau/dtheta
        first = (2 * total64.detach().abs() / tau * dtau).item()
        floor = max(first, (0.2 * go.sum() * tau * dtau).item())
        checks.append(compare("grad_theta", grads[1], refs[1], floor, RTOL))


def run_kd(env: Env, case: Case) -> list[Check]:
    k, o = env.kernels, env.oracle
    g = _seed(env, case)
    zs = case.method == "ls"
    student, teacher, _, scale, offset = make_inputs(env, case, g)
    base = 1.0 if case.inputs in HARD_INPUTS else (2.0 if zs else 4.0)
    temp, extra, temp64, extra64 = _temperature(env, case, g, base)
    go = 0.1 + _rand(g, case.batch, env=env)
    loss = k.kd_rows(
        student, teacher, temp, zs, case.eps, scale=scale, offset=offset, impl="triton"
    )
    if case.temp == "theta":
        total = (loss * go).sum()
        grads = torch.autograd.grad(total, [student, *extra])
    else:
        grads = torch.autograd.grad(loss, [student, *extra], go)
    s64 = student.detach().double().requires_grad_()
    t64 = o.decode(teacher, scale, offset)
    ref = o.kd_rows(s64, t64, temp64, zs, case.eps)
    total64 = (ref * go.double()).sum()
    refs = torch.autograd.grad(total64, [s64, *extra64])
    rows_t = _row_temps(temp64, case.batch)
    checks = [
        flag("dtypes", loss.dtype == torch.float32 and grads[0].dtype == student.dtype),
        compare("loss", loss, ref, 0.1 * rows_t.max().item() ** 2, RTOL),
        compare("grad_s", grads[0], refs[0], _grad_floor(s64, go, rows_t, zs), _rtol_grad(case)),
    ]
    _temp_checks(checks, case, grads, refs, go, go * ref.detach().float(), temp64, total64)
    return checks


def run_kd_ce(env: Env, case: Case) -> list[Check]:
    """KD with its cross-entropy in one kernel (``kd_ce``: what KD-based methods train with):
    the three batch means and the gradients of the total, against the float64 oracle."""
    k, o = env.kernels, env.oracle
    g = _seed(env, case)
    zs = case.method == "ls_ce"
    student, teacher, target, scale, offset = make_inputs(env, case, g)
    base = 1.0 if case.inputs in HARD_INPUTS else (2.0 if zs else 4.0)
    temp, extra, temp64, extra64 = _temperature(env, case, g, base)
    ce_w, kd_w = (0.1, 9.0) if zs else (0.1, 0.9)  # the methods' defaults
    total, ce, kd = k.kd_ce(
        student, teacher, target, temp, ce_w, kd_w, zs, case.eps, scale=scale, offset=offset,
        impl="triton",
    )  # fmt: skip
    grads = torch.autograd.grad(total, [student, *extra])
    s64 = student.detach().double().requires_grad_()
    rows64 = o.kd_rows(s64, o.decode(teacher, scale, offset), temp64, zs, case.eps)
    ce64 = torch.nn.functional.cross_entropy(s64, target)
    total64 = ce_w * ce64 + kd_w * rows64.mean()
    refs = torch.autograd.grad(total64, [s64, *extra64])
    rows_t = _row_temps(temp64, case.batch)
    go = torch.full((case.batch,), kd_w / case.batch, device=env.device)  # each KD row's weight
    floor_s = max(_grad_floor(s64, go, rows_t, zs), ce_w / case.batch)
    checks = [
        flag("dtypes", total.dtype == torch.float32 and grads[0].dtype == student.dtype),
        compare("total", total, total64, 0.0, RTOL),
        compare("ce", ce, ce64, 0.0, RTOL),
        compare("kd", kd, rows64.mean(), 0.1 * rows_t.max().item() ** 2, RTOL),
        compare("grad_s", grads[0], refs[0], floor_s, _rtol_grad(case)),
    ]
    _temp_checks(checks, case, grads, refs, go, go * rows64.detach().float(), temp64, total64)
    return checks


def run_dkd(env: Env, case: Case) -> list[Check]:
    k, o = env.kernels, env.oracle
    g = _seed(env, case)
    zs = case.method == "dkd_ls"
    student, teacher, target, scale, offset = make_inputs(env, case, g)
    base = 1.0 if case.inputs in HARD_INPUTS else (2.0 if zs else 4.0)
    temp, extra, temp64, extra64 = _temperature(env, case, g, base)
    go_t = 0.1 + _rand(g, case.batch, env=env)
    go_n = 0.1 + _rand(g, case.batch, env=env)
    if case.method == "ctkd_dkd":
        go_n = 2.0 * go_t  # CTKD+DKD: alpha 1, beta 2 (per-row weights of the mean)
    tckd, nckd = k.dkd_rows(
        student, teacher, target, temp, zs, case.eps, scale=scale, offset=offset, impl="triton"
    )
    total = (tckd * go_t).sum() + (nckd * go_n).sum()
    grads = torch.autograd.grad(total, [student, *extra])
    s64 = student.detach().double().requires_grad_()
    t64 = o.decode(teacher, scale, offset)
    ref_t, ref_n = o.dkd_rows(s64, t64, target, temp64, zs, case.eps)
    total64 = (ref_t * go_t.double()).sum() + (ref_n * go_n.double()).sum()
    refs = torch.autograd.grad(total64, [s64, *extra64])
    rows_t = _row_temps(temp64, case.batch)
    floor = 0.1 * rows_t.max().item() ** 2
    checks = [
        flag("dtypes", tckd.dtype == torch.float32 and grads[0].dtype == student.dtype),
        compare("tckd", tckd, ref_t, floor, RTOL),
        compare("nckd", nckd, ref_n, floor, RTOL),
        compare(
            "grad_s", grads[0], refs[0], _grad_floor(s64, go_t + go_n, rows_t, zs), _rtol_grad(case)
        ),
    ]
    go_loss = go_t * ref_t.detach().float() + go_n * ref_n.detach().float()
    _temp_checks(checks, case, grads, refs, go_t + go_n, go_loss, temp64, total64)
    return checks


def run_dkd_ce(env: Env, case: Case) -> list[Check]:
    """DKD with its cross-entropy in one kernel (``dkd_ce``: what DKD trains with): the four
    batch means and the gradients of the total, against the float64 oracle."""
    k, o = env.kernels, env.oracle
    g = _seed(env, case)
    zs = case.method == "dkd_ls_ce"
    student, teacher, target, scale, offset = make_inputs(env, case, g)
    base = 1.0 if case.inputs in HARD_INPUTS else (2.0 if zs else 4.0)
    temp, extra, temp64, extra64 = _temperature(env, case, g, base)
    weights = (1.0, 9.0, 72.0) if zs else (1.0, 1.0, 8.0)  # LS+DKD's and DKD's defaults
    out = k.dkd_ce(
        student, teacher, target, temp, *weights, zs, case.eps, scale=scale, offset=offset,
        impl="triton",
    )  # fmt: skip
    grads = torch.autograd.grad(out[0], [student, *extra])
    s64 = student.detach().double().requires_grad_()
    ref_t, ref_n = o.dkd_rows(s64, o.decode(teacher, scale, offset), target, temp64, zs, case.eps)
    ce64 = torch.nn.functional.cross_entropy(s64, target)
    total64 = weights[0] * ce64 + weights[1] * ref_t.mean() + weights[2] * ref_n.mean()
    refs = torch.autograd.grad(total64, [s64, *extra64])
    rows_t = _row_temps(temp64, case.batch)
    b = case.batch
    go = torch.full((b,), (weights[1] + weights[2]) / b, device=env.device)
    floor = 0.1 * rows_t.max().item() ** 2
    checks = [
        flag("dtypes", out[0].dtype == torch.float32 and grads[0].dtype == student.dtype),
        compare("total", out[0], total64, 0.0, RTOL),
        compare("ce", out[1], ce64, 0.0, RTOL),
        compare("tckd", out[2], ref_t.mean(), floor, RTOL),
        compare("nckd", out[3], ref_n.mean(), floor, RTOL),
        compare(
            "grad_s", grads[0], refs[0], max(_grad_floor(s64, go, rows_t, zs), 1.0 / b),
            _rtol_grad(case),
        ),
    ]  # fmt: skip
    go_loss = (weights[1] * ref_t.detach().float() + weights[2] * ref_n.detach().float()) / b
    _temp_checks(checks, case, grads, refs, go, go_loss, temp64, total64)
    return checks


def _ats_oracle(student, teacher, target, tau1, tau2, st) -> torch.Tensor:
    """Float64 ATS rows with per-sample (B,) temperatures (tests.kernels.oracle takes floats)."""
    tau = tau2[:, None].expand_as(teacher).clone()
    tau.scatter_(1, target[:, None], tau1[:, None])
    p = torch.softmax(teacher / tau, dim=1)
    log_q = torch.log_softmax(student / st[:, None], dim=1)
    return st**2 * -(p * log_q).sum(dim=1)


def run_ats(env: Env, case: Case) -> list[Check]:
    k, o = env.kernels, env.oracle
    g = _seed(env, case)
    student, teacher, target, scale, offset = make_inputs(env, case, g)
    b = case.batch
    if case.temp == "T_vec":  # per-sample temperatures (no gradient: fused ATS has none)
        tau2 = 1.0 + 2.0 * _rand(g, b, env=env)
        tau1 = tau2 + 0.5 + 3.0 * _rand(g, b, env=env)
        st = 0.5 + 2.0 * _rand(g, b, env=env)
        temps: tuple = (tau1, tau2, st)
        st_rows = st.double()
    else:
        temps = (1.0, 1.0, 1.0) if case.inputs in HARD_INPUTS else (4.0, 2.0, 1.5)
        st_rows = torch.full((b,), temps[2], dtype=torch.float64, device=env.device)
    go = 0.1 + _rand(g, b, env=env)
    loss = k.ats_rows(student, teacher, target, *temps, scale=scale, offset=offset, impl="triton")
    (grad,) = torch.autograd.grad(loss, [student], go)
    s64 = student.detach().double().requires_grad_()
    t64 = o.decode(teacher, scale, offset)
    if case.temp == "T_vec":
        ref = _ats_oracle(s64, t64, target, *(t.double() for t in temps))
    else:
        ref = o.ats_rows(s64, t64, target, *temps)
    (ref_grad,) = torch.autograd.grad(ref, [s64], go.double())
    return [
        flag("dtypes", loss.dtype == torch.float32 and grad.dtype == student.dtype),
        compare("loss", loss, ref, 0.1 * st_rows.max().item() ** 2, RTOL),
        compare("grad_s", grad, ref_grad, (go.double() * st_rows).max().item(), _rtol_grad(case)),
    ]


def run_ats_ce(env: Env, case: Case) -> list[Check]:
    """ATS with its cross-entropy in one kernel (``ats_ce``: what ATS trains with): the three
    batch means and the student's gradient of the total, against the float64 oracle."""
    k, o = env.kernels, env.oracle
    g = _seed(env, case)
    student, teacher, target, scale, offset = make_inputs(env, case, g)
    b = case.batch
    temps = (1.0, 1.0, 1.0) if case.inputs in HARD_INPUTS else (4.0, 2.0, 1.5)
    out = k.ats_ce(
        student, teacher, target, *temps, 0.5, 0.5, scale=scale, offset=offset, impl="triton"
    )
    (grad,) = torch.autograd.grad(out[0], [student])
    s64 = student.detach().double().requires_grad_()
    rows = o.ats_rows(s64, o.decode(teacher, scale, offset), target, *temps)
    ce64 = torch.nn.functional.cross_entropy(s64, target)
    total64 = 0.5 * ce64 + 0.5 * rows.mean()
    (ref_grad,) = torch.autograd.grad(total64, [s64])
    return [
        flag("dtypes", out[0].dtype == torch.float32 and grad.dtype == student.dtype),
        compare("total", out[0], total64, 0.0, RTOL),
        compare("ce", out[1], ce64, 0.0, RTOL),
        compare("ats", out[2], rows.mean(), 0.1 * temps[2] ** 2, RTOL),
        compare("grad_s", grad, ref_grad, temps[2] / b, _rtol_grad(case)),
    ]


def run_decode(env: Env, case: Case) -> list[Check]:
    g = _seed(env, case)
    _, teacher, _, scale, offset = make_inputs(env, case, g)
    out = env.kernels.decode_teacher(teacher, scale, offset, impl="triton")
    exact = env.oracle.decode(teacher, scale, offset)
    rtol = DECODE_RTOL_INT8 if case.teacher == "i8" else 0.0
    return [
        flag("dtype", out.dtype == torch.float32),
        compare("decoded", out, exact, 0.0, rtol),
    ]


def run_undefined(env: Env, case: Case) -> list[Check]:
    """Rows whose loss is undefined come out NaN, the others as the oracle's: a z-score of a
    teacher row holding -inf (row 1) or +inf (row 3), and DKD without z-score with a NaN
    (row 1) or +inf (row 3) non-target teacher logit. On a GPU max() drops NaN: the kernels
    make such rows NaN explicitly (``defined``; DKD keeps a NaN sum), where they gave a
    uniform teacher or a finite NCKD (2026-11-27, third session)."""
    k, o = env.kernels, env.oracle
    g = _seed(env, case)
    b, c = case.batch, case.classes
    student = 3.0 * _randn(g, b, c, env=env)
    teacher = 0.8 * student + 1.5 * _randn(g, b, c, env=env)
    target = torch.randint(0, c, (b,), generator=g, device=env.device)
    bad, good = torch.tensor([1, 3]), torch.tensor([0, 2, *range(4, b)])
    zs_teacher, teacher_nan = teacher.clone(), teacher.clone()
    for row, value in ((1, float("-inf")), (3, float("inf"))):
        zs_teacher[row, (target[row] + 1) % c] = value
    teacher_nan[1, (target[1] + 1) % c] = float("nan")
    teacher_nan[3, (target[3] + 1) % c] = float("inf")
    s64 = student.double()
    checks = []
    kd = k.kd_rows(student, zs_teacher, 2.0, True, impl="triton")
    tckd, nckd = k.dkd_rows(student, zs_teacher, target, 2.0, True, impl="triton")
    plain_t, plain_n = k.dkd_rows(student, teacher_nan, target, 4.0, False, impl="triton")
    total = k.kd_ce(student, zs_teacher, target, 2.0, 0.1, 0.9, True, impl="triton")[0]
    ref_kd = o.kd_rows(s64[good], zs_teacher[good].double(), 2.0, True)
    ref_t, ref_n = o.dkd_rows(s64[good], zs_teacher[good].double(), target[good], 2.0, True)
    ref_pt, ref_pn = o.dkd_rows(s64[good], teacher_nan[good].double(), target[good], 4.0, False)
    for name, out, ref in (("ls kd", kd, ref_kd), ("ls tckd", tckd, ref_t),
                           ("ls nckd", nckd, ref_n), ("dkd tckd", plain_t, ref_pt),
                           ("dkd nckd", plain_n, ref_pn)):  # fmt: skip
        if name != "dkd tckd":  # a +inf target-free row's TCKD is defined (p_y -> 0)
            checks.append(flag(f"{name} NaN rows", bool(out[bad].isnan().all()), "not NaN"))
        checks.append(compare(f"{name} other rows", out[good], ref, 0.1, RTOL))
    checks.append(flag("ls kd+ce total NaN", bool(total.isnan()), "not NaN"))
    return checks


class _FakeCuda:
    """Stands for a CUDA tensor where only ``is_cuda`` is read (the CPU interpreter run)."""

    is_cuda = True


def _node(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__ if t.grad_fn is not None else "None"


def run_dispatch(env: Env, case: Case) -> list[Check]:
    """``impl="auto"``: fused kernels for CUDA tensors it supports, the reference otherwise."""
    k = env.kernels
    cuda = env.device.type == "cuda"
    saved = os.environ.pop(k.ENV_VAR, None)
    try:
        g = _seed(env, case)
        b, c = case.batch, case.classes
        student = (3 * _randn(g, b, c, env=env)).requires_grad_()
        teacher = (3 * _randn(g, b, c, env=env)).half()
        target = torch.randint(0, c, (b,), generator=g, device=env.device)
        want = "triton" if cuda else "reference"
        checks = [
            flag("auto_resolves", k.resolve_impl("auto", (student, teacher), None) == want, want),
            flag("auto_fake_cuda", k.resolve_impl("auto", (_FakeCuda(),), None) == "triton"),
            flag(
                "auto_unsupported",
                k.resolve_impl("auto", (_FakeCuda(),), "float64") == "reference",
            ),
        ]
        fused = {
            "kd": k.kd_rows(student, teacher, 4.0),
            "ls": k.kd_rows(student, teacher, 2.0, zscore=True),
            "dkd": k.dkd_rows(student, teacher, target, 4.0)[0],
            "ats": k.ats_rows(student, teacher, target, 4.0, 2.0, 1.0),
        }
        names = {"kd": "KDRows", "ls": "KDRows", "dkd": "DKDRows", "ats": "ATSRows"}
        for method, out in fused.items():
            node = _node(out)
            on_fused = node.startswith(names[method])
            checks.append(flag(f"auto_{method}", on_fused == cuda, f"grad_fn {node}"))
        decode_mod = k._fused("decode")
        calls: list[int] = []
        original = decode_mod.decode_teacher

        def counting(*args: Any, **kw: Any) -> torch.Tensor:
            calls.append(1)
            return original(*args, **kw)

        decode_mod.decode_teacher = counting
        try:
            k.decode_teacher(teacher)
        finally:
            decode_mod.decode_teacher = original
        checks.append(flag("auto_decode", bool(calls) == cuda, f"{len(calls)} fused calls"))
        # What auto must send to the reference even on CUDA.
        s64 = student.detach().double().requires_grad_()
        node = _node(k.kd_rows(s64, teacher, 4.0))
        checks.append(flag("auto_f64_reference", not node.startswith("KDRows"), node))
        tau1 = torch.full((b,), 4.0, device=env.device, requires_grad=True)
        out = k.ats_rows(student, teacher, target, tau1, 2.0, 1.0)
        (gt,) = torch.autograd.grad(out.sum(), [tau1])
        ok = not _node(out).startswith("ATSRows") and bool(torch.isfinite(gt).all())
        checks.append(flag("auto_ats_tau_grad_reference", ok, _node(out)))
        checks.append(flag("env_unset", saved is None, f"{k.ENV_VAR}={saved!r} was set"))
        return checks
    finally:
        if saved is not None:
            os.environ[k.ENV_VAR] = saved


#: A learned parameter's gradient against float32's own error row by row (``run_method``): 2x,
#: so that a 6% scale error in global CTKD's theta gradient fails (4x let it pass, CPU,
#: 2026-11-27: float32's row errors there are ~3e-3 of the rows' terms, 2e-2 of the gradient).
ROW_ERRORS = 2.0


def run_method(env: Env, case: Case) -> list[Check]:
    """A registry method on the device under ``impl="auto"`` (the fused kernels on CUDA) against
    the same method in float64 (which the dispatcher sends to the PyTorch reference).

    Beside ``rtol`` of each tensor's size, a tensor also passes when its error is at most 4 times
    that of the float32 PyTorch reference on the same device (``LOGITBANK_KERNELS=reference``):
    a learned temperature's gradient sums rows that pull both ways, and how much of it float32
    keeps is a property of the inputs, not of the kernels. A learned parameter's gradient also
    passes, element by element, within ``ROW_ERRORS`` times float32's error summed row by row
    without cancellation (``row_errors``): the reference's error on the batch is one draw of how its
    rows' errors cancel and may be lucky (seen on an H200, 2026-11-27: global CTKD's theta, the
    fused error 1.7e-2 of the gradient, over 4x the float32 reference's on the batch).
    """
    from pipeline.methods import MethodContext, build_method

    k = env.kernels
    g = _seed(env, case)
    b, c = case.batch, case.classes
    config = json.loads(case.method.removeprefix("method:"))
    method = build_method(config, num_classes=c).to(env.device)
    ctx = MethodContext(epoch=29, num_epochs=240)  # past DKD's warm-up and CTKD's curriculum
    student = (3 * _randn(g, b, c, env=env)).requires_grad_()
    teacher = (0.8 * student.detach() + 1.5 * _randn(g, b, c, env=env)).half()  # stored
    target = torch.randint(0, c, (b,), generator=g, device=env.device)

    def run(module: torch.nn.Module, s: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        params = [p for p in module.parameters() if p.requires_grad]
        total = module(s, t, target, ctx)["total"]
        return [total, *torch.autograd.grad(total, [s, *params])]

    names = ["total", "grad_s"] + [f"grad_{n}" for n, p in method.named_parameters()]
    saved = os.environ.pop(k.ENV_VAR, None)
    try:
        fused = run(method, student, teacher)
        os.environ[k.ENV_VAR] = "reference"
        ref32 = run(copy.deepcopy(method), student, teacher)
    finally:
        os.environ.pop(k.ENV_VAR, None)
        if saved is not None:
            os.environ[k.ENV_VAR] = saved
    s64 = student.detach().double().requires_grad_()
    exact = run(copy.deepcopy(method).double(), s64, teacher.double())

    def row_errors() -> list[torch.Tensor]:
        """Per parameter, elementwise, float32's error row by row without cancellation:
        (1/B) Σ_b |g32_b - g64_b|, g_b the gradient of the method on row b alone, g32 from the
        float32 reference on this device, g64 in float64. A learned temperature's gradient is
        a sum over rows that pull both ways, each row's share O(1/T^3) from O(1/T) parts at
        CTKD's tau ~ 15, so float32 keeps it only to what its rows keep; the reference's error
        on the whole batch is one draw of how those row errors cancel, not a bound. Raises when
        the rows are not independent (the per-row gradients must add up to the batch's)."""
        mod32, mod64 = copy.deepcopy(method), copy.deepcopy(method).double()
        p32 = [p for p in mod32.parameters() if p.requires_grad]
        p64 = [p for p in mod64.parameters() if p.requires_grad]
        errs = [torch.zeros_like(p) for p in p64]
        sums = [torch.zeros_like(p) for p in p64]
        sizes = [torch.zeros_like(p) for p in p64]
        os.environ[k.ENV_VAR] = "reference"
        try:
            for i in range(b):
                rows = slice(i, i + 1)
                s_i, t_i, y_i = student.detach()[rows], teacher[rows], target[rows]
                g32 = torch.autograd.grad(mod32(s_i, t_i, y_i, ctx)["total"], p32)
                total = mod64(s_i.double(), t_i.double(), y_i, ctx)["total"]
                g64 = torch.autograd.grad(total, p64)
                for err, acc, size, a, e in zip(errs, sums, sizes, g32, g64):
                    err += (a.double() - e).abs() / b
                    acc += e / b
                    size += e.abs() / b
        finally:
            os.environ.pop(k.ENV_VAR, None)
            if saved is not None:
                os.environ[k.ENV_VAR] = saved
        for name, acc, size, whole in zip(names[2:], sums, sizes, exact[2:]):
            gap = (acc - whole.detach()).abs().max().item()
            if gap > 1e-9 * max(size.abs().max().item(), 1e-300):
                raise AssertionError(f"{name}: rows are not independent ({gap:.1e}): no row bound")
        return errs

    row_errs: list[torch.Tensor] | None = None
    checks = []
    for index, (name, out, ref, base) in enumerate(zip(names, fused, exact, ref32)):
        check = compare(name, out, ref, 0.0, RTOL)
        base_err = (base.detach().double() - ref.detach()).abs().max().item()
        err = (out.detach().double() - ref.detach()).abs().max().item()
        allowed = max(RTOL * max(ref.detach().abs().max().item(), 0.0), 4 * base_err)
        if not check.ok and check.note == "" and err <= allowed:
            check.ok, check.note = True, f"within 4x the float32 reference's {base_err:.1e}"
            check.tol = err / allowed
        elif not check.ok and check.note == "" and index >= 2:  # a learned parameter's gradient
            row_errs = row_errs if row_errs is not None else row_errors()
            bound = ROW_ERRORS * row_errs[index - 2]
            excess = (out.detach().double() - ref.detach()).abs()
            worst = (excess / bound.clamp_min(1e-300)).max().item()
            if worst <= 1.0:
                check.ok, check.tol = True, worst
                errs = row_errs[index - 2].max().item()
                check.note = f"within {ROW_ERRORS:g}x float32's row errors ({errs:.1e})"
        checks.append(check)
    return checks


RUNNERS: dict[str, Callable[[Env, Case], list[Check]]] = {
    "kd": run_kd,
    "ls": run_kd,
    "ctkd_kd": run_kd,
    "kd_ce": run_kd_ce,
    "ls_ce": run_kd_ce,
    "ctkd_kd_ce": run_kd_ce,
    "dkd_ce": run_dkd_ce,
    "dkd_ls_ce": run_dkd_ce,
    "ctkd_dkd_ce": run_dkd_ce,
    "ats_ce": run_ats_ce,
    "dkd": run_dkd,
    "dkd_ls": run_dkd,
    "ctkd_dkd": run_dkd,
    "ats": run_ats,
    "decode": run_decode,
    "dispatch": run_dispatch,
    "undefined": run_undefined,
}


# ----------------------------------------------------------------------------- the case list

REGISTRY_CONFIGS = (
    {"name": "kd"},
    {"name": "dkd"},
    {"name": "ats"},
    {"name": "ls"},
    {"name": "ls+dkd"},
    {"name": "ctkd"},
    {"name": "ctkd+dkd"},
    {"name": "ls+ctkd"},
    {"name": "ctkd", "variant": "instance"},
)


def build_cases(profile: Profile) -> list[Case]:
    """All cases, most important first (``--budget`` cuts from the end)."""
    cases: list[Case] = []
    b_methods, c_methods = profile.methods_shape
    cases.append(Case("dispatch", "dispatch", c_methods, b_methods))
    for c in profile.classes:  # core: float32 teacher and student
        b = profile.batch[c]
        core = [
            ("kd", "T"),
            ("kd", "T_b"),
            ("ls", "T"),
            ("ls", "T_b"),
            ("dkd", "T"),
            ("dkd", "T_b"),
            ("dkd_ls", "T"),
            ("dkd_ls", "T_b"),
            ("ctkd_kd", "theta"),
            ("ctkd_dkd", "theta"),
            ("kd_ce", "T"),
            ("kd_ce", "T_b"),
            ("ls_ce", "T"),
            ("ctkd_kd_ce", "theta"),
            ("dkd_ce", "T"),
            ("dkd_ce", "T_b"),
            ("dkd_ls_ce", "T"),
            ("ctkd_dkd_ce", "theta"),
            ("ats_ce", "T"),
            ("ats", "T"),
            ("ats", "T_vec"),
            ("decode", "T"),
        ]
        cases += [Case("core", m, c, b, temp=t) for m, t in core]
    for teacher in ("f16", "bf16", "i8"):
        for c in profile.classes:
            b = profile.batch[c]
            dtype_cases = (("kd", "T"), ("ls", "T"), ("dkd", "T_b"), ("ats", "T"), ("kd_ce", "T_b"))
            dtype_cases += (("dkd_ce", "T_b"), ("ats_ce", "T"))
            for method, temp in dtype_cases:
                cases.append(Case("dtype", method, c, b, teacher=teacher, temp=temp))
            cases.append(Case("dtype", "decode", c, b, teacher=teacher))
    for c in profile.classes:
        b = profile.batch[c]
        for method in ("kd", "ls", "dkd", "dkd_ls", "ats", "kd_ce", "ls_ce", "dkd_ce", "ats_ce"):
            cases.append(Case("extreme", method, c, b, inputs="extreme"))
        cases.append(Case("extreme", "dkd", c, b, inputs="gap"))
        cases.append(Case("extreme", "dkd_ce", c, b, inputs="gap"))
    for c in profile.classes:  # -inf teacher logits (p = 0); constant rows z-scored, eps = 0
        b = profile.batch[c]
        for method in ("kd", "dkd", "kd_ce", "dkd_ce"):
            cases.append(Case("edge", method, c, b, temp="T_b", inputs="neginf"))
        cases.append(Case("edge", "ats", c, b, inputs="neginf"))
        for method, temp in (("ls", "T_b"), ("dkd_ls", "T_b"), ("ls_ce", "T"), ("dkd_ls_ce", "T")):
            cases.append(Case("edge", method, c, b, temp=temp, inputs="constant", eps=0.0))
        if b > 4:
            cases.append(Case("edge", "undefined", c, b))
    for c, b in profile.odd_batch.items():
        odd_cases = (("kd", "T_b"), ("ls", "T"), ("dkd", "T_b"), ("dkd_ls", "T"), ("kd_ce", "T_b"))
        odd_cases += (("dkd_ce", "T_b"),)
        for method, temp in odd_cases:
            cases.append(Case("odd_b", method, c, b, teacher="f16", temp=temp))
        cases.append(Case("odd_b", "ats", c, b, teacher="f16"))
        cases.append(Case("odd_b", "ats_ce", c, b, teacher="f16"))
        cases.append(Case("odd_b", "decode", c, b, teacher="i8"))
    for student in ("f16", "bf16"):
        for c in profile.student_classes:
            b = profile.batch[c]
            for method in ("kd", "dkd", "ats", "kd_ce", "dkd_ce", "ats_ce"):
                cases.append(Case("student", method, c, b, teacher="f16", student=student))
    for config in REGISTRY_CONFIGS:
        name = "method:" + json.dumps(config, separators=(",", ":"))
        cases.append(Case("methods", name, c_methods, b_methods, teacher="f16"))
    return cases


# ----------------------------------------------------------------------------- running


def _broken_context(text: str) -> bool:
    words = ("illegal memory access", "device-side assert", "CUDA error", "unspecified launch")
    return any(w in text for w in words)


def run_case(env: Env, case: Case) -> Record:
    start = time.perf_counter()
    runner = run_method if case.method.startswith("method:") else RUNNERS[case.method]
    try:
        checks = runner(env, case)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        checks.append(flag("canaries", env.poison.canaries_intact(), "write past an output"))
        status = "PASS" if all(c.ok for c in checks) else "FAIL"
        return Record(case, status, checks, time.perf_counter() - start)
    except Exception as exc:  # a compile error, a launch failure: report it and go on
        env.poison.buffers.clear()
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        tb = traceback.format_exc(limit=-4)
        return Record(case, "FAIL", [], time.perf_counter() - start, f"{text}\n{tb}")


def format_record(r: Record) -> str:
    head = f"{r.status:<4} {r.case.name}"
    if r.status == "SKIP":
        return f"{head}  ({r.error})"
    if r.error:
        return f"{head}  ERROR {r.error.splitlines()[0][:300]}  {r.seconds:.2f}s"
    worst = ", ".join(f"{c.quantity} {c.rel:.1e}" for c in r.checks if c.rtol > 0)
    bad = [f"{c.quantity}: rel {c.rel:.2e} > {c.rtol:g} {c.note}".strip() for c in r.checks]
    bad = [b for b, c in zip(bad, r.checks) if not c.ok]
    tail = f"  FAILED: {'; '.join(bad)}" if bad else ""
    return f"{head}  rel {r.rel:.1e} tol {r.tol:.2f} ({worst}) {r.seconds:.2f}s{tail}"


def summary(records: list[Record]) -> list[str]:
    """A method × C table of the worst rel/rtol per cell (FAIL / SKIP marked), then totals."""
    lines = ["", "summary: worst (max error / tolerance) per group and method, by C; <= 1 passes"]
    keys: list[tuple[str, str]] = []
    for r in records:
        key = (r.case.group, method_key(r))
        if key not in keys:
            keys.append(key)
    classes = sorted({r.case.classes for r in records})
    lines.append(f"{'group':<8} {'method':<16} " + " ".join(f"{c:>9}" for c in classes))
    for group, method in keys:
        cells = []
        for c in classes:
            rs = [
                r
                for r in records
                if r.case.group == group and r.case.classes == c and method_key(r) == method
            ]
            if not rs:
                cells.append(f"{'':>9}")
            elif any(r.status == "FAIL" for r in rs):
                cells.append(f"{'FAIL':>9}")
            elif all(r.status == "SKIP" for r in rs):
                cells.append(f"{'skip':>9}")
            else:
                cells.append(f"{max(r.tol for r in rs if r.status == 'PASS'):>9.3f}")
        lines.append(f"{group:<8} {method:<16} " + " ".join(cells))
    counts = {s: sum(r.status == s for r in records) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(
        f"\n{len(records)} cases: {counts['PASS']} passed, {counts['FAIL']} failed, "
        f"{counts['SKIP']} skipped"
    )
    worst = max((r for r in records if r.status == "PASS"), key=lambda r: r.tol, default=None)
    if worst is not None:
        lines.append(f"closest to its tolerance: {worst.case.name.strip()} (tol {worst.tol:.3f})")
    for r in records:
        if r.status == "FAIL":
            lines.append("FAILED: " + format_record(r))
    return lines


def method_key(r: Record) -> str:
    method = r.case.method
    if method.startswith("method:"):
        config = json.loads(method.removeprefix("method:"))
        return "method:" + config["name"] + ("(inst)" if "variant" in config else "")
    return method


def environment(kernels: ModuleType, device: torch.device) -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "interpreted": kernels._interpreted(),
        kernels.ENV_VAR: os.environ.get(kernels.ENV_VAR),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def record_json(r: Record, index: int) -> dict[str, Any]:
    return {
        "index": index,
        "case": asdict(r.case),
        "name": r.case.name,
        "status": r.status,
        "rel": r.rel,
        "tol": r.tol,
        "seconds": r.seconds,
        "error": r.error,
        "checks": [asdict(c) for c in r.checks],
    }


def record_from_json(d: dict[str, Any]) -> Record:
    checks = [Check(**c) for c in d["checks"]]
    return Record(Case(**d["case"]), d["status"], checks, d["seconds"], d["error"])


def partition(cases: list[Case], jobs: int) -> list[list[int]]:
    """Case indices per worker. Cases of one (C, B, teacher, student) compile mostly the same
    kernel specializations, so each such group goes to one worker (largest groups first, each
    to the least loaded worker); a worker runs its cases in the list's order."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault((c.classes, c.batch, c.teacher, c.student), []).append(i)
    load = [0] * jobs
    parts: list[list[int]] = [[] for _ in range(jobs)]
    for members in sorted(groups.values(), key=len, reverse=True):
        k = load.index(min(load))
        parts[k] += members
        load[k] += len(members)
    return [sorted(part) for part in parts]


def run_serial(
    env: Env, cases: list[Case], indices: list[int], deadline: float, emit: Callable
) -> None:
    """Run ``cases[i]`` for i in indices; ``emit(i, record)`` after each (SKIPs included)."""
    broken = ""
    for i in indices:
        case = cases[i]
        if broken:
            emit(i, Record(case, "SKIP", error=f"CUDA context broken: {broken}"))
        elif time.time() > deadline:
            emit(i, Record(case, "SKIP", error="over the --budget"))
        else:
            record = run_case(env, case)
            emit(i, record)
            if record.error and _broken_context(record.error):
                broken = record.error.splitlines()[0][:200]


def run_workers(
    argv: list[str], cases: list[Case], jobs: int, deadline: float, say: Callable
) -> tuple[list[Record], list[str]]:
    """Run the cases in ``jobs`` worker processes (triton compiles on several cores; a worker
    that breaks its CUDA context takes only its own cases down). Returns the records in the
    cases' order and the heavy modules any worker imported."""
    tmp = Path(tempfile.mkdtemp(prefix="check_kernels_"))
    procs = []
    for k in range(jobs):
        out = tmp / f"worker{k}.jsonl"
        cmd = [sys.executable, "-m", "tests.gpu.check_kernels", *argv]
        cmd += ["--worker", f"{k}/{jobs}", "--worker-out", str(out), "--deadline", str(deadline)]
        procs.append((subprocess.Popen(cmd), out))
    hard = deadline + 45.0  # a case in flight at the deadline may still compile
    killed = set()
    for k, (proc, _) in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, hard - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed.add(k)
    parts = partition(cases, jobs)
    found: dict[int, Record] = {}
    heavy: set[str] = set()
    for k, (proc, out) in enumerate(procs):
        lines = out.read_text().splitlines() if out.exists() else []
        for line in lines:
            d = json.loads(line)
            if "heavy" in d:
                heavy.update(d["heavy"])
            else:
                found[d["index"]] = record_from_json(d)
        first = True
        for i in parts[k]:
            if i in found:
                continue
            if k in killed:
                found[i] = Record(cases[i], "SKIP", error="worker killed at the deadline")
            elif first:
                why = f"worker {k} exited with {proc.returncode} during this case"
                found[i] = Record(cases[i], "FAIL", error=why)
            else:
                found[i] = Record(cases[i], "SKIP", error=f"worker {k} exited earlier")
            first = False
        if proc.returncode != 0 and k not in killed:
            say(f"worker {k} exited with {proc.returncode}")
    shutil.rmtree(tmp, ignore_errors=True)
    return [found[i] for i in range(len(cases))], sorted(heavy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="CPU, TRITON_INTERPRET=1, small")
    parser.add_argument("--out", type=Path, default=None, help="write check_kernels.{json,txt}")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds; later cases skip")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes")
    parser.add_argument("--only", nargs="+", default=None, help="substrings of case names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "k/n"
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0"):
        print("note: TRITON_INTERPRET was set; removed, so the kernels are compiled", flush=True)
    profile_name = args.profile or ("small" if args.interpret else "full")
    cases = build_cases(PROFILES[profile_name])
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not args.interpret and not torch.cuda.is_available():
        print("no CUDA device: run with --interpret to check on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.interpret else "cuda")

    isolate_storage()  # before anything imports pipeline (pipeline.errors -> storage.errors)
    import pipeline.kernels as kernels
    from tests.kernels import oracle

    lines: list[str] = []
    prefix = f"[w{args.worker.split('/')[0]}] " if args.worker else ""

    def say(line: str) -> None:
        lines.append(line)
        print(prefix + line, flush=True)

    started = time.time()
    if not kernels.triton_available():
        say("FAIL triton does not import here")
        return 1
    info = environment(kernels, device)
    if info["interpreted"] != args.interpret:
        say(f"FAIL kernels interpreted={info['interpreted']} but --interpret={args.interpret}")
        return 1
    budget = args.budget if args.budget is not None else (1e9 if args.interpret else 150.0)
    deadline = args.deadline if args.deadline is not None else started + budget
    env = Env(kernels, oracle, device, args.seed, PoisonedTorch())
    for name in FUSED_MODULES:
        kernels._fused(name).torch = env.poison  # outputs allocated by the kernels are poisoned

    if args.worker is not None:  # one worker of a parallel run: its share, as JSON lines
        k, n = map(int, args.worker.split("/"))
        with args.worker_out.open("w") as sink:

            def emit(i: int, record: Record) -> None:
                sink.write(json.dumps(record_json(record, i), default=str) + "\n")
                sink.flush()
                if record.status != "SKIP":
                    say(format_record(record))

            run_serial(env, cases, partition(cases, n)[k], deadline, emit)
            sink.write(json.dumps({"heavy": heavy_modules()}) + "\n")
        return 0

    default_jobs = 1 if args.interpret else max(1, min(8, (os.cpu_count() or 2) // 2))
    jobs = max(1, min(args.jobs or default_jobs, len(cases)))
    say("check_kernels: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    say(f"{len(cases)} cases, {jobs} jobs, budget {budget:g}s, seed {args.seed}, rtol {RTOL:g}")
    if jobs == 1:
        records: list[Record] = []

        def collect(i: int, record: Record) -> None:
            records.append(record)
            if record.status != "SKIP":
                say(format_record(record))

        run_serial(env, cases, list(range(len(cases))), deadline, collect)
        heavy = heavy_modules()
    else:
        passed_on = _worker_args(list(argv if argv is not None else sys.argv[1:]))
        records, heavy = run_workers(passed_on, cases, jobs, deadline, say)
        heavy = sorted(set(heavy) | set(heavy_modules()))
        lines += [format_record(r) for r in records if r.status != "SKIP"]  # in order
    for line in summary(records):
        say(line)
    say(f"heavy modules imported: {heavy or 'none'}")
    lines += [format_record(r) for r in records if r.status == "SKIP"]
    elapsed = time.time() - started
    say(f"check_kernels: {elapsed:.1f}s")
    failed = any(r.status == "FAIL" for r in records) or bool(heavy)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": info,
            "seconds": elapsed,
            "jobs": jobs,
            "rtol": RTOL,
            "heavy_modules": heavy,
            "passed": not failed,
            "records": [record_json(r, i) for i, r in enumerate(records)],
        }
        (args.out / "check_kernels.json").write_text(json.dumps(payload, indent=1, default=str))
        (args.out / "check_kernels.txt").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


def _worker_args(argv: list[str]) -> list[str]:
    """The command line a worker gets: the parent's, less --out/--jobs/--list/--budget."""
    out: list[str] = []
    skip = 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=")[0]
        if name in ("--out", "--jobs", "--budget"):
            skip = 0 if "=" in a else 1
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
