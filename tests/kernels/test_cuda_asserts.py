"""On a CUDA machine: the tensor values a check could read only with a host sync a step (a
per-sample temperature, ATS's tau1 >= tau2) are asserted on the device, as PyTorch's
cross-entropy asserts its targets. Each call runs in its own process: a device-side assert ends
the process's CUDA context. Off CUDA these values are refused in one line
(``tests/kernels/test_dispatch.py``, ``tests/methods``); here they were not looked at, and a -1
in a per-sample temperature gave a finite, wrong loss (before 2026-11-27)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run on a GPU: tests/gpu/run_on_device.sh)"
)

ROOT = Path(__file__).resolve().parents[2]

SETUP = """
import torch
from pipeline import kernels
from pipeline.methods import ats, kd
torch.manual_seed(0)
s = torch.randn(4, 10, device="cuda", requires_grad=True)
t = torch.randn(4, 10, device="cuda").half()
y = torch.tensor([0, 1, 2, 9], device="cuda")
good = torch.full((4,), 4.0, device="cuda")
bad = torch.tensor([4.0, {bad}, 4.0, 4.0], device="cuda")
"""

CALLS = {
    "kd_rows": "kernels.kd_rows(s, t, {temp}).sum().backward()",
    "kd_rows reference": "kernels.kd_rows(s, t, {temp}, impl='reference').sum().backward()",
    "kd_ce": "kernels.kd_ce(s, t, y, {temp}, 0.1, 0.9)[0].backward()",
    "dkd_ce": "kernels.dkd_ce(s, t, y, {temp}, 1.0, 1.0, 8.0)[0].backward()",
    "ats_rows tau1": "kernels.ats_rows(s, t, y, {temp}, 1.0, 1.0).sum().backward()",
    "kd_loss": "kd.kd_loss(s, t.float(), {temp}).backward()",
    "ats_loss tau1 < tau2": "ats.ats_loss(s, t.float(), y, {temp}, good).backward()",
}


def _run(calls: str, bad: str) -> subprocess.CompletedProcess:
    code = SETUP.format(bad=bad) + calls + "\ntorch.cuda.synchronize()\n"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_good_temperatures_pass() -> None:
    """Every call below, with valid temperatures, in one process (so the failures below are
    the asserts', not a call that fails anyway)."""
    calls = "\n".join(call.format(temp="good") for call in CALLS.values())
    done = _run(calls, "4.0")
    assert done.returncode == 0, done.stderr[-2000:]


# -1 for every call; NaN, 0 and +inf through the shared check once each (a process a case).
CASES = [(name, "-1.0") for name in sorted(CALLS)] + [
    ("kd_rows", "float('nan')"),
    ("kd_ce", "0.0"),
    ("dkd_ce", "float('inf')"),
    ("ats_loss tau1 < tau2", "1.0"),  # > 0 and finite, but below tau2 = 4 on row 1
]


@pytest.mark.parametrize(("name", "bad"), CASES)
def test_bad_temperatures_stop_on_the_device(name: str, bad: str) -> None:
    done = _run(CALLS[name].format(temp="bad"), bad)
    assert done.returncode != 0, f"{name} took a temperature of {bad} on CUDA"
    assert "device-side assert" in done.stderr, done.stderr[-2000:]
