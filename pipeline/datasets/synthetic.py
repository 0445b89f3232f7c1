"""A tiny synthetic dataset for tests and the tiny config, the same bytes on every machine.

Each class has a blocky random prototype (a ``grid``×``grid`` pattern per channel, upsampled);
a sample is its class's prototype blended with uniform noise:

    x = round((1 - noise) · prototype[label] + noise · u),   u uniform in [0, 255]

All numbers come from the counter-based hash of ``pipeline.views`` (not numpy's RNG streams, which
may change between numpy versions), so the dataset — and its fingerprint — depend on the options
alone. Train and test share the prototypes and differ in noise and labels; a small CNN learns it.
"""

from __future__ import annotations

import numpy as np

from pipeline.datasets.base import ImageDataset, channel_stats, check_split
from pipeline.errors import DatasetError
from pipeline.views import counter_uint64

# Domain words: independent streams for prototypes, labels and noise under one seed.
_PROTO, _LABEL, _NOISE = 0x70726F746F, 0x6C6162656C, 0x6E6F697365


def _bytes(words: tuple[int, ...], n: int) -> np.ndarray:
    return (counter_uint64(words, np.arange(n)) >> np.uint64(56)).astype(np.uint8)  # (n,)


def _split(
    split: str, n: int, size: int, channels: int, classes: int, seed: int, noise: float, grid: int
) -> tuple[np.ndarray, np.ndarray]:
    sid = 0 if split == "train" else 1
    proto = _bytes((_PROTO, seed), classes * grid * grid * channels).reshape(
        classes, grid, grid, channels
    )
    cells = np.arange(size) * grid // size  # pixel -> grid cell
    proto = proto[:, cells][:, :, cells].astype(np.float32)  # (K, S, S, C)
    order = np.argsort(counter_uint64((_LABEL, seed, sid), np.arange(n)), kind="stable")
    labels = (np.arange(n) % classes)[order].astype(np.int64)  # balanced, shuffled
    u = _bytes((_NOISE, seed, sid), n * size * size * channels).reshape(n, size, size, channels)
    x = (1.0 - noise) * proto[labels] + noise * u.astype(np.float32)
    return np.rint(x).clip(0, 255).astype(np.uint8), labels


def synthetic(
    split: str,
    num_samples: int = 256,
    num_test: int = 128,
    image_size: int = 16,
    channels: int = 1,
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 0.45,
    grid: int = 4,
) -> ImageDataset:
    """``num_samples`` train / ``num_test`` test images, channels×image_size×image_size."""
    check_split(split, "synthetic")
    if min(num_samples, num_test, image_size, channels, num_classes, grid) < 1:
        raise DatasetError("synthetic: sizes, counts and grid must be >= 1")
    if not 0.0 <= noise <= 1.0:
        raise DatasetError(f"synthetic: noise must be in [0, 1], got {noise}")
    args = (image_size, channels, num_classes, seed, noise, grid)
    images, labels = _split(split, num_samples if split == "train" else num_test, *args)
    train = images if split == "train" else _split("train", num_samples, *args)[0]
    mean, std = channel_stats(train)  # the test split is normalised like the training split
    return ImageDataset(f"synthetic/{split}", images, labels, num_classes, mean, std)
