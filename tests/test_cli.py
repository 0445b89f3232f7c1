"""The command line: bad input ends in one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage import create_store

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["verify", "/nonexistent/store.zarr"], "does not exist"),
        (["audit", "/nonexistent/store.zarr"], "does not exist"),
        (["plan", "-N", "0", "-C", "10"], "num_samples must be > 0"),
        (["plan", "-N", "10", "-C", "1"], "num_classes must be >= 2"),
        (["plan", "-N", "10", "-C", "10", "--encoding", "fp8"], "unknown encoding 'fp8'"),
        (
            ["plan", "-N", "100", "-C", "10", "--encoding", "topk", "--topk", "10"],
            r"topk k must be in \[1, 9\]",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert __import__("re").search(message, lines[0]), lines[0]


def test_plan_prints_an_imagenet_estimate():
    result = cli("plan", "-N", "1281167", "-C", "1000", "-V", "10")
    assert result.returncode == 0, result.stderr
    files = int(result.stdout.split(" file(s)")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert 1000 <= files <= 5000, result.stdout  # a few thousand files, not millions
    assert "24.2 GiB" in result.stdout  # its last chunk a view padded, as zarr writes it


def test_verify_and_audit_on_a_store(tmp_path):
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    with create_store(path, 300, 10, 2, chunk_rows=64) as store:
        for v in range(2):
            store.write(v, 0, rng.standard_normal((300, 10)).astype(np.float32) * 3)
    result = cli("verify", str(path))
    assert result.returncode == 0 and "OK: 10/10 chunks checked" in result.stdout
    result = cli("audit", str(path), "--rows", "200")
    assert result.returncode == 0, result.stderr
    rows = {
        line.split("|")[1].strip(): line
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "encoding" not in line and "---" not in line
    }
    assert set(rows) == {"float32", "float16", "bfloat16", "int8", "topk"}


def test_unfinished_store_verify_lists_missing_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, 300, 10, 1, chunk_rows=64, chunks_per_shard=1) as store:
        store.write(0, 0, np.ones((128, 10), np.float32))
    result = cli("verify", str(path))
    assert result.returncode == 1
    assert "missing: view 0 chunks 2..4" in result.stdout
