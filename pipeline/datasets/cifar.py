"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from their "python version" pickle files.

Those files are pickles, and unpickling runs whatever callables a file names. They are read with
``SafeUnpickler``, whose ``find_class`` hands out only numpy's array reconstruction (the official
files hold dicts of bytes, lists and uint8 arrays) and refuses every other global, so a tampered
file fails with ``DatasetError`` instead of running code. Rows of ``data`` are 3072 bytes, the red,
green and blue 32×32 planes; they are turned channels-last once, at load.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets.base import ImageDataset, check_split
from pipeline.errors import DatasetError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# ndarray.__reduce__ names numpy.core.multiarray._reconstruct (numpy 1) or
# numpy._core.multiarray._reconstruct (numpy 2); take the function itself from numpy, never import
# by the name the file gives.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED`` (numpy arrays and dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids")


def safe_unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (Python 2 files give bytes keys)."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: no such CIFAR file; set the data path to its folder") from e
    except Exception as e:  # a hostile or broken pickle can raise almost anything
        raise DatasetError(
            f"{path}: not a valid CIFAR pickle ({type(e).__name__}: {e}); use the official files"
        ) from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: a CIFAR pickle holds a dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    if "data" not in d or label_key not in d:
        raise DatasetError(f"{path}: missing 'data' or {label_key!r}; not a CIFAR batch file")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(f"{path}: 'data' must be a uint8 N×3072 array; not a CIFAR batch")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: rows of {data.shape[1]} bytes, CIFAR rows are 3072")
    labels = np.asarray(d[label_key])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {label_key!r} must hold {len(data)} integers")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _root(path: str | None, kind: str, folder: str) -> Path:
    if not path:
        raise DatasetError(f"{kind}: set the data path to the extracted {folder} folder")
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{kind}: {root} is not a folder; set the data path to {folder}")
    return root


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: no {key!r} list; not a CIFAR meta file")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def cifar10(split: str, path: str | None = None) -> ImageDataset:
    """CIFAR-10: 50000 train (data_batch_1..5) / 10000 test (test_batch) RGB 32×32, 10 classes."""
    check_split(split, "cifar10")
    root = _root(path, "cifar10", "cifar-10-batches-py")
    names = _names(safe_unpickle(root / "batches.meta"), "label_names", root / "batches.meta")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_batch(root / f, "labels") for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(
        f"cifar10/{split}", images, labels, len(names), mean=CIFAR10_MEAN, std=CIFAR10_STD
    )


def cifar100(split: str, path: str | None = None, label: str = "fine") -> ImageDataset:
    """CIFAR-100: 50000 train / 10000 test RGB 32×32; 100 fine or 20 coarse classes."""
    check_split(split, "cifar100")
    if label not in ("fine", "coarse"):
        raise DatasetError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}")
    root = _root(path, "cifar100", "cifar-100-python")
    names = _names(safe_unpickle(root / "meta"), f"{label}_label_names", root / "meta")
    images, labels = _batch(root / split, f"{label}_labels")
    return ImageDataset(
        f"cifar100/{split}", images, labels, len(names), mean=CIFAR100_MEAN, std=CIFAR100_STD
    )
