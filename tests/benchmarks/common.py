"""What the teacher-side benchmarks share: a zoo teacher with random weights in a run folder.

Speed does not depend on the weights, so no teacher is trained: a checkpoint of a freshly built
model is given to the tiny config (``teacher.checkpoint``) on a synthetic CIFAR-like data set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models import build_model, save_checkpoint

TINY = Path(__file__).resolve().parents[2] / "stages" / "configs" / "tiny.yaml"


def random_teacher_run(run: Path, model: str, rows: int, classes: int, views: int) -> list[str]:
    """Write ``run/given.pt`` (``model``, 3x32x32 -> ``classes``) and return the ``--set``
    values of a run in ``run`` that uses it on ``rows`` synthetic images with ``views`` views."""
    ckpt = run / "given.pt"
    kwargs = {"num_classes": classes, "in_channels": 3, "image_size": (32, 32)}
    torch.manual_seed(0)
    save_checkpoint(ckpt, build_model(model, **kwargs), model_name=model, model_kwargs=kwargs)
    return [
        f"run_dir={run}",
        f"data.options={{num_samples: {rows}, num_test: 256, image_size: 32, "
        f"channels: 3, num_classes: {classes}, seed: 0}}",
        f"augment.views={views}",
        f"teacher.checkpoint={ckpt}",
    ]


def cli_args(sets: list[str]) -> list[str]:
    """``--config tiny.yaml --set ... --quiet`` for ``python -m pipeline STAGE``."""
    return ["--config", str(TINY), *[a for s in sets for a in ("--set", s)], "--quiet"]
