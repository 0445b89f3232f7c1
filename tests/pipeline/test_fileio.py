"""Temporary files of writes a kill cut short: removed for the names asked, nothing else."""

from __future__ import annotations

import pytest

from pipeline.fileio import remove_stale_temps, temp_beside


def test_stale_temps_of_the_names_asked_are_removed(tmp_path):
    stale = [
        ".teacher.onnx.k2j3.tmp.onnx",  # export_onnx's (temp_beside with suffix .tmp.onnx)
        ".teacher.onnx.k2j3.tmp.onnx.data",  # what the dynamo exporter may leave beside it
        ".teacher.pt.a8x.tmp",
        ".teacher.state.pt.zz1.tmp",
    ]
    kept = ["teacher.onnx", "teacher.pt", ".student.pt.q1.tmp", "teacher.onnx.parity.json"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path, ("teacher.onnx", "teacher.pt", "teacher.state.pt"))
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


@pytest.mark.parametrize("suffix", [".tmp", ".tmp.onnx"])
def test_what_temp_beside_makes_is_what_remove_stale_temps_finds(tmp_path, suffix):
    with temp_beside(tmp_path / "teacher.onnx", suffix) as tmp:
        assert [p.name for p in remove_stale_temps(tmp_path, ("teacher.onnx",))] == [tmp.name]
