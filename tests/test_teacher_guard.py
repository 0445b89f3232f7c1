"""The teacher stage keeps the teacher a run folder was made from.

A ``teacher.pt`` of another config (or of no recorded config) is refused in one line, before
anything trains, and every file stays as it was: the ONNX file, the store and the students in
the folder were made from it. The same config is a no-op, an interrupted run resumes, a folder
where a checkpoint goes or an unwritable run folder is refused before the first epoch, and a
Ctrl-C leaves ``teacher.config.yaml`` describing the teacher that is on disk.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import pipeline.teacher as teacher_module
from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.models import build_model, read_checkpoint, save_checkpoint
from tests.stages.common import fails, snapshot, stage_argv
from tests.torch_threads import one_thread as one_torch_thread

TINY = Path(__file__).resolve().parents[1] / "stages" / "configs" / "tiny.yaml"
RECORD = "teacher.config.yaml"


def _record(run: Path) -> dict:
    return yaml.safe_load((run / RECORD).read_text())


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: the resumed teacher is compared bit for bit with the fixture's."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with the tiny config's finished teacher (2 epochs) and its record."""
    run = tmp_path_factory.mktemp("guard") / "finished"
    with one_torch_thread():
        assert main(stage_argv("teacher", run)) == 0
    assert (run / "teacher.pt").is_file() and (run / RECORD).is_file()
    return run


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the model (the first step of training) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher stage started training")

    monkeypatch.setattr(teacher_module, "build_model", refuse)


@pytest.mark.parametrize(
    ("sets", "differs"),
    [
        (["teacher.epochs=1"], "teacher.epochs was 2, is 1"),  # the review's `make` repro
        (["teacher.lr=1e-3"], "teacher.lr was 0.05, is 0.001"),
        (["data.options.seed=1"], "data.options.seed was 0, is 1"),
        (["augment.pad=1"], "augment.pad was 2, is 1"),
        (
            [f"teacher.{k}" for k in ("lr=0.2", "momentum=0.5", "gamma=0.5", "seed=3", "epochs=3")],
            "and 1 more",
        ),
    ],
    ids=["epochs", "lr", "data", "augment", "many"],
)
def test_a_teacher_of_another_config_is_refused_and_kept(
    finished: Path, tmp_path: Path, capsys, no_training, sets: list[str], differs: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "teacher.onnx").write_bytes(b"made from this teacher")  # what export would have made
    before = snapshot(run)
    err = fails(
        capsys,
        stage_argv("teacher", run, *sets),
        f"{run / 'teacher.pt'} is a teacher trained with another config",
        differs,
        "set another run_dir",
        f"delete {run / 'teacher.pt'}",
        "teacher.onnx",
    )
    assert "Traceback" not in err
    assert snapshot(run) == before  # teacher.pt, its record and what was made from it
    assert not (run / "teacher.state.pt").exists()


def test_a_dataset_that_cannot_be_read_says_so_first(
    finished: Path, tmp_path: Path, capsys, no_training
) -> None:
    """The config's real problem (a wrong data path) comes before "another config"."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    sets = ("data.kind=array", f"data.path={run / 'nope.npz'}", "data.options={}")
    err = fails(capsys, stage_argv("teacher", run, *sets), "nope.npz does not exist")
    assert "another config" not in err


def test_a_checkpoint_with_no_recorded_config_is_refused(
    finished: Path, tmp_path: Path, capsys, no_training
) -> None:
    """A teacher put into the run folder by hand: this stage did not train it."""
    run = tmp_path / "run"
    run.mkdir()
    kwargs = read_checkpoint(finished / "teacher.pt").model_kwargs
    model = build_model("small_cnn", **kwargs)
    save_checkpoint(run / "teacher.pt", model, model_name="small_cnn", model_kwargs=kwargs)
    before = snapshot(run)
    fails(
        capsys,
        stage_argv("teacher", run),
        "the teacher stage did not train (it records no config)",
        f"teacher.checkpoint={run / 'teacher.pt'}",
    )
    assert snapshot(run) == before


def test_the_same_config_is_a_no_op(finished: Path, tmp_path: Path, no_training) -> None:
    """Finished with this config: nothing trains, teacher.pt is not rewritten (nor with more
    stored views or another distill setting, which the teacher does not depend on)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    teacher = (run / "teacher.pt").read_bytes()
    assert main(stage_argv("teacher", run)) == 0
    assert main(stage_argv("teacher", run, "augment.views=3", "distill.epochs=1")) == 0
    # data.test_subset changes what the teacher is evaluated on, not its weights: no refusal
    # (`make distill SET=data.test_subset=500` reruns the teacher stage)
    assert main(stage_argv("teacher", run, "data.test_subset=5")) == 0
    assert teacher_module.made_with(load_config(TINY, [f"run_dir={run}", "data.test_subset=5"]))
    assert (run / "teacher.pt").read_bytes() == teacher


def test_an_interrupted_teacher_resumes(finished: Path, tmp_path: Path, monkeypatch, capsys):
    """Ctrl-C after epoch 1's state: exit 130, the record describes that state; another config
    is refused and leaves it; the same config resumes at epoch 2 and ends with the weights of
    the uninterrupted run."""
    run = tmp_path / "run"
    save = teacher_module._save_atomic

    def save_then_interrupt(obj, path):
        save(obj, path)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(teacher_module, "_save_atomic", save_then_interrupt)
        assert main(stage_argv("teacher", run)) == 130
    assert (run / "teacher.state.pt").is_file() and not (run / "teacher.pt").exists()
    assert _record(run) == {**_record(finished), "run_dir": str(run)}  # this run's config
    state = snapshot(run)
    fails(
        capsys,
        stage_argv("teacher", run, "teacher.lr=1e-3"),
        "teacher.state.pt belongs to a run with another",
    )
    assert snapshot(run) == state

    epochs = []
    evaluate = teacher_module.evaluate
    monkeypatch.setattr(teacher_module, "evaluate", lambda *a: epochs.append(1) or evaluate(*a))
    assert main(stage_argv("teacher", run)) == 0
    assert len(epochs) == 1  # epoch 2 only
    assert not (run / "teacher.state.pt").exists()
    got, want = read_checkpoint(run / "teacher.pt"), read_checkpoint(finished / "teacher.pt")
    assert got.extra["config_hash"] == want.extra["config_hash"]
    assert got.state_dict.keys() == want.state_dict.keys()
    for name, value in want.state_dict.items():
        assert torch.equal(got.state_dict[name], value), name


def test_a_ctrl_c_leaves_the_record_of_the_teacher_on_disk(
    finished: Path, tmp_path: Path, monkeypatch
) -> None:
    """Ctrl-C before the stage's checks (here: while the dataset loads) must not write another
    config's record beside teacher.pt; nor a record where no teacher (or state) is yet."""

    def interrupt(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher_module, "splits", interrupt)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    assert main(stage_argv("teacher", run, "teacher.lr=1e-3")) == 130
    assert snapshot(run) == before
    fresh = tmp_path / "fresh"
    assert main(stage_argv("teacher", fresh)) == 130
    assert not (fresh / RECORD).exists()


def test_a_ctrl_c_of_an_export_leaves_the_record_of_the_onnx_file_on_disk(
    finished: Path, tmp_path: Path, monkeypatch
) -> None:
    """The same for export: interrupted while it re-exports with other settings, the old
    teacher.onnx stays, and so does the record that describes it (export.config.yaml had been
    rewritten with the new settings); an export of the same settings records it."""
    import pipeline.onnx_export as onnx_export

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    export = ["export", "--config", str(TINY), "--quiet", "--set", f"run_dir={run}"]
    assert main(export) == 0
    before = snapshot(run)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_onnx", interrupt)
    assert main([*export, "--set", "export.atol=0.001"]) == 130
    assert snapshot(run) == before
    (run / "export.config.yaml").unlink()
    assert main(export) == 0  # up to date: nothing exported, the record written again
    assert (run / "export.config.yaml").is_file()


@pytest.mark.parametrize("name", ["teacher.pt", "teacher.state.pt"])
def test_a_folder_where_a_checkpoint_goes_is_refused_before_training(
    tmp_path: Path, capsys, no_training, name: str
) -> None:
    run = tmp_path / "run"
    (run / name).mkdir(parents=True)
    fails(
        capsys,
        stage_argv("teacher", run),
        f"{run / name} is a folder, not a checkpoint file",
        "run_dir",
    )
    assert (run / name).is_dir() and not (run / RECORD).exists()


def test_an_unwritable_run_folder_is_refused_before_training(
    tmp_path: Path, capsys, monkeypatch, no_training
) -> None:
    """The tests run as root, which permissions do not stop: the write itself is refused."""
    import pipeline.fileio as fileio

    run = tmp_path / "run"
    mkstemp = fileio.tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == run:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refused)
    fails(capsys, stage_argv("teacher", run), "permission denied", str(run), "run_dir")
    assert not (run / "teacher.pt").exists() and not (run / RECORD).exists()


def test_every_epoch_trains_on_augmented_views(tmp_path: Path, monkeypatch) -> None:
    """View 0 is the clean image (augment.identity_view0, the default): the first epoch trained
    on it, unaugmented (audit, 2026-11-27)."""
    from pipeline.data import Split

    views: list[object] = []
    batch = Split.batch

    def recording(self, idx, view=None, seed=None):
        if self.split == "train":
            views.append(view)
        return batch(self, idx, view=view, seed=seed)

    monkeypatch.setattr(Split, "batch", recording)
    config = load_config(TINY, [f"run_dir={tmp_path}", "teacher.epochs=2"])
    assert config.augment.identity_view0 and config.teacher.augment
    teacher_module.train_teacher(config, progress=False)
    assert views and 0 not in views and None not in views, sorted(set(map(str, views)))
    assert sorted(set(views)) == [1, 2]  # a view an epoch
