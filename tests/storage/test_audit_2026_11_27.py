"""Faults an audit of verify, audit, plan and the HDF5 backend found (2026-11-27): each test
failed before its fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.__main__ import main
from stages.verify import _stamp_of
from storage import StoreCorruptError, create_store, open_store
from storage.audit import audit_logits
from storage.encodings import decode, encode

N, C, V = 10, 10, 2
LOGITS = np.arange(V * N * C, dtype=np.float32).reshape(V, N, C) % 7 - 3


def _store(path: Path, backend: str, **kwargs) -> Path:
    with create_store(str(path), N, C, V, encoding="float32", backend=backend, **kwargs) as s:
        for v in range(V):
            s.write(v, 0, LOGITS[v])
    return path


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_chunk_longer_than_the_store_is_one_chunk(tmp_path: Path, backend: str) -> None:
    """HDF5 refused chunk_rows > N with a traceback (the tiny config's 32 rows, N = 20);
    zarr took it."""
    path = _store(tmp_path / f"s.{backend}", backend, chunk_rows=32)
    with open_store(str(path)) as store:
        assert store.verify().ok
        for v in range(V):
            np.testing.assert_array_equal(store.read(np.arange(N), view=v), LOGITS[v])


def test_an_hdf5_store_missing_a_dataset_is_one_line(tmp_path: Path, capsys) -> None:
    """It was a KeyError traceback wherever the dataset was first read (verify, precompute,
    distill); zarr's store names the array."""
    path = _store(tmp_path / "s.h5", "hdf5")
    with h5py.File(path, "r+") as f:
        del f["stats"]
    with pytest.raises(StoreCorruptError, match=r"its stats dataset\(s\) are missing; delete it"):
        open_store(str(path))
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_zarr_store_missing_its_marks_is_not_sent_to_repair(tmp_path: Path, capsys) -> None:
    """verify advised `verify --repair`, which then said to delete the store: repair rewrites
    marks, it cannot re-create their array."""
    path = _store(tmp_path / "s.zarr", "zarr")
    shutil.rmtree(path / "done")
    with open_store(str(path)) as store:
        report = store.verify()
    assert not report.repairable and "--repair" not in report.fix()
    assert main(["verify", str(path)]) == 1
    assert "--repair" not in capsys.readouterr().out


def test_audit_of_constant_rows_is_no_division_by_zero() -> None:
    """Rows all equal: teacher and student agree exactly, the reference KD loss is 0
    (ZeroDivisionError)."""
    table = audit_logits(np.ones((16, 10)))
    for row in table:
        if "error" not in row:
            assert row["kd_T1"] == 0.0 and row["kd_T4"] == 0.0, row


def test_topk_keeps_a_finite_tail_far_below_the_top(tmp_path: Path) -> None:
    """A kept value ~800 above the others: exp() of the floor underflowed, the tail decoded to
    -inf, and verify called the healthy store damaged."""
    row = np.concatenate([[800.0], np.linspace(-5.0, 0.0, 99)]).astype(np.float32)[None]
    decoded = decode("topk", encode("topk", row, 4), 100)
    assert np.isfinite(decoded).all()
    assert decoded[0, 0] == 800.0 and (decoded[0, 1:] <= row[0, 1:].max()).all()
    with create_store(str(tmp_path / "t.zarr"), 1, 100, 1, encoding="topk", topk=4) as s:
        s.write(0, 0, row)
    with open_store(str(tmp_path / "t.zarr")) as store:
        assert store.verify().ok


def test_verify_repair_finds_the_stamp_of_a_file_url_store(tmp_path: Path) -> None:
    """precompute.store=file://RUN/u.zarr: the stamp names the URL, and `verify --repair`
    left it (make then skipped the repaired store)."""
    (tmp_path / "u.zarr").mkdir()
    url = f"file://{tmp_path / 'u.zarr'}"
    stamp = tmp_path / "precompute.done"
    stamp.write_text(url + "\n")
    assert _stamp_of(url) == stamp
    assert _stamp_of(str(tmp_path / "u.zarr")) == stamp
    stamp.write_text(str(tmp_path / "other.zarr") + "\n")
    assert _stamp_of(url) is None


def test_a_nan_logsumexp_still_decodes_to_nan() -> None:
    """The log-space floor took a NaN stored logsumexp for a vanished tail: finite logits, and
    verify passed a damaged store (review)."""
    row = np.linspace(-5.0, 5.0, 100, dtype=np.float32)[None]
    parts = encode("topk", row, 4)
    parts["stats"] = parts["stats"].copy()
    parts["stats"][0, 1] = np.nan
    assert np.isnan(decode("topk", parts, 100)[0, 4:]).any()
