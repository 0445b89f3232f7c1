"""Array datasets: a ``.npz`` file or a zarr group holding uint8 images and integer labels.

Inside the file a split is found as ``<split>_images`` / ``<split>_labels`` (npz or zarr), as a
zarr subgroup ``<split>/images``, or — for the train split only — as plain ``images`` / ``labels``.
A test split never falls back to the plain arrays (that would evaluate on the training data): put
``test_*`` arrays in the file or give ``test_path``. Images are N×H×W (grey) or N×H×W×C,
channels last. Zarr images stay on disk and are read per batch; npz arrays are loaded at open.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets.base import ImageDataset, LazyImages, channel_stats, check_split
from pipeline.errors import DatasetError

MAX_LABEL = 2**31 - 1  # labels are class numbers: one this large is damage, not a class


def _open(path: Path) -> Any:
    """A mapping name -> array: an NpzFile or a zarr group."""
    if not path.exists():
        raise DatasetError(f"array dataset {path} does not exist; set the data path")
    try:
        if path.suffix == ".npz":
            return np.load(path, allow_pickle=False)  # never unpickle object arrays
        import zarr

        return zarr.open_group(str(path), mode="r")
    except Exception as e:
        raise DatasetError(f"{path}: not a readable .npz file or zarr group ({e})") from e


def _get(store: Any, name: str, path: Path) -> Any | None:
    try:
        return store[name]
    except (KeyError, FileNotFoundError):
        return None
    except ValueError as e:
        if "allow_pickle" in str(e):  # an object array in an npz, which would need unpickling
            raise DatasetError(
                f"array {name!r} is unreadable ({e}); store plain numeric arrays"
            ) from e
        raise DatasetError(f"{path}: array {name!r} is corrupt ({e}); re-create the file") from e
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:  # bad CRC, truncated member
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the disk's or the permissions' fault, reported as such
        raise DatasetError(f"{path}: array {name!r} is corrupt ({e}); re-create the file") from e


def _arrays(store: Any, split: str, path: Path) -> tuple[Any, Any]:
    for images_key, labels_key in (
        (f"{split}_images", f"{split}_labels"),
        (f"{split}/images", f"{split}/labels"),
        *([("images", "labels")] if split == "train" else []),
    ):
        images = _get(store, images_key, path)
        if images is not None:
            labels = _get(store, labels_key, path)
            if labels is None:
                raise DatasetError(f"{path}: has {images_key!r} but no {labels_key!r}")
            return images, labels
    hint = "images/labels or train_images/train_labels" if split == "train" else "test_images"
    raise DatasetError(f"{path}: no {split} arrays; add {hint} to it or set {split}_path")


def _read(arr: Any, selection: Any, name: str, path: Path) -> np.ndarray:
    """Rows of a zarr array; a chunk its codec cannot decode is the file's fault, one line."""
    try:
        return arr.get_orthogonal_selection(selection)
    except (RuntimeError, ValueError, TypeError, EOFError, zlib.error) as e:  # codecs' errors
        raise DatasetError(
            f"{path}: zarr array {name!r} has a damaged chunk ({type(e).__name__}: {e}); "
            "re-create it"
        ) from e


def _zarr_images(arr: Any, path: Path) -> LazyImages:
    grey = arr.ndim == 3
    shape = (*arr.shape, 1) if grey else tuple(arr.shape)

    def take(idx: np.ndarray) -> np.ndarray:
        # zarr reads sorted, unique coordinates best; put the caller's order back afterwards.
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = np.asarray(_read(arr, (uniq,), "images", path))[inverse]
        return rows[..., None] if grey else rows

    return LazyImages(shape, take)


def array_dataset(
    split: str,
    path: str | None = None,
    train_path: str | None = None,
    test_path: str | None = None,
    num_classes: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    name: str = "array",
) -> ImageDataset:
    """uint8 images and integer labels from a ``.npz`` file or zarr group (see the module doc).

    ``num_classes``, ``mean`` and ``std`` default to those of the train split (the largest label
    + 1; exact per-channel statistics of its images), so both splits are normalised alike.
    """
    check_split(split, "array")
    chosen = {"train": train_path, "test": test_path}[split] or path
    if not chosen:
        raise DatasetError(
            f"array: set the data path (or {split}_path) to a .npz file or zarr group"
        )
    file = Path(chosen)
    images, labels = _arrays(_open(file), split, file)
    if np.dtype(images.dtype) != np.uint8 or images.ndim not in (3, 4):
        raise DatasetError(
            f"{file}: images must be uint8 N×H×W or N×H×W×C, got {images.dtype} {images.shape}"
        )
    if images.ndim == 4 and images.shape[3] not in (1, 3, 4):
        raise DatasetError(
            f"{file}: images have {images.shape[3]} channels last; store them channels-last N×H×W×C"
        )
    if isinstance(images, np.ndarray):
        pixels: np.ndarray | LazyImages = images if images.ndim == 4 else images[..., None]
    else:
        pixels = _zarr_images(images, file)
    if not isinstance(labels, np.ndarray):  # a zarr array
        labels = _read(labels, (slice(None),) * labels.ndim, "labels", file)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{file}: labels must be integers, got {labels.dtype}")
    if labels.shape != images.shape[:1]:
        raise DatasetError(
            f"{file}: {images.shape[0]} images but labels of shape {labels.shape}; "
            "store one integer label per image, a 1-d array"
        )
    if len(labels) == 0:
        raise DatasetError(
            f"{file}: the {split} split holds no images; give a dataset with at least one image"
        )
    if int(labels.max()) > MAX_LABEL:  # a Python int: uint64 labels >= 2**63 must not wrap
        raise DatasetError(
            f"{file}: labels reach {int(labels.max())}, beyond any class count; fix the labels"
        )
    if split == "train":
        if num_classes is None:
            num_classes = int(labels.max()) + 1  # not empty (checked); uint64 has no -1
        if mean is None or std is None:
            mean, std = channel_stats(pixels)
    elif num_classes is None or mean is None or std is None:
        # The test split takes what it lacks from the training split, as the model was trained.
        train = array_dataset("train", path, train_path, None, num_classes, mean, std, name)
        num_classes, mean, std = train.num_classes, train.mean, train.std
    return ImageDataset(f"{name}/{split}", pixels, labels, num_classes, tuple(mean), tuple(std))
