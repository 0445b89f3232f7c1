"""Which error comes first, and what its advice names.

A bad method option (or student) changes the config's key, so the folder of the run it would
train holds "a finished run with another config": the option is named, not the folder, and the
folder is left as it was. A sweep's run does not inherit ``distill.name``: the advice of a
refusal or a divergence inside a sweep names ``sweep.runs[i].name`` (and ``.lr``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pipeline.__main__ import main
from pipeline.distill import accepted_keys, output_dir, train_student
from pipeline.distill_state import finished
from pipeline.errors import MethodError
from pipeline.methods.ctkd import CurriculumTemperature, GlobalTemperature, learned_temperature
from tests.distill.conftest import TINY, TinyRun

FOLDER = "small_cnn-kd-s0"  # tiny.yaml's student, kd, seed 0: the default folder


def _argv(stage: str, tiny_run: TinyRun, *overrides: str) -> list[str]:
    args = [stage, "--config", str(TINY), "--quiet"]
    for item in tiny_run.sets(*overrides):
        args += ["--set", item]
    return args


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """Overrides of a run folder of its own (the shared store) where kd seed 0 is finished."""
    run_dir = tmp_path_factory.mktemp("order")
    sets = (
        f"run_dir={run_dir}",
        f"distill.store={tiny_run.run_dir / 'store.zarr'}",
        "distill.epochs=1",
    )
    assert main(_argv("distill", tiny_run, *sets)) == 0
    assert (run_dir / "distill" / FOLDER / "student.pt").is_file()
    return sets


# --set overrides → the message expected; each one changes the config's key, and each run would
# train into the folder of the finished kd run.
BAD_OPTIONS = {
    "zero temperature": (
        ("distill.method_options={temperature: 0}",),
        "temperature must be a finite number > 0, got 0",
    ),
    "negative temperature": (
        ("distill.method_options={temperature: -1}",),
        "temperature must be a finite number > 0, got -1",
    ),
    "nan temperature": (
        ("distill.method_options={temperature: .nan}",),
        "temperature must be a finite number > 0, got nan",
    ),
    "infinite temperature": (
        ("distill.method_options={temperature: .inf}",),
        "temperature must be a finite number > 0, got inf",
    ),
    "typo'd key": (
        ("distill.method_options={temprature: 2}",),
        "unknown key(s) 'temprature' for method 'kd'",
    ),
    "ce with options": (
        ("distill.method=ce", "distill.method_options={temperature: 2}", f"distill.name={FOLDER}"),
        "method 'ce' takes no options, got 'temperature'",
    ),
    "ctkd curriculum": (
        (
            "distill.method=ctkd",
            "distill.method_options={curriculum_epochs: 0}",
            f"distill.name={FOLDER}",
        ),
        "curriculum_epochs must be a whole number >= 1, got 0",
    ),
    "unknown student": (
        ("distill.student=resnet9", f"distill.name={FOLDER}"),
        "unknown model 'resnet9'; choose one of: ",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_bad_option_is_named_before_the_finished_run(tiny_run, run, capsys, case):
    sets, message = BAD_OPTIONS[case]
    folder = Path(tiny_run.config(*run).run_path) / "distill" / FOLDER
    before = _files(folder)
    capsys.readouterr()
    assert main(_argv("distill", tiny_run, *run, *sets)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines[0]
    assert "finished run" not in lines[0]
    assert _files(folder) == before  # nothing written, nothing lost


def test_a_finished_run_is_found_as_before(tiny_run, run):
    """The early check changes nothing of a valid run: found finished, not retrained, and the
    caller's random generator left as it was (instance-wise CTKD's check builds an MLP)."""
    sets = (
        *run,
        "distill.method=ctkd",
        "distill.method_options={variant: instance}",
        "distill.name=order-ctkd",
    )
    config = tiny_run.config(*sets)
    path = train_student(config, progress=False)
    written = path.stat().st_mtime_ns
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    assert train_student(config, progress=False) == path
    assert torch.equal(torch.get_rng_state(), rng)
    assert path.stat().st_mtime_ns == written


def _sweep(tiny_run: TinyRun, run: tuple[str, ...], runs: str, *sets: str) -> list[str]:
    return _argv("sweep", tiny_run, *run, f"sweep.runs={runs}", "sweep.seeds=[0]", *sets)


def test_a_sweep_names_its_runs_name_for_a_finished_run(tiny_run, run, capsys):
    """distill.name does not move a sweep's run: the advice names sweep.runs[i].name."""
    runs = "[{method: ce, epochs: 1}, {method: kd, epochs: 3}]"
    config = tiny_run.config(*run)
    assert main(_sweep(tiny_run, run, runs, "distill.name=elsewhere")) == 2
    err = capsys.readouterr().err.strip()
    ckpt = config.run_path / "distill" / FOLDER / "student.pt"
    assert err == (
        f"error: sweep.runs[1] (kd, seed 0): {ckpt} is a finished run with another config: set "
        f"sweep.runs[1].name to train this one elsewhere, or delete the folder"
    )
    assert not (config.run_path / "distill" / "small_cnn-ce-s0").exists()  # nothing trained


def test_a_sweep_names_its_runs_name_for_a_saved_state(tiny_run, run, capsys):
    config = tiny_run.config(*run)
    stale = config.run_path / "distill" / "stale-s0"
    stale.mkdir(parents=True)
    torch.save({"epoch": 0, "config_hash": "another"}, stale / "state.pt")
    assert main(_sweep(tiny_run, run, "[{method: kd, name: stale}]")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: sweep.runs[0] (kd, seed 0): {stale / 'state.pt'} belongs to a run with another "
        f"config: restore that config to resume it, set sweep.runs[0].name to train this one "
        f"elsewhere, or delete the folder"
    )


def test_a_finished_run_of_another_store_names_the_section(tiny_run, run):
    config = tiny_run.config(*run)
    ckpt = config.run_path / "distill" / FOLDER / "student.pt"
    with pytest.raises(Exception, match=re.escape("set sweep.runs[2].name to train from this")):
        finished(ckpt, accepted_keys(config), {"onnx_sha256": "0" * 64}, section="sweep.runs[2]")
    with pytest.raises(Exception, match=re.escape("set distill.name to train from this")):
        finished(ckpt, accepted_keys(config), {"onnx_sha256": "0" * 64})


def test_a_sweep_names_its_runs_keys_for_a_divergence(tiny_run, run, capsys):
    runs = "[{method: ce, epochs: 1, name: cool}, {method: kd, name: hot, lr: 1.0e+8, epochs: 1}]"
    assert main(_sweep(tiny_run, run, runs)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == (
        "sweep 2/2 hot-s0: DIVERGED: hot-s0 diverged: its loss became non-finite in epoch 1/1 "
        "(ce nan, kd nan, total nan); stopped with no student (metrics.jsonl shows the epoch, no "
        "state to resume): lower sweep.runs[1].lr or the method's loss weights, under another "
        "sweep.runs[1].name (or delete this run's folder)"
    )
    assert main(_sweep(tiny_run, run, runs)) == 0  # reported again from diverged.json
    lines = capsys.readouterr().out.strip().splitlines()
    marker = output_dir(tiny_run.config(*run, "distill.name=hot-s0")) / "diverged.json"
    assert lines[1].startswith("sweep 2/2 hot-s0: DIVERGED: hot-s0 diverged in an earlier run: ")
    assert lines[1].endswith(
        "lower sweep.runs[1].lr or the method's loss weights, under another sweep.runs[1].name "
        f"(or delete this run's folder); delete {marker} to train it again as it is"
    )


def test_ctkd_names_the_argument_the_caller_set():
    """The config key and the functional argument are both curriculum_epochs."""
    with pytest.raises(MethodError, match=r"^curriculum_epochs must be a whole number >= 1, got 0"):
        learned_temperature(curriculum_epochs=0)
    with pytest.raises(MethodError, match=r"^curriculum_epochs must be .*, got True"):
        CurriculumTemperature(GlobalTemperature(), True)
