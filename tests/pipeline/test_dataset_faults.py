"""Damaged or odd dataset files and options: one line naming the file (or option) and the fix,
never a traceback, and never data that is silently wrong."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import DATASETS, build_dataset, dataset_fingerprint, write_idx
from pipeline.errors import ConfigError, DatasetError
from pipeline.views import PreprocessSpec


def _folder(root: Path, n: int = 2, size: tuple[int, int] = (8, 8)) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / "train" / cls / f"{i}.png")
    return root


def _build(root: Path, **options) -> object:
    return build_dataset({"kind": "image_folder", "path": str(root), **options}, "train")


def _bmp(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A 24-bit BMP, byte for byte (rows bottom-up, padded to 4 bytes)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + info + pixels


def _bad_tiff() -> bytes:
    """A TIFF whose width is a fraction: Pillow raises ValueError("Invalid dimensions")."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "TIFF")
    raw = bytearray(buf.getvalue())
    at = raw.find(struct.pack("<HH", 256, 4))  # IMAGEWIDTH, LONG
    raw[at + 2 : at + 4] = struct.pack("<H", 5)  # -> RATIONAL
    return bytes(raw)


# --- image folders: undecodable files -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, data, error",
    [
        ("9.bmp", _bmp(200000, 200000), "DecompressionBombError"),  # the header's claim alone
        ("9.tif", _bad_tiff(), "ValueError"),
        ("9.png", b"\x00\x05\x16\x07 not a png", "UnidentifiedImageError"),
    ],
)
@pytest.mark.parametrize("first", [False, True], ids=["in-a-batch", "size-probe"])
def test_an_undecodable_image_is_one_line_naming_it(
    tmp_path: Path, name: str, data: bytes, error: str, first: bool
) -> None:
    root = _folder(tmp_path)
    bad = root / "train" / "a" / (f"-{name}" if first else name)  # "-9.*" sorts before "0.png"
    bad.write_bytes(data)
    with pytest.raises(DatasetError, match=rf"{bad.name}: cannot decode image \({error}") as err:
        ds = _build(root) if first else _build(root, image_size=8)
        ds.get_batch(np.arange(len(ds)))
    assert "\n" not in str(err.value) and "remove or replace it" in str(err.value)


def test_hidden_files_are_not_images(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    clean = dataset_fingerprint(_build(root))
    (root / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # sorts first
    (root / "train" / "b" / ".hidden.png").write_bytes((root / "train/b/0.png").read_bytes())
    ds = _build(root)  # no image_size: the size is probed from the first file
    assert len(ds) == 4 and ds.get_batch([0])[0].shape == (1, 3, 8, 8)
    assert dataset_fingerprint(ds) == clean


@pytest.mark.parametrize(
    "size", [0, -3, [0, 8], [8, -1], True, [8, 8, 8], [8], "8", 8.5, [8, True], 10**6]
)
def test_image_size_is_checked_when_the_dataset_is_built(tmp_path: Path, size: object) -> None:
    root = _folder(tmp_path)
    with pytest.raises(DatasetError, match=r"image_size must be an int in \[1, \d+\]") as err:
        _build(root, image_size=size)
    assert repr(size) in str(err.value) and "\n" not in str(err.value)


def test_image_size_int_or_pair(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    assert _build(root, image_size=4).get_batch([0])[0].shape == (1, 3, 4, 4)
    assert _build(root, image_size=(4, 6)).get_batch([0])[0].shape == (1, 3, 4, 6)
    assert _build(root, image_size=[np.int64(5), 3]).get_batch([0])[0].shape == (1, 3, 5, 3)


# --- image folders: 16-bit and wider pixels ------------------------------------------------------


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "train/a/0.png")
    assert Image.open(tmp_path / "train/a/0.png").mode == "I;16"
    want = np.rint(wide / 257).astype(np.uint8)
    for channels in (1, 3):
        x, _ = _build(tmp_path, channels=channels).get_batch([0])
        for c in range(channels):
            np.testing.assert_array_equal(x[0, c].numpy(), want)


@pytest.mark.parametrize(
    "mode, pixels", [("I", np.full((8, 8), 70000, np.int32)), ("F", np.full((8, 8), 0.5, "f4"))]
)
def test_32_bit_and_float_images_are_refused(tmp_path: Path, mode: str, pixels) -> None:
    root = _folder(tmp_path)
    Image.fromarray(pixels, mode).save(root / "train/a/w.tif")
    ds = _build(root)
    with pytest.raises(
        DatasetError, match=rf"w\.tif: mode {mode} .* convert it to an 8- or 16-bit"
    ):
        ds.get_batch(np.arange(len(ds)))


# --- image folders: names that are not UTF-8 -----------------------------------------------------


def _pinned_tree(root: Path) -> None:
    """Files of fixed bytes (hand-made BMPs) under UTF-8 names, non-ASCII ones among them."""
    for k, (cls, name) in enumerate([("A", "x.bmp"), ("ä b", "é.bmp"), ("日本", "0.bmp")]):
        (root / "train" / cls).mkdir(parents=True)
        pixels = bytes([40 * k, 7, 200, 9, 9, 9, 0, 0]) * 2  # 2×2, rows padded to 8 bytes
        (root / "train" / cls / name).write_bytes(_bmp(2, 2, pixels))


#: The fingerprint of ``_pinned_tree`` as stores and teachers made before this test recorded it.
PINNED_UTF8_FINGERPRINT = "47ab667db8b34d18307289028e78c7f7402f3dc7f78aab2cbc79261b2f515e38"


@pytest.mark.parametrize("cache", ["on", "off"])
def test_utf8_names_keep_their_fingerprint(tmp_path: Path, monkeypatch, cache: str) -> None:
    if cache == "off":
        monkeypatch.setenv("LOGITBANK_CACHE_DIR", "off")
    _pinned_tree(tmp_path / "d")
    for _ in range(2):  # cold, then from the cache
        assert dataset_fingerprint(_build(tmp_path / "d")) == PINNED_UTF8_FINGERPRINT


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system taking any bytes")
@pytest.mark.parametrize("cache", ["on", "off"])
def test_names_that_are_not_utf8_hash_as_their_bytes(
    tmp_path: Path, monkeypatch, cache: str
) -> None:
    if cache == "off":
        monkeypatch.setenv("LOGITBANK_CACHE_DIR", "off")
    root = _folder(tmp_path / "d")
    cls = os.fsencode(root / "train") + b"/caf\xe9"  # Latin-1 "café"
    os.mkdir(cls)
    png = (root / "train/a/0.png").read_bytes()
    Path(os.fsdecode(cls + b"/\xe9t\xe9.png")).write_bytes(png)
    ds = _build(root)
    assert ds.classes[2] == os.fsdecode(b"caf\xe9") and len(ds) == 5
    fingerprint = dataset_fingerprint(ds)
    assert dataset_fingerprint(_build(root)) == fingerprint  # again, from the cache when on
    # By definition: the name's bytes as on disk, then the file's sha256.
    h = hashlib.sha256()
    h.update(f"logitbank-dataset-v1 {(5, 8, 8, 3)} 3\n".encode())
    h.update(f"RGB {(5, 8, 8, 3)} resize=False\n".encode())
    for path in ds.files:
        name = os.fsencode(path.parent.name) + b"/" + os.fsencode(path.name) + b"\n"
        h.update(name + hashlib.sha256(path.read_bytes()).digest())
    h.update(np.asarray([0, 0, 1, 1, 2], dtype="<i8").tobytes())
    assert fingerprint == h.hexdigest()


# --- mean and std --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mean, std",
    [([0.5], [float("nan")]), ([float("nan")], [0.3]), ([0.5], [float("inf")]),
     ([10**400], [0.3]), ([0.5], [10**400]), ([0.5], [0.0])],
)  # fmt: skip
def test_mean_and_std_must_be_finite(mean: list, std: list) -> None:
    spec = {"kind": "synthetic", "num_samples": 8, "num_test": 4, "mean": mean, "std": std}
    with pytest.raises(DatasetError, match="std > 0, all finite numbers") as err:
        build_dataset(spec, "train")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="must be finite numbers, std > 0"):
        PreprocessSpec(mean=tuple(mean), std=tuple(std))


def test_a_non_string_option_key_is_one_line() -> None:
    with pytest.raises(DatasetError, match=r"unknown option\(s\) 1; known: channels"):
        build_dataset({"kind": "synthetic", 1: 2}, "train")


# --- array datasets ------------------------------------------------------------------------------

IMAGES = np.random.default_rng(1).integers(0, 256, (2000, 8, 8), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_a_corrupt_npz_member_names_the_file(tmp_path: Path, save) -> None:
    path = tmp_path / "d.npz"
    save(path, images=IMAGES, labels=np.arange(len(IMAGES)) % 4)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 4] ^= 0xFF  # inside images.npy: a bad CRC-32, or a bad deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(zipfile.BadZipFile), np.load(path) as z:  # what np.load alone says
        z["images"]
    with pytest.raises(DatasetError, match=r"d\.npz: array 'images' is corrupt .*re-create"):
        build_dataset({"kind": "array", "path": str(path)}, "train")


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.int64(3), r"20 images but labels of shape \(\)"),
        (np.zeros((20, 1), np.int64), r"20 images but labels of shape \(20, 1\)"),
        (
            np.arange(20, dtype=np.uint64) + np.uint64(2**63),
            r"labels reach 9223372036854775827, beyond any class count",
        ),
    ],
)
def test_array_labels_are_one_per_image_and_in_range(tmp_path: Path, labels, message) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=IMAGES[:20], labels=labels)
    with pytest.raises(DatasetError, match=rf"d\.npz: {message}") as err:
        build_dataset({"kind": "array", "path": str(path)}, "train")
    assert "data.options" not in str(err.value)


def _zarr(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="w")
    g.create_array("images", data=images, chunks=(5, 8, 8))
    g.create_array("labels", data=labels, chunks=(5,))


def test_zarr_chunks_of_fill_values_are_no_damage(tmp_path: Path) -> None:
    """zarr 3 writes no chunk that holds only the fill value: black image corners (a chunking
    across height and width) and class-0 labels are no file at all, and read as 0, rightly.
    A check refusing arrays with chunks missing (a partial copy reads as zeros too) refused
    such datasets (review, 2026-11-27), so missing chunks are zarr's to mean fill values."""
    import zarr

    path = tmp_path / "d.zarr"
    images = np.zeros((20, 8, 8), np.uint8)
    images[:, 2:6, 2:6] = IMAGES[:20, 2:6, 2:6] | 1  # black corners
    g = zarr.open_group(str(path), mode="w")
    g.create_array("images", data=images, chunks=(5, 2, 2))
    g.create_array("labels", data=np.sort(np.arange(20) % 4), chunks=(5,))
    assert not (path / "images" / "c" / "0" / "0" / "0").exists()
    assert not (path / "labels" / "c" / "0").exists()
    ds = build_dataset({"kind": "array", "path": str(path)}, "train")
    got, labels = ds.get_batch(np.arange(20))
    np.testing.assert_array_equal(np.asarray(got)[:, 0], images)  # (B, 1, H, W)
    assert ds.num_classes == 4 and list(labels) == sorted(np.arange(20) % 4)


def test_uint64_labels_are_read(tmp_path: Path) -> None:
    """labels.max(initial=-1) overflowed for uint64 labels (a traceback; review)."""
    np.savez(tmp_path / "d.npz", images=IMAGES[:8], labels=np.arange(8, dtype=np.uint64) % 4)
    spec = {"kind": "array", "path": str(tmp_path / "d.npz")}
    assert build_dataset(spec, "train").num_classes == 4


def test_pillow_10s_16_bit_png_mode_is_scaled() -> None:
    """Pillow < 11 opens a 16-bit grey PNG as mode I, which was refused as 32-bit (review)."""
    from PIL import Image

    from pipeline.datasets.folder import _as_8bit

    im = Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.int32), "I")
    im.format = "PNG"
    got = np.asarray(_as_8bit(im, Path("x.png")))
    np.testing.assert_array_equal(got, (np.arange(64).reshape(8, 8) * 1000 * 255 + 32767) // 65535)


def test_a_damaged_zarr_chunk_names_the_file(tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "d.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array(
        "images", data=IMAGES[:20] | 1, chunks=(5, 8, 8), compressors=zarr.codecs.ZstdCodec()
    )
    g.create_array("labels", data=np.arange(20) % 4)
    (path / "images" / "c" / "1" / "0" / "0").write_bytes(b"not zstd at all")
    with pytest.raises(DatasetError, match=r"d\.zarr: zarr array 'images' has a damaged chunk"):
        build_dataset({"kind": "array", "path": str(path)}, "train")


def test_errors_from_a_file_reader_blame_the_file_not_the_options(
    tmp_path: Path, monkeypatch
) -> None:
    bad = tmp_path / "d.npy"
    bad.write_bytes(b"not an npy file")

    def reader(split: str, path: str | None = None, num_classes: int = 3):
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)  # ValueError from numpy's reader

    monkeypatch.setitem(DATASETS, "npy", reader)
    with pytest.raises(DatasetError, match=r"npy: cannot read the train data from .*d\.npy") as err:
        build_dataset({"kind": "npy", "path": str(bad)}, "train")
    assert "data.options" not in str(err.value) and "re-create it" in str(err.value)


# --- IDX / Fashion-MNIST -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_an_empty_fashion_mnist_split_is_refused(tmp_path: Path, gz: str) -> None:
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{gz}", np.zeros((0, 28, 28), np.uint8))
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{gz}", np.zeros(0, np.uint8))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.*holds no images"):
        build_dataset({"kind": "fashion_mnist", "path": str(tmp_path)}, "test")


def test_an_idx_header_whose_size_wraps_int64_is_refused(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    # 2**22 * 2**21 * 2**21 = 2**64: 0 in int64, so a bare header would "fit".
    head = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**22, 2**21, 2**21)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(head)
    with pytest.raises(
        DatasetError, match=r"16 bytes but its IDX header .* needs 18446744073709551632"
    ):
        build_dataset({"kind": "fashion_mnist", "path": str(tmp_path)}, "test")
