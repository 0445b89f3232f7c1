"""Sizes given to ``make_layout`` are used as given or refused in one line that names the value and
the allowed range: never quietly replaced (0 by "automatic", 2.5 by 2). None means automatic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage import StoreError, make_layout

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "given, message",
    [
        ({"chunk_rows": 0}, r"chunk_rows must be >= 1 \(None for automatic\), got 0"),
        ({"chunk_rows": -64}, r"chunk_rows must be >= 1 \(None for automatic\), got -64"),
        ({"chunk_rows": 2.5}, r"chunk_rows must be an integer >= 1 \(None .*\), got 2\.5"),
        ({"chunk_rows": True}, r"chunk_rows must be an integer >= 1 \(None .*\), got True"),
        ({"chunks_per_shard": 0}, r"chunks_per_shard must be >= 1 \(None .*\), got 0"),
        ({"chunks_per_shard": 1.5}, r"chunks_per_shard must be an integer >= 1 .*, got 1\.5"),
        ({"encoding": "topk", "topk": 0}, r"topk k must be in \[1, 9\] for 10 classes, got 0"),
        ({"encoding": "topk", "topk": 2.5}, r"topk must be an integer \(None .*\), got 2\.5"),
        ({"view_param_width": -1}, r"view_param_width must be >= 0 \(0 for none\), got -1"),
        ({"view_param_width": 1.5}, r"view_param_width must be an integer >= 0 .*, got 1\.5"),
    ],
)
def test_a_size_out_of_range_is_refused(given, message):
    with pytest.raises(StoreError, match=message) as caught:
        make_layout(1000, 10, **given)
    assert "\n" not in str(caught.value)


def test_none_is_automatic_and_a_size_given_is_kept():
    auto = make_layout(60_000, 10)
    assert make_layout(60_000, 10, chunk_rows=None, chunks_per_shard=None) == auto
    assert (auto.chunk_rows, auto.chunks_per_shard) == (8192, 1)  # Fashion-MNIST, as shipped
    given = make_layout(60_000, 10, chunk_rows=np.int64(100), chunks_per_shard=3)
    assert (given.chunk_rows, given.chunks_per_shard) == (100, 3)
    assert make_layout(1000, 10, encoding="topk").topk == 9  # the default: at most C - 1
    assert make_layout(1000, 10, encoding="topk", topk=np.int32(4)).topk == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--chunk-rows", "0"], "chunk_rows must be >= 1 (None for automatic), got 0"),
        (["--encoding", "topk", "--topk", "0"], "topk k must be in [1, 9] for 10 classes, got 0"),
    ],
)
def test_plan_refuses_a_zero_size(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", "-N", "100", "-C", "10", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
