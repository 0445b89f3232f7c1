"""The version 2/3 HDF5 superblock, read in one place (``storage.h5_recover.read_superblock``).

Three things read it: the truncation check (``_truncation``), the check a reader makes before
HDF5 opens the file (``_superblock_problem``) and the clearing of a killed writer's flags
(``clear_status_flags``). These tests give them real files written by HDF5 (which also proves
the checksum: HDF5 wrote it and HDF5 checks the one we rewrite), cut, flipped, flagged, short and
foreign ones, and pin every answer. The superblock's layout is decoded here independently.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from storage import StoreError, create_store, h5_backend, open_store
from storage.h5_backend import _superblock_problem, _truncation
from storage.h5_recover import clear_status_flags, lookup3, read_superblock

CHECKSUM_FAILS = "its superblock fails its checksum"


def decode(data: bytes) -> dict:
    """The fields of a version 2/3 superblock, by the layout in HDF5's file format spec."""
    width = data[9]
    addresses = [
        int.from_bytes(data[12 + i * width : 12 + (i + 1) * width], "little") for i in range(4)
    ]
    size = 12 + 4 * width
    (checksum,) = struct.unpack_from("<I", data, size)
    return {"version": data[8], "width": width, "flags": data[11], "eoa": addresses[2],
            "size": size, "checksum": checksum}  # fmt: skip


def h5py_file(path: Path, width: int = 8, libver: str = "latest") -> bytes:
    """A closed file written by h5py with ``width``-byte addresses; its bytes."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_sizes(width, 8)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    bound = h5py.h5f.LIBVER_LATEST if libver == "latest" else h5py.h5f.LIBVER_EARLIEST
    fapl.set_libver_bounds(bound, h5py.h5f.LIBVER_LATEST)
    fid = h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl)
    with h5py.File(fid) as f:
        f.create_dataset("x", data=np.arange(2000.0), chunks=(200,))  # 2-byte addresses
    return path.read_bytes()


@pytest.fixture(scope="module")
def store_bytes(tmp_path_factory) -> bytes:
    """A finished store written by this project's HDF5 backend."""
    path = tmp_path_factory.mktemp("store") / "s.h5"
    x = np.random.default_rng(0).normal(size=(500, 10)).astype(np.float32)
    with create_store(path, 500, 10, backend="hdf5", chunk_rows=64) as store:
        store.write(0, 0, x)
    return path.read_bytes()


@pytest.fixture(scope="module")
def flagged_bytes(tmp_path_factory) -> bytes:
    """A file copied while its SWMR writer had it open: its write flags are set."""
    path = tmp_path_factory.mktemp("live") / "s.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("x", data=np.arange(10_000.0), chunks=(100,), maxshape=(None,))
        f.swmr_mode = True
        f["x"][:] = 1.0
        f.flush()
        data = path.read_bytes()
    return data


def put(tmp_path: Path, data: bytes, name: str = "s.h5") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---- a whole file -------------------------------------------------------------------------------


def test_a_stores_superblock_is_read_field_by_field(tmp_path, store_bytes):
    path = put(tmp_path, store_bytes)
    with open(path, "rb") as fh:
        sb = read_superblock(fh)
    want = decode(store_bytes)
    assert (sb.version, sb.width, sb.flags, sb.size) == (3, 8, 0, 44)
    assert (sb.version, sb.width, sb.flags, sb.size) == tuple(
        want[k] for k in ("version", "width", "flags", "size")
    )
    assert sb.raw == store_bytes[:48] and sb.signed and sb.intact
    assert sb.eoa == want["eoa"] == len(store_bytes)  # a clean close records the real end
    assert sb.stored == sb.computed == want["checksum"]  # HDF5's checksum, recomputed
    assert _truncation(str(path)) is None
    assert _superblock_problem(str(path)) is None


@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_every_address_width_is_read(tmp_path, width):
    data = h5py_file(tmp_path / "w.h5", width)
    with open(tmp_path / "w.h5", "rb") as fh:
        sb = read_superblock(fh)
    assert (sb.version, sb.width, sb.size, len(sb.raw)) == (
        3,
        width,
        12 + 4 * width,
        16 + 4 * width,
    )
    assert sb.eoa == len(data) and sb.intact and sb.stored == decode(data)["checksum"]
    path = str(tmp_path / "w.h5")
    assert _superblock_problem(path) is None and _truncation(path) is None
    clear_status_flags(path)  # a clean file: nothing to clear, nothing to extend
    assert Path(path).read_bytes() == data


# ---- cut short ----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [4, 8])
def test_a_file_cut_after_its_superblock_is_named_truncated(tmp_path, width):
    data = h5py_file(tmp_path / "w.h5", width)
    for keep in (len(data) - 1, len(data) // 2, 16 + 4 * width):
        path = str(put(tmp_path, data[:keep]))
        assert _truncation(path) == (
            f"file truncated: {keep} bytes of the {len(data)} its superblock records"
        )
        assert _superblock_problem(path) is None  # the superblock itself is whole
    path = str(put(tmp_path, data + bytes(10)))  # longer than recorded: not truncated
    assert _truncation(path) is None


def test_a_file_cut_inside_its_superblock(tmp_path, store_bytes):
    for keep in range(48):
        path = put(tmp_path, store_bytes[:keep])
        want = (
            f"cut short: {keep} bytes, less than its superblock"
            if keep < 12
            else f"cut short: {keep} bytes, less than its 48-byte superblock"
        )
        assert _superblock_problem(str(path)) == want, keep
        assert _truncation(str(path)) is None, keep
        # Refused with one line, the file untouched (12 bytes on: "checksum does not match").
        with pytest.raises(StoreError, match="version 2/3" if keep < 12 else "checksum"):
            clear_status_flags(str(path))
        assert path.read_bytes() == store_bytes[:keep]  # left as it was


def test_a_cut_superblock_is_not_read_again(tmp_path, store_bytes, monkeypatch):
    waits = []
    monkeypatch.setattr(h5_backend, "time", SimpleNamespace(sleep=waits.append))
    path = put(tmp_path, store_bytes[:30])
    assert _superblock_problem(str(path)).startswith("cut short: 30 bytes") and waits == [0.0]


# ---- damaged ------------------------------------------------------------------------------------


def test_a_flipped_bit_anywhere_in_the_superblock_fails_its_checksum(
    tmp_path, store_bytes, monkeypatch
):
    monkeypatch.setattr(h5_backend, "time", SimpleNamespace(sleep=lambda s: None))
    for at in range(48):
        data = bytearray(store_bytes)
        data[at] ^= 1  # version 3 becomes 2 and the width 9: still checked, still failing
        path = put(tmp_path, bytes(data))
        assert _superblock_problem(str(path)) == CHECKSUM_FAILS, at
        assert _truncation(str(path)) is None, at
        with pytest.raises(StoreError) as err:
            clear_status_flags(str(path))
        assert str(err.value) == (
            f"{path}: not an HDF5 file with a version 2/3 superblock; "
            f"run `h5clear -s {path}` to clear its write flags"
            if at < 8  # the signature is checked first
            else f"{path}: superblock checksum does not match; the file may be damaged: "
            f"run `h5clear -s {path}` or recompute the store"
        ), at
        assert path.read_bytes() == bytes(data)


def test_a_failing_checksum_is_read_three_times(tmp_path, store_bytes, monkeypatch):
    data = bytearray(store_bytes)
    data[30] ^= 1
    path = put(tmp_path, bytes(data))
    waits = []
    monkeypatch.setattr(h5_backend, "time", SimpleNamespace(sleep=waits.append))
    assert _superblock_problem(str(path)) == CHECKSUM_FAILS
    assert waits == [0.0, 0.01, 0.04]


def test_a_superblock_a_writer_was_rewriting_passes_when_read_again(
    tmp_path, store_bytes, monkeypatch
):
    data = bytearray(store_bytes)
    data[11] ^= 1
    path = put(tmp_path, bytes(data))
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 2:
            path.write_bytes(store_bytes)  # the writer has finished its update

    monkeypatch.setattr(h5_backend, "time", SimpleNamespace(sleep=sleep))
    assert _superblock_problem(str(path)) is None and waits == [0.0, 0.01]


# ---- write flags --------------------------------------------------------------------------------


def test_a_flagged_file_is_not_judged_truncated(tmp_path, flagged_bytes):
    assert decode(flagged_bytes)["flags"] != 0
    for keep in (len(flagged_bytes), len(flagged_bytes) // 2, 48):
        path = str(put(tmp_path, flagged_bytes[:keep]))
        assert _truncation(path) is None
        assert _superblock_problem(path) is None  # flags are no damage


@pytest.mark.parametrize("extra", [0, 4096, -4096])
def test_clearing_the_flags_writes_what_h5clear_would(tmp_path, flagged_bytes, extra):
    """Flags cleared, the end-of-file address raised to the file's size (never lowered), the
    checksum recomputed, nothing else touched: and HDF5 then opens it for writing."""
    data = flagged_bytes + bytes(extra) if extra >= 0 else flagged_bytes[:extra]
    path = put(tmp_path, data)
    if extra >= 0:
        with pytest.raises(OSError, match="already open for write"):
            h5py.File(path, "r+").close()
    clear_status_flags(str(path))
    out = path.read_bytes()
    old, new = decode(data), decode(out)
    assert new["flags"] == 0 and new["eoa"] == max(old["eoa"], len(data))
    assert new["checksum"] == lookup3(out[:44])
    assert out[12:28] == data[12:28] and out[36:44] == data[36:44] and out[48:] == data[48:]
    assert out[:11] == data[:11] and len(out) == len(data)
    if extra >= 0:
        with h5py.File(path, "r+") as f:  # HDF5 checks the checksum we wrote
            assert f["x"][-1] == 1.0


def test_a_killed_writers_store_opens_for_writing_again(tmp_path, flagged_bytes):
    """Through the backend: "already open for write" leads to clear_status_flags."""
    path = tmp_path / "s.h5"
    with create_store(path, 200, 4, backend="hdf5", chunk_rows=50) as store:
        store.write(0, 0, np.ones((50, 4), np.float32))
    data = bytearray(path.read_bytes())
    data[11] = 5  # as a killed SWMR writer leaves it, checksum and all
    data[44:48] = struct.pack("<I", lookup3(bytes(data[:44])))
    path.write_bytes(bytes(data))
    with open_store(path, mode="a") as store:
        store.write(0, 50, np.ones((50, 4), np.float32))
    assert decode(path.read_bytes())["flags"] == 0


# ---- other files --------------------------------------------------------------------------------


def test_a_version_0_superblock_is_left_to_hdf5(tmp_path):
    data = h5py_file(tmp_path / "v0.h5", libver="earliest")
    assert data[8] == 0
    with open(tmp_path / "v0.h5", "rb") as fh:
        sb = read_superblock(fh)
    assert sb.version == 0 and sb.raw == data[:12] and sb.stored is None and not sb.intact
    for keep in (len(data), len(data) // 2, 20):
        path = put(tmp_path, data[:keep])
        assert _truncation(str(path)) is None and _superblock_problem(str(path)) is None
        with pytest.raises(StoreError) as err:
            clear_status_flags(str(path))
        assert str(err.value) == (
            f"{path}: not an HDF5 file with a version 2/3 superblock; "
            f"run `h5clear -s {path}` to clear its write flags"
        )
        assert path.read_bytes() == data[:keep]


def test_files_that_are_not_hdf5(tmp_path):
    for data in (b"", b"\x89HDF", b"a plain text file, nothing like HDF5 at all\n" * 3):
        path = put(tmp_path, data)
        assert _truncation(str(path)) is None
        assert _superblock_problem(str(path)) == (
            f"cut short: {len(data)} bytes, less than its superblock" if len(data) < 12 else None
        )
        with pytest.raises(StoreError, match="not an HDF5 file with a version 2/3 superblock"):
            clear_status_flags(str(path))
        assert path.read_bytes() == data
    # The signature is HDF5's to check; a foreign file whose 9th byte reads 3 fails the checksum.
    path = put(tmp_path, b"12345678\x03\x08\x08\x00" + bytes(40))
    assert _superblock_problem(str(path)) is not None


def test_a_foreign_signature_is_not_judged_truncated(tmp_path, store_bytes):
    """A checksum that matches is not enough: the file must also start with HDF5's signature."""
    data = bytearray(store_bytes[: len(store_bytes) // 2])
    data[0] = ord("X")
    data[44:48] = struct.pack("<I", lookup3(bytes(data[:44])))
    path = put(tmp_path, bytes(data))
    with open(path, "rb") as fh:
        sb = read_superblock(fh)
    assert sb.intact and not sb.signed
    assert _truncation(str(path)) is None
    assert _superblock_problem(str(path)) is None  # the signature is HDF5's to check
    with pytest.raises(StoreError, match="not an HDF5 file with a version 2/3 superblock"):
        clear_status_flags(str(path))


def test_a_missing_file(tmp_path):
    path = str(tmp_path / "gone.h5")
    assert _truncation(path) is None and _superblock_problem(path) is None
    with pytest.raises(FileNotFoundError):
        clear_status_flags(path)
