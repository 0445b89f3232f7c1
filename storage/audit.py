"""How much each encoding loses, measured where it matters: in the distillation loss.

For a sample of rows of a store, every encoding is applied in memory and decoded again; the KD loss
``T² · KL(softmax(t/T) || softmax(s/T))`` is computed in float64 with the decoded teacher and with
the store's own values (the reference: exact when the store is float32), and the relative error of
the batch loss is reported for T = 1, 2, 4, 8 and for z-scored logits (logit standardization, at
its base temperature 2). The student is synthetic and fixed by the seed: the teacher's logits
halved plus Gaussian noise of each row's std — a half-trained student, where KD is used.
"""

from __future__ import annotations

import math

import numpy as np

from storage.base import LogitStore
from storage.encodings import ENCODINGS, decode, encode
from storage.errors import BadWriteError
from storage.layout import DEFAULT_TOPK, row_bytes

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
ZSCORE_TEMPERATURE = 2.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def kd_loss(teacher: np.ndarray, student: np.ndarray, temperature: float) -> float:
    """Batch-mean T²·KL(p_t || p_s) in float64."""
    lt = _log_softmax(teacher / temperature)
    ls = _log_softmax(student / temperature)
    return float(temperature**2 * (np.exp(lt) * (lt - ls)).sum(axis=1).mean())


def zscore(x: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, ddof=1, keepdims=True) + eps)


def sample_rows(store: LogitStore, rows: int, seed: int = 0) -> np.ndarray:
    """float64 logits of up to ``rows`` random done rows, across views."""
    rng = np.random.default_rng(seed)
    done_views = [v for v in range(store.num_views) if store.done[v].all()] or [0]
    per_view = max(1, rows // len(done_views))
    out = []
    for v in done_views:
        idx = np.sort(rng.choice(store.num_samples, min(per_view, store.num_samples), False))
        out.append(store.read(idx, view=v))
    return np.concatenate(out).astype(np.float64)


def audit_logits(teacher: np.ndarray, seed: int = 0, topk: int | None = None) -> list[dict]:
    """One row per encoding: bytes per row, max |error|, relative KD-loss error per temperature."""
    c = teacher.shape[1]
    rng = np.random.default_rng(seed)
    std = teacher.std(axis=1, ddof=1, keepdims=True)
    student = 0.5 * teacher + rng.standard_normal(teacher.shape) * std
    ref = {t: kd_loss(teacher, student, t) for t in TEMPERATURES}
    ref_z = kd_loss(zscore(teacher), zscore(student), ZSCORE_TEMPERATURE)
    k = topk or min(DEFAULT_TOPK, c - 1)
    table = []
    for name in ENCODINGS:
        row = {"encoding": name, "bytes_per_row": row_bytes(c, name, k) + 16}
        try:
            parts = encode(name, teacher.astype(np.float32), k)
        except BadWriteError as exc:
            row["error"] = str(exc)
            table.append(row)
            continue
        dec = decode(name, parts, c).astype(np.float64)
        row["max_abs_error"] = float(np.abs(dec - teacher).max())
        for t in TEMPERATURES:
            row[f"kd_T{t:g}"] = _relative(kd_loss(dec, student, t), ref[t])
        row["kd_zscore"] = _relative(
            kd_loss(zscore(dec), zscore(student), ZSCORE_TEMPERATURE), ref_z
        )
        table.append(row)
    return table


def _relative(value: float, ref: float) -> float:
    """|value - ref| / ref; where the reference loss is 0 (constant rows: teacher and student
    agree exactly), 0 if the decoded loss is too, else inf (it was a ZeroDivisionError)."""
    err = abs(value - ref)
    if ref != 0:
        return err / ref
    return 0.0 if err == 0 else math.inf


def format_audit(table: list[dict], rows: int, reference: str) -> str:
    cols = [f"kd_T{t:g}" for t in TEMPERATURES] + ["kd_zscore"]
    head = ["encoding", "bytes/row", "max|err|", *[f"rel.err {c[3:]}" for c in cols]]
    lines = [
        f"audit of {rows} rows; reference: the store's {reference} values; relative error "
        f"of the batch KD loss (z-score at T={ZSCORE_TEMPERATURE:g})",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for r in table:
        if "error" in r:
            cells = [r["encoding"], str(r["bytes_per_row"]), "n/a: " + r["error"].split(":")[0]]
            cells += [""] * len(cols)
        else:
            cells = [r["encoding"], str(r["bytes_per_row"]), f"{r['max_abs_error']:.3g}"]
            cells += [f"{r[c]:.2e}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
