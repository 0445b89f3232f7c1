"""Datasets: one small interface (``ImageDataset``) over Fashion-MNIST, CIFAR, arrays, image
folders and a synthetic set, built from a config's ``data`` section by ``build_dataset``.

    ds = build_dataset({"kind": "fashion_mnist"}, "train")      # Debian's files by default
    images, labels = ds.get_batch(np.arange(8))                  # uint8 (8, 1, 28, 28), int64 (8,)
    dataset_fingerprint(ds)                                      # sha256 of images and labels
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from pipeline.datasets.arrays import array_dataset
from pipeline.datasets.base import (
    SPLITS,
    ImageDataset,
    LazyImages,
    channel_stats,
    dataset_fingerprint,
)
from pipeline.datasets.cifar import SafeUnpickler, cifar10, cifar100, safe_unpickle
from pipeline.datasets.folder import ImageFolderDataset, image_folder
from pipeline.datasets.idx import FASHION_MNIST_DIR, fashion_mnist, read_idx, write_idx
from pipeline.datasets.synthetic import synthetic
from pipeline.errors import DatasetError

#: kind -> builder(split, **options); every option is a keyword of the builder.
DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "array": array_dataset,
    "image_folder": image_folder,
    "synthetic": synthetic,
}

__all__ = [
    "DATASETS", "FASHION_MNIST_DIR", "SPLITS", "ImageDataset", "ImageFolderDataset", "LazyImages",
    "SafeUnpickler", "array_dataset", "build_dataset", "channel_stats", "cifar10", "cifar100",
    "dataset_fingerprint", "fashion_mnist", "image_folder", "read_idx", "safe_unpickle",
    "synthetic", "write_idx",
]  # fmt: skip


def build_dataset(spec: dict[str, Any], split: str) -> ImageDataset:
    """The ``split`` ("train" or "test") of the dataset ``spec`` describes.

    ``spec``: ``{"kind": ..., "path": ..., <the kind's options>}``; ``mean`` and ``std`` (per
    channel, [0, 1] units) override the kind's normalisation for every kind.
    """
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(DATASETS)}")
    builder = DATASETS[kind]
    accepted = set(inspect.signature(builder).parameters) - {"split"}
    mean, std = options.get("mean"), options.get("std")
    if "mean" not in accepted:
        options.pop("mean", None)
        options.pop("std", None)
    unknown = sorted(str(k) for k in set(options) - accepted)  # YAML keys may be numbers
    if unknown:
        raise DatasetError(
            f"{kind}: unknown option(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(accepted | {'mean', 'std'}))}"
        )
    try:
        ds = builder(split, **options)
    except (TypeError, ValueError, IndexError) as exc:
        what = f"({type(exc).__name__}: {str(exc)[:120]})"
        if _raised_reading(exc):  # a damaged file, not an option: name the files, not options
            paths = ", ".join(str(v) for k, v in options.items() if k.endswith("path") and v)
            raise DatasetError(
                f"{kind}: cannot read the {split} data from {paths or 'the data path'} {what}: "
                "the file is corrupt or of another format; re-create it"
            ) from None
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise DatasetError(
            f"{kind}: data.options ({shown}) hold a value of the wrong kind or range "
            f"{what}: fix data.options"
        ) from None
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise DatasetError(f"{kind}: give both mean and std, or neither")
        c = ds.images.shape[3]
        pairs = [mean, std]
        if (
            not all(isinstance(v, (list, tuple)) and len(v) == c for v in pairs)
            or not all(_finite(x) for v in pairs for x in v)
            or min(std) <= 0
        ):
            raise DatasetError(
                f"{kind}: mean and std need {c} value(s) each, std > 0, all finite numbers"
            )
        ds.mean, ds.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return ds


def _finite(x: Any) -> bool:
    """A real number, not NaN or infinite (a NaN std trains on NaN inputs, an infinite one on
    zeros, both without an error)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float
        return False


#: Modules that read data files: an error raised inside them is the file's, not an option's.
_READERS = (
    "zipfile", "gzip", "pickle", "zarr", "numcodecs", "PIL",
    "numpy.lib.format", "numpy.lib.npyio", "numpy.lib._format_impl", "numpy.lib._npyio_impl",
)  # fmt: skip


def _raised_reading(exc: BaseException) -> bool:
    """Whether ``exc`` came from inside a file-format reader (a damaged file) rather than from
    a builder's use of an option."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if any(module == r or module.startswith(r + ".") for r in _READERS):
            return True
        tb = tb.tb_next
    return False
