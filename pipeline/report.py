"""The report stage: every student of a run folder compared in one table, with plots.

Reads ``RUN_DIR/distill/*/metrics.jsonl`` (one JSON line per epoch) and each run's resolved
``config.yaml``; a run is finished when its ``student.pt`` is there (never loaded: its
metrics.jsonl must then hold every epoch it trained). Runs whose configs differ only in the seed
(the ``-sSEED`` end of the folder name, or the device, prefetch, evaluation batch size and DDP
timeout) form one group — the method in distill's one spelling; the same recipe under two names
is two groups — and the group's numbers are the mean ± sample standard deviation (n − 1) over
its finished seeds::

    best  = max_e test_acc_e      final = test_acc_E      (per run, then over seeds)

Writes ``RUN_DIR/report/``: ``results.md`` (a table per method, a table per run, the plots),
``results.json`` (the same numbers, for the README and scripts), ``curves.png`` (test top-1 per
epoch, one line per run) and ``methods.png`` (mean final top-1 per method, seed spread as error
bars, the CE baseline as a line), rendered by ``pipeline.report_render``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, publish, temp_beside
from pipeline.metrics import first_diverged_epoch

# Settings that change how a run is computed, not what it learns (distill's NOT_IN_KEY), and
# the seed: runs differing only in these are seeds of one experiment (of one name: the same recipe
# under two names is two experiments). Kept in step with pipeline.distill by a test.
_NOT_RESULT_KEYS = ("seed", "name", "device", "prefetch", "eval_batch_size", "ddp_timeout_s")
#: Keys that make a method what it is: a group's CE baseline has the same settings but these.
_METHOD_KEYS = ("method", "method_options", "teacher_source")


class ReportError(UserError):
    """Nothing to report, or a metrics file that cannot be read."""


@dataclass
class RunResult:
    """One student folder: what it is and how it did."""

    name: str
    """Its folder under RUN_DIR/distill."""
    label: str
    """The folder name without ``-sSEED``: what the seeds of one experiment share."""
    student: str
    method: str
    method_options: dict
    seed: int
    teacher: str | None
    teacher_test_acc: float | None
    finished: bool
    epochs: int
    """Epochs done (lines of metrics.jsonl)."""
    target_epochs: int | None
    curve: list[float]
    """Test top-1 (%) after each epoch."""
    best_acc: float
    final_acc: float
    wall_s: float
    """Seconds of training and evaluation, summed over epochs (start-up not counted)."""
    rows_per_s: float
    """Training throughput, mean over epochs."""
    diverged_epoch: int | None = None
    """The epoch whose loss diverged (NaN, infinite, or over 1,000 times the first epoch's): the
    run stopped there, with no student."""
    group: str = field(repr=False, default="")

    @property
    def status(self) -> str:
        if self.diverged_epoch is not None:
            return f"diverged (epoch {self.diverged_epoch})"
        return "finished" if self.finished else "unfinished"


@dataclass
class Stat:
    mean: float
    std: float | None
    """Sample standard deviation (n − 1); None for a single seed."""
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, list(values))

    def text(self) -> str:
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class GroupResult:
    """The finished seeds of one experiment (teacher, student, method and recipe)."""

    label: str
    teacher: str | None
    teacher_test_acc: float | None
    student: str
    method: str
    method_options: dict
    seeds: list[int]
    runs: list[str]
    epochs: list[int]
    best_acc: Stat
    final_acc: Stat
    wall_s: float
    rows_per_s: float
    delta_ce: float | None = None
    """Mean final top-1 minus that of the CE group trained with every other setting the same
    (None when no such CE group ran, and for CE itself)."""

    @property
    def method_text(self) -> str:
        if not self.method_options:
            return self.method
        options = ", ".join(f"{k}={v}" for k, v in self.method_options.items())
        return f"{self.method} ({options})"


@dataclass
class Report:
    run_dir: str
    groups: list[GroupResult]
    runs: list[RunResult]
    files: dict[str, str] = field(default_factory=dict)


def _read_metrics(path: Path) -> list[dict]:
    # A rerun of a finished student writes its metrics.jsonl again from its student.pt.
    fix = "delete the run folder or rerun its student"
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not a metrics file (not UTF-8 text): {fix}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not math.isfinite(float(record["test_acc"])):
                raise ValueError("test_acc is not a finite number")
        except (ValueError, KeyError, TypeError):
            raise ReportError(f"{path} line {number} is not a metrics record: {fix}") from None
        records.append(record)
    return records


def _read_config(path: Path) -> dict:
    """A run's resolved config as plain YAML (not load_config: an old run stays readable)."""
    if not path.is_file():
        raise ReportError(
            f"{path} is missing: without it the run's method and group are unknown; restore it, "
            f"rerun its student, or delete the run"
        )
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ReportError(f"{path} is not valid YAML: restore it or delete the run") from None
    if not isinstance(config, dict):  # a run would be reported as "?", in a group of its own
        raise ReportError(
            f"{path} is not a run's config (a mapping of sections): restore it or delete the run"
        )
    return config


def _method(distill: dict) -> str:
    """``distill.method`` in distill's one spelling (``method_of``: "KD", "ls + dkd" are kd,
    ls+dkd): a respelling trains into the same folder, so it is the same experiment."""
    return str(distill.get("method", "?")).strip().lower().replace(" ", "")


def _trains(config: dict, extra: dict) -> bool:
    """Whether a teacher checkpoint (its ``extra``) is the teacher that the student's config
    trains: the config hash the teacher stage records, or a recorded config that differs from
    the student's only in ``EVALUATION_ONLY`` keys or in where the dataset lies
    (``LOCATION_ONLY``: the student's store check compared the dataset's content). A checkpoint
    that records no config hash (not the teacher stage's) has nothing to compare: taken as it
    is."""
    # Private to pipeline.teacher, but the report must agree with it on what a teacher is.
    from pipeline.fingerprint import spec_hash
    from pipeline.teacher import EVALUATION_ONLY, LOCATION_ONLY, _flat, _recipe

    if extra.get("config_hash") is None:
        return True
    try:
        recipe = json.loads(json.dumps(_recipe(config), default=str))  # tuples as JSON lists
        if spec_hash(recipe) == extra["config_hash"]:
            return True
        then, now = _flat(_recipe(json.loads(extra["config"]))), _flat(recipe)
    except (KeyError, TypeError, ValueError, AttributeError):  # a config too old to compare
        return False
    differing = {k for k in then.keys() | now.keys() if then.get(k) != now.get(k)}
    return differing <= EVALUATION_ONLY | LOCATION_ONLY


def _teacher(config: dict, run_dir: Path, cache: dict) -> tuple[str | None, float | None]:
    """(model name, test top-1) of the teacher: teacher.checkpoint, else RUN_DIR/teacher.pt; for
    a student of another run's store (``distill.store``, no ``teacher.checkpoint`` given), the
    teacher.pt beside that store, or none known (not this run's teacher, which did not make
    its logits). RUN_DIR/teacher.pt is the student's teacher only if the student's config
    trains it (``_trains``): one retrained since with other settings (its logits precomputed
    again) did not teach the students made before, whose top-1 it is not (None)."""
    from pipeline.models import read_checkpoint  # torch: only when there are runs to report

    section = config.get("teacher") or {}
    path = Path(section.get("checkpoint") or run_dir / "teacher.pt")
    distill = config.get("distill") or {}
    store, own = distill.get("store"), (config.get("precompute") or {}).get("store")
    online = distill.get("teacher_source") == "online"
    reads_store = _method(distill) not in ("ce", "pskd") and not online
    mine = not section.get("checkpoint")  # a teacher named: the user says whose logits
    if (
        store
        and reads_store
        and mine
        and "://" not in str(store)
        and store != own
        and Path(store).parent.resolve() != run_dir.resolve()
    ):
        path = Path(store).parent / "teacher.pt"  # the run that made the store, if it is one
        section, mine = {}, False  # its model is not this config's teacher.model
    if path not in cache:
        try:
            ckpt = read_checkpoint(path)
            acc = ckpt.extra.get("test_acc")
            cache[path] = (ckpt.model_name, None if acc is None else float(acc), ckpt.extra)
        except UserError:  # a student of a teacher that is gone: still worth reporting
            cache[path] = (section.get("model"), None, {})
    name, acc, extra = cache[path]
    if mine and not _trains(config, extra):  # RUN_DIR/teacher.pt is another teacher now
        return section.get("model"), None
    recorded = _recorded_config(extra)
    if recorded is not None and _test_subset(recorded) != _test_subset(config):
        return name, None  # measured on other test rows than the student's: not comparable
    return name, acc


def _recorded_config(extra: dict) -> dict | None:
    """The config a teacher checkpoint records (the teacher stage's), else None."""
    try:
        recorded = json.loads(extra["config"])
    except (KeyError, TypeError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _test_subset(config: dict) -> object:
    data = config.get("data")
    return data.get("test_subset") if isinstance(data, dict) else None


def collect_runs(run_dir: Path) -> list[RunResult]:
    """Every RUN_DIR/distill/* folder with at least one epoch of metrics.

    A finished run's result is its ``student.pt``'s history, which the report does not load
    (it never loads a student.pt: README, Security); its metrics.jsonl, which distill and the
    sweep write again from that history when they meet the finished run, stands for it only
    while it holds what the run trained: one record per epoch of the config's
    ``distill.epochs``, numbered 1, 2, … A file emptied, cut short or appended to since is
    refused (``_check_history``), never reported or left out.
    """
    teachers: dict = {}
    runs = []
    for finished in sorted((run_dir / "distill").glob("*/student.pt")):
        if not (finished.parent / "metrics.jsonl").is_file():  # it would be left out silently
            raise ReportError(
                f"{finished.parent} holds a finished student but no metrics.jsonl: rerun its "
                f"student (distill writes its metrics again from student.pt) or delete the folder"
            )
    for metrics in sorted((run_dir / "distill").glob("*/metrics.jsonl")):
        history = _read_metrics(metrics)
        if not history and not (metrics.parent / "student.pt").is_file():  # no epoch done yet
            continue
        try:
            runs.append(_run_result(metrics.parent, history, run_dir, teachers))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ReportError(
                f"{metrics.parent}: its metrics.jsonl or config.yaml holds a value of the wrong "
                f"kind ({type(exc).__name__}: {str(exc)[:120]}): delete the run folder or rerun "
                f"its student"
            ) from None
    return runs


def _check_history(path: Path, history: list[dict], finished: bool, epochs: object) -> None:
    """Refuse a metrics file that is not the run's: epochs numbered other than 1, 2, …, or for a
    finished run (``epochs``: its config's ``distill.epochs``) another count of them."""
    fix = "rerun its student (distill and the sweep write it again from student.pt) or delete "
    fix += "the run folder"
    for number, record in enumerate(history, 1):
        if record.get("epoch", number) != number:  # (records of old runs may not number it)
            raise ReportError(
                f"{path} holds epoch {record['epoch']!r} as epoch {number} (lines lost, repeated "
                f"or added since the run wrote it): {fix}"
            )
    if finished and (not history or (type(epochs) is int and len(history) != epochs)):
        trained = f"trained {epochs}" if type(epochs) is int else "finished"
        raise ReportError(
            f"{path} records {len(history)} epochs, its run {trained} (student.pt): the file was "
            f"emptied, cut short or appended to since: {fix}"
        )


def _run_result(folder: Path, history: list[dict], run_dir: Path, teachers: dict) -> RunResult:
    """One run's result from its metrics and resolved config (raises on values of wrong kinds)."""
    config = _read_config(folder / "config.yaml")
    distill = config.get("distill") or {}
    if not isinstance(distill, dict):
        raise TypeError(f"distill is {type(distill).__name__}, not a mapping")
    finished = (folder / "student.pt").is_file()
    _check_history(folder / "metrics.jsonl", history, finished, distill.get("epochs"))
    seed = int(distill.get("seed", 0))
    teacher, teacher_acc = _teacher(config, run_dir, teachers)
    curve = [float(r["test_acc"]) for r in history]
    rates = [float(r["rows_per_s"]) for r in history if "rows_per_s" in r]
    key = {
        "distill": {
            **{k: v for k, v in distill.items() if k not in _NOT_RESULT_KEYS},
            "method": _method(distill),
        },
        **{k: config.get(k) for k in ("data", "augment", "teacher")},
        "encoding": (config.get("precompute") or {}).get("encoding"),
    }
    return RunResult(
        name=folder.name,
        label=re.sub(rf"-s{seed}(?=-online$|$)", "", folder.name),
        student=str(distill.get("student", "?")),
        method=_method(distill),
        method_options=dict(distill.get("method_options") or {}),
        seed=seed,
        teacher=teacher,
        teacher_test_acc=teacher_acc,
        finished=finished,
        epochs=len(history),
        target_epochs=distill.get("epochs"),
        curve=curve,
        best_acc=max(curve),
        final_acc=curve[-1],
        wall_s=sum(float(r.get("seconds", 0.0)) for r in history),
        rows_per_s=statistics.fmean(rates) if rates else 0.0,
        diverged_epoch=first_diverged_epoch(history),
        group=json.dumps(key, sort_keys=True, default=str),
    )


def _order(method: str) -> int:
    from pipeline.distill_inputs import method_names  # ce first, then the registry's order

    names = method_names()
    return names.index(method) if method in names else len(names)


def aggregate(runs: list[RunResult]) -> list[GroupResult]:
    """One group per experiment, from its finished runs only (an unfinished run's last epoch is
    not a result), and not one that diverged (a run from before the growth check trained on to
    the end, at chance: listed apart, like the runs that stopped)."""
    by_key: dict[str, list[RunResult]] = {}
    for run in runs:
        if run.finished and run.diverged_epoch is None:
            by_key.setdefault(f"{run.label}\n{run.group}", []).append(run)
    groups = []
    for members in by_key.values():
        members.sort(key=lambda r: r.seed)
        first = members[0]
        groups.append(
            GroupResult(
                label=first.label,
                teacher=first.teacher,
                teacher_test_acc=first.teacher_test_acc,
                student=first.student,
                method=first.method,
                method_options=first.method_options,
                seeds=[r.seed for r in members],
                runs=[r.name for r in members],
                epochs=sorted({r.epochs for r in members}),
                best_acc=Stat.of([r.best_acc for r in members]),
                final_acc=Stat.of([r.final_acc for r in members]),
                wall_s=statistics.fmean(r.wall_s for r in members),
                rows_per_s=statistics.fmean(r.rows_per_s for r in members),
            )
        )
    baseline = {id(g): _baseline_key(by_key, g) for g in groups}
    groups.sort(key=lambda g: (g.student, _order(g.method), g.label))
    for group in groups:
        if group.method == "ce":
            continue
        ce = next(
            (g for g in groups if g.method == "ce" and baseline[id(g)] == baseline[id(group)]),
            None,
        )
        if ce is not None:  # CE trained with every other setting of this group's the same
            group.delta_ce = group.final_acc.mean - ce.final_acc.mean
    return groups


def _baseline_key(by_key: dict[str, list[RunResult]], group: GroupResult) -> str:
    """A group's settings without what makes its method (``_METHOD_KEYS``)."""
    run = next(r for members in by_key.values() for r in members if r.name == group.runs[0])
    try:
        key = json.loads(run.group)
        for name in _METHOD_KEYS:
            key["distill"].pop(name, None)
    except (ValueError, TypeError, KeyError, AttributeError):  # not a config's key: itself
        return run.group
    return json.dumps(key, sort_keys=True)


def _json(report: Report) -> dict:
    runs = [{k: v for k, v in asdict(r).items() if k != "group"} for r in report.runs]
    return {
        "run_dir": report.run_dir,
        "methods": [asdict(g) for g in report.groups],
        "runs": runs,
        "files": report.files,
    }


def write_report(config: Config) -> Report:
    """Collect the runs of ``config.run_dir`` and write RUN_DIR/report/.

    Raises:
        ReportError: no run with metrics in RUN_DIR/distill, an unreadable metrics file or one
            that is not its run's, or a folder where a report file goes (nothing written).
    """
    run_dir = config.run_path
    runs = collect_runs(run_dir)
    if not runs:
        raise ReportError(
            f"no runs to report in {run_dir / 'distill'}: train students first "
            f"(python -m pipeline sweep, or distill) with this config's run_dir"
        )
    from pipeline.report_render import markdown, plot_curves, plot_methods  # matplotlib: now

    groups = aggregate(runs)
    runs.sort(key=lambda r: (r.student, _order(r.method), r.label, r.seed))
    out = run_dir / "report"
    names = ["curves.png", *(["methods.png"] if groups else []), "results.json", "results.md"]
    for name in (*names, "methods.png"):  # checked first: a failure leaves the old report whole
        if (out / name).is_dir():
            raise ReportError(
                f"{out / name} is a folder where the report writes a file: move it away, then "
                f"run the report again"
            )
    report = Report(str(run_dir), groups, runs)
    report.files["markdown"] = str(out / "results.md")
    report.files["json"] = str(out / "results.json")
    report.files["curves"] = str(out / "curves.png")
    if groups:
        report.files["methods"] = str(out / "methods.png")
    # Every file is written beside its place first and all are published together: a failure
    # while rendering (a full disk, a plot that fails) leaves the previous report as it was.
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(temp_beside(out / name)) for name in names}
        plot_curves(runs, tmp["curves.png"])
        if groups:
            plot_methods(groups, tmp["methods.png"])
        with atomic_write(tmp["results.json"], "w") as f:
            json.dump(_json(report), f, indent=2)
            f.write("\n")
        with atomic_write(tmp["results.md"], "w") as f:
            f.write(markdown(report))
        for name in names:  # results.md, which shows the plots, last
            publish(tmp[name], out / name)
    if not groups:
        (out / "methods.png").unlink(missing_ok=True)  # an older report's chart is not this one
    return report
