"""`sweep` then `report` on the tiny store: tiny.yaml's sweep (ce, kd, ls+dkd × seeds 0 and 1,
two epochs each), and a report whose every number is recomputed here from the metrics files."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
from PIL import Image

from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.models import read_checkpoint
from tests.report.conftest import TINY, argv

PNG = b"\x89PNG\r\n\x1a\n"


def _run(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def swept(tiny_store: Path) -> dict:
    rc, sweep_out = _run(argv("sweep", tiny_store))
    assert rc == 0, sweep_out
    rc, report_out = _run(argv("report", tiny_store))
    assert rc == 0, report_out
    return {"run": tiny_store, "sweep": sweep_out, "report": report_out}


def _expected_folders() -> list[str]:
    config = load_config(TINY)
    names = []
    for run in config.sweep.runs:
        for seed in config.sweep.seeds:
            names.append(f"{config.distill.student}-{run['method']}-s{seed}")
    return names


def test_sweep_trains_every_run_and_seed(swept):
    run, names = swept["run"], _expected_folders()
    assert len(names) == 6
    assert sorted(p.name for p in (run / "distill").iterdir()) == sorted(names)
    for name in names:
        folder = run / "distill" / name
        assert (folder / "student.pt").is_file() and not (folder / "state.pt").exists()
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
    lines = swept["sweep"].strip().splitlines()
    for position, name in enumerate(names, 1):
        assert lines[position - 1].startswith(f"sweep {position}/6 {name}: trained, test top-1 ")
    assert lines[-1].startswith("sweep: 6 runs done (6 trained, 0 already finished)")
    assert (run / "sweep.done").read_text().split() == names


def _metrics(run: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted((run / "distill").glob("*/metrics.jsonl")):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def test_report_numbers_equal_the_metrics(swept):
    run = swept["run"]
    results = json.loads((run / "report" / "results.json").read_text())
    markdown = (run / "report" / "results.md").read_text()
    metrics = _metrics(run)
    teacher = read_checkpoint(run / "teacher.pt").extra["test_acc"]

    groups: dict[str, list[str]] = {}  # folder name without -sSEED → its seeds' folders
    for name in metrics:
        groups.setdefault(re.sub(r"-s\d+$", "", name), []).append(name)
    assert {g["label"] for g in results["methods"]} == set(groups)
    assert [g["method"] for g in results["methods"]] == ["ce", "kd", "ls+dkd"]
    rows = {line.split(" | ")[4]: line for line in markdown.splitlines() if " | " in line}

    for group in results["methods"]:
        folders = sorted(groups[group["label"]])
        assert sorted(group["runs"]) == folders and group["seeds"] == [0, 1]
        best = [max(r["test_acc"] for r in metrics[f]) for f in folders]
        final = [metrics[f][-1]["test_acc"] for f in folders]
        wall = [sum(r["seconds"] for r in metrics[f]) for f in folders]
        rate = [statistics.fmean(r["rows_per_s"] for r in metrics[f]) for f in folders]
        for key, values in (("best_acc", best), ("final_acc", final)):
            assert group[key]["values"] == pytest.approx(values)
            assert group[key]["mean"] == pytest.approx(statistics.fmean(values))
            assert group[key]["std"] == pytest.approx(statistics.stdev(values))
        assert group["wall_s"] == pytest.approx(statistics.fmean(wall))
        assert group["rows_per_s"] == pytest.approx(statistics.fmean(rate))
        assert group["epochs"] == [2]
        assert group["teacher"] == "small_cnn"
        assert group["teacher_test_acc"] == pytest.approx(teacher)
        row = rows[group["label"]]
        for values in (best, final):
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert f" {mean:.2f} ± {std:.2f} " in row, row
        assert f" {teacher:.2f} " in row

    ce = results["methods"][0]["final_acc"]["mean"]
    for group in results["methods"][1:]:
        assert group["delta_ce"] == pytest.approx(group["final_acc"]["mean"] - ce)

    by_name = {r["name"]: r for r in results["runs"]}
    assert set(by_name) == set(metrics)
    for name, history in metrics.items():
        entry = by_name[name]
        assert entry["curve"] == [r["test_acc"] for r in history]
        assert entry["final_acc"] == history[-1]["test_acc"] and entry["finished"]
        assert entry["seed"] == int(name.rsplit("-s", 1)[1])
        assert f"| {name} | small_cnn | {entry['method']} | {entry['seed']} | 2/2 |" in markdown


def test_plots_are_valid_pngs(swept):
    report = swept["run"] / "report"
    printed = [line.removeprefix("report: ") for line in swept["report"].splitlines()[1:]]
    assert printed == [str(report / n) for n in ("results.md", "results.json")] + [
        str(report / n) for n in ("curves.png", "methods.png")
    ]
    for name in ("curves.png", "methods.png"):
        path = report / name
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 300
        assert f"]({name})" in (report / "results.md").read_text()


def test_rerunning_the_sweep_trains_nothing(swept, monkeypatch):
    run = swept["run"]
    files = sorted((run / "distill").glob("*/*"))
    before = {p: p.stat().st_mtime_ns for p in files}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("pipeline.sweep.train_student", no_training)
    rc, out = _run(argv("sweep", run))
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert all(": already finished, test top-1 " in line for line in lines[:-1]), out
    assert lines[-1].startswith("sweep: 6 runs done (0 trained, 6 already finished)")
    assert sorted((run / "distill").glob("*/*")) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_a_failing_run_does_not_stop_the_others(tiny_store, tmp_path, capsys):
    """A run that fails when it trains (its store has a damaged chunk: chunk checksums are read
    by each run, not by the sweep's checks before the first) is reported; the others train."""
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store / "store.zarr", damaged)
    chunks = (p for p in (damaged / "logits" / "c").rglob("*") if p.is_file())
    chunk = max(chunks, key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    runs = f"[{{method: kd, store: {damaged}, name: broken}}, {{method: ce, epochs: 1}}]"
    sets = (f"distill.store={tiny_store / 'store.zarr'}", f"sweep.runs={runs}", "sweep.seeds=[3]")
    assert main(argv("sweep", tmp_path, *sets)) == 1
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0].startswith("sweep 1/2 broken-s3: FAILED: ") and "damaged.zarr" in lines[0]
    assert lines[1].startswith("sweep 2/2 small_cnn-ce-s3: trained, test top-1 ")
    assert err.strip().splitlines()[-1] == (
        "error: 1 of 2 sweep runs failed (broken-s3); the others are kept, rerun to retry only "
        "the failed ones"
    )
    assert not (tmp_path / "sweep.done").exists()
    assert (tmp_path / "distill" / "small_cnn-ce-s3" / "student.pt").is_file()

    # One seed: the report gives the mean alone; the failed run wrote no metrics, so it is absent.
    assert main(argv("report", tmp_path)) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["small_cnn-ce-s3"]
    (group,) = results["methods"]
    assert group["final_acc"]["std"] is None and group["teacher_test_acc"] is None
    assert (tmp_path / "report" / "methods.png").read_bytes()[:8] == PNG


def test_a_missing_store_is_refused_before_anything_trains(tiny_store, tmp_path, capsys):
    """A typo in a run's store (or a store with fewer views than a run asks for) is found
    before the first student trains, CE runs included: one line, exit 2, nothing trained."""
    runs = "[{method: ce, epochs: 1}, {method: kd, store: /nonexistent/store.zarr}]"
    sets = (f"distill.store={tiny_store / 'store.zarr'}", f"sweep.runs={runs}", "sweep.seeds=[3]")
    assert main(argv("sweep", tmp_path, *sets)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        "error: sweep.runs[1] (kd, seed 3): /nonexistent/store.zarr does not exist: give the "
        "path of a store made by precompute (a .zarr directory or an .h5 file)"
    )
    runs = "[{method: ce, epochs: 1}, {method: kd, views: 9}]"
    assert main(argv("sweep", tmp_path, sets[0], f"sweep.runs={runs}", "sweep.seeds=[3]")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep.runs[1] (kd, seed 3): distill.views=9 but store "), err
    assert not (tmp_path / "distill").exists()


def test_a_diverged_run_is_reported_not_failed(tiny_store, tmp_path, capsys):
    """A run whose loss becomes NaN stops at that epoch with no student; the sweep calls it
    diverged (not failed: sweep.done is written) and the report names it beside the table."""
    runs = "[{method: kd, name: hot, lr: 1.0e+8, epochs: 2}, {method: ce, epochs: 1}]"
    sets = (f"distill.store={tiny_store / 'store.zarr'}", f"sweep.runs={runs}", "sweep.seeds=[4]")
    assert main(argv("sweep", tmp_path, *sets)) == 0
    out, _ = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == (
        "sweep 1/2 hot-s4: DIVERGED: hot-s4 diverged: its loss became non-finite in epoch 1/2 "
        "(ce nan, kd nan, total nan); stopped with no student (metrics.jsonl shows the epoch, no "
        "state to resume): lower sweep.runs[0].lr or the method's loss weights, under another "
        "sweep.runs[0].name (or delete this run's folder)"
    )
    assert lines[1].startswith("sweep 2/2 small_cnn-ce-s4: trained, test top-1 ")
    assert lines[2].startswith("sweep: 2 runs done (1 trained, 0 already finished, 1 diverged")
    assert (tmp_path / "sweep.done").is_file()
    hot = tmp_path / "distill" / "hot-s4"
    kept = [".distill.lock", "config.yaml", "diverged.json", "metrics.jsonl"]
    assert sorted(p.name for p in hot.iterdir()) == kept
    written = (hot / "metrics.jsonl").stat().st_mtime_ns

    # A rerun reports the same outcome without training up to the same NaN again.
    assert main(argv("sweep", tmp_path, *sets)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(
        "sweep 1/2 hot-s4: DIVERGED: hot-s4 diverged in an earlier run: its loss became "
        "non-finite in epoch 1/2 (ce nan, kd nan, total nan)"
    )
    assert lines[1].startswith("sweep 2/2 small_cnn-ce-s4: already finished")
    assert (hot / "metrics.jsonl").stat().st_mtime_ns == written

    assert main(argv("report", tmp_path, *sets)) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    by_name = {r["name"]: r for r in results["runs"]}
    assert by_name["hot-s4"]["diverged_epoch"] == 1 and not by_name["hot-s4"]["finished"]
    assert by_name["small_cnn-ce-s4"]["diverged_epoch"] is None
    assert [g["label"] for g in results["methods"]] == ["small_cnn-ce"]
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "**Diverged** (the loss became NaN or infinite, or grew over 1,000-fold;" in markdown
    assert "hot (kd): seed 4 in epoch 1." in markdown
    assert "| hot-s4 | small_cnn | kd | 4 | 1/2 |" in markdown
    assert markdown.count("diverged (epoch 1)") == 1

    # The folder reused with another recipe (no state.pt to refuse it: it diverged in epoch 1)
    # trains: the marker was the other config's outcome.
    calm = (sets[0], "sweep.runs=[{method: kd, name: hot, epochs: 2}]", sets[2])
    capsys.readouterr()
    assert main(argv("sweep", tmp_path, *calm)) == 0
    assert capsys.readouterr().out.startswith("sweep 1/1 hot-s4: trained, test top-1 ")
    assert sorted(p.name for p in hot.iterdir()) == [
        ".distill.lock",
        "config.yaml",
        "metrics.jsonl",
        "student.pt",
    ]
