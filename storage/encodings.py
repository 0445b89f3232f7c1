"""How raw float32 logits are encoded on disk, and decoded back.

Every encoding also stores ``stats`` per row of the *full raw* logits — max, logsumexp, mean and
unbiased std — computed in float64 before encoding, so temperature and z-score stay computable
whatever was lost.

- ``float32``: exact.
- ``float16``: 11-bit mantissa; values beyond +-65504 are refused (use float32 or bfloat16).
- ``bfloat16``: 8-bit mantissa, float32's range; stored as the uint16 bit pattern (numpy, zarr and
  HDF5 have no bfloat16 type): ``float32 = (uint32(bits) << 16).view(float32)``.
- ``int8``: per-row affine, ``logit = q * scale + offset`` with ``q`` in [-127, 127],
  ``offset = (max + min) / 2`` and ``scale = (max - min) / 254``.
- ``topk``: the k largest logits (float16) and their class indices (int32). The other C - k classes
  are rebuilt as one constant ``tail`` chosen so that the row's logsumexp equals the stored one:
  ``tail = log((exp(lse) - sum_k exp(v_k)) / (C - k))``. Softmax mass at T = 1 is therefore exact in
  total, but its spread over the tail classes is lost (flat); at other temperatures and after
  z-score the error grows — ``python -m pipeline audit`` measures it on your store.
"""

from __future__ import annotations

import sys

import numpy as np

from storage.errors import BadWriteError, StoreError

FLOAT16_MAX = 65504.0
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Bytes of float32 rows the topk selection works on at once: ``argpartition`` of the negated rows
#: allocates 3x its input (the negated copy, int64 indices), so a big block goes a slice at a time.
TOPK_BLOCK_BYTES = 8 << 20


# Row arrays each encoding writes besides ``stats``: name → (stored dtype, last axis), where the
# last axis is "classes", "topk", or None for a (V, N) array.
ENCODINGS: dict[str, dict[str, tuple[str, str | None]]] = {
    "float32": {"logits": ("float32", "classes")},
    "float16": {"logits": ("float16", "classes")},
    "bfloat16": {"logits": ("uint16", "classes")},  # bfloat16 bit patterns
    "int8": {
        "logits": ("int8", "classes"),
        "scale": ("float32", None),
        "offset": ("float32", None),
    },
    "topk": {"topk_values": ("float16", "topk"), "topk_indices": ("int32", "topk")},
}
STATS_FIELDS = ("max", "logsumexp", "mean", "std")


def row_arrays(encoding: str, num_classes: int, topk: int = 0) -> dict[str, tuple[str, int | None]]:
    """Every per-row array of an encoding, ``stats`` included: name → (dtype, last axis or None)."""
    if encoding not in ENCODINGS:
        raise StoreError(f"unknown encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    width = {"classes": num_classes, "topk": topk, None: None}
    out = {name: (dtype, width[axis]) for name, (dtype, axis) in ENCODINGS[encoding].items()}
    out["stats"] = ("float32", len(STATS_FIELDS))
    return out


def row_stats(logits: np.ndarray) -> np.ndarray:
    """Per-row max, logsumexp, mean and unbiased std of raw logits, in float64 → float32 (B, 4)."""
    return _row_stats64(logits)[0].astype(np.float32)


def row_stats_reference(logits: np.ndarray) -> np.ndarray:
    """The plain float64 formulas ``row_stats`` is tested against (whole-array, slow)."""
    x = logits.astype(np.float64, copy=False)  # (B, C)
    mx = x.max(axis=1)
    lse = mx + np.log(np.exp(x - mx[:, None]).sum(axis=1))
    return np.stack([mx, lse, x.mean(axis=1), x.std(axis=1, ddof=1)], axis=1)


#: Bytes of float64 rows ``_row_stats64`` works on at once: a block stays in the CPU's L2 cache,
#: instead of the B x C float64 temporaries the plain formulas allocate (and page-fault) per pass.
STATS_BLOCK_BYTES = 1 << 20


def _row_stats64(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (B, 4) max, logsumexp, mean, unbiased std; float64 (B,) row min).

    Everything is computed in float64 from the float32 values, a cache-sized block of rows at a
    time: max, then the mean (pairwise sum), then the squared deviations from that mean (two-pass
    variance), then ``exp(x - max)`` summed. A row holding NaN/inf has a non-finite mean.
    """
    b, c = logits.shape
    step = max(1, min(b, STATS_BLOCK_BYTES // (8 * c)))
    buf = np.empty((step, c), np.float64)
    stats = np.empty((b, 4), np.float64)
    row_min = np.empty(b, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows: refused by the caller
        for a in range(0, b, step):
            z = min(a + step, b)
            x = buf[: z - a]
            np.copyto(x, logits[a:z])
            mx = x.max(axis=1)
            mean = x.sum(axis=1)
            mean /= c
            x.min(axis=1, out=row_min[a:z])
            x -= mean[:, None]
            sq = np.einsum("ij,ij->i", x, x)
            x -= (mx - mean)[:, None]  # now x - max
            np.exp(x, out=x)
            st = stats[a:z]
            st[:, 0] = mx
            st[:, 1] = np.log(x.sum(axis=1))
            st[:, 1] += mx
            st[:, 2] = mean
            st[:, 3] = np.sqrt(sq / (c - 1))
    return stats, row_min


def _shown_rows(bad: np.ndarray, first_row: int) -> tuple[int, str]:
    """(how many, the first ten global row numbers) of the rows marked in ``bad``."""
    rows = np.flatnonzero(bad) + first_row
    return len(rows), ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")


def _refuse(bad: np.ndarray, first_row: int, message: str) -> None:
    """A BadWriteError when any row is marked in ``bad``: ``message`` with ``{count}`` and
    ``{rows}`` filled in (the first global row numbers), then "; nothing was written"."""
    if bad.any():
        count, shown = _shown_rows(bad, first_row)
        raise BadWriteError(f"{message.format(count=count, rows=shown)}; nothing was written")


def check_finite(logits: np.ndarray, first_row: int) -> None:
    """Refuse NaN/inf rows, naming them (global row numbers)."""
    bad = ~np.isfinite(logits).all(axis=1)
    _refuse(
        bad,
        first_row,
        "{count} row(s) hold NaN or inf logits (rows {rows}): fix the "
        "teacher or its inputs for these samples",
    )


def check_float32_range(logits: np.ndarray, first_row: int) -> None:
    """Refuse rows of finite wider-than-float32 logits (float64) that float32 cannot hold: every
    encoding starts from float32, where they would become inf (and be called "NaN or inf")."""
    if logits.dtype.itemsize <= 4:
        return
    peak = np.abs(logits).max(axis=1)  # NaN if the row holds one: refused as such later
    bad = np.isfinite(peak) & (peak > FLOAT32_MAX)
    _refuse(
        bad,
        first_row,
        "logits beyond float32's range (|x| > 3.40e38) in rows {rows}: every "
        "encoding stores float32 or less; fix the teacher or its inputs for these samples",
    )


def _refuse_rows(bad: np.ndarray, dtype: str, first_row: int, note: str = "") -> None:
    """Refuse rows whose logits a ``dtype`` cannot hold (they would be stored as inf)."""
    limit = "3.39e38" if dtype == "bfloat16" else "65504"
    fix = "float32" if dtype == "bfloat16" else "float32 or bfloat16"
    _refuse(
        bad,
        first_row,
        f"logits beyond {dtype}'s range (|x| > {limit}) in rows {{rows}}{note}: use encoding {fix}",
    )


def encode(name: str, logits: np.ndarray, topk: int = 0, first_row: int = 0) -> dict:
    """float32 (B, C) raw logits → the arrays of ``name`` plus ``stats``."""
    stats, row_min = _row_stats64(logits)
    if not np.isfinite(stats[:, 2]).all():  # the float64 mean is finite iff the row is
        check_finite(logits, first_row)  # names the rows and raises
    out = {"stats": stats.astype(np.float32)}
    if name == "float32":
        out["logits"] = logits.astype(np.float32, copy=False)
    elif name == "float16":
        _refuse_rows(np.maximum(stats[:, 0], -row_min) > FLOAT16_MAX, "float16", first_row)
        out["logits"] = np.empty(logits.shape, np.float16)
        convert_into(out["logits"], logits)
    elif name == "bfloat16":
        out["logits"] = float32_to_bfloat16_bits(logits)
        # Within a float32's range, only values past bfloat16's largest (3.39e38) round to inf.
        _refuse_rows((out["logits"] & 0x7FFF == 0x7F80).any(axis=1), "bfloat16", first_row)
    elif name == "int8":
        lo, hi = row_min, stats[:, 0]  # the float32 values, exactly
        offset = (hi + lo) / 2
        scale = (hi - lo) / 254
        # A constant row has scale 0: it decodes to its offset exactly.
        safe = np.where(scale > 0, scale, 1.0)
        q = np.rint((logits - offset[:, None]) / safe[:, None])
        out["logits"] = np.clip(q, -127, 127).astype(np.int8)
        out["scale"] = scale.astype(np.float32)
        out["offset"] = offset.astype(np.float32)
        # Decoding is float32 q · scale + offset: rows near float32's limits can overflow there.
        with np.errstate(over="ignore"):
            ends = [np.float32(q_end) * out["scale"] + out["offset"] for q_end in (-127, 127)]
        bad = ~(np.isfinite(ends[0]) & np.isfinite(ends[1]))
        _refuse(
            bad,
            first_row,
            "logits in rows {rows} span more than int8's float32 scale and "
            "offset can decode (values near float32's limit, 3.4e38): use encoding float32",
        )
    elif name == "topk":
        out["topk_indices"], kept = _top_k(logits, topk)
        bad = np.abs(kept).max(axis=1) > FLOAT16_MAX
        _refuse_rows(bad, "float16", first_row, " (topk keeps its values in float16)")
        out["topk_values"] = kept.astype(np.float16)
    else:
        row_arrays(name, logits.shape[1])  # raises: unknown encoding
    return out


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 (B, k) class indices of each row's k largest logits, largest first, and those values
    (B, k); a block of rows at a time (each row's result depends on that row alone)."""
    b, c = logits.shape
    step = max(1, min(b, TOPK_BLOCK_BYTES // (4 * c)))
    indices = np.empty((b, k), np.int32)
    values = np.empty((b, k), logits.dtype)
    for a in range(0, b, step):
        x = logits[a : a + step]
        idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(x, idx, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")  # largest first, for readers
        indices[a : a + step] = np.take_along_axis(idx, order, axis=1)
        values[a : a + step] = np.take_along_axis(vals, order, axis=1)
    return indices, values


def decode(name: str, parts: dict, num_classes: int) -> np.ndarray:
    """The arrays of one encoding for B rows → float32 (B, C) raw logits."""
    if name == "float32":
        return np.asarray(parts["logits"], dtype=np.float32)
    if name in ("float16", "bfloat16"):
        raw = parts["logits"]
        return decode_into(name, raw, np.empty(raw.shape, np.float32))
    if name == "int8":
        q = parts["logits"].astype(np.float32)
        return q * parts["scale"][:, None] + parts["offset"][:, None]
    if name == "topk":
        return _decode_topk(
            parts["topk_values"], parts["topk_indices"], parts["stats"], num_classes
        )
    raise StoreError(f"unknown encoding {name!r}: choose one of {', '.join(ENCODINGS)}")


def decode_into(name: str, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Decode the ``logits`` array of a float encoding (float32, float16, bfloat16) into ``out``."""
    if name == "float32":
        np.copyto(out, raw)
    elif name == "float16":
        convert_into(out, raw)
    elif name == "bfloat16":
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        raise StoreError(f"decode_into takes a float encoding, not {name!r}")
    return out


# ---- float16 <-> float32 ---------------------------------------------------------------------
#: Elements per torch copy: below torch's parallel grain size (32768), so every copy runs inline on
#: the calling thread: no OpenMP pool is ever started, which would hang a process forked after it.
_TORCH_STEP = 32767
#: float16 elements numpy converts (~1-2 ns each) before torch is imported for it (~1.5 s): a
#: process that converts little never pays for the import, one that converts a lot pays it once.
NUMPY_CONVERT_BUDGET = 500_000_000
_torch_module = None
_numpy_converted = 0


def _torch(elements: int):
    """torch if it is imported, or worth importing now (and installed); else None."""
    global _torch_module, _numpy_converted
    if _torch_module is None:
        torch = sys.modules.get("torch")
        if torch is None and _numpy_converted + elements > NUMPY_CONVERT_BUDGET:
            try:
                import torch
            except ImportError:  # pragma: no cover - torch is a dependency of the project
                torch = False
        if torch is None:
            _numpy_converted += elements
        else:
            _torch_module = torch
    return _torch_module or None


def convert_into(out: np.ndarray, src: np.ndarray) -> np.ndarray:
    """``out[...] = src`` between float16 and float32 (same shape), rounding to nearest even.

    numpy's float16 casts are scalar loops (~1-2 ns an element); torch's use the CPU's F16C
    instructions, about 10x faster even when copied in single-threaded pieces. numpy is used when
    torch is missing, not worth importing yet, or an array does not suit it (read-only source,
    non-contiguous); both give the same bits.
    """
    torch = _torch(out.size)
    if (
        torch
        and out.flags.c_contiguous
        and src.flags.c_contiguous
        and src.flags.writeable  # torch.from_numpy warns on read-only arrays
        and out.shape == src.shape
    ):
        d = torch.from_numpy(out.reshape(-1))
        s = torch.from_numpy(src.reshape(-1))
        for dd, ss in zip(d.split(_TORCH_STEP), s.split(_TORCH_STEP)):
            dd.copy_(ss)
        return out
    np.copyto(out, src, casting="unsafe")
    return out


def _decode_topk(
    values: np.ndarray, indices: np.ndarray, stats: np.ndarray, num_classes: int
) -> np.ndarray:
    v = values.astype(np.float64)  # (B, k)
    k = v.shape[1]
    lse = stats[:, 1].astype(np.float64)  # (B,)
    m = v.max(axis=1)
    # Tail mass relative to exp(m): what the kept values do not explain of the stored logsumexp.
    tail_mass = np.exp(lse - m) - np.exp(v - m[:, None]).sum(axis=1)
    # float16 rounding can eat it: a floor, in log space (exp of a kept value ~745 below the
    # top underflows to 0, and the tail was then -inf, flagged by verify as damage).
    log_floor = v.min(axis=1) - m + np.log(1e-6 * (num_classes - k))
    floored = np.isfinite(tail_mass) & ~(tail_mass > np.exp(log_floor))  # NaN stays NaN
    log_mass = np.where(floored, log_floor, np.log(np.where(floored, 1.0, tail_mass)))
    # A tail class is never above the smallest kept one (it could be only by float16 rounding).
    tail = np.minimum(m + log_mass - np.log(num_classes - k), v.min(axis=1))
    out = np.repeat(tail[:, None], num_classes, axis=1)
    np.put_along_axis(out, indices.astype(np.int64), v, axis=1)
    return out.astype(np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bfloat16, returned as its uint16 bit pattern."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
