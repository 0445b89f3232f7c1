"""Faults of the teacher and export stages: a diverged teacher, a damaged training state, a
folder where an export's file goes, and advice that names settings which exist.

Each fault ends in one line (exit status 2) naming the problem and the fix, and leaves what was
on disk as it was.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pipeline.onnx_export as onnx_export
import pipeline.teacher as teacher_module
from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.errors import os_error_message
from pipeline.fileio import atomic_write
from pipeline.models import build_model, read_checkpoint, save_checkpoint
from pipeline.onnx_export import ParityError, _verdict
from tests.stages.common import TINY, fails, snapshot, stage_argv
from tests.torch_threads import one_thread


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with the tiny config's teacher, exported."""
    run = tmp_path_factory.mktemp("faults") / "finished"
    with one_thread():
        assert main(stage_argv("teacher", run)) == 0
        assert main(stage_argv("export", run)) == 0
    return run


# -- a diverged teacher ------------------------------------------------------------------------


def test_a_diverged_teacher_is_refused_and_writes_no_checkpoint(tmp_path: Path, capsys) -> None:
    """lr 1e9: the loss is NaN within the first epoch; it was accepted (exit 0, test top-1 10%)
    with every weight of teacher.pt NaN."""
    run = tmp_path / "run"
    fails(
        capsys,
        stage_argv("teacher", run, "teacher.lr=1e9", "teacher.epochs=1"),
        "the teacher diverged: its loss became non-finite in epoch 1/1 (train_loss nan)",
        "no teacher.pt (no state to resume): lower teacher.lr",
    )
    assert not run.exists() or not any(run.iterdir())


def test_a_teacher_diverging_later_keeps_its_last_good_state(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A NaN loss in epoch 2 (of 2): no teacher.pt, and the state of epoch 1 stays as written
    (a rerun with a lower lr is refused by it, so the line says to delete it)."""
    run = tmp_path / "run"
    cross_entropy = torch.nn.functional.cross_entropy
    calls = []

    def nan_in_epoch_2(*args, **kwargs):
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) > 4 else loss  # 256 rows / 64: 4 batches

    saved = []
    save = teacher_module._save_atomic
    monkeypatch.setattr(teacher_module, "_save_atomic", lambda o, p: saved.append(1) or save(o, p))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_in_epoch_2)
    fails(
        capsys,
        stage_argv("teacher", run),
        "its loss became non-finite in epoch 2/2",
        "teacher.state.pt keeps epoch 1",
        f"lower teacher.lr and delete {run / 'teacher.state.pt'} to train afresh",
    )
    assert len(saved) == 1 and sorted(p.name for p in run.iterdir()) == ["teacher.state.pt"]
    state = torch.load(run / "teacher.state.pt", weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_weights_broken_by_an_epochs_last_step_are_refused(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A step's loss is computed before the step: the weights after the last one are checked."""
    run = tmp_path / "run"
    models = []
    real_build = teacher_module.build_model
    monkeypatch.setattr(
        teacher_module,
        "build_model",
        lambda *a, **k: models.append(real_build(*a, **k)) or models[-1],
    )

    class Bar:  # the progress bar: after the epoch's last batch, a weight becomes inf
        def __init__(self, batches, **kwargs) -> None:
            self.batches = batches

        def __iter__(self):
            yield from self.batches
            with torch.no_grad():
                next(models[-1].parameters()).fill_(float("inf"))

        def set_postfix(self, **kwargs) -> None:
            pass

    monkeypatch.setattr(teacher_module, "tqdm", Bar)
    fails(
        capsys,
        stage_argv("teacher", run, "teacher.epochs=1"),
        "its weights became non-finite in epoch 1/1",
        "lower teacher.lr",
    )
    assert not (run / "teacher.pt").exists()


def test_a_nan_teacher_is_blamed_on_its_weights_not_the_exporter(
    finished: Path, tmp_path: Path, capsys
) -> None:
    """A teacher.pt of NaN weights (made before the teacher stage checked): export blamed the
    exporter and advised a setting that does not exist."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = read_checkpoint(finished / "teacher.pt")
    model = build_model(ckpt.model_name, **ckpt.model_kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(
        run / "teacher.pt",
        model,
        model_name=ckpt.model_name,
        model_kwargs=ckpt.model_kwargs,
        extra=ckpt.extra,
    )
    err = fails(
        capsys,
        stage_argv("export", run),
        "PyTorch's own outputs are NaN/inf in 2 batches",
        "the teacher's weights or outputs are NaN/inf",
        "teacher.lr",
    )
    assert "export-unsafe" not in err and "exporter=" not in err
    assert not (run / "teacher.onnx").exists()


# -- advice that names settings which exist ----------------------------------------------------


def test_parity_advice_names_the_setting_that_selects_the_other_exporter() -> None:
    base = {
        "passed": False,
        "atol": 1e-4,
        "top1_agreement": 0.9,
        "nonfinite_batches": 0,
        "max_abs_diff": 0.5,
        "max_abs_logit": 12.0,
    }
    for exporter, setting in [("dynamo", "export.opset=17"), ("torchscript", "export.opset=18")]:
        with pytest.raises(ParityError, match="export-unsafe ops") as info:
            _verdict({**base, "exporter": exporter}, "the export")
        assert f"re-export with {setting}" in str(info.value)
        assert "exporter=" not in str(info.value)
        load_config(TINY, [setting])  # a key the config knows


def test_a_failed_export_advises_export_opset_17_which_works(
    finished: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The dynamo exporter fails: the line says export.opset=17 (not the unknown
    export.exporter), and with it the TorchScript exporter writes the file."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(finished / "teacher.pt", run / "teacher.pt")
    real_export = onnx_export._torch_export

    def dynamo_fails(model, sample, path, opset, dynamic, exporter):
        if exporter == "dynamo":
            raise RuntimeError("data-dependent control flow")
        real_export(model, sample, path, opset, dynamic, exporter)

    monkeypatch.setattr(onnx_export, "_torch_export", dynamo_fails)
    err = fails(capsys, stage_argv("export", run), "failed (data-dependent", "try export.opset=17")
    assert "exporter=" not in err
    assert main(stage_argv("export", run, "export.opset=17")) == 0
    record = json.loads((run / "teacher.onnx.parity.json").read_text())
    assert record["exporter"] == "torchscript" and record["passed"]


# -- a damaged training state ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ([1, 2, 3], "(a list)"),
        ("hash only", "(no model, optimizer, scheduler, torch_rng, epoch, history)"),
        ("bad model", "(Error(s) in loading state_dict"),
    ],
    ids=["list", "no-model", "bad-model"],
)
def test_a_malformed_training_state_is_one_line_and_kept(
    tmp_path: Path, capsys, monkeypatch, content, why: str
) -> None:
    """A teacher.state.pt that torch.load reads but that is no training state: it was an
    AttributeError (a list) or a KeyError (a dict of the right config hash, no model)."""
    run = tmp_path / "run"
    run.mkdir()
    key = teacher_module.teacher_key(load_config(TINY, [f"run_dir={run}"]))
    if content == "hash only":
        content = {"config_hash": key}
    elif content == "bad model":
        content = {k: 0 for k in ("optimizer", "scheduler", "torch_rng", "epoch", "history")} | {
            "config_hash": key,
            "model": {"nonsense": torch.zeros(1)},
        }
    path = run / "teacher.state.pt"
    torch.save(content, path)
    before = snapshot(run)
    fails(
        capsys,
        stage_argv("teacher", run),
        f"{path} is not a teacher training state {why}",
        "delete it to train the teacher afresh",
    )
    assert snapshot(run) == before


# -- a folder where an export's file goes ------------------------------------------------------


def test_an_os_error_of_a_rename_names_its_destination(tmp_path: Path) -> None:
    """os.replace(tmp, dest) onto a folder: the line named the temporary file."""
    dest = tmp_path / "teacher.onnx"
    dest.mkdir()
    with pytest.raises(IsADirectoryError) as info, atomic_write(dest) as f:
        f.write(b"x")
    message = os_error_message(info.value)
    assert message.startswith(f"a folder is where a file belongs ({dest}): ")
    assert ".tmp" not in message
    plain = OSError(errno.EISDIR, "Is a directory", str(dest))
    assert f"({dest})" in os_error_message(plain)


@pytest.mark.parametrize(
    "name", ["teacher.onnx", "teacher.onnx.parity.json", "teacher.onnx.parity-failed.json"]
)
def test_a_folder_where_an_export_file_goes_is_refused_before_publishing(
    finished: Path, tmp_path: Path, capsys, name: str
) -> None:
    """With the record's name a folder, export published a new teacher.onnx, then failed on
    its record (naming a temporary file)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(finished / "teacher.pt", run / "teacher.pt")
    (run / name).mkdir()
    err = fails(
        capsys, stage_argv("export", run), f"{run / name} is a folder, not a file", "run_dir"
    )
    assert ".tmp" not in err
    assert sorted(p.name for p in run.iterdir()) == sorted({"teacher.pt", name})
    assert (run / name).is_dir()


def test_a_record_that_cannot_be_written_publishes_no_onnx_file(
    finished: Path, tmp_path: Path, monkeypatch
) -> None:
    """The record is written before the file is published: a full disk while writing it leaves
    the earlier teacher.onnx (dynamo, opset 18) and its record as they were, not a new
    teacher.onnx (TorchScript, opset 17) beside the record of the old one."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)

    def full(record, f, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f.name)

    monkeypatch.setattr(onnx_export, "json", SimpleNamespace(dump=full))
    assert main(stage_argv("export", run, "export.opset=17")) == 2
    after = snapshot(run)
    for name in ("teacher.onnx", "teacher.onnx.parity.json", "teacher.pt"):
        assert after[name] == before[name], name
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_a_nan_batch_norm_statistic_is_divergence() -> None:
    """Weights finite, a running mean NaN: the teacher's outputs are NaN all the same (review)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert teacher_module._divergence(1.0, model) is None
    model[1].running_mean[0] = float("nan")
    assert teacher_module._divergence(1.0, model) == (
        "weights",
        "NaN/inf after the epoch's last step",
    )
