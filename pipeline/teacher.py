"""Training a teacher from the zoo (for the default run, and for users who have none).

SGD with momentum and a multi-step schedule from the config; random crop/flip views drawn fresh
each epoch from the same counter-based generator as the stored views (so a resumed run draws the
same ones); the test accuracy after every epoch. A training state is written atomically after each
epoch, so a killed run resumes at the next epoch; the final checkpoint holds the weights, the
model's name and arguments, the resolved config and the test accuracy. An epoch whose loss or
weights become NaN/inf stops the run: no checkpoint, the last good epoch's state kept.

A run folder holds one teacher: a ``teacher.pt`` (or training state) made with another config is
refused before anything trains, never replaced, since the ONNX file, the store and the students
in that folder were made from it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import Config, to_dict
from pipeline.data import Split, dataset_sha256, splits
from pipeline.errors import ModelError
from pipeline.fileio import atomic_write, remove_stale_temps, temp_beside
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


def _recipe(settings: dict) -> dict:
    """What the teacher's weights depend on, of a config's ``to_dict``."""
    # augment.views is how many views precompute stores: the teacher's own training views are
    # drawn fresh each epoch whatever it is, so asking for more views does not retrain it.
    augment = {k: v for k, v in settings["augment"].items() if k != "views"}
    return {"teacher": settings["teacher"], "data": settings["data"], "augment": augment}


def teacher_key(config: Config) -> str:
    """The config hash a teacher checkpoint and training state record."""
    return spec_hash(_recipe(to_dict(config)))


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    """``{"teacher": {"lr": 0.1}}`` → ``{"teacher.lr": 0.1}`` (an empty mapping adds no key)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


_UNSET = object()  # a key one of the two configs does not have (a version apart)


def _show(value: object) -> str:
    return "unset" if value is _UNSET else json.dumps(value)


#: Recipe keys that change what the teacher is evaluated on, not its weights: a finished
#: teacher that differs only in these is this config's teacher (not retrained, not refused).
EVALUATION_ONLY = frozenset({"data.test_subset"})


def _differing(extra: dict, config: Config) -> tuple[dict, dict, list[str]] | None:
    """(then, now, names): the flat recipes of the checkpoint's config and ``config``, and the
    keys whose values differ; None when the checkpoint holds no readable config."""
    try:
        then = _flat(_recipe(json.loads(extra["config"])))
    except (KeyError, TypeError, ValueError):
        return None
    now = _flat(json.loads(json.dumps(_recipe(to_dict(config)))))  # tuples as JSON lists
    names = [
        name
        for name in sorted(set(then) | set(now), key=lambda n: (n not in now, n))
        if then.get(name, _UNSET) != now.get(name, _UNSET)
    ]
    return then, now, names


#: Recipe keys that say where the data lie, not what they are: a finished teacher that differs
#: in these too is this config's when the dataset it recorded has the same content (a run
#: folder moved to another machine, the dataset to another disk).
LOCATION_ONLY = frozenset({"data.path"})


def _same_weights(extra: dict, config: Config, key: str) -> bool:
    """Whether a checkpoint's teacher is the one ``config`` trains: the same config hash, or a
    recorded config that differs only in ``EVALUATION_ONLY`` keys, and in ``LOCATION_ONLY``
    ones where the dataset's content hash, recorded since 2026-11-27, is the same."""
    if extra.get("config_hash") == key:
        return True
    diff = _differing(extra, config)
    if diff is None:
        return False
    names = set(diff[2]) - EVALUATION_ONLY
    if not names:
        return True
    recorded = extra.get("dataset")
    return (
        names <= LOCATION_ONLY and recorded is not None and recorded == dataset_sha256(config.data)
    )


def _what_differs(extra: dict, config: Config, key: str, limit: int = 4) -> str:
    """The recipe keys whose values differ between the checkpoint's config and ``config``
    (e.g. ``teacher.lr was 0.05, is 0.001``), else the two config hashes."""
    then, now, names = _differing(extra, config) or ({}, {}, [])
    changed = [
        f"{name} was {_show(then.get(name, _UNSET))}, is {_show(now.get(name, _UNSET))}"
        for name in names
    ]
    if not then or not changed:
        return f"config hash {extra.get('config_hash')}, this config's {key}"
    more = f"; and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def _refuse_other_teacher(out: Path, extra: dict, config: Config, key: str) -> ModelError:
    if extra.get("config_hash") is None:  # put there by hand, or made elsewhere
        return ModelError(
            f"{out} is a checkpoint the teacher stage did not train (it records no config): set "
            f"teacher.checkpoint={out} to use it as the teacher, set another run_dir to train "
            f"one, or delete it to train one here"
        )
    return ModelError(
        f"{out} is a teacher trained with another config ({_what_differs(extra, config, key)}): "
        f"set another run_dir to train this one, or delete {out} and what was made from it "
        f"({config.onnx_path.name}, the store, the students) to train this one here"
    )


def _refuse_folder(path: Path) -> None:
    if path.exists() and not path.is_file():
        raise ModelError(
            f"{path} is a folder, not a checkpoint file: move it away or set another run_dir"
        )


#: What a teacher training state holds (``train_teacher`` writes it after each epoch).
STATE_KEYS = ("model", "optimizer", "scheduler", "torch_rng", "epoch", "history", "config_hash")
_AFRESH = "delete it to train the teacher afresh"


def _load_state(path: Path, key: str) -> dict:
    """The training state at ``path``, checked to be one of this config's teacher."""
    state = load_weights_only(path, _AFRESH)
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else None
    if missing is None or missing:
        what = f"a {type(state).__name__}" if missing is None else f"no {', '.join(missing)}"
        raise ModelError(f"{path} is not a teacher training state ({what}): {_AFRESH}")
    if state["config_hash"] != key:
        raise ModelError(
            f"{path} belongs to a run with another config: delete it to "
            f"start afresh, or restore that config to resume"
        )
    return state


def _restore(state: dict, path: Path, model: nn.Module, opt, sched) -> tuple[list[dict], int]:
    """Load a training state into the model, optimizer, scheduler and RNG; (history, epoch to
    train next)."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history = json.loads(state["history"])
        if not isinstance(history, list):
            raise TypeError(f"its history is a {type(history).__name__}, not a list")
        return history, int(state["epoch"]) + 1
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{path} is not a teacher training state ({first}): {_AFRESH}") from e


def _divergence(loss: float, model: nn.Module) -> tuple[str, str] | None:
    """(what became non-finite, the numbers) if an epoch diverged, else None."""
    if not math.isfinite(loss):
        return "loss", f"train_loss {loss}"
    # The last step can break the weights after the loss it followed was computed, and a
    # batch-norm statistic (a buffer) can turn NaN while every weight stays finite.
    tensors = [*model.parameters(), *model.buffers()]
    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        return "weights", "NaN/inf after the epoch's last step"
    return None


def made_with(config: Config) -> bool:
    """Whether the teacher in RUN_DIR was made with ``config``: its ``teacher.pt``, or where there
    is none yet the training state of an interrupted run (the command line asks before it records
    an interrupted stage's config beside them). True for a given ``teacher.checkpoint``."""
    if config.teacher.checkpoint:
        return True
    key = teacher_key(config)
    out, state_path = config.run_path / "teacher.pt", config.run_path / "teacher.state.pt"
    if out.exists():
        return out.is_file() and _same_weights(read_checkpoint(out).extra, config, key)
    if state_path.is_file():
        state = load_weights_only(state_path, _AFRESH)
        return isinstance(state, dict) and state.get("config_hash") == key
    return False


def train_teacher(config: Config, progress: bool = True) -> Path:
    """Train (or resume, or skip when finished) and return the checkpoint path.

    Raises:
        ModelError: RUN_DIR already holds a teacher (or a training state) of another config, a
            file that is no training state, or a folder where a checkpoint goes; refused before
            anything trains or is written. Or an epoch diverged (NaN/inf loss or weights): no
            checkpoint is written, the last good epoch's state is kept.
    """
    cfg = config.teacher
    out = config.run_path / "teacher.pt"
    state_path = config.run_path / "teacher.state.pt"
    key = teacher_key(config)
    _refuse_folder(out)
    _refuse_folder(state_path)
    finished = read_checkpoint(out) if out.is_file() else None
    if finished is not None and _same_weights(finished.extra, config, key):
        return out  # finished with this very config
    train, test = splits(config)
    kwargs = train.model_kwargs  # reads the dataset: one that cannot be read says so first
    len(test)  # and its test split, rather than after the first epoch
    if finished is not None:
        raise _refuse_other_teacher(out, finished.extra, config, key)
    state = _load_state(state_path, key) if state_path.is_file() else None
    with temp_beside(out):  # an unwritable run folder fails now, not after the first epoch
        pass
    # What a teacher stage killed mid-write left (checkpoints of a large teacher: hundreds of MB).
    remove_stale_temps(config.run_path, (out.name, state_path.name))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **kwargs)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    history: list[dict] = []
    first = 0
    if state is not None:
        history, first = _restore(state, state_path, model, opt, sched)
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
            # Views from 1 on: view 0 is the clean image where augment.identity_view0 is set
            # (the default), which made the first epoch unaugmented.
            view = epoch + 1 if cfg.augment else None
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
        if (why := _divergence(loss_sum / max(1, seen), model)) is not None:
            # Its state is not saved: a rerun resumes from the last good epoch (or none).
            kept = f"{state_path.name} keeps epoch {epoch}" if epoch else "no state to resume"
            raise ModelError(
                f"the teacher diverged: its {why[0]} became non-finite in epoch {epoch + 1}/"
                f"{cfg.epochs} ({why[1]}); stopped with no {out.name} ({kept}): lower "
                f"teacher.lr{f' and delete {state_path} to train afresh' if epoch else ''}"
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
            "dataset": train.fingerprint()["dataset"],  # its content: the data, wherever they lie
        },
    )
    state_path.unlink(missing_ok=True)
    return out
