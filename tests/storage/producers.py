"""Picklable stand-ins for a teacher: deterministic logits per (view, row range)."""

from __future__ import annotations

import numpy as np


class SeededLogits:
    """``produce(view, start, stop)`` → (logits, view_params), the same for the same rows."""

    def __init__(self, num_classes: int, width: int = 3) -> None:
        self.num_classes = num_classes
        self.width = width

    def __call__(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(start, stop)
        logits = (
            np.stack(
                [np.random.default_rng([view, r]).standard_normal(self.num_classes) for r in rows]
            )
            * 3
        )
        params = np.stack([rows % 7, rows % 5, np.full_like(rows, view)], axis=1)[:, : self.width]
        return logits.astype(np.float32), params.astype(np.int16)


def torch_batches(batches):
    """What the distill stage does: present LogitBatches to a DataLoader as an IterableDataset."""
    return _TorchBatches(batches)


try:
    import torch

    class _TorchBatches(torch.utils.data.IterableDataset):
        def __init__(self, batches) -> None:
            self.batches = batches

        def __iter__(self):
            for idx, views, logits in self.batches:
                yield idx.copy(), views.copy(), logits.copy()
except ImportError:  # pragma: no cover - torch is a dependency
    pass
