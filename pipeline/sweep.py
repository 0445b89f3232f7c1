"""The sweep stage: many students from one store, trained one after another.

    for run in sweep.runs, for seed in sweep.seeds:
        distill = config.distill with the run's keys and the seed      (method_options and name
        train_student(config with that distill)                         are not inherited)

Every (run, seed) is checked before the first one trains — unknown method, unknown student, bad
value, two runs writing one folder — so a typo fails in a second, not after hours. At run time a
failing student is reported and the sweep goes on with the others; ``sweep.done`` is written only
when every run finished. Finished runs are not trained again (``train_student`` recognises its
own checkpoint), so rerunning a sweep after adding runs or seeds trains only the new ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.distill import config_key, output_dir, train_student
from pipeline.distill_inputs import build_student_method
from pipeline.distill_state import finished
from pipeline.errors import EXPECTED_ERRORS, ConfigError, ModelError, UserError
from pipeline.fileio import atomic_write
from pipeline.models import MODELS, read_checkpoint

# Only checks that the method and its options exist; the class count matters to no check, just
# to instance-wise CTKD's MLP, which the real run builds again with the dataset's.
_CHECK_CLASSES = 2


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


@dataclass
class Outcome:
    run: SweepRun
    status: str
    """trained, finished (before this sweep: nothing to do) or failed."""
    test_acc: float | None = None
    best_acc: float | None = None
    seconds: float = 0.0
    error: str | None = None

    def line(self, total: int, position: int) -> str:
        """The run's one-line summary."""
        head = f"sweep {position}/{total} {self.run.folder.name}"
        if self.status == "failed":
            return f"{head}: FAILED: {self.error}"
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
            try:
                build_student_method(distill.method, distill.method_options, _CHECK_CLASSES)
            except UserError as exc:
                raise type(exc)(f"{where}: {exc}") from None
            item = SweepRun(index, seed, dataclasses.replace(config, distill=distill))
            if item.folder in folders:
                raise ConfigError(
                    f"{where} and {folders[item.folder]} both train into {item.folder}: give "
                    f"one of them a distinct name (sweep.runs[i].name)"
                )
            folders[item.folder] = f"sweep.runs[{index}]"
            planned.append(item)
    return planned


def _summary(path: Path) -> tuple[float, float]:
    """(final, best) test top-1 of a finished student."""
    extra = read_checkpoint(path).extra
    history = json.loads(extra.get("history") or "[]")
    final = float(extra["test_acc"])
    return final, max((float(r["test_acc"]) for r in history), default=final)


def run_sweep(
    config: Config,
    *,
    progress: bool = True,
    on_run: Callable[[Outcome, int, int], None] | None = None,
) -> list[Outcome]:
    """Train every (run, seed) of ``config.sweep`` that is not finished yet.

    Args:
        config: the run's config; ``sweep`` lists the runs, ``distill`` holds their defaults.
        progress: progress bars and per-epoch lines from each student.
        on_run: called as ``on_run(outcome, position, total)`` when a run ends (positions from
            1), e.g. to print its line at once rather than after the whole sweep.

    Returns:
        One outcome per (run, seed), in order. A failed run does not stop the others;
        ``sweep.done`` is written only when none failed (and removed otherwise).
    """
    planned = plan_sweep(config)  # before anything trains: a bad entry costs nothing
    marker = done_path(config)
    marker.unlink(missing_ok=True)  # a sweep with other runs is not done because an old one was
    outcomes: list[Outcome] = []
    for position, item in enumerate(planned, 1):
        t0 = time.perf_counter()
        try:
            ckpt = item.folder / "student.pt"
            status = "finished" if finished(ckpt, config_key(item.config)) else "trained"
            if status == "trained":
                ckpt = train_student(item.config, progress=progress)
            final, best = _summary(ckpt)
            outcome = Outcome(item, status, final, best, time.perf_counter() - t0)
        except EXPECTED_ERRORS as exc:
            outcome = Outcome(item, "failed", seconds=time.perf_counter() - t0, error=str(exc))
        except Exception as exc:  # a bug or e.g. CUDA out of memory: the other runs still go
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
