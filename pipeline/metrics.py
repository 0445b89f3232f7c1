"""A student's ``metrics.jsonl``: one JSON record per epoch, written by distill, read by report
and sweep. Light (no torch), so the report reads it without importing the training code.

    {"epoch": 3, "lr": 0.05, "loss": {"ce": 0.41, "kd": 0.93, "total": 0.88}, "train_acc": 86.9,
     "rows_per_s": 22943.1, "views": [2], "test_acc": 85.4, "seconds": 2.6}

A diverged epoch (a loss term NaN or infinite) is kept as it was, ``NaN``/``Infinity`` written as
Python's json module writes them, so the report can show where a run stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.fileio import atomic_write


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl, rewritten whole from the state's history so it always matches it."""
    with atomic_write(path, "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")


def diverged(record: dict) -> bool:
    """Whether an epoch's record has a loss term that is NaN or infinite."""
    return not all(math.isfinite(float(v)) for v in record.get("loss", {}).values())
