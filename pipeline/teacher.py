"""Training a teacher from the zoo (for the default run, and for users who have none).

SGD with momentum and a multi-step schedule from the config; random crop/flip views drawn fresh
each epoch from the same counter-based generator as the stored views (so a resumed run draws the
same ones); the test accuracy after every epoch. A training state is written atomically after each
epoch, so a killed run resumes at the next epoch; the final checkpoint holds the weights, the
model's name and arguments, the resolved config and the test accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import Config, to_dict
from pipeline.data import Split, splits
from pipeline.errors import ModelError
from pipeline.fileio import atomic_write, remove_stale_temps
from pipeline.fingerprint import spec_hash
from pipeline.models import build_model, read_checkpoint, save_checkpoint
from pipeline.models.checkpoint import load_weights_only

# Teacher training views come from their own generator stream, apart from the stored views.
TRAIN_VIEW_SEED_OFFSET = 1_000_003


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy (%) on clean images."""
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        idx = np.arange(start, min(start + batch_size, len(split)))
        x, y, _ = split.batch(idx)
        correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / max(1, len(split))


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def train_teacher(config: Config, progress: bool = True) -> Path:
    """Train (or resume, or skip when finished) and return the checkpoint path."""
    cfg = config.teacher
    out = config.run_path / "teacher.pt"
    state_path = config.run_path / "teacher.state.pt"
    settings = to_dict(config)
    # augment.views is how many views precompute stores: the teacher's own training views are
    # drawn fresh each epoch whatever it is, so asking for more views does not retrain it.
    augment = {k: v for k, v in settings["augment"].items() if k != "views"}
    key = spec_hash({"teacher": settings["teacher"], "data": settings["data"], "augment": augment})
    if out.is_file() and read_checkpoint(out).extra.get("config_hash") == key:
        return out  # finished with this very config
    # What a teacher stage killed mid-write left (checkpoints of a large teacher: hundreds of MB).
    remove_stale_temps(config.run_path, (out.name, state_path.name))
    train, test = splits(config)
    kwargs = train.model_kwargs
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **kwargs)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    history: list[dict] = []
    first = 0
    if state_path.is_file():
        state = load_weights_only(state_path, "delete it to train the teacher afresh")
        if state.get("config_hash") != key:
            raise ModelError(
                f"{state_path} belongs to a run with another config: delete it to "
                f"start afresh, or restore that config to resume"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history = json.loads(state["history"])
        first = int(state["epoch"]) + 1
    for epoch in range(first, cfg.epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        bar = tqdm(
            range(0, len(order), cfg.batch_size),
            disable=not progress,
            leave=False,
            desc=f"teacher epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
        )
        seen = correct = 0
        loss_sum = 0.0
        t0 = time.perf_counter()
        for start in bar:
            idx = np.sort(order[start : start + cfg.batch_size])
            view = epoch if cfg.augment else None
            x, y, _ = train.batch(idx, view=view, seed=config.augment.seed + TRAIN_VIEW_SEED_OFFSET)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{100 * correct / seen:.1f}",
                rows_s=f"{seen / (time.perf_counter() - t0):.0f}",
            )
        sched.step()
        acc = evaluate(model, test)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(1, seen),
                "train_acc": 100 * correct / max(1, seen),
                "test_acc": acc,
                "seconds": time.perf_counter() - t0,
            }
        )
        if progress:
            print(
                f"teacher epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / max(1, seen):.4f}, "
                f"test top-1 {acc:.2f}%",
                flush=True,
            )
        _save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "history": json.dumps(history),
                "config_hash": key,
            },
            state_path,
        )
    acc = history[-1]["test_acc"] if history else evaluate(model, test)
    save_checkpoint(
        out,
        model,
        model_name=cfg.model,
        model_kwargs=kwargs,
        extra={
            "test_acc": acc,
            "history": json.dumps(history),
            "config_hash": key,
            "config": json.dumps(to_dict(config)),
        },
    )
    state_path.unlink(missing_ok=True)
    return out
