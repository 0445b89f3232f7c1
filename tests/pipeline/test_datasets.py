"""Datasets: file formats round trip, bad files fail with one clear line, and content is stable."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.datasets import (
    DATASETS,
    build_dataset,
    cifar10,
    cifar100,
    dataset_fingerprint,
    fashion_mnist,
    read_idx,
    safe_unpickle,
    synthetic,
    write_idx,
)
from pipeline.errors import DatasetError

RNG = np.random.default_rng(0)


def _idx_files(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> None:
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte{sfx}",
            RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", _as_uint8(np.arange(n) % 10))


def _as_uint8(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.uint8)


# --- IDX / Fashion-MNIST -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    a = (RNG.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, a)
    b = read_idx(path)
    assert b.shape == a.shape and b.dtype.newbyteorder("=") == np.dtype(dtype)
    np.testing.assert_array_equal(b, a)
    if not suffix:
        assert isinstance(b, np.memmap)  # plain files are mapped, not read


def test_idx_header_is_the_mnist_one(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.zeros((2, 3, 4), np.uint8))
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3]) and struct.unpack(">3I", raw[4:16]) == (2, 3, 4)
    assert len(raw) == 16 + 24


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx(tmp_path: Path, gz: bool) -> None:
    _idx_files(tmp_path, gz=gz)
    train = fashion_mnist("train", str(tmp_path))
    test = build_dataset({"kind": "fashion_mnist", "path": str(tmp_path)}, "test")
    assert (len(train), len(test), train.num_classes) == (12, 5, 10)
    assert train.images.shape == (12, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and list(train.labels[:3]) == [0, 1, 2]
    x, y = train.get_batch([3, 0, 3])
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == [3, 0, 3]
    np.testing.assert_array_equal(x[1, 0].numpy(), train.images[0, :, :, 0])
    assert train.mean == (0.286041,) and train.std == (0.353024,)


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    "damage",
    ["cut_plain", "cut_gz_stream", "short_gz_content", "bad_magic", "long_plain"],
)
def test_corrupt_idx_names_the_file(tmp_path: Path, damage: str) -> None:
    gz = damage in ("cut_gz_stream", "short_gz_content")
    _idx_files(tmp_path, gz=gz)
    bad = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    if damage == "cut_plain":
        _truncate(bad, 16 + 28 * 28 * 3 + 7)
    elif damage == "cut_gz_stream":
        _truncate(bad, bad.stat().st_size // 2)
    elif damage == "short_gz_content":
        raw = gzip.decompress(bad.read_bytes())
        bad.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "bad_magic":
        bad.write_bytes(b"\x1f\x00\x08\x03" + bad.read_bytes()[4:])
    else:
        bad.write_bytes(bad.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=str(bad.name)) as err:
        fashion_mnist("train", str(tmp_path))
    assert "\n" not in str(err.value)


def test_label_count_must_match(tmp_path: Path) -> None:
    _idx_files(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte"):
        fashion_mnist("train", str(tmp_path))


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="unknown split"):
        fashion_mnist("validation", str(tmp_path))


# --- CIFAR ---------------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), as the official CIFAR files were."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes) -> None:
        head = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else None
        self.write(head or pickle.BINSTRING + struct.pack("<i", len(obj)))
        self.write(obj)
        self.memoize(obj)

    def _save_py2_text(self, obj: str) -> None:
        self._save_py2_str(obj.encode("latin-1"))

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_text  # numpy's dtype arguments ('u1', '|') were str too


def _dump(path: Path, obj: dict, style: str) -> None:
    if style == "py2":
        with open(path, "wb") as f:
            _Py2Pickler(f, protocol=2).dump(obj)
        # numpy 1 (and so the official files) named the reconstructor numpy.core.multiarray.
        path.write_bytes(
            path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        )
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(style)))


def _cifar_rows(n: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.mark.parametrize("style", ["py2", "3", "4"])
def test_cifar10_round_trip(tmp_path: Path, style: str) -> None:
    names = [f"class{i}".encode() for i in range(10)]
    _dump(tmp_path / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 3}, style)
    rows = []
    for i in range(1, 6):
        data = _cifar_rows(3)
        rows.append(data)
        batch = {b"batch_label": b"x", b"labels": [i, i + 1, 0], b"data": data}
        _dump(tmp_path / f"data_batch_{i}", batch, style)
    test_rows = _cifar_rows(4)
    _dump(tmp_path / "test_batch", {b"labels": [9, 8, 7, 6], b"data": test_rows}, style)

    train = cifar10("train", str(tmp_path))
    test = build_dataset({"kind": "cifar10", "path": str(tmp_path)}, "test")
    assert (len(train), len(test), train.num_classes) == (15, 4, 10)
    assert train.images.shape == (15, 32, 32, 3) and test.labels.tolist() == [9, 8, 7, 6]
    assert train.labels[:3].tolist() == [1, 2, 0] and train.labels[-3:].tolist() == [5, 6, 0]
    x, _ = train.get_batch([4])  # row 1 of batch 2: the file's bytes are R, G, B planes
    np.testing.assert_array_equal(x[0].numpy().reshape(-1), rows[1][1])
    assert train.mean == (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize("label", ["fine", "coarse"])
def test_cifar100_round_trip(tmp_path: Path, label: str) -> None:
    meta = {b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20}
    _dump(tmp_path / "meta", meta, "py2")
    for split, n in (("train", 6), ("test", 2)):
        data = _cifar_rows(n)
        fine, coarse = [99 - i for i in range(n)], [19 - i for i in range(n)]
        _dump(
            tmp_path / split, {b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, "4"
        )
    spec = {"kind": "cifar100", "path": str(tmp_path), "label": label}
    train, test = build_dataset(spec, "train"), cifar100("test", str(tmp_path), label=label)
    assert train.num_classes == (100 if label == "fine" else 20)
    assert train.labels[0] == train.num_classes - 1 and (len(train), len(test)) == (6, 2)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os_system", "builtins_eval", "inside_array", "protocol5"])
def test_restricted_unpickler_refuses_code(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "data_batch_1"
    if payload == "os_system":
        evil.write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    elif payload == "builtins_eval":
        evil.write_bytes(b"cbuiltins\neval\n(S'open(\"" + str(marker).encode() + b'", "w")\'\ntR.')
    elif payload == "inside_array":  # an object array whose element is the exploit
        arr = np.empty(1, dtype=object)
        arr[0] = _Exploit(marker)
        evil.write_bytes(pickle.dumps({b"data": arr}, protocol=2))
    else:  # numpy pickles arrays with _frombuffer under protocol 5: not in the allow-list
        evil.write_bytes(pickle.dumps({b"data": _cifar_rows(1)}, protocol=5))
    with pytest.raises(DatasetError, match="data_batch_1.*refusing") as err:
        safe_unpickle(evil)
    assert not marker.exists() and "\n" not in str(err.value)


def test_cifar_missing_path_and_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        cifar10("train")
    _dump(tmp_path / "batches.meta", {b"label_names": [b"a"] * 10}, "4")
    _dump(tmp_path / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "4")
    with pytest.raises(DatasetError, match="3072"):
        cifar10("test", str(tmp_path))
    with pytest.raises(DatasetError, match="data_batch_1: no such"):
        cifar10("train", str(tmp_path))


# --- arrays, folders, synthetic ------------------------------------------------------------------


def test_npz_dataset(tmp_path: Path) -> None:
    images, labels = RNG.integers(0, 256, (10, 8, 8), dtype=np.uint8), np.arange(10) % 4
    test_images = RNG.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, images=images, labels=labels, test_images=test_images, test_labels=[0, 1, 2])
    train = build_dataset({"kind": "array", "path": str(path)}, "train")
    test = build_dataset({"kind": "array", "path": str(path)}, "test")
    assert train.images.shape == (10, 8, 8, 1) and train.num_classes == 4
    assert test.num_classes == 4 and test.mean == train.mean  # test normalised like train
    np.testing.assert_allclose(train.mean[0], images.mean() / 255, rtol=1e-5)
    np.testing.assert_allclose(train.std[0], images.std() / 255, rtol=1e-5)
    x, y = test.get_batch([2, 0])
    np.testing.assert_array_equal(x[:, 0].numpy(), test_images[[2, 0]])
    assert y.tolist() == [2, 0]

    only_train = tmp_path / "t.npz"
    np.savez(only_train, images=images, labels=labels)
    with pytest.raises(DatasetError, match="no test arrays"):  # never silently test on train
        build_dataset({"kind": "array", "path": str(only_train)}, "test")
    obj = tmp_path / "o.npz"
    np.savez(obj, images=np.array([None, 1], dtype=object), labels=[0, 1])
    with pytest.raises(DatasetError, match="unreadable"):
        build_dataset({"kind": "array", "path": str(obj)}, "train")


def test_zarr_dataset_reads_lazily_in_any_order(tmp_path: Path) -> None:
    import zarr  # a dependency of logitbank

    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    images = RNG.integers(0, 256, (20, 6, 5, 3), dtype=np.uint8)
    for split, sl in (("train", slice(0, 15)), ("test", slice(15, 20))):
        g = root.create_group(split)
        g.create_array("images", data=images[sl], chunks=(4, 6, 5, 3))
        g.create_array("labels", data=np.arange(20)[sl] % 3)
    ds = build_dataset(
        {"kind": "array", "path": str(tmp_path / "d.zarr"), "num_classes": 3}, "test"
    )
    assert ds.images.shape == (5, 6, 5, 3) and not isinstance(ds.images, np.ndarray)
    idx = [4, 1, 1, 3]
    x, y = ds.get_batch(idx)
    np.testing.assert_array_equal(x.numpy(), images[15:][idx].transpose(0, 3, 1, 2))
    assert y.tolist() == [(15 + i) % 3 for i in idx]
    np.testing.assert_array_equal(ds.images[1:3], images[16:18])
    with pytest.raises(IndexError):
        ds.get_batch([5])


def _png_tree(root: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    pixels = {}
    for split, per in (("train", 3), ("test", 1)):
        for cls in ("zebra", "ant"):  # not in sorted order on purpose
            (root / split / cls).mkdir(parents=True)
            for i in range(per):
                a = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
                name = f"{split}/{cls}/{i}.png"
                Image.fromarray(a).save(root / name)
                pixels[name] = a
    return pixels


def test_image_folder(tmp_path: Path) -> None:
    pixels = _png_tree(tmp_path)
    train = build_dataset({"kind": "image_folder", "path": str(tmp_path)}, "train")
    assert train.classes == ["ant", "zebra"] and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images.shape == (6, 6, 7, 3)
    x, y = train.get_batch([4, 0])
    np.testing.assert_array_equal(x[0].numpy().transpose(1, 2, 0), pixels["train/zebra/1.png"])
    np.testing.assert_array_equal(x[1].numpy().transpose(1, 2, 0), pixels["train/ant/0.png"])
    assert y.tolist() == [1, 0]
    spec = {"kind": "image_folder", "path": str(tmp_path), "image_size": [4, 5], "channels": 1}
    small = build_dataset(spec, "test")
    assert small.get_batch([0, 1])[0].shape == (2, 1, 4, 5) and small.mean == (0.449,)
    before = dataset_fingerprint(
        build_dataset({"kind": "image_folder", "path": str(tmp_path)}, "test")
    )
    from PIL import Image

    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "test/ant/0.png")
    after = dataset_fingerprint(
        build_dataset({"kind": "image_folder", "path": str(tmp_path)}, "test")
    )
    assert before != after


def test_image_folder_size_mismatch_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train/a/0.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "train/a/1.png")
    ds = build_dataset({"kind": "image_folder", "path": str(tmp_path)}, "train")
    with pytest.raises(DatasetError, match=r"1\.png.*image_size"):
        ds.get_batch([0, 1])


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, b = synthetic("train", seed=3), synthetic("train", seed=3)
    assert a.images.tobytes() == b.images.tobytes() and (a.labels == b.labels).all()
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    assert synthetic("train", seed=4).images.tobytes() != a.images.tobytes()
    assert np.bincount(a.labels).tolist() == [26] * 6 + [25] * 4
    rgb = synthetic("test", num_test=50, channels=3)
    assert rgb.images.shape == (50, 16, 16, 3) and len(rgb.mean) == 3
    # Class structure: nearest class mean (from train) classifies held-out test images well.
    train, test = synthetic("train", seed=0), synthetic("test", seed=0)
    flat = train.images.reshape(len(train), -1).astype(np.float64)
    means = np.stack([flat[train.labels == k].mean(0) for k in range(10)])
    dist = ((test.images.reshape(len(test), 1, -1) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == test.labels).mean() > 0.8


def test_synthetic_fingerprint_is_pinned() -> None:
    # The same bytes on every machine and numpy version: the counter-based generator, pinned.
    ds = build_dataset({"kind": "synthetic"}, "train")
    assert dataset_fingerprint(ds) == SYNTHETIC_FINGERPRINT
    assert ds.mean == SYNTHETIC_MEAN_STD[0] and ds.std == SYNTHETIC_MEAN_STD[1]


SYNTHETIC_FINGERPRINT = "d3eb438ec785c4273d92eb9ee91c2c4d3fa4713edfa947dc4dd793b52777dceb"
SYNTHETIC_MEAN_STD = ((0.490573,), (0.197238,))


# --- registry, fingerprint -----------------------------------------------------------------------


def test_build_dataset_rejects_unknowns() -> None:
    with pytest.raises(DatasetError, match="known kinds: fashion_mnist, cifar10") as err:
        build_dataset({"kind": "mnist"}, "train")
    assert all(k in str(err.value) for k in DATASETS)
    with pytest.raises(DatasetError, match="unknown option.*num_sample\\b"):
        build_dataset({"kind": "synthetic", "num_sample": 3}, "train")
    ds = build_dataset({"kind": "synthetic", "mean": [0.5], "std": [0.25]}, "train")
    assert (ds.mean, ds.std) == ((0.5,), (0.25,))
    with pytest.raises(DatasetError, match="1 value"):
        build_dataset({"kind": "synthetic", "mean": [0.5, 0.5], "std": [0.2, 0.2]}, "train")


def test_fingerprint_sees_every_pixel_and_label() -> None:
    ds = synthetic("train", num_samples=64)
    base = dataset_fingerprint(ds)
    assert dataset_fingerprint(ds) is ds._fingerprint  # cached on the object
    for change in ("pixel", "label"):
        other = synthetic("train", num_samples=64)
        if change == "pixel":
            other.images = other.images.copy()
            other.images[63, 15, 15, 0] ^= 1
        else:
            other.labels = other.labels.copy()
            other.labels[0] = (other.labels[0] + 1) % 10
        assert dataset_fingerprint(other) != base


# --- the real files ------------------------------------------------------------------------------

#: sha256 of the official Fashion-MNIST training set as this project hashes it (images, labels).
FASHION_MNIST_TRAIN_FINGERPRINT = "e23c850589dd5233c59c5e86c864aa2deb018b71f794d30e36fc77a990f1a505"


@pytest.mark.realdata
def test_real_fashion_mnist(fashion_mnist_dir: Path) -> None:
    spec = {"kind": "fashion_mnist", "path": str(fashion_mnist_dir)}
    train, test = build_dataset(spec, "train"), build_dataset(spec, "test")
    assert (len(train), len(test), train.num_classes) == (60000, 10000, 10)
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    subset = np.random.default_rng(0).choice(60000, 512, replace=False)
    x, y = train.get_batch(subset)
    assert x.shape == (512, 1, 28, 28) and y.tolist() == train.labels[subset].tolist()
    assert 0.25 < x.float().mean().item() / 255 < 0.32  # the stated mean, 0.286, on a subset
    assert dataset_fingerprint(train) == FASHION_MNIST_TRAIN_FINGERPRINT


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"num_samples": "abc"},
            r"synthetic: data.options \(num_samples='abc', .*\) hold a value of the wrong kind",
        ),
        ({"mean": 0.5, "std": 0.5}, r"synthetic: mean and std need 1 value\(s\) each, std > 0"),
        ({"mean": ["a"], "std": [1.0]}, r"mean and std need 1 value\(s\) each"),
    ],
)
def test_dataset_options_of_the_wrong_kind_are_one_line(options: dict, message: str) -> None:
    base = {"num_samples": 8, "num_test": 4, "image_size": 8, "channels": 1, "num_classes": 3}
    with pytest.raises(DatasetError, match=message) as err:
        build_dataset({"kind": "synthetic", **base, **options}, "train")
    assert "\n" not in str(err.value)
