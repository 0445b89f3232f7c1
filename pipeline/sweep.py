"""The sweep stage: many students from one store, trained one after another.

    for run in sweep.runs, for seed in sweep.seeds:
        distill = config.distill with the run's keys and the seed      (method_options and name
        train_student(config with that distill)                         are not inherited)

Every (run, seed) is checked before the first one trains — unknown method, unknown student, bad
value, a teacher store missing, unfinished, made for other data or with fewer views than asked,
two runs writing one folder, a folder already holding another config's or another teacher
store's student — so a typo fails in a second, not after hours. At run time a
failing student is reported and the sweep goes on with the others; ``sweep.done`` is written when
none failed (a run that diverged counts as done: it stopped on purpose, and the report lists
it). Finished runs are not trained again (``train_student`` recognises its own checkpoint), so
rerunning a sweep after adding runs or seeds trains only the new ones.

With ``nproc`` (``make sweep NPROC=n``) the sweep itself stays one process and starts each student
on n ranks under torchrun's launcher (:mod:`pipeline.launch`, DDP as in
:mod:`pipeline.distill_ddp`) with the run's resolved config: every student gets a fresh process
group, and a student that fails stops only its own ranks, as a failed student does in a
one-process sweep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, save_resolved
from pipeline.data import check_test_split, splits
from pipeline.distill import (
    DivergedError,
    accepted_keys,
    check_not_diverged,
    check_recipe,
    output_dir,
    reads_teacher_store,
    teacher_fingerprint,
    train_student,
)
from pipeline.distill_ddp import World
from pipeline.distill_inputs import DistillError, check_teacher_store, store_path
from pipeline.distill_state import finished, load_state, restore_metrics
from pipeline.errors import (
    EXPECTED_ERRORS,
    ConfigError,
    ModelError,
    UserError,
    os_error_message,
)
from pipeline.fileio import atomic_write
from pipeline.launch import torchrun
from pipeline.metrics import diverged
from pipeline.models import MODELS, read_checkpoint


@dataclass(frozen=True)
class SweepRun:
    index: int
    """Position of the run in ``sweep.runs``."""
    seed: int
    config: Config
    """The full config this student trains with."""

    @property
    def folder(self) -> Path:
        return output_dir(self.config)

    @property
    def section(self) -> str:
        """Where this run's keys are set: what a refusal's advice names (``sweep.runs[i].name``,
        as a sweep's run does not inherit ``distill.name``)."""
        return f"sweep.runs[{self.index}]"


@dataclass
class Outcome:
    run: SweepRun
    status: str
    """trained, finished (before this sweep: nothing to do), diverged (its loss became NaN or
    infinite, or exploded: no student, the report shows it) or failed."""
    test_acc: float | None = None
    best_acc: float | None = None
    seconds: float = 0.0
    error: str | None = None

    def line(self, total: int, position: int) -> str:
        """The run's one-line summary."""
        head = f"sweep {position}/{total} {self.run.folder.name}"
        if self.status == "failed":
            return f"{head}: FAILED: {self.error}"
        if self.status == "diverged":
            return f"{head}: DIVERGED: {self.error}"
        what = "trained" if self.status == "trained" else "already finished"
        return (
            f"{head}: {what}, test top-1 {self.test_acc:.2f}% (best {self.best_acc:.2f}%), "
            f"{self.seconds:.1f} s"
        )


def done_path(config: Config) -> Path:
    return config.run_path / "sweep.done"


def plan_sweep(config: Config) -> list[SweepRun]:
    """Every (run, seed) of ``config.sweep`` as a full config, all of them checked.

    Raises:
        ConfigError: a value a run cannot have, or two runs that would write the same folder.
        MethodError: an unknown method, or options the method does not take.
        ModelError: an unknown student.
    """
    planned: list[SweepRun] = []
    folders: dict[Path, str] = {}
    for index, run in enumerate(config.sweep.runs):
        where = f"sweep.runs[{index}] ({run['method']})"
        for seed in config.sweep.seeds:
            keys = {"method_options": {}, "name": None, **run, "seed": seed}
            if run.get("name") is not None:
                keys["name"] = f"{run['name']}-s{seed}"
            try:
                distill = dataclasses.replace(config.distill, **keys)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if distill.student not in MODELS:
                raise ModelError(
                    f"{where}: unknown student {distill.student!r}; choose one of: "
                    f"{', '.join(MODELS)}"
                )
            item = SweepRun(index, seed, dataclasses.replace(config, distill=distill))
            try:
                check_recipe(item.config)  # the method and its options
            except UserError as exc:
                raise type(exc)(f"{where}: {exc}") from None
            if item.folder in folders:
                raise ConfigError(
                    f"{where} and {folders[item.folder]} both train into {item.folder}: give "
                    f"one of them a distinct name (sweep.runs[i].name)"
                )
            folders[item.folder] = f"sweep.runs[{index}]"
            planned.append(item)
    return planned


def check_data(planned: list[SweepRun]) -> None:
    """Read the dataset's files (both splits' labels) before anything trains: every run of a
    sweep has the run's data, so a missing file is one refusal, not each run failing."""
    if planned:
        train, test = splits(planned[0].config)
        train.labels  # noqa: B018
        check_test_split(test)


def check_stores(planned: list[SweepRun]) -> None:
    """Refuse, before anything trains, a run whose teacher store is missing, unfinished, made
    for other data or holding fewer views than it asks for (found at the run's turn, after the
    runs before it had trained, the CE students first). Each (store, views) is checked once;
    chunk checksums are left to each run, as they take a pass over the store.

    Raises:
        DistillError, StoreError: the first such run, named, with the store's own line.
    """
    seen: set[tuple[str, int | None]] = set()
    train = None
    for item in planned:
        if not reads_teacher_store(item.config):
            continue
        key = (str(store_path(item.config)), item.config.distill.views)
        if key in seen:
            continue
        seen.add(key)
        if train is None:  # every run of a sweep has the run's data and augmentation
            train, _ = splits(item.config)
        try:
            check_teacher_store(item.config, train)
        except EXPECTED_ERRORS as exc:
            where = f"sweep.runs[{item.index}] ({item.config.distill.method}, seed {item.seed})"
            raise type(exc)(f"{where}: {exc}") from None


def check_folders(planned: list[SweepRun]) -> None:
    """Refuse, before anything trains, a run whose folder already holds a student or a training
    state of another config or another teacher store (``train_student`` would refuse it at the
    run's turn, after the runs before it had trained: hours later).

    Raises:
        DistillError: the first such run, named, with what to do.
    """
    for item in planned:
        ckpt, state = item.folder / "student.pt", item.folder / "state.pt"
        if not (ckpt.exists() or state.exists()):
            continue
        where = f"sweep.runs[{item.index}] ({item.config.distill.method}, seed {item.seed})"
        keys = accepted_keys(item.config)
        source = teacher_fingerprint(item.config)  # check_stores opened it already
        try:
            if not finished(ckpt, keys, source, section=item.section):
                load_state(state, keys, source, section=item.section)
        except DistillError as exc:
            raise DistillError(f"{where}: {exc}") from None


def _summary(path: Path) -> tuple[float, float]:
    """(final, best) test top-1 of a finished student."""
    extra = read_checkpoint(path).extra
    history = json.loads(extra.get("history") or "[]")
    final = float(extra["test_acc"])
    return final, max((float(r["test_acc"]) for r in history), default=final)


class StudentProcessFailed(UserError):
    """A student trained under torchrun ended with a non-zero status (its rank 0 said why)."""


def train_under_torchrun(
    config: Config, nproc: int, *, progress: bool = True, section: str = "distill"
) -> Path:
    """Train one student on ``nproc`` ranks: ``python -m pipeline distill`` under torchrun's
    launcher (:mod:`pipeline.launch`), on ``config``; ``section`` as ``train_student``'s (the
    ranks' own refusals and divergence name ``sweep.runs[i]`` keys in a sweep).

    The config travels as its resolved YAML (a temporary file), so the student's folder, config
    key and checkpoint are those a one-process ``train_student(config)`` gives.

    Raises:
        StudentProcessFailed: the ranks ended with a non-zero status; rank 0's one-line error is
            above it on stderr.
    """
    fd, name = tempfile.mkstemp(prefix="logitbank-sweep-", suffix=".yaml")
    os.close(fd)
    started = time.time()

    def remove() -> None:
        Path(name).unlink(missing_ok=True)

    try:
        save_resolved(config, name)
        argv = ["distill", "--config", name, "--section", section]
        status = torchrun(nproc, argv if progress else [*argv, "--quiet"], cleanup=remove)
    finally:
        remove()
    checkpoint = output_dir(config) / "student.pt"
    metrics = output_dir(config) / "metrics.jsonl"
    if status != 0 and metrics.is_file() and metrics.stat().st_mtime >= started:
        last = (metrics.read_text().splitlines() or ["{}"])[-1]
        record = json.loads(last) if last.strip() else {}
        if "loss" in record and diverged(record):
            what = record.get("diverged", ["became non-finite"])[0]
            raise DivergedError(
                f"its loss {what} in epoch {record['epoch']} ({nproc} processes under torchrun; "
                f"rank 0's line above says more)"
            )
    if status != 0 or not checkpoint.is_file():
        raise StudentProcessFailed(
            f"its {nproc} processes under torchrun stopped with exit status {status} (the "
            f"error is above); rerun the sweep to retry it"
            if status != 0
            else f"its {nproc} processes under torchrun ended without {checkpoint}; rerun the "
            f"sweep to retry it"
        )
    return checkpoint


def _one_line(exc: Exception) -> str | None:
    from storage.urls import remote_error

    if (remote := remote_error(exc)) is not None:
        return remote
    return os_error_message(exc) if isinstance(exc, OSError) else None


def run_sweep(
    config: Config,
    *,
    progress: bool = True,
    on_run: Callable[[Outcome, int, int], None] | None = None,
    nproc: int | None = None,
) -> list[Outcome]:
    """Train every (run, seed) of ``config.sweep`` that is not finished yet.

    Args:
        config: the run's config; ``sweep`` lists the runs, ``distill`` holds their defaults.
        progress: progress bars and per-epoch lines from each student.
        on_run: called as ``on_run(outcome, position, total)`` when a run ends (positions from
            1), e.g. to print its line at once rather than after the whole sweep.
        nproc: train each student on this many processes under torchrun (None: in this one).

    Raises:
        UserError: ``nproc`` below 1, or the sweep itself started under torchrun.

    Returns:
        One outcome per (run, seed), in order. A failed run does not stop the others;
        ``sweep.done`` is written only when none failed (and removed otherwise).
    """
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if World.from_env().distributed:
        raise UserError(
            "the sweep runs as one process and starts torchrun for each student itself: run "
            "`python -m pipeline sweep --nproc N` (make sweep NPROC=N), not under torchrun"
        )
    planned = plan_sweep(config)  # before anything trains: a bad entry costs nothing
    check_data(planned)
    check_stores(planned)
    check_folders(planned)  # a refused sweep changes nothing, the last one's sweep.done included
    marker = done_path(config)
    marker.unlink(missing_ok=True)  # a sweep with other runs is not done because an old one was
    outcomes: list[Outcome] = []
    for position, item in enumerate(planned, 1):
        t0 = time.perf_counter()
        try:
            ckpt = item.folder / "student.pt"
            keys = accepted_keys(item.config)
            # As train_student checks it: a student of another teacher store (the teacher
            # retrained, precompute --overwrite) is not this sweep's finished run.
            source = teacher_fingerprint(item.config)
            status = "finished" if finished(ckpt, keys, source, section=item.section) else "trained"
            if status == "finished":  # its metrics.jsonl rebuilt from the checkpoint if damaged
                restore_metrics(ckpt, item.folder / "metrics.jsonl")
            if status == "trained":
                check_not_diverged(item.config, section=item.section)  # before any process starts
            if status == "trained" and nproc is not None:
                ckpt = train_under_torchrun(
                    item.config, nproc, progress=progress, section=item.section
                )
            elif status == "trained":
                ckpt = train_student(item.config, progress=progress, section=item.section)
            final, best = _summary(ckpt)
            outcome = Outcome(item, status, final, best, time.perf_counter() - t0)
        except DivergedError as exc:  # a result of the recipe, reported; not a failure
            outcome = Outcome(item, "diverged", seconds=time.perf_counter() - t0, error=str(exc))
        except EXPECTED_ERRORS as exc:
            outcome = Outcome(item, "failed", seconds=time.perf_counter() - t0, error=str(exc))
        except Exception as exc:  # a bug or e.g. CUDA out of memory: the other runs still go
            # What the command line says in one line (a full disk, a read-only folder, a file
            # where the run's folder belongs, object storage refusing) is one line here too.
            error = _one_line(exc)
            if error is None:
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            outcome = Outcome(item, "failed", seconds=time.perf_counter() - t0, error=error)
        outcomes.append(outcome)
        if on_run is not None:
            on_run(outcome, position, len(planned))
    if all(o.status != "failed" for o in outcomes):
        with atomic_write(marker, "w") as f:
            f.write("".join(f"{o.run.folder.name}\n" for o in outcomes))
    return outcomes
