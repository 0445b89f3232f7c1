"""The report rendered: ``results.md``, and plots drawn with matplotlib's Agg canvas (no display,
no pyplot state).

``curves.png``: test top-1 per epoch, one line per run, one colour per experiment (its seeds share
it), unfinished runs dotted. ``methods.png``: one bar per experiment, the mean final top-1, the
seeds' sample standard deviation as error bars, the CE baseline and the teacher as lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.fileio import atomic_write
from pipeline.report import GroupResult, Report, RunResult


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG without any GUI backend
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)


def _teacher_line(ax, items: list) -> None:
    teachers = {(x.teacher, x.teacher_test_acc) for x in items if x.teacher_test_acc is not None}
    for name, acc in sorted(teachers, key=str):
        ax.axhline(acc, color="black", linestyle=":", linewidth=1, label=f"teacher {name}")


def plot_curves(runs: list[RunResult], path: Path) -> None:
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    for run in runs:
        first = run.group not in colours
        colour = colours.setdefault(run.group, _colour(len(colours)))
        epochs = range(1, len(run.curve) + 1)
        ax.plot(
            epochs,
            run.curve,
            color=colour,
            linestyle="-" if run.finished else ":",
            marker="o" if len(run.curve) <= 30 else None,
            markersize=3,
            linewidth=1.2,
            label=run.label if first else None,  # one legend entry per experiment
        )
    _teacher_line(ax, runs)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Test top-1 per epoch (one line per run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    _save(fig, path)


def plot_methods(groups: list[GroupResult], path: Path) -> None:
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) + 2), 5))
    ax = fig.add_subplot()
    x = range(len(groups))
    ax.bar(
        x,
        [g.final_acc.mean for g in groups],
        yerr=[g.final_acc.std or 0.0 for g in groups],
        capsize=4,
        color=[_colour(i) for i in x],
        alpha=0.85,
    )
    for g in groups:
        if g.method == "ce":
            ax.axhline(
                g.final_acc.mean, color="grey", linestyle="--", label=f"CE baseline ({g.label})"
            )
    _teacher_line(ax, groups)
    ax.set_xticks(list(x), [g.label for g in groups], rotation=30, ha="right")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title("Final top-1 per method (mean over seeds, error bars: std)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower right")
    _save(fig, path)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]], numeric: set[int]) -> list[str]:
    align = ["---:" if i in numeric else "---" for i in range(len(header))]
    lines = [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |"]
    lines += [f"| {' | '.join(_cell(c) for c in row)} |" for row in rows]
    return lines


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(report: Report) -> str:
    """results.md: the table per method, the table per run, the plots."""
    out = [
        "# Distillation results",
        "",
        f"Run folder `{report.run_dir}`. Top-1 accuracy (%) on the test set: **best** is the "
        "highest over the epochs, **final** the last epoch's; mean ± sample standard deviation "
        "(n − 1) over the seeds. Wall time: training and evaluation of one run, mean over "
        "seeds; rows/s: training throughput, mean over epochs and seeds.",
        "",
        "## Methods",
        "",
    ]
    if report.groups:
        rows = [
            [
                g.teacher or "—",
                _pct(g.teacher_test_acc),
                g.student,
                g.method_text,
                g.label,
                ", ".join(map(str, g.seeds)),
                g.best_acc.text(),
                g.final_acc.text(),
                "—" if g.delta_ce is None else f"{g.delta_ce:+.2f}",
                "–".join(map(str, sorted({g.epochs[0], g.epochs[-1]}))),
                f"{g.wall_s:.1f}",
                f"{g.rows_per_s:.0f}",
            ]
            for g in report.groups
        ]
        header = ["teacher", "teacher top-1", "student", "method", "run", "seeds"]
        header += ["best top-1", "final top-1", "Δ final vs CE", "epochs", "wall time (s)"]
        out += _table([*header, "rows/s"], rows, numeric={1, *range(6, 12)})
    else:
        out.append("No finished runs yet.")
    gone: dict[str, list[str]] = {}
    for r in report.runs:
        if r.diverged_epoch is not None:
            gone.setdefault(f"{r.label} ({r.method})", []).append(
                f"seed {r.seed} in epoch {r.diverged_epoch}"
            )
    if gone:
        out += [
            "",
            "**Diverged** (the loss became NaN or infinite, or grew over 1,000-fold; the run "
            "stopped with no student and "
            "is not in the table above): "
            + "; ".join(f"{label}: {', '.join(seeds)}" for label, seeds in gone.items())
            + ".",
        ]
    out += ["", "## Runs", ""]
    rows = [
        [
            r.name,
            r.student,
            r.method,
            r.seed,
            f"{r.epochs}/{r.target_epochs if r.target_epochs is not None else '?'}",
            f"{r.best_acc:.2f}",
            f"{r.final_acc:.2f}",
            f"{r.wall_s:.1f}",
            f"{r.rows_per_s:.0f}",
            r.status,
        ]
        for r in report.runs
    ]
    header = ["run", "student", "method", "seed", "epochs", "best top-1", "final top-1"]
    out += _table([*header, "wall time (s)", "rows/s", "status"], rows, numeric=set(range(3, 9)))
    for name, title in (("curves", "Test top-1 per epoch"), ("methods", "Final top-1 per method")):
        if name in report.files:
            out += ["", f"![{title}]({Path(report.files[name]).name})"]
    return "\n".join(out) + "\n"
