"""The fused kernels' default tiles keep enough warps resident on an H100/H200 SM.

Compiled for sm_90 on this machine (no GPU needed; tests/kernels/registers.py). These kernels
are memory-bound: an SM hides the latency of its loads with the warps it keeps resident, and
registers per thread bound that number. The tiles once chosen for C < 1024 (2,048 elements, 8
warps, several rows' pieces per thread) took 206-255 registers in the forward kernels: 8 warps
per SM, a likely cause of the fused KD kernel measured 1.4x *slower* than eager PyTorch at
C = 10 on an H200 (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.kernels import require_triton

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def usage() -> list[dict]:
    require_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton's default, said explicitly (quiet)
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.registers", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_and_tile_compiles_without_spilling(usage) -> None:
    assert len(usage) >= 40
    spilled = [(r["variant"], r["classes"], r["local"]) for r in usage if r["local"]]
    assert not spilled


def test_everyday_kernels_keep_16_warps_resident_at_every_class_count(usage) -> None:
    """KD, DKD, ATS forward and backward with a float16 teacher: >= 16 resident warps (<= 128
    registers at 4 warps a program); the old small-C tiles gave 8."""
    low = [
        (r["variant"], r["classes"], r["tile"], r["registers"], r["resident_warps"])
        for r in usage
        if r["plain"] and r["resident_warps"] < 16
    ]
    assert not low


def test_no_kernel_is_near_the_register_ceiling(usage) -> None:
    """A thread gets at most 255 registers; the old multi-row tiles hit it (the forward kernels,
    and every z-scored, int8 or temperature-gradient variant) and ptxas then squeezes the code.
    The heaviest now, CTKD's temperature gradient through z-scored DKD from an int8 teacher at
    C = 10, takes about 200."""
    heavy = [(r["variant"], r["classes"], r["registers"]) for r in usage if r["registers"] > 224]
    assert not heavy
