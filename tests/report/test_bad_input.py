"""Bad sweep entries and an empty report: one line on stderr, exit 2, nothing trained.

The two kinds the issue names run as real command lines (started together: each costs an
interpreter start-up); their variants go through the same ``main`` in this process.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.__main__ import main
from pipeline.config import SweepConfig, load_config, save_resolved
from pipeline.distill_inputs import method_names
from pipeline.errors import ConfigError
from pipeline.sweep import plan_sweep
from tests.distill.conftest import run_cli
from tests.report.conftest import TINY, argv

# name → (stage, --set overrides, the message expected on the one line of stderr)
CLI: dict[str, tuple[str, tuple[str, ...], str]] = {
    "unknown key": (
        "sweep",
        ("sweep.runs=[{method: kd, temprature: 2}]",),
        r"unknown key sweep\.runs\[0\]\.temprature: a run sets distill keys, known are "
        r"student, method, method_options, ",
    ),
    "unknown method": (
        "sweep",
        ("sweep.runs=[{method: kd}, {method: fitnet}]",),
        r"sweep\.runs\[1\] \(fitnet\): unknown method 'fitnet': known are ce, kd, dkd, ctkd",
    ),
    "report with no runs": ("report", (), r"no runs to report in .*distill: train students"),
}

IN_PROCESS: dict[str, tuple[tuple[str, ...], str]] = {
    "no method": (("sweep.runs=[{lr: 0.1}]",), r"sweep\.runs\[0\] needs a method"),
    "seed in a run": (("sweep.runs=[{method: kd, seed: 1}]",), r"seeds come from sweep\.seeds"),
    "bad value": (("sweep.runs=[{method: kd, lr: fast}]",), r"sweep\.runs\[0\]\.lr must be float"),
    "out of range": (
        ("sweep.runs=[{method: kd, lr: -1}]",),
        r"sweep\.runs\[0\] \(kd\): distill\.lr must be > 0",
    ),
    "unknown student": (
        ("sweep.runs=[{method: kd, student: resnet9}]",),
        r"sweep\.runs\[0\] \(kd\): unknown student 'resnet9'; choose one of: resnet20",
    ),
    "unknown option": (
        ("sweep.runs=[{method: dkd, method_options: {tau: 2}}]",),
        r"sweep\.runs\[0\] \(dkd\): unknown key\(s\) 'tau' for method 'dkd'",
    ),
    "same folder": (
        ("sweep.runs=[{method: kd}, {method: kd, method_options: {temperature: 2}}]",),
        r"sweep\.runs\[1\] \(kd\) and sweep\.runs\[0\] both train into .*small_cnn-kd-s0: give",
    ),
    "seed twice": (("sweep.seeds=[0, 0]",), r"sweep\.seeds has a seed twice"),
    "not a list": (("sweep.runs={method: kd}",), r"sweep\.runs must be a list"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, object]]:
    jobs = {}
    for name, (stage, sets, _) in CLI.items():
        run_dir = tmp_path_factory.mktemp("bad") / "run"
        jobs[name] = (argv(stage, run_dir, *sets), run_dir)
    with ThreadPoolExecutor(3) as pool:
        done = pool.map(run_cli, [args for args, _ in jobs.values()])
        return {name: (result, jobs[name][1]) for name, result in zip(jobs, done)}


def _one_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(CLI))
def test_bad_input_on_the_command_line(results, case):
    result, run_dir = results[case]
    assert result.returncode == 2, result.stderr
    _one_line(result.stderr, CLI[case][2])
    assert not (run_dir / "distill").exists() and not (run_dir / "report").exists()


@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_bad_sweep_entries_in_process(tmp_path, capsys, case):
    sets, message = IN_PROCESS[case]
    assert main(argv("sweep", tmp_path, *sets)) == 2
    _one_line(capsys.readouterr().err, message)
    assert not (tmp_path / "distill").exists()


def test_default_runs_are_the_issues_methods():
    methods = [run["method"] for run in SweepConfig().runs]
    assert methods == ["ce", "kd", "dkd", "ctkd", "ls+kd", "ls+dkd", "ats", "pskd"]
    assert set(methods) <= set(method_names())
    assert SweepConfig().seeds == [0]


@pytest.mark.parametrize("name", ["''", "'.hidden'", "a/b"])
def test_a_sweep_run_name_must_be_a_plain_folder_name(tmp_path, name):
    """Checked before the seed suffix: an empty name trained into a folder called "-s0"."""
    runs = f"[{{method: kd, name: {name}}}]"
    with pytest.raises(ConfigError, match=r"sweep.runs\[0\].name must be a plain folder name"):
        load_config(TINY, [f"run_dir={tmp_path}", f"sweep.runs={runs}"])


def test_plan_names_folders_and_keeps_distill_defaults(tmp_path):
    runs = "[{method: ce}, {method: kd, method_options: {temperature: 2}, name: kd-t2, lr: 1}]"
    sets = [f"run_dir={tmp_path}", f"sweep.runs={runs}", "sweep.seeds=[0, 5]"]
    config = load_config(TINY, [*sets, "distill.method_options={temperature: 3}"])
    plan = plan_sweep(config)
    assert [p.folder.name for p in plan] == [
        "small_cnn-ce-s0",
        "small_cnn-ce-s5",
        "kd-t2-s0",
        "kd-t2-s5",
    ]
    kd = plan[2].config.distill
    assert (kd.method, kd.method_options, kd.lr, kd.seed) == ("kd", {"temperature": 2}, 1.0, 0)
    assert kd.epochs == config.distill.epochs and kd.batch_size == config.distill.batch_size
    assert plan[0].config.distill.method_options == {}  # options are not inherited
    # The sweep section survives the resolved config.yaml a stage writes.
    save_resolved(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_damaged_run_folders_are_named_not_left_out(tmp_path):
    """A finished student without its metrics.jsonl was left out of its experiment's mean, and
    a run whose config.yaml is no mapping became a "?" run in a group of its own, silently
    (exit 0). Each is now the one-line error naming the folder."""
    import json

    from pipeline.errors import UserError
    from pipeline.report import collect_runs

    def run(name: str, config: str | None, metrics: bool, student: bool) -> None:
        folder = tmp_path / "distill" / name
        folder.mkdir(parents=True)
        if config is not None:
            (folder / "config.yaml").write_text(config)
        if metrics:
            (folder / "metrics.jsonl").write_text(json.dumps({"test_acc": 50.0}) + "\n")
        if student:
            (folder / "student.pt").write_bytes(b"")

    good = "distill: {student: mlp, method: kd, seed: 0, epochs: 1}\n"
    run("mlp-kd-s0", good, metrics=True, student=True)
    assert [r.name for r in collect_runs(tmp_path)] == ["mlp-kd-s0"]
    run("mlp-kd-s1", good, metrics=False, student=True)
    with pytest.raises(UserError, match=r"mlp-kd-s1 holds a finished student but no metrics"):
        collect_runs(tmp_path)
    (tmp_path / "distill" / "mlp-kd-s1" / "student.pt").unlink()  # unfinished, never started
    run("mlp-ce-s0", "junk\n", metrics=True, student=True)
    with pytest.raises(UserError, match=r"mlp-ce-s0/config.yaml is not a run's config"):
        collect_runs(tmp_path)
    (tmp_path / "distill" / "mlp-ce-s0" / "config.yaml").unlink()
    with pytest.raises(UserError, match=r"mlp-ce-s0/config.yaml is missing"):
        collect_runs(tmp_path)
