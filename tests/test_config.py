from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from pipeline.config import load_config, save_resolved
from pipeline.errors import ConfigError


def test_defaults_file_and_overrides_combine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\nteacher:\n  epochs: 7\n  lr: 0.05\naugment:\n  views: 2\n")
    config = load_config(
        path,
        [
            "teacher.milestones=[3, 5]",
            "export.atol=1e-3",
            "precompute.scheduler=null",
            "teacher.epochs=9",
        ],
    )
    assert config.run_dir == "runs/x" and config.augment.views == 2
    assert config.teacher.epochs == 9 and config.teacher.lr == 0.05
    assert config.teacher.milestones == [3, 5] and config.export.atol == 1e-3
    assert config.precompute.scheduler is None and config.teacher.batch_size == 128
    save_resolved(config, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == config


def test_resolved_config_write_clears_leftovers(tmp_path, monkeypatch):
    """A kill during the resolved config's write (fault campaign: in its fsync) leaves a
    temporary file beside it: the next write removes it. A write whose own temporary file
    another command removed as a leftover meanwhile writes again."""
    import pipeline.fileio as fileio

    config = load_config(None, ["teacher.epochs=3"])
    out = tmp_path / "precompute.config.yaml"
    out.write_text("old\n")
    leftover = tmp_path / ".precompute.config.yaml.k1ll3d.tmp"
    leftover.write_text("half")
    other = tmp_path / ".other.yaml.k1ll3d.tmp"  # another file's: not this write's to remove
    other.write_text("x")
    publish, stolen = fileio.publish, []

    def steal_first(tmp, path):
        if not stolen:
            stolen.append(Path(tmp))
            Path(tmp).unlink()  # as a concurrent save_resolved's cleanup would
        publish(tmp, path)

    monkeypatch.setattr(fileio, "publish", steal_first)
    save_resolved(config, out)
    assert stolen and load_config(out) == config
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted([out.name, other.name])


def test_precompute_parity_record_write_clears_leftovers(tmp_path):
    """The slow fault campaign killed precompute in its parity record's write: the temporary
    file stayed for good. The next write removes it (the same helper as the configs')."""
    from types import SimpleNamespace

    from pipeline.precompute import PARITY_FILE, _write_parity_record

    config = load_config(None, [f"run_dir={tmp_path}"])
    leftover = tmp_path / f".{PARITY_FILE}.k1ll3d.tmp"
    leftover.write_text("{half")
    produce = SimpleNamespace(runner=SimpleNamespace(device="cpu"), precision="fp32", parity=None)
    _write_parity_record(config, produce)
    assert sorted(q.name for q in tmp_path.iterdir()) == [PARITY_FILE]
    assert json.loads((tmp_path / PARITY_FILE).read_text())["provider"] == "cpu"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("teacher:\n  lrr: 0.1\n", [], "unknown config key teacher.lrr: known keys in teacher"),
        ("", ["foo.bar=1"], "unknown config key foo: known keys in the top level"),
        ("", ["teacher.epochs=abc"], "teacher.epochs must be int, got 'abc'"),
        ("", ["teacher.lr=-1"], r"teacher.lr must be > 0, got -1.0"),
        ("", ["augment.views=0"], r"augment.views must be > 0, got 0"),
        ("", ["teacher.momentum=-1"], r"teacher.momentum must be >= 0, got -1.0"),
        ("", ["teacher.weight_decay=-1"], r"teacher.weight_decay must be >= 0"),
        ("", ["teacher.gamma=-1"], r"teacher.gamma must be > 0, got -1.0"),
        ("", ["teacher.milestones=[5, 2]"], r"teacher.milestones must be increasing epochs >= 1"),
        ("", ["export.parity_batches=0"], r"export.parity_batches must be > 0, got 0"),
        ("", ["export.opset=3"], r"export.opset must be >= 7, got 3"),
        ("", ["precompute.threads=0"], r"precompute.threads must be > 0, got 0"),
        ("", ["precompute.chunk_rows=0"], r"precompute.chunk_rows must be > 0, got 0"),
        ("", ["precompute.provider=gpu"], r"provider must be one of auto, cuda, cpu, got 'gpu'"),
        ("", ["precompute.parity_rows=-1"], r"precompute.parity_rows must be >= 0, got -1"),
        # checked when read: it was reported as "a store made from other inputs" (2026-11-27)
        ("", ["precompute.encoding=bogus"], r"precompute.encoding must be one of float32, "),
        ("", ["precompute.backend=tiledb"], r"precompute.backend must be one of zarr, hdf5, got"),
        ("", ["distill.pskd_encoding=f8"], r"distill.pskd_encoding must be one of float32, "),
        ("", ["distill.name=" + "a" * 300], r"distill.name must be at most 200 bytes .* 300: "),
        ("", ["precompute.parity_rtol=0"], r"parity_rtol must be a finite number > 0, got 0.0"),
        ("", ["precompute.parity_rtol=nan"], r"parity_rtol must be a finite number > 0, got nan"),
        ("", ["export.atol=inf"], r"export.atol must be a finite number, got inf"),
        ("", ["teacher.lr=nan"], r"teacher.lr must be a finite number, got nan"),
        ("", ["teacher.seed=-1"], r"teacher.seed: a seed is a whole number from 0 to 2\*\*64 - 1"),
        ("", ["augment.seed=-3"], r"augment.seed: a seed is a whole number from 0 to 2\*\*64 - 1"),
        ("teacher:\n  1: a\n  foo: b\n", [], r"unknown config key teacher.1: known keys"),
        ("", ["teacher=3"], "config section teacher must be a mapping"),
        ("", ["teacher.epochs"], "must look like section.key=value"),
        ("teacher: [1, 2\n", [], r"not valid YAML \(line"),
        ("- a\n- b\n", [], "must hold a mapping of sections, not list"),
        ("teacher:\n  milestones: 5\n", [], "teacher.milestones must be a list"),
        ("teacher:\n  augment: yes please\n", [], "teacher.augment must be bool"),
    ],
)
def test_bad_configs_are_refused_with_one_line(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file nowhere.yaml not found"):
        load_config("nowhere.yaml")


def test_yaml_tags_never_run_code(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "stages" / "configs").glob("*.yaml")), ids=str
)
def test_every_shipped_config_loads_and_plans_its_sweep(path: Path) -> None:
    from pipeline.sweep import plan_sweep

    config = load_config(path)
    assert plan_sweep(config)  # every run's method, options and student are known


def test_a_huge_integer_is_a_config_error_not_a_traceback():
    huge = "1" + "0" * 400  # math.isfinite(int) raises OverflowError past float's range
    for key in ("teacher.epochs", "teacher.lr"):  # an int setting, a float one (float() raised)
        with pytest.raises(ConfigError, match=f"{key} must be .*, got a 401-digit number"):
            load_config(None, [f"{key}={huge}"])
    assert load_config(None, [f"teacher.epochs={2**62}"]).teacher.epochs == 2**62


@pytest.mark.parametrize(
    ("code", "what"),
    [
        (errno.EISDIR, "a folder is where a file belongs"),
        (errno.ENAMETOOLONG, "a file name is too long for the file system"),
        (errno.ENOENT, "no such file or folder"),
    ],
)
def test_path_os_errors_are_one_line(code, what):
    """A run_dir of 300 characters, a folder where teacher.pt goes, a run_dir under /proc: the
    user's to fix, one line naming the path (they were tracebacks)."""
    from pipeline.errors import os_error_message

    message = os_error_message(OSError(code, os.strerror(code), "/r/x"))
    assert (
        message == f"{what} (/r/x): check run_dir and the store, data and checkpoint paths "
        "in the config"
    )


def test_a_key_given_twice_is_refused_but_a_merged_key_may_be_overridden(tmp_path):
    """YAML keeps the last of two equal keys silently (`method: kd` then `method: dkd` trained
    DKD); anchors and merge keys, a common way to write sweep runs, still load."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("distill:\n  method: kd\n  epochs: 2\n  method: dkd\n")
    with pytest.raises(ConfigError, match=r"key 'method' is given twice \(line 4\): keep one"):
        load_config(twice)
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "distill: &d\n  method: kd\n  epochs: 3\n"
        "sweep:\n  runs:\n    - {<<: *d, method: ce}\n    - <<: *d\n      epochs: 2\n"
    )
    runs = load_config(merged).sweep.runs
    assert runs == [{"method": "ce", "epochs": 3}, {"method": "kd", "epochs": 2}]
    chain = tmp_path / "chain.yaml"  # an anchored mapping that merges another, merged deeper
    chain.write_text(
        "sweep:\n  runs:\n    - &kd {method: kd, epochs: 2}\n"
        "    - &dkd {<<: *kd, method: dkd}\n  seeds: [0]\n"
        "distill: {<<: *dkd, student: small_cnn}\n"
    )
    assert load_config(chain).distill.method == "dkd"
