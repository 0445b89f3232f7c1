"""The common face of every dataset: channels-last uint8 images, int64 labels, batches for models.

Images stay uint8 (N, H, W, C) in memory (or on disk: a memmap, a zarr array, image files decoded
per batch); a batch leaves as a torch uint8 (B, C, H, W) tensor, and only the views and the
normalisation of ``pipeline.views`` turn it into float32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.errors import DatasetError

SPLITS = ("train", "test")
#: Rows hashed or scanned per block: ~3 MiB of 28×28 images, bounded memory for large ones.
BLOCK_ROWS = 4096


def check_split(split: str, kind: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"{kind}: unknown split {split!r}; use one of {', '.join(SPLITS)}")


def as_indices(indices: Any, n: int) -> np.ndarray:
    """(B,) int64 row numbers, each in [0, n)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"sample indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    return idx


class LazyImages:
    """A read-only uint8 (N, H, W, C) array whose rows are fetched on demand.

    ``take(idx) -> (B, H, W, C)`` does the work (a zarr read, image decoding); indexing with an int,
    a slice or an index array goes through it.
    """

    def __init__(self, shape: tuple[int, int, int, int], take: Callable[[np.ndarray], np.ndarray]):
        self.shape = shape
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._take = take

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return self._take(np.arange(*key.indices(self.shape[0])))
        if np.ndim(key) == 0:
            return self._take(as_indices([key], self.shape[0]))[0]
        return self._take(as_indices(key, self.shape[0]))


class ImageDataset:
    """A labelled image dataset.

    Attributes:
        name: e.g. ``"fashion_mnist/train"``.
        images: uint8 (N, H, W, C), channels last: a numpy array, memmap or ``LazyImages``.
        labels: int64 (N,).
        num_classes: labels lie in [0, num_classes).
        mean, std: per channel, in [0, 1] units, for ``pipeline.views.PreprocessSpec``.
    """

    def __init__(
        self,
        name: str,
        images: np.ndarray | LazyImages,
        labels: np.ndarray,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        labels = np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DatasetError(
                f"{name}: images must be uint8 N×H×W×C, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or len(labels) != images.shape[0]:
            raise DatasetError(
                f"{name}: {images.shape[0]} images but labels of shape {labels.shape}; "
                "give one label per image"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{name}: labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(
                f"{name}: labels span [{labels.min()}, {labels.max()}], outside the "
                f"{num_classes} classes; fix the labels or num_classes"
            )
        if len(mean) != images.shape[3] or len(std) != images.shape[3]:
            raise DatasetError(
                f"{name}: mean/std need {images.shape[3]} channel value(s), got {mean} / {std}"
            )
        self.name = name
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        n, h, w, c = self.images.shape
        return (
            f"{type(self).__name__}({self.name!r}, N={n}, {c}×{h}×{w}, {self.num_classes} classes)"
        )

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 (B, C, H, W) and labels int64 (B,) of rows ``indices`` (any order)."""
        idx = as_indices(indices, len(self))
        x = np.asarray(self.images[idx])  # (B, H, W, C), a copy
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (B, C, H, W)
        return torch.from_numpy(x), torch.from_numpy(self.labels[idx].copy())

    def content_blocks(self) -> Iterator[bytes | memoryview | np.ndarray]:
        """What the fingerprint hashes, in order: image row blocks (subclasses may differ)."""
        for start in range(0, len(self), BLOCK_ROWS):
            yield np.ascontiguousarray(self.images[start : start + BLOCK_ROWS])


def dataset_fingerprint(ds: ImageDataset) -> str:
    """sha256 (hex) of the shape, classes, images and labels; computed once per object."""
    if getattr(ds, "_fingerprint", None):
        return ds._fingerprint  # type: ignore[return-value]
    h = hashlib.sha256()
    h.update(f"logitbank-dataset-v1 {tuple(ds.images.shape)} {ds.num_classes}\n".encode())
    for block in ds.content_blocks():
        h.update(block)
    h.update(np.ascontiguousarray(ds.labels, dtype="<i8"))
    ds._fingerprint = h.hexdigest()
    return ds._fingerprint


def channel_stats(images: np.ndarray | LazyImages) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units, from exact integer histograms.

    Integer counts make the result bit-identical on every machine, so a spec hashed from it is too.
    """
    c = images.shape[3]
    counts = np.zeros((c, 256), dtype=np.int64)
    for start in range(0, images.shape[0], BLOCK_ROWS):
        block = np.asarray(images[start : start + BLOCK_ROWS])  # (b, H, W, C)
        for ch in range(c):
            counts[ch] += np.bincount(block[..., ch].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    if not total.all():
        raise DatasetError("cannot compute mean/std of an empty dataset; give mean and std")
    mean = (counts * values).sum(axis=1) / total
    var = (counts * values**2).sum(axis=1) / total - mean**2
    std = np.sqrt(np.maximum(var, 1e-12))
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)
