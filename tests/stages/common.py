"""What the stage tests share: the tiny config, a store's arrays, a tiny run made once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "stages" / "configs" / "tiny.yaml"
#: Every array of a store: two stores made from the same inputs must agree on each, bit for bit.
ARRAYS = ("logits", "stats", "view_params", "labels", "done")


def raw_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """Each array of the zarr store at ``path`` (a path or URL), read with zarr directly."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ARRAYS}


def assert_same_store(got: Path | str, want: Path | str) -> None:
    """Equal array by array (dtypes too), and complete."""
    a, b = raw_arrays(got), raw_arrays(want)
    for name in ARRAYS:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["done"].all()


def stage_argv(stage: str, run_dir: Path, *sets: str) -> list[str]:
    """argv of ``stage`` on the tiny config in ``run_dir``, with ``sets`` overrides."""
    argv = [stage, "--config", str(TINY), "--quiet"]
    for item in (f"run_dir={run_dir}", *sets):
        argv += ["--set", item]
    return argv


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path: what a refused command must keep."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def fails(capsys, argv: list[str], *needles: str) -> str:
    """The CLI ends in exit status 2 and one line on stderr that holds every needle."""
    capsys.readouterr()  # what earlier calls printed is not this one's
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def build_tiny_run(run_dir: Path, args: Callable[[str, Path], list[str]]) -> Path:
    """teacher, export and precompute into ``run_dir``; ``args(stage, run_dir)`` is the CLI."""
    for stage in ("teacher", "export", "precompute"):
        assert main(args(stage, run_dir)) == 0, stage
    return run_dir
