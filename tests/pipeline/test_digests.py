"""An image folder's fingerprint reads each file once: later runs hash only what changed, and the
fingerprint is the same value cached or not (stores made before the cache still match)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import build_dataset, dataset_fingerprint
from pipeline.datasets.digests import CACHE_ENV, cache_dir


def _tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("b", "a"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / "train" / cls / f"{i}.png")


def _fingerprint(root: Path) -> str:
    return dataset_fingerprint(build_dataset({"kind": "image_folder", "path": str(root)}, "train"))


def _by_hand(root: Path) -> str:
    """The fingerprint from its definition (base.dataset_fingerprint + folder.content_blocks),
    every file read and hashed here."""
    files = sorted((root / "train").glob("*/*.png"))  # classes a, b; files sorted in each
    h = hashlib.sha256()
    h.update(f"logitbank-dataset-v1 {(len(files), 5, 6, 3)} 2\n".encode())
    h.update(f"RGB {(len(files), 5, 6, 3)} resize=False\n".encode())
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).digest()
        h.update(f"{path.parent.name}/{path.name}\n".encode() + digest)
    labels = [0 if p.parent.name == "a" else 1 for p in files]
    h.update(np.asarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """The files ``Path.read_bytes`` read (the digests' only reads)."""
    seen: list[Path] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        seen.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    return seen


def test_a_warm_cache_reads_no_file_and_gives_the_same_fingerprint(tmp_path, monkeypatch, reads):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    expected = _by_hand(tmp_path / "data")
    reads.clear()
    assert _fingerprint(tmp_path / "data") == expected  # cold: every file read once
    assert len(reads) == 6
    assert len(list((tmp_path / "cache").glob("digests-*.npz"))) == 1
    reads.clear()
    assert _fingerprint(tmp_path / "data") == expected  # warm: none
    assert reads == []
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_dir() is None
    assert _fingerprint(tmp_path / "data") == expected and len(reads) == 6


def test_a_file_rewritten_in_place_is_hashed_again(tmp_path, monkeypatch, reads):
    """Same size, its mtime set back: the ctime (which no tool sets back) still tells."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    before = _fingerprint(tmp_path / "data")
    path = tmp_path / "data" / "train" / "a" / "1.png"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the PNG's last chunk: same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    reads.clear()
    after = _fingerprint(tmp_path / "data")
    assert after != before and after == _by_hand(tmp_path / "data")
    assert [p.name for p in reads if p.suffix == ".png"].count("1.png") >= 1


@pytest.mark.parametrize("damage", ["garbage", "empty", "a directory"])
def test_a_damaged_or_unwritable_cache_is_ignored(tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    _tree(tmp_path / "data")
    expected = _by_hand(tmp_path / "data")
    assert _fingerprint(tmp_path / "data") == expected
    (saved,) = cache.glob("digests-*.npz")
    if damage == "garbage":
        saved.write_bytes(b"PK\x03\x04 not an npz")
    elif damage == "empty":
        saved.write_bytes(b"")
    else:  # the cache folder is a file: nothing can be written there
        monkeypatch.setenv(CACHE_ENV, str(saved))
    assert _fingerprint(tmp_path / "data") == expected
    if damage != "a directory":
        assert _fingerprint(tmp_path / "data") == expected  # rewritten, readable again
        with np.load(saved, allow_pickle=False) as z:
            assert z["digests"].shape == (6, 32)


def test_a_cache_of_another_format_is_ignored(tmp_path, monkeypatch):
    """An npz at the cache's path that is not this format (a non-scalar format entry, other
    dtypes) is hashed over and rewritten, never a traceback or wrong digests."""
    from pipeline.datasets import digests

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    expected = _by_hand(tmp_path / "data")
    assert _fingerprint(tmp_path / "data") == expected
    (saved,) = (tmp_path / "cache").glob("digests-*.npz")
    with np.load(saved) as z:
        good = {k: z[k] for k in z.files}
    for bad in (
        {**good, "format": np.array([1, 2])},
        {**good, "digests": good["digests"].astype(np.int64)},  # 256 bytes a "digest"
        {**good, "names": np.zeros(3, np.int64)},
    ):
        np.savez(saved, **bad)
        assert _fingerprint(tmp_path / "data") == expected
    assert digests.cache_dir() == tmp_path / "cache"
