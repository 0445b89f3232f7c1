"""The GPU check script stays runnable without a GPU: its CPU-interpreter mode on a few cases.

The real run is ``bash tests/gpu/run_on_device.sh`` on a CUDA machine (compiled kernels).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.gpu import check_kernels
from tests.kernels import require_triton

ROOT = Path(__file__).resolve().parents[2]


def test_cases_cover_every_kernel_and_partition_once() -> None:
    cases = check_kernels.build_cases(check_kernels.PROFILES["full"])
    methods = {c.method for c in cases}
    assert {"kd", "ls", "dkd", "dkd_ls", "ats", "decode", "ctkd_kd", "ctkd_dkd"} <= methods
    assert {
        "kd_ce",
        "ls_ce",
        "ctkd_kd_ce",
        "dkd_ce",
        "dkd_ls_ce",
        "ctkd_dkd_ce",
        "ats_ce",
    } <= methods
    assert {c.teacher for c in cases} == set(check_kernels.TEACHERS)
    assert {2, 10, 100, 1000, 32768, 131072} <= {c.classes for c in cases}
    assert all(c.batch * c.classes <= 2**22 for c in cases)
    parts = check_kernels.partition(cases, 8)
    assert sorted(i for part in parts for i in part) == list(range(len(cases)))


def test_worker_args_drop_parent_only_options() -> None:
    argv = ["--out", "/tmp/x", "--jobs=4", "--budget", "9", "--seed", "3", "--only", "kd"]
    assert check_kernels._worker_args(argv) == ["--seed", "3", "--only", "kd"]


def test_interpreter_run_passes(tmp_path: Path) -> None:
    require_triton()
    cmd = [sys.executable, "-m", "tests.gpu.check_kernels", "--interpret", "--jobs", "1"]
    cmd += ["--only", "C=10 ", "dispatch", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    payload = json.loads((tmp_path / "check_kernels.json").read_text())
    assert payload["passed"] and payload["heavy_modules"] == []
    assert payload["environment"]["interpreted"] is True
    assert {r["status"] for r in payload["records"]} == {"PASS"}


def test_tile_sweep_candidates_and_dry_run() -> None:
    """tests/gpu/tile_sweep.py (a GPU tool): every C's default tile is among its candidates, each
    candidate is a legal tile, and every candidate of C = 37 computes what the reference does."""
    require_triton()
    from pipeline.kernels.triton_common import launch_config
    from tests.gpu import tile_sweep

    for method in ("kd", "dkd"):
        for classes in tile_sweep.CLASSES:
            tiles = tile_sweep.candidates(classes, method)
            batch = tile_sweep.ELEMENTS // classes
            assert tile_sweep.default_tile(batch, classes, method, "cpu") in tiles
            assert any(len(t) == 4 for t in tiles) == (method == "kd" and classes >= 8192)
            for tile in tiles:
                launch = launch_config(batch, classes, tile[:3])
                assert 1 <= launch.rows * launch.block // (32 * launch.num_warps) <= 32
    cmd = [sys.executable, "-m", "tests.gpu.tile_sweep", "--interpret"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("agree with the reference") == 2, run.stdout


def test_host_cost_dry_run(tmp_path: Path) -> None:
    """tests/gpu/host_cost.py (a GPU tool) runs every row and the profile under the interpreter
    and writes its JSON with a figure for each row."""
    require_triton()
    cmd = [sys.executable, "-m", "tests.gpu.host_cost", "--interpret", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    payload = json.loads((tmp_path / "host_cost.json").read_text())
    assert len(payload["us"]) == 13 and all(us > 0 for us in payload["us"].values())
    assert "function calls" in (tmp_path / "host_cost_profile.txt").read_text()


def test_host_variants_dry_run() -> None:
    """tests/gpu/host_variants.py (a GPU tool) builds every variant under the interpreter, and
    each one's loss and gradient equal the shipped fused step's (it asserts so itself)."""
    require_triton()
    cmd = [sys.executable, "-m", "tests.gpu.host_variants", "--interpret", "--classes", "64"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    checked = [line for line in run.stdout.splitlines() if line.startswith("C=64")]
    assert len(checked) == 8, run.stdout  # 7 variants against the shipped step, and the end
    assert checked[-1] == "C=64: code paths ran (no timing on CPU)"
