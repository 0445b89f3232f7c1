"""`python -m pipeline distill`: a run, and every bad input as one line, exit 2, no traceback.

Each kind of refusal runs as a real command line (``BAD``); they start together, a few at a time,
in one module fixture, since each costs an interpreter start-up of about two seconds. Variants of
the same refusals (``MORE_BAD``) go through the same ``main`` in this process.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.__main__ import main
from pipeline.data import splits
from pipeline.distill import output_dir
from storage import create_store, open_store
from tests.distill.conftest import run_cli

OK = ("distill.method=dkd", "distill.epochs=2", "distill.name=cli-dkd")

# name → (--set overrides, the message expected on the one line of stderr)
BAD: dict[str, tuple[tuple[str, ...], str]] = {
    "unknown student": (
        ("distill.student=resnet8",),
        r"unknown model 'resnet8'; choose one of: resnet20, .*resnet8x4",
    ),
    "unknown method": (
        ("distill.method=fitnet",),
        r"unknown method 'fitnet': known are ce, kd, dkd, ctkd, ls, ats, pskd",
    ),
    "parameter out of range": (
        ("distill.method=dkd", "distill.method_options={beta: -2}"),
        r"beta must be a finite number >= 0, got -2",
    ),
    "unknown config key": (
        ("distill.learning_rate=0.1",),
        r"unknown config key distill.learning_rate: known keys in distill are student",
    ),
    "fingerprint": (
        ("augment.pad=1",),
        r"made from other inputs \(augment: store '[0-9a-f]+' vs expected '[0-9a-f]+'\)",
    ),
    "more views than stored": (("distill.views=3",), r"distill.views=3 but store .* holds 2 view"),
    # The cases below are prepared by the fixture (a crafted store or a damaged file).
    "class count": (("distill.store={tmp}/c5.zarr",), "holds 5 classes but the dataset has 10"),
    "labels": (("distill.store={tmp}/labels.zarr",), r"labels differ .* at 256 row\(s\)"),
    "truncated state": (("distill.name=trunc-state",), r"state\.pt is truncated or corrupt"),
    "truncated checkpoint": (
        ("distill.name=trunc-ckpt",),
        r"student\.pt is truncated or corrupt .*delete it",
    ),
}

MORE_BAD: dict[str, tuple[tuple[str, ...], str]] = {
    "unknown composition": (("distill.method=ats+ls",), r"unknown composition 'ats\+ls'"),
    "unknown method key": (
        ("distill.method_options.tau=2",),
        r"unknown key\(s\) 'tau' for method 'kd': allowed are temperature",
    ),
    "options for ce": (("distill.method=ce", "distill.method_options.x=1"), "takes no options"),
    "bad choice": (("distill.teacher_source=cloud",), "must be one of store, online"),
    "no store": (("distill.store=/nonexistent/store.zarr",), "does not exist"),
    "online without teacher": (
        ("distill.teacher_source=online", "teacher.checkpoint=/nonexistent/t.pt"),
        r"checkpoint /nonexistent/t.pt not found",
    ),
}


def _crafted_store(path, tiny_run, classes: int, labels: np.ndarray) -> None:
    with open_store(tiny_run.run_dir / "store.zarr") as src:
        fingerprint, params = src.fingerprint, src.read_array("view_params", np.arange(256))
    with create_store(
        path, 256, classes, 1, chunk_rows=32, fingerprint=fingerprint, labels=labels,
        view_param_width=3,
    ) as store:  # fmt: skip
        store.write(0, 0, np.zeros((256, classes), np.float32), params)


@pytest.fixture(scope="module")
def results(tiny_run, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    train, _ = splits(tiny_run.config())
    _crafted_store(tmp / "c5.zarr", tiny_run, 5, train.labels % 5)
    _crafted_store(tmp / "labels.zarr", tiny_run, 10, (train.labels + 1) % 10)
    for name, file in (("trunc-state", "state.pt"), ("trunc-ckpt", "student.pt")):
        out = output_dir(tiny_run.config(f"distill.name={name}"))
        out.mkdir(parents=True)
        (out / file).write_bytes(b"PK\x03\x04 truncated")
    # Each case in its own run folder (a case's own distill.name comes later and wins): a
    # student another test finished under the default name would be refused first.
    jobs = {
        name: tiny_run.argv(
            f"distill.name=cli-bad-{i}", *(s.replace("{tmp}", str(tmp)) for s in sets)
        )
        for i, (name, (sets, _)) in enumerate(BAD.items())
    }
    jobs["ok"] = tiny_run.argv(*OK)
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(jobs, pool.map(run_cli, jobs.values())))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(results, case):
    result = results[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(BAD[case][1], lines[0]), lines[0]


@pytest.mark.parametrize("case", list(MORE_BAD))
def test_more_bad_input_in_process(tiny_run, capsys, case):
    sets, message = MORE_BAD[case]
    assert main(tiny_run.argv(f"distill.name=cli-more-{list(MORE_BAD).index(case)}", *sets)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines[0]


def test_a_run_from_the_command_line(results, tiny_run):
    result = results["ok"]
    assert result.returncode == 0, result.stderr
    out = output_dir(tiny_run.config(*OK))
    assert result.stdout.strip().startswith(f"distill: {out / 'student.pt'} (test top-1 ")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_diverged_run_run_again_repeats_its_line_without_training(tiny_run, capsys):
    """diverged.json records the outcome: the same config again gives the same line at once
    (naming the file), and once it is deleted the run trains again."""
    sets = ("distill.lr=1e8", "distill.epochs=2", "distill.name=cli-hot")
    out = output_dir(tiny_run.config(*sets))
    assert main(tiny_run.argv(*sets)) == 2
    first = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"error: cli-hot diverged: its loss became non-finite in epoch 1/2 .*", first
    )
    written = (out / "metrics.jsonl").stat().st_mtime_ns

    assert main(tiny_run.argv(*sets)) == 2
    again = capsys.readouterr().err.strip()
    assert again == first.replace("cli-hot diverged:", "cli-hot diverged in an earlier run:") + (
        f"; delete {out / 'diverged.json'} to train it again as it is"
    )
    assert (out / "metrics.jsonl").stat().st_mtime_ns == written  # nothing retrained

    marker = json.loads((out / "diverged.json").read_text())
    marker["record"]["epoch"] = "one"  # damaged: of no use, so the run trains (and diverges)
    (out / "diverged.json").write_text(json.dumps(marker))
    assert main(tiny_run.argv(*sets)) == 2
    assert capsys.readouterr().err.strip() == first
    assert (out / "metrics.jsonl").stat().st_mtime_ns != written

    marker = json.loads((out / "diverged.json").read_text())
    del marker["record"]["diverged"]  # as a NaN epoch's marker was first written: still one
    (out / "diverged.json").write_text(json.dumps(marker))
    assert main(tiny_run.argv(*sets)) == 2
    assert capsys.readouterr().err.strip() == again


def test_a_run_made_from_another_teacher_store_is_refused(tiny_run, tmp_path, capsys):
    """The teacher retrained and the store made again: a finished student (or a saved state) of
    the old store is neither reused nor resumed, and the refusal changes nothing of the run."""
    other = tmp_path / "other.zarr"
    shutil.copytree(tiny_run.store32, other)
    sets = ("distill.epochs=1", "distill.name=cli-source", f"distill.store={other}")
    assert main(tiny_run.argv(*sets)) == 0
    out = output_dir(tiny_run.config(*sets))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["fingerprint"]["onnx_sha256"] = "0" * 64  # another teacher's ONNX file
    (other / "zarr.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(tiny_run.argv(*sets)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a finished run trained from another teacher store" in err
    assert "differs in onnx_sha256" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_store_with_another_view_count_is_refused(tiny_run, capsys):
    """ce and PS-KD plan with augment.views: a KD run may not silently use the store's count."""
    sets = ("augment.views=1", "distill.name=cli-views")
    assert main(tiny_run.argv(*sets)) == 2
    err = capsys.readouterr().err
    assert re.search(r"holds 2 view\(s\) but augment.views=1: set augment.views=2", err), err
    assert not output_dir(tiny_run.config(*sets)).exists()  # not even its config.yaml
    assert main(tiny_run.argv(*sets, "distill.views=1", "distill.epochs=1")) == 0
