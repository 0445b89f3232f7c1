"""Faults: damaged stores are named by `verify`, refused by `distill`, repaired by `verify --repair`
and precompute; and a short fault campaign (SIGKILL at random moments, resume, compare).

Each damage is done to a finished tiny store the way a disk or a careless copy would do it: a
flipped byte in a chunk's data or in a shard's index, a truncated or deleted shard file (zarr), a
flipped byte in a chunk of the .h5 file (found with h5py's chunk info) or a truncated .h5 file.
`verify` must name the chunk (view, chunk, rows) and the file, one line per problem, exit 1;
`distill` must refuse the store before training in one line naming it and the fix, exit 2.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import h5py
import pytest

from pipeline.__main__ import main
from tests.fault_campaign import (
    SETTINGS,
    TEACHER_FILES,
    TINY,
    compare_stores,
    run_campaign,
    table,
)

ROWS, PER_SHARD, N = 32, 2, 1024  # SETTINGS: 1024 rows in 32-row chunks, 2 chunks per shard
CHUNKS = N // ROWS


def _sets(run_dir: Path, backend: str, *extra: str) -> list[str]:
    sets = [f"run_dir={run_dir}", *SETTINGS, f"precompute.backend={backend}", *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A teacher of the campaign's settings, trained and exported once."""
    folder = tmp_path_factory.mktemp("teacher")
    for stage in ("teacher", "export"):  # in this process: two interpreter start-ups saved
        assert main([stage, "--config", str(TINY), "--quiet", *_sets(folder, "zarr")]) == 0
    return folder


@pytest.fixture(scope="module")
def finished(teacher, tmp_path_factory) -> dict[str, Path]:
    """backend -> a run folder holding the teacher and its finished store."""
    out = {}
    for backend in ("zarr", "hdf5"):
        run_dir = tmp_path_factory.mktemp(f"store-{backend}")
        for file in TEACHER_FILES:
            shutil.copy2(teacher / file, run_dir / file)
        argv = ["precompute", "--config", str(TINY), "--quiet", *_sets(run_dir, backend)]
        assert main(argv) == 0
        out[backend] = run_dir
    return out


def _copy(finished: dict[str, Path], backend: str, dest: Path) -> tuple[Path, Path]:
    """(run folder, store) copied from the finished one."""
    shutil.copytree(finished[backend], dest)
    return dest, dest / ("store.zarr" if backend == "zarr" else "store.h5")


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _shard(store: Path, name: str, view: int, chunk: int) -> Path:
    return store / name / "c" / str(view) / str(chunk // PER_SHARD) / "0"


# Each damage: (backend, what it does) -> (the chunks verify must name, a file it must name).
def _damage(kind: str, store: Path, rng: random.Random) -> tuple[list[tuple[int, int]], str]:
    view, chunk = rng.randrange(2), rng.randrange(CHUNKS)
    pair = [(view, chunk - chunk % PER_SHARD + i) for i in range(PER_SHARD)]  # a shard's chunks
    if kind == "zarr: flipped data byte":
        shard = _shard(store, "logits", view, chunk)
        chunk_bytes = ROWS * 10 * 2 + 4  # float16 logits of 10 classes, and a crc32c
        _flip(shard, (chunk % PER_SHARD) * chunk_bytes + rng.randrange(chunk_bytes - 4))
        return [(view, chunk)], str(shard)
    if kind == "zarr: flipped index byte":
        shard = _shard(store, "stats", view, chunk)
        _flip(shard, shard.stat().st_size - 1 - rng.randrange(16 * PER_SHARD + 4))
        return pair, str(shard)
    if kind == "zarr: truncated shard":
        shard = _shard(store, "logits", view, chunk)
        os.truncate(shard, rng.randrange(1, shard.stat().st_size))
        return pair, str(shard)
    if kind == "zarr: deleted shard":
        shard = _shard(store, "view_params", view, chunk)
        shard.unlink()
        return pair, str(shard.relative_to(store))
    if kind == "hdf5: flipped data byte":
        with h5py.File(store, "r") as f:
            info = f["logits"].id.get_chunk_info_by_coord((view, chunk * ROWS, 0))
        _flip(store, info.byte_offset + rng.randrange(info.size))
        return [(view, chunk)], str(store)
    assert kind == "hdf5: truncated file"
    with h5py.File(store, "r") as f:
        info = f["logits"].id.get_chunk_info_by_coord((1, N - ROWS, 0))
    os.truncate(store, info.byte_offset + info.size // 2)  # inside view 1's last logits chunk
    return [(1, CHUNKS - 1)], str(store)


KINDS = [
    "zarr: flipped data byte",
    "zarr: flipped index byte",
    "zarr: truncated shard",
    "zarr: deleted shard",
    "hdf5: flipped data byte",
    "hdf5: truncated file",
]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("kind", KINDS)
def test_damage_is_named_by_verify_and_refused_by_distill(finished, tmp_path, capsys, kind):
    backend = kind.split(":")[0]
    run_dir, store = _copy(finished, backend, tmp_path / "run")
    chunks, file = _damage(kind, store, random.Random(KINDS.index(kind)))
    capsys.readouterr()

    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert all(line.startswith(("damaged: ", "FAILED: ", "fix: ")) for line in lines), out
    for view, chunk in chunks:
        named = [line for line in lines if f"damaged: view {view} chunk {chunk} (rows" in line]
        assert named, f"view {view} chunk {chunk} not named:\n{out}"
    assert file in out
    fix = "delete" if kind == "hdf5: truncated file" else "verify --repair"
    assert lines[-1].startswith("fix: ") and fix in lines[-1], out

    argv = ["distill", "--config", str(TINY), "--quiet"]
    argv += _sets(run_dir, backend, "distill.method=kd", f"distill.store={store}")
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert str(store) in err and fix in err, err
    view, chunk = chunks[0]
    assert f"view {view}" in err, err
    assert not (run_dir / "distill").exists() or not list((run_dir / "distill").rglob("*.pt"))


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_verify_repair_then_precompute_restores_the_store(finished, tmp_path, capsys, backend):
    run_dir, store = _copy(finished, backend, tmp_path / "run")
    rng = random.Random(7)
    _damage(f"{backend}: flipped data byte", store, rng)
    if backend == "zarr":
        _damage("zarr: deleted shard", store, rng)
    capsys.readouterr()
    assert main(["verify", "--repair", str(store)]) == 1
    out = capsys.readouterr().out
    assert "repaired: view" in out and "marked not done" in out, out
    assert main(["verify", str(store)]) == 1  # the repaired shards are now missing, not damaged
    out = capsys.readouterr().out
    assert "missing: view" in out and "damaged: view" not in out, out

    argv = ["precompute", "--config", str(TINY), "--quiet", *_sets(run_dir, backend)]
    assert main(argv) == 0
    assert main(["verify", str(store)]) == 0
    assert compare_stores(finished[backend] / store.name, store) == []


def test_a_store_with_unreadable_marks_is_repaired_whole(finished, tmp_path, capsys):
    run_dir, store = _copy(finished, "zarr", tmp_path / "run")
    _flip(store / "done" / "c" / "1" / "0", 2)
    capsys.readouterr()
    argv = ["distill", "--config", str(TINY), "--quiet"]
    argv += _sets(run_dir, "zarr", "distill.method=kd", f"distill.store={store}")
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "completion marks (done) are unreadable" in err and "verify --repair" in err, err
    assert main(["verify", "--repair", str(store)]) == 1
    assert "damaged: done (completion marks) unreadable" in capsys.readouterr().out
    assert main(["precompute", "--config", str(TINY), "--quiet", *_sets(run_dir, "zarr")]) == 0
    assert compare_stores(finished["zarr"] / store.name, store) == []


def test_short_fault_campaign(teacher, tmp_path):
    """Two kills per stage (one round killed twice) on zarr; `make bench` runs the full one."""
    rounds = run_campaign(
        tmp_path, kills=2, seed=1, methods=("pskd",), teacher=teacher, log=lambda _: None
    )
    report = table(rounds, "zarr")
    assert all(r.identical for r in rounds), report + "\n" + str([r.problems for r in rounds])
    for stage in ("precompute", "distill"):
        assert any(k.landed for r in rounds if r.stage == stage for k in r.kills), report


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_full_fault_campaign(teacher, tmp_path, backend):
    """20 kills per stage, kd and PS-KD (3.5 to 4.5 minutes per backend on 2 cores)."""
    rounds = run_campaign(tmp_path, kills=20, backend=backend, teacher=teacher, log=print)
    report = table(rounds, backend)
    print(report)
    assert all(r.identical for r in rounds), report
