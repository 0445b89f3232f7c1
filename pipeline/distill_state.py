"""A distill run's resumable state: the student, its optimizer and schedule, files on disk.

After every epoch ``state.pt`` receives (atomically) the model, the method's own state (CTKD's
temperature), the optimizer, the scheduler, the RNG states (every rank's under DDP), the history
and the epoch. Together
with a batch order that depends on (seed, epoch) only, that is all a killed run needs to go on
exactly where the last finished epoch left it. The final ``student.pt`` records the config hash,
so a finished run is recognised and not trained again, and a run folder is never reused by a
run with another config. A run whose loss diverged (pipeline.metrics) leaves ``diverged.json`` (the
config hash and that epoch's record): it is the same run's outcome, so a rerun reports it again
rather than retraining up to the same epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data import Split
from pipeline.distill_inputs import DistillError, build_student_method
from pipeline.errors import ModelError
from pipeline.fileio import atomic_write
from pipeline.methods import Method
from pipeline.metrics import divergence, write_metrics
from pipeline.models import build_model, read_checkpoint
from pipeline.models.checkpoint import load_weights_only
from storage.locking import WriterLock


class RunLock(WriterLock):
    """One process at a time trains a student folder: an ``flock`` on FOLDER/.distill.lock.

    Two sweeps (or two ``make distill``) of one run folder would otherwise train the same student
    at once, each removing the other's temporary files and PS-KD self-teacher stores. The kernel
    releases the lock when its holder dies (SIGKILL too), so a killed run never leaves it held;
    the file itself stays (removing it would let a third process lock another inode)."""

    NAME = ".distill.lock"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder / self.NAME, str(folder), busy=self._busy)
        self.folder = folder

    def _busy(self, holder: str) -> DistillError:
        return DistillError(
            f"{self.folder} is being trained by another process ({holder}): wait for it to "
            f"finish (a rerun then finds the student finished, or resumes it) or stop it"
        )

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        super().acquire()


def _check_source(
    path: Path, saved: str | None, source: dict | None, what: str, section: str = "distill"
) -> None:
    """Refuse a run made from another teacher store than ``source`` (its fingerprint);
    ``section``: where the run's keys are set (see :func:`finished`)."""
    if source is None or not saved:
        return
    try:
        before = json.loads(saved)
        keys = sorted(k for k in {*before, *source} if before.get(k) != source.get(k))
    except (ValueError, TypeError, AttributeError):  # not a fingerprint: not comparable
        before, keys = {}, ["(unreadable)"]
    if keys:
        online = ("teacher_sha256" in dict(before), "teacher_sha256" in source)
        teacher = {
            (True, True): "teacher checkpoint",
            (False, False): "teacher store",
        }.get(online, "teacher source (a store against an online teacher)")
        raise DistillError(
            f"{path} is {what} from another {teacher} (its fingerprint differs in "
            f"{', '.join(keys)}): set {section}.name to train from this one elsewhere, or delete "
            f"the folder"
        )


def load_state(
    path: Path,
    key: str | tuple[str, ...],
    source: dict | None = None,
    *,
    section: str = "distill",
) -> dict | None:
    """The state of the last finished epoch of this run, or None when there is none yet.
    ``key``: the run's config key, or the keys it accepts (``accepted_keys``); ``source``: the
    fingerprint of the teacher store the run reads now (None: it reads none); ``section``: where
    the run's keys are set (see :func:`finished`)."""
    if not path.is_file():
        return None
    state = load_weights_only(path, "delete it to train this student afresh")
    if not isinstance(state, dict) or "epoch" not in state:
        raise DistillError(f"{path} is not a distill state file: delete it to start afresh")
    if state.get("config_hash") not in ((key,) if isinstance(key, str) else key):
        raise DistillError(
            f"{path} belongs to a run with another config: restore that config to resume it, "
            f"set {section}.name to train this one elsewhere, or delete the folder"
        )
    _check_source(path, state.get("store_fingerprint"), source, "a run trained", section)
    return state


def finished(
    path: Path,
    key: str | tuple[str, ...],
    source: dict | None = None,
    *,
    section: str = "distill",
) -> bool:
    """Whether ``path`` holds this very run's final checkpoint (then there is nothing to do),
    trained from the teacher store whose fingerprint is ``source`` (when it reads one).

    ``section``: where the run's keys are set, so that a refusal names the key that moves the
    run elsewhere: ``distill``, or a sweep's ``sweep.runs[i]`` (whose runs do not inherit
    ``distill.name``)."""
    if not path.exists():
        return False
    try:
        ckpt = read_checkpoint(path)
    except ModelError as exc:
        raise DistillError(f"{exc} (delete it to train the student again)") from None
    if ckpt.extra.get("config_hash") not in ((key,) if isinstance(key, str) else key):
        raise DistillError(
            f"{path} is a finished run with another config: set {section}.name to train this "
            f"one elsewhere, or delete the folder"
        )
    what = "a finished run trained"
    _check_source(path, ckpt.extra.get("store_fingerprint"), source, what, section)
    return True


def restore_metrics(ckpt_path: Path, metrics_path: Path) -> None:
    """A finished run's metrics.jsonl as its checkpoint's history has it: a damaged or deleted
    file is written again (the report reads it), a whole one is left as it is."""
    history = json.loads(read_checkpoint(ckpt_path).extra.get("history") or "[]")
    if not history:  # a checkpoint without its history: the file is all there is
        return
    try:
        if metrics_path.read_text() == "".join(json.dumps(r) + "\n" for r in history):
            return
    except (OSError, ValueError):  # missing, or not text any more
        pass
    write_metrics(metrics_path, history)


def save_diverged(path: Path, key: str, record: dict) -> None:
    """Record that this run (config hash ``key``) diverged, with the epoch's record."""
    with atomic_write(path, "w") as f:
        json.dump({"config_hash": key, "record": record}, f)


def diverged_before(path: Path, key: str) -> dict | None:
    """The diverged epoch's record if this very run diverged before, else None.

    A marker of another config (the folder reused after a divergence in epoch 1, with no state
    to refuse it) or one that cannot be read is not this run's outcome: None.
    """
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("config_hash") != key:
        return None
    record = marker.get("record")
    if not isinstance(record, dict) or type(record.get("epoch")) is not int:
        return None
    if "diverged" not in record:  # a marker of a NaN epoch written before the field existed
        why = divergence(record, record)
        record = {**record, "diverged": list(why)} if why is not None else record
    why = record.get("diverged")
    if not (isinstance(why, list) and len(why) == 2 and all(isinstance(w, str) for w in why)):
        return None
    return record


def save_state(
    path: Path,
    student: Student,
    device: torch.device,
    *,
    epoch: int,
    step: int,
    history: list[dict],
    key: str,
    ranks_rng: list[dict] | None = None,
    source: dict | None = None,
) -> None:
    """Everything to go on after ``epoch`` (0-based), written atomically: a kill at any moment
    leaves the previous state or this one, never half a file. Under DDP ``ranks_rng`` holds
    every rank's :func:`rng_state`, in rank order."""
    state = {
        **student.state(device),
        "epoch": epoch,
        "step": step,
        "history": json.dumps(history),
        "config_hash": key,
    }
    if source is not None:  # the teacher store's fingerprint: a resume checks it
        state["store_fingerprint"] = json.dumps(source)
    if ranks_rng is not None:
        state["ranks_rng"] = ranks_rng
    with atomic_write(path) as f:
        torch.save(state, f)


def rng_state(device: torch.device) -> dict:
    """This process's random number generators (CPU, and CUDA on a GPU)."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


@dataclass
class Student:
    """What a training state holds besides the history: weights, method, optimizer, schedule."""

    model: nn.Module
    method: Method
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler

    def state(self, device: torch.device) -> dict:
        return {
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),  # CTKD's temperature
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            **rng_state(device),
        }

    def load(self, state: dict, device: torch.device, rank: int = 0, world_size: int = 1) -> int:
        """Restore ``state``; returns the number of processes that saved it. Each rank takes its
        own RNG state when the world size is the same, rank 0's otherwise."""
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ranks = state.get("ranks_rng") or []
        saved_by = max(1, len(ranks))
        rng = ranks[rank] if saved_by == world_size and ranks else state
        torch.set_rng_state(rng["torch_rng"])
        if device.type == "cuda" and rng.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rng["cuda_rng"], device)
        return saved_by


def build_student(config: Config, train: Split, device: torch.device) -> tuple[Student, dict]:
    """The student, its loss and optimizer, initialised from the seed; and the model kwargs."""
    cfg = config.distill
    kwargs = train.model_kwargs
    # Both draw their initial weights (instance-wise CTKD has an MLP) from the seeded generator.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.student, **kwargs).to(device)
    method = build_student_method(cfg.method, cfg.method_options, train.num_classes).to(device)
    opt = torch.optim.SGD(
        [*model.parameters(), *method.parameters()],  # CTKD's temperature trains alongside
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, gamma=cfg.gamma)
    return Student(model, method, opt, sched), kwargs
