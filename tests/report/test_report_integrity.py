"""What the report must not get wrong about a run folder, on folders written here (no training):
a finished run's metrics.jsonl that is no longer the run's, a method spelt two ways, students of
a teacher since retrained, and a report that fails half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config, save_resolved, to_dict
from pipeline.models import build_model, save_checkpoint
from pipeline.report import ReportError, aggregate, collect_runs, write_report
from pipeline.teacher import teacher_key
from tests.report.conftest import TINY


def _run(root: Path, name: str, accs: list[float], *sets: str, finished: bool = True) -> Path:
    """A student folder as distill leaves it (``student.pt`` a marker: the report never loads
    it), with tiny.yaml's resolved config under ``sets``."""
    folder = root / "distill" / name
    folder.mkdir(parents=True)
    records = [{"epoch": i + 1, "test_acc": a, "rows_per_s": 100.0} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_config(TINY, [f"run_dir={root}", f"distill.epochs={len(accs)}", *sets])
    save_resolved(config, folder / "config.yaml")
    if finished:
        (folder / "student.pt").write_bytes(b"")
    return folder


def _teacher(root: Path, acc: float, *sets: str) -> None:
    """RUN_DIR/teacher.pt as the teacher stage writes it for tiny.yaml under ``sets``."""
    config = load_config(TINY, [f"run_dir={root}", *sets])
    kwargs = {"num_classes": 4, "in_channels": 1, "image_size": (8, 8)}
    extra = {"test_acc": acc, "config_hash": teacher_key(config)}
    extra["config"] = json.dumps(to_dict(config))
    model = build_model("mlp", **kwargs)
    save_checkpoint(root / "teacher.pt", model, model_name="mlp", model_kwargs=kwargs, extra=extra)


def _damage(kind: str, path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    damaged = {
        "emptied": [],
        "cut short": lines[:-1],
        "appended to": [*lines, json.dumps({"epoch": 3, "test_acc": 50}) + "\n"],
        "reordered": lines[::-1],
    }[kind]
    path.write_text("".join(damaged))


@pytest.mark.parametrize("kind", ["emptied", "cut short", "appended to", "reordered"])
def test_a_finished_runs_metrics_that_are_not_its_epochs_are_refused(tmp_path, kind):
    """The report reads metrics.jsonl, not student.pt: an emptied file left the seed out of its
    experiment, one cut short or appended to gave "1/2 finished" or "3/2 finished" and a final
    top-1 the run never had, all with exit 0."""
    _run(tmp_path, "small_cnn-kd-s1", [30.0, 40.0], "distill.seed=1")
    folder = _run(tmp_path, "small_cnn-kd-s0", [20.0, 60.0])
    _damage(kind, folder / "metrics.jsonl")
    with pytest.raises(ReportError, match=r"small_cnn-kd-s0/metrics.jsonl (records|holds epoch)"):
        collect_runs(tmp_path)
    try:
        collect_runs(tmp_path)
    except ReportError as e:
        assert "\n" not in str(e) and "rerun its student" in str(e)


def test_an_unfinished_run_keeps_what_it_has(tmp_path):
    """Not a finished run: fewer epochs than planned are its progress, none yet is no run."""
    _run(tmp_path, "small_cnn-kd-s0", [20.0, 60.0], "distill.epochs=2", finished=False)
    folder = _run(tmp_path, "small_cnn-kd-s1", [30.0], "distill.seed=1", finished=False)
    _damage("emptied", folder / "metrics.jsonl")
    (run,) = collect_runs(tmp_path)
    assert (run.name, run.finished, run.final_acc) == ("small_cnn-kd-s0", False, 60.0)


def test_a_method_spelt_two_ways_is_one_experiment(tmp_path):
    """distill takes "KD" for kd (same folder name, same key): the report made two kd groups."""
    _run(tmp_path, "small_cnn-kd-s5", [40.0], "distill.method=KD", "distill.seed=5")
    _run(tmp_path, "small_cnn-kd-s6", [50.0], "distill.method=kd", "distill.seed=6")
    (group,) = aggregate(collect_runs(tmp_path))
    assert (group.method, group.seeds) == ("kd", [5, 6])
    assert group.final_acc.mean == pytest.approx(45.0)


def test_students_of_a_teacher_since_retrained_show_no_teacher_figure(tmp_path):
    """teacher.pt retrained with another teacher.lr (its store precomputed again): the students
    made before learned from the old teacher's logits, and were credited with the new one's."""
    _teacher(tmp_path, 91.5, "teacher.lr=0.2")
    _run(tmp_path, "old-kd-s0", [40.0])
    _run(tmp_path, "old-ce-s0", [30.0], "distill.method=ce")
    _run(tmp_path, "new-kd-s0", [45.0], "teacher.lr=0.2")
    _run(tmp_path, "subset-kd-s0", [46.0], "teacher.lr=0.2", "data.test_subset=64")
    moved = f"data.path={tmp_path / 'elsewhere'}"  # the dataset moved (tests/test_moved_dataset.py)
    _run(tmp_path, "moved-kd-s0", [46.5], "teacher.lr=0.2", moved)
    named = f"teacher.checkpoint={tmp_path / 'teacher.pt'}"  # the user says whose logits
    _run(tmp_path, "named-kd-s0", [47.0], named)
    teachers = {r.name: (r.teacher, r.teacher_test_acc) for r in collect_runs(tmp_path)}
    assert teachers["old-kd-s0"] == teachers["old-ce-s0"] == ("small_cnn", None)
    assert teachers["new-kd-s0"] == ("mlp", 91.5)
    # The same teacher, but its 91.5 % is of other test rows than this student's (audit).
    assert teachers["subset-kd-s0"] == ("mlp", None)
    assert teachers["moved-kd-s0"] == ("mlp", 91.5)
    assert teachers["named-kd-s0"] == ("mlp", 91.5)
    by_label = {g.label: g for g in aggregate(collect_runs(tmp_path))}
    assert by_label["old-kd"].teacher_test_acc is None
    assert by_label["new-kd"].teacher_test_acc == 91.5


def test_a_report_that_fails_leaves_the_previous_one_whole(tmp_path):
    """results.md a folder: curves.png, methods.png and results.json were replaced before the
    failure, a report half of this run and half of the last."""
    config = load_config(TINY, [f"run_dir={tmp_path}"])
    _run(tmp_path, "small_cnn-kd-s0", [20.0, 60.0])
    write_report(config)
    out = tmp_path / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["curves.png", "methods.png", "results.json", "results.md"]
    _run(tmp_path, "small_cnn-ce-s0", [10.0, 30.0], "distill.method=ce")  # a new report differs
    (out / "results.md").unlink()
    (out / "results.md").mkdir()
    with pytest.raises(ReportError, match=r"report/results.md is a folder where the report"):
        write_report(config)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == {k: v for k, v in before.items() if k != "results.md"}
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary file left


def test_the_refusal_is_one_line_and_writes_no_report(tmp_path, capsys):
    from pipeline.__main__ import main
    from tests.report.conftest import argv

    _damage("emptied", _run(tmp_path, "small_cnn-kd-s0", [20.0, 60.0]) / "metrics.jsonl")
    assert main(argv("report", tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "records 0 epochs, its run trained 2" in err
    assert not (tmp_path / "report").exists()
