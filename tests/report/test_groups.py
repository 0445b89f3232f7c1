"""How the report groups runs into experiments and picks each one's CE baseline, on run folders
written here (metrics.jsonl, config.yaml, a finished marker): no training needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.distill import NOT_IN_KEY
from pipeline.report import _NOT_RESULT_KEYS, ReportError, aggregate, collect_runs


def _run(root: Path, name: str, accs: list[float], **distill) -> Path:
    folder = root / "distill" / name
    folder.mkdir(parents=True)
    records = [{"epoch": i + 1, "test_acc": a, "rows_per_s": 100.0} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = {"student": "mlp", "method": "kd", "epochs": len(accs), "lr": 0.05, "seed": 0}
    config = {"distill": {**settings, **distill}, "teacher": {"model": "resnet20"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "student.pt").write_bytes(b"")  # finished
    return folder


def test_the_ce_baseline_has_every_other_setting_the_same(tmp_path):
    """Not the first CE group of the student: the one trained as long, at the same rate."""
    _run(tmp_path, "ce-1ep-s0", [50.0], method="ce")
    _run(tmp_path, "ce-s0", [40.0, 60.0, 70.0], method="ce")
    _run(tmp_path, "kd-s0", [40.0, 60.0, 65.0])
    _run(tmp_path, "kd-fast-s0", [40.0, 60.0, 66.0], lr=0.5)  # no CE at this rate
    groups = {g.label: g for g in aggregate(collect_runs(tmp_path))}
    assert groups["kd"].delta_ce == pytest.approx(65.0 - 70.0)
    assert groups["kd-fast"].delta_ce is None
    assert groups["ce"].delta_ce is None and groups["ce-1ep"].delta_ce is None


def test_seeds_group_by_recipe_and_name(tmp_path):
    """Seeds of one name form one experiment; the same recipe under another name is another
    (never seeds 0, 0, 1, 1); settings that do not change what a run learns do not split one."""
    for seed, acc in ((0, 60.0), (1, 62.0)):
        _run(tmp_path, f"kd-s{seed}", [acc], seed=seed, ddp_timeout_s=60 + seed)
        _run(tmp_path, f"kd-again-s{seed}", [acc], seed=seed, device="cpu" if seed else "cuda")
    groups = {g.label: g for g in aggregate(collect_runs(tmp_path))}
    assert sorted(groups) == ["kd", "kd-again"]
    assert groups["kd"].seeds == [0, 1] and groups["kd-again"].seeds == [0, 1]
    assert groups["kd"].final_acc.mean == pytest.approx(61.0)


def test_keys_that_do_not_change_a_run_are_those_of_distill():
    assert set(NOT_IN_KEY) <= set(_NOT_RESULT_KEYS)


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f.joinpath("metrics.jsonl").write_text('{"test_acc": 1, "rows_per_s": "x"}\n'),
        lambda f: f.joinpath("config.yaml").write_text("distill: [1]\n"),
        lambda f: f.joinpath("config.yaml").write_text("distill: {seed: one}\n"),
    ],
    ids=["rows_per_s", "distill-list", "seed-text"],
)
def test_a_damaged_run_is_one_line(tmp_path, damage):
    damage(_run(tmp_path, "kd-s0", [50.0]))
    with pytest.raises(ReportError, match=r"kd-s0: its metrics.jsonl or config.yaml holds a") as e:
        collect_runs(tmp_path)
    assert "\n" not in str(e.value)


def test_a_student_of_another_runs_store_shows_that_runs_teacher(tmp_path):
    """distill.store naming another run's store: its logits are that run's teacher's, so the
    report shows the teacher.pt beside the store (it showed this run's teacher), or none."""
    from pipeline.models import build_model, save_checkpoint

    run, other = tmp_path / "run", tmp_path / "other"
    kwargs = {"num_classes": 4, "in_channels": 1, "image_size": (8, 8)}
    for folder, name, acc in ((run, "mlp", 80.0), (other, "small_cnn", 91.5)):
        folder.mkdir()
        save_checkpoint(folder / "teacher.pt", build_model(name, **kwargs), model_name=name,
                        model_kwargs=kwargs, extra={"test_acc": acc})  # fmt: skip
    _run(run, "kd-s0", [60.0])
    _run(run, "kd-other-s0", [61.0], store=str(other / "store.zarr"))
    _run(run, "kd-nowhere-s0", [62.0], store=str(tmp_path / "elsewhere" / "store.zarr"))
    _run(run, "ce-s0", [59.0], method="ce", store=str(other / "store.zarr"))  # reads no store
    named = _run(run, "kd-named-s0", [63.0], store=str(tmp_path / "elsewhere" / "store.zarr"))
    config = yaml.safe_load((named / "config.yaml").read_text())
    config["teacher"]["checkpoint"] = str(run / "teacher.pt")  # the user names the teacher
    (named / "config.yaml").write_text(yaml.safe_dump(config))
    teachers = {r.name: (r.teacher, r.teacher_test_acc) for r in collect_runs(run)}
    assert teachers["kd-s0"] == teachers["ce-s0"] == teachers["kd-named-s0"] == ("mlp", 80.0)
    assert teachers["kd-other-s0"] == ("small_cnn", 91.5)
    assert teachers["kd-nowhere-s0"] == (None, None)
