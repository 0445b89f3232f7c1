"""From a config to model-ready batches: the dataset, its preprocessing and its replayable views.

The one function that turns (sample indices, view) into the float32 tensor a model sees, shared by
the teacher's training, the export's parity batches, the precompute and (later) the student — so
teacher and student see byte-identical images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from pipeline.config import AugmentConfig, Config, DataConfig
from pipeline.datasets import build_dataset, dataset_fingerprint
from pipeline.errors import ConfigError
from pipeline.fingerprint import spec_hash
from pipeline.views import AugmentSpec, PreprocessSpec, apply_view, normalize, view_params


def augment_spec(cfg: AugmentConfig) -> AugmentSpec:
    return AugmentSpec(pad=cfg.pad, flip=cfg.flip, identity_view0=cfg.identity_view0)


@dataclass
class Split:
    """One split of a dataset (optionally its first ``subset`` rows), ready for models."""

    data: DataConfig
    split: str
    augment: AugmentConfig

    def __getstate__(self) -> dict:
        # Worker processes rebuild the dataset from the config rather than receive its pixels.
        state = dict(self.__dict__)
        for key in ("dataset", "rows", "preprocess", "spec"):
            state.pop(key, None)
        return state

    @cached_property
    def dataset(self):
        spec = {
            "kind": self.data.kind,
            **({"path": self.data.path} if self.data.path else {}),
            **self.data.options,
        }
        return build_dataset(spec, self.split)

    @cached_property
    def rows(self) -> int:
        n = len(self.dataset)
        subset = self.data.train_subset if self.split == "train" else self.data.test_subset
        if subset is not None:
            if subset < 1:
                raise ConfigError(f"data.{self.split}_subset must be >= 1, got {subset}")
            n = min(n, subset)
        return n

    def __len__(self) -> int:
        return self.rows

    @property
    def num_classes(self) -> int:
        return int(self.dataset.num_classes)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset.labels[: self.rows], dtype=np.int64)

    @cached_property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec(mean=tuple(self.dataset.mean), std=tuple(self.dataset.std))

    @cached_property
    def spec(self) -> AugmentSpec:
        return augment_spec(self.augment)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's input."""
        images, _ = self.dataset.get_batch(np.arange(1))
        return tuple(int(s) for s in images.shape[1:])

    @property
    def model_kwargs(self) -> dict:
        """The zoo's arguments for a model of this split's images and classes."""
        channels, height, width = self.image_shape
        return {
            "num_classes": self.num_classes,
            "in_channels": channels,
            "image_size": (height, width),
        }

    def batch(
        self, indices: np.ndarray, view: int | None = None, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        """Model input float32 (B, C, H, W), labels (B,), and the view parameters used.

        ``view=None`` gives the clean image; otherwise view ``view`` drawn with ``seed``
        (default: the augment config's seed), the same for any batch, worker or order.
        """
        images, labels = self.dataset.get_batch(np.asarray(indices))
        params = None
        if view is not None:
            params = view_params(
                self.augment.seed if seed is None else seed, view, np.asarray(indices), self.spec
            )
            images = apply_view(images, params, self.spec)
        return normalize(images, self.preprocess), torch.as_tensor(labels), params

    def fingerprint(self) -> dict:
        """What a store made from this split depends on (besides the teacher)."""
        return {
            # hashed afresh (a file rewritten in place since is never taken for the old one),
            # and shared with the keys that take the data by content (dataset_sha256)
            "dataset": _remember(self.data, self.split, dataset_fingerprint(self.dataset)),
            "rows": self.rows,
            "preprocess": spec_hash(self.preprocess.to_dict()),
            "augment": spec_hash(self.spec.to_dict()),
            "seed": self.augment.seed,
        }


#: (kind, path, options, the path's stat, split) → the split's content hash: one hash a process
#: (an image folder's is a listing and a stat of every file even with its digest cache).
_HASHES: dict[tuple, str] = {}


def dataset_sha256(data: DataConfig, split: str = "train") -> str:
    """The content hash of a split of the dataset ``data`` names (``dataset_fingerprint``):
    what a teacher or student depends on, wherever the files lie (``data.path``), for their
    keys. Once a process, or taken from the split's own fingerprint (the store checks', always
    computed afresh); hashed again when the path's file, or a file at the top of its folder,
    changes."""
    key = _hash_key(data, split)
    if key not in _HASHES:
        path = data.path or ""
        spec = {"kind": data.kind, **({"path": path} if path else {}), **data.options}
        _remember(data, split, dataset_fingerprint(build_dataset(spec, split)))
    return _HASHES[key]


def _hash_key(data: DataConfig, split: str) -> tuple:
    path = data.path or ""
    stamp = _stamp(path) if path else None
    return (data.kind, path, json.dumps(data.options, sort_keys=True, default=str), stamp, split)


def _remember(data: DataConfig, split: str, value: str) -> str:
    if len(_HASHES) >= 16:
        _HASHES.clear()
    _HASHES[_hash_key(data, split)] = value
    return value


def _stamp(path: str) -> object:
    """What changes when a dataset's file, or a file at the top of its folder, is rewritten."""
    try:
        st = os.stat(path)
        own = (st.st_mtime_ns, st.st_size, st.st_ino)
        if not os.path.isdir(path):
            return own
        with os.scandir(path) as entries:
            inside = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries)
        return own, tuple(inside)
    except OSError:  # gone: the build says so
        return None


def check_test_split(test: Split) -> None:
    """Read the test split's files (its length and labels): one missing or unreadable is
    refused now, not at the evaluation after the first epoch."""
    test.labels  # noqa: B018


def splits(config: Config) -> tuple[Split, Split]:
    """(train, test) of the configured dataset."""
    return (Split(config.data, "train", config.augment), Split(config.data, "test", config.augment))
