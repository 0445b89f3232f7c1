"""IDX files (LeCun's MNIST format) and Fashion-MNIST (Xiao et al., 2017) read from them.

An IDX file is ``00 00 <dtype> <ndim>``, then ndim big-endian uint32 sizes, then the values in C
order, big-endian. Files may be gzipped (``*.gz``). Plain files are memory-mapped; gzipped ones are
inflated once into memory (47 MB for Fashion-MNIST's training images).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.datasets.base import ImageDataset, check_split
from pipeline.errors import DatasetError

#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = (0.286041,)  # of the 60000 training images, in [0, 1] units
FASHION_MNIST_STD = (0.353024,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder(">"): k for k, v in _DTYPES.items()}


def _parse_header(head: bytes, path: Path, size: int) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {head[:4].hex()})")
    dtype, ndim = np.dtype(_DTYPES[head[2]]), head[3]
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise DatasetError(f"{path}: truncated IDX header; re-download or reinstall the file")
    shape = struct.unpack(f">{ndim}I", head[4:offset])
    want = offset + math.prod(shape) * dtype.itemsize  # Python ints: np.prod can wrap to 0
    if size != want:
        raise DatasetError(
            f"{path}: {size} bytes but its IDX header {shape} needs {want}; "
            "the file is truncated or corrupt — re-download or reinstall it"
        )
    return dtype, shape, offset


def read_idx(path: str | Path) -> np.ndarray:
    """The array in an IDX file, gzipped or not (plain files are memory-mapped, read-only)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
            dtype, shape, offset = _parse_header(raw[:1024], path, len(raw))
            return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1024)
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: no such IDX file; check the data path") from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: unreadable IDX file ({e}); re-download or reinstall it") from e
    dtype, shape, offset = _parse_header(head, path, size)
    if size == offset:  # np.memmap refuses empty maps
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzipped when ``path`` ends in ``.gz``."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = _CODES.get(np.dtype(dtype).newbyteorder(">"))
    if code is None:
        raise DatasetError(f"IDX cannot hold {array.dtype}; use uint8, int8/16/32 or float32/64")
    data = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += np.ascontiguousarray(array, dtype=dtype).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; "
        "run `apt-get install dataset-fashion-mnist` or set the data path"
    )


def fashion_mnist(split: str, path: str | None = None) -> ImageDataset:
    """Fashion-MNIST: 60000 train / 10000 test grey 28×28 images of 10 clothing classes."""
    check_split(split, "fashion_mnist")
    root = Path(path or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 N×H×W images, got {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8 or len(labels) != len(images):
        raise DatasetError(
            f"{labels_path}: expected {len(images)} uint8 labels, got {labels.dtype} "
            f"{labels.shape}; the files do not belong together"
        )
    if len(images) == 0:
        raise DatasetError(
            f"{images_path}: the {split} split holds no images; re-download or reinstall the files"
        )
    return ImageDataset(
        f"fashion_mnist/{split}",
        images[..., None],  # (N, 28, 28, 1): still a view of the memmap
        labels.astype(np.int64),
        num_classes=len(FASHION_MNIST_CLASSES),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )
