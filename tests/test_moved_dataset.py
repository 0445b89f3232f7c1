"""A dataset moved to another path (the same files) keeps its teacher, store and students.

``data.path`` says where the files lie, not what they are: the teacher's checkpoint records the
dataset's content hash, and the students' and the export's keys hold that hash instead of the
path, so a run folder taken to another machine, or a dataset moved to another disk, is reused
(each stage used to refuse it, or redo it, as "another config"). Other content at the new path
is still refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.__main__ import main
from tests.stages.common import TINY, fails


def _save(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (128, 12, 12), dtype=np.uint8),
        train_labels=np.arange(128) % 4,
        test_images=rng.integers(0, 256, (32, 12, 12), dtype=np.uint8),
        test_labels=np.arange(32) % 4,
    )


def test_a_moved_dataset_keeps_the_teacher_store_and_students(tmp_path: Path, capsys) -> None:
    run, first, moved = tmp_path / "run", tmp_path / "a" / "data.npz", tmp_path / "b" / "data.npz"
    _save(first, 0)
    sets = [
        f"run_dir={run}", "data.kind=array", f"data.path={first}", "data.options={}",
        "teacher.epochs=1", "distill.epochs=1", "distill.device=cpu",
    ]  # fmt: skip

    def argv(stage: str, *extra: str) -> list[str]:
        return [stage, "--config", str(TINY), "--quiet"] + [
            a for s in (*sets, *extra) for a in ("--set", s)
        ]

    def stamps() -> dict[str, int]:
        made = [run / "teacher.pt", run / "teacher.onnx", *run.glob("distill/*/student.pt")]
        return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in made}

    def all_stages() -> None:
        for stage in ("teacher", "export", "precompute"):
            assert main(argv(stage)) == 0, stage
        for method in ("kd", "ce"):
            assert main(argv("distill", f"distill.method={method}")) == 0, method

    all_stages()
    before = stamps()
    assert len(before) == 4
    moved.parent.mkdir()
    shutil.move(first, moved)
    sets[2] = f"data.path={moved}"
    all_stages()
    assert stamps() == before  # nothing trained or exported again
    _save(moved, 1)  # other images at the new path: another dataset
    fails(capsys, argv("teacher"), "teacher trained with another config", "data.path was")


def test_the_store_checks_hash_a_dataset_rewritten_in_place_afresh(tmp_path: Path) -> None:
    """The keys' hash is kept for a process (by the path's stat); a store check's is not: a
    dataset rewritten where the stat cannot see it (an option's path, here) is still new data."""
    from pipeline.config import load_config
    from pipeline.data import dataset_sha256, splits

    data = tmp_path / "data.npz"
    _save(data, 0)
    config = load_config(
        TINY, ["data.kind=array", f"data.options={{train_path: {data}, test_path: {data}}}"]
    )
    first = splits(config)[0].fingerprint()["dataset"]
    assert dataset_sha256(config.data) == first  # shared with the keys
    _save(data, 1)
    assert splits(config)[0].fingerprint()["dataset"] != first
    assert dataset_sha256(config.data) != first  # the keys take the fresh one up
