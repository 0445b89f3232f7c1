"""A student's ``metrics.jsonl``: one JSON record per epoch, written by distill, read by report
and sweep. Light (no torch), so the report reads it without importing the training code.

    {"epoch": 3, "lr": 0.05, "loss": {"ce": 0.41, "kd": 0.93, "total": 0.88}, "train_acc": 86.9,
     "rows_per_s": 22943.1, "views": [2], "test_acc": 85.4, "seconds": 2.6}

A diverged epoch (a loss term NaN, infinite or over ``TERM_LIMIT``, or the total grown over
``GROWTH_LIMIT`` times its first epoch's) is kept as it was, ``NaN``/``Infinity`` written as
Python's json module writes them, with ``"diverged": [what, detail]`` added, so the report can
show where a run stopped.
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


#: A total loss this many times its first epoch's means divergence, NaN or not. In healthy runs
#: (tests, Fashion-MNIST: KD, CTKD, DKD with its warm-up, PS-KD, ATS, LS) it stayed within 6x;
#: DKD at a learning rate too high for an MLP grew 3e5-6e8-fold an epoch before turning NaN, or
#: stayed finite at 1e20 with the student at chance.
GROWTH_LIMIT = 1000.0
#: A loss term this large means divergence even in epoch 1, when there is no earlier epoch to
#: measure growth against (a blow-up within the first epoch): cross-entropy this size needs logit
#: gaps of 1e5; the exploding DKD runs above had terms of 3e5-1e19.
TERM_LIMIT = 1e5


def divergence(record: dict, first: dict) -> tuple[str, str] | None:
    """(what the loss did, the numbers) if epoch ``record`` diverged, else None; ``first`` is
    the run's first epoch's record (its total is the scale the growth is measured against)."""
    loss = record.get("loss", {})
    bad = [f"{k} {v}" for k, v in loss.items() if not math.isfinite(float(v))]
    if bad:
        return "became non-finite", ", ".join(bad)
    total, start = loss.get("total"), first.get("loss", {}).get("total")
    if total is not None and start is not None and start > 0 and total > GROWTH_LIMIT * start:
        return (
            f"grew over {GROWTH_LIMIT:,.0f}-fold",
            f"total {start:.4g} in epoch {first.get('epoch', 1)}, {total:.4g} now",
        )
    # The terms as computed (the total is weighted: large weights are the user's choice).
    huge = [
        f"{k} {float(v):.4g}"
        for k, v in loss.items()
        if k != "total" and abs(float(v)) > TERM_LIMIT
    ]
    if huge:
        return f"exceeded {TERM_LIMIT:.0e}", ", ".join(huge)
    return None


def diverged(record: dict) -> bool:
    """Whether a record of metrics.jsonl is of a diverged epoch: marked so by distill, or (in a
    file from before the mark) with a loss term NaN or infinite."""
    if "diverged" in record:
        return True
    return not all(math.isfinite(float(v)) for v in record.get("loss", {}).values())


def first_diverged_epoch(history: list[dict]) -> int | None:
    """The first epoch of a metrics.jsonl history that diverged (marked by distill, or by its
    values: a file written before the mark, or by a run that trained on through it)."""
    for i, record in enumerate(history):
        if diverged(record) or divergence(record, history[0]) is not None:
            return int(record.get("epoch", i + 1))
    return None
