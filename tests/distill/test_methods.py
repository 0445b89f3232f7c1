"""A short run of every method of the registry (and `ce`): finite losses, learning, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import splits
from pipeline.distill import evaluate, output_dir, train_student
from pipeline.distill_inputs import method_names
from pipeline.models import load_model_from_checkpoint, read_checkpoint

CHANCE = 10.0  # 10 balanced classes


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_a_student(tiny_run, method):
    # One clean view: the synthetic set is learnable in a few epochs (see conftest).
    config = tiny_run.config(f"distill.method={method}", "distill.views=1")
    path = train_student(config, progress=False)
    assert path == output_dir(config) / "student.pt"
    assert path.parent.name == f"small_cnn-{method}-s0"

    lines = (path.parent / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert set(r) == {
            "epoch", "lr", "loss", "train_acc", "test_acc", "rows_per_s", "seconds", "views"
        }  # fmt: skip
        assert "total" in r["loss"] and all(math.isfinite(v) for v in r["loss"].values())
        assert 0 <= r["train_acc"] <= 100 and 0 <= r["test_acc"] <= 100
        assert r["rows_per_s"] > 0 and r["seconds"] > 0 and r["views"] == [0]
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.05, 0.05, 0.005])
    assert max(r["test_acc"] for r in records) >= 2 * CHANCE, records

    # The final checkpoint loads without unpickling code, and says how it was made.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["model_name"] == "small_cnn"
    ckpt = read_checkpoint(path)
    assert ckpt.extra["test_acc"] == records[-1]["test_acc"]
    assert json.loads(ckpt.extra["config"])["distill"]["method"] == method
    model = load_model_from_checkpoint(path)
    _, test = splits(config)
    assert evaluate(model, test, torch.device("cpu")) == ckpt.extra["test_acc"]
    assert not (path.parent / "state.pt").exists()
    assert (path.parent / "config.yaml").is_file()


def test_a_finished_run_is_not_trained_again(tiny_run):
    config = tiny_run.config("distill.method=kd", "distill.name=twice", "distill.epochs=1")
    path = train_student(config, progress=False)
    stamp = path.stat().st_mtime_ns
    assert train_student(config, progress=False) == path
    assert path.stat().st_mtime_ns == stamp


def test_views_rotate_by_epoch(tiny_run):
    config = tiny_run.config("distill.method=kd", "distill.name=rotate", "distill.epochs=3")
    path = train_student(config, progress=False)
    records = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["views"] for r in records] == [[0], [1], [0]]  # view = epoch mod V, V = 2


def test_sample_policy_trains_every_epoch_on_both_views(tiny_run):
    config = tiny_run.config(
        "distill.method=kd",
        "distill.name=per-row",
        "distill.epochs=2",
        "distill.view_policy=sample",
    )
    path = train_student(config, progress=False)
    records = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["views"] for r in records] == [[0, 1], [0, 1]]
    assert all(np.isfinite(r["loss"]["total"]) for r in records)


def test_config_key_ignores_device_and_loader_settings(tmp_path: Path) -> None:
    """A run may resume on another device or with another prefetch depth; a change of what is
    trained (here the learning rate) must change the key."""
    from pipeline.config import load_config
    from pipeline.distill import config_key

    tiny = Path(__file__).resolve().parents[2] / "stages" / "configs" / "tiny.yaml"

    def key(*sets: str) -> str:  # a run folder without a store (see the next test for one)
        return config_key(load_config(tiny, [f"run_dir={tmp_path}", *sets]))

    base = key()
    assert key("distill.device=cpu", "distill.prefetch=0", "distill.eval_batch_size=7") == base
    # A respelt method is the same run (same key, same folder), not "another config"; a run
    # saved before with the key of the method as spelled (the old key) is still this run's.
    from pipeline.distill import accepted_keys, output_dir

    assert key("distill.method= LS + DKD") == key("distill.method=ls+dkd")
    respelt = load_config(tiny, [f"run_dir={tmp_path}", "distill.method=KD"])
    plain = load_config(tiny, [f"run_dir={tmp_path}", "distill.method=kd"])
    assert output_dir(respelt) == output_dir(plain)
    assert config_key(respelt, spelled=True) != config_key(respelt)
    assert config_key(respelt, spelled=True) in accepted_keys(respelt)
    assert key("distill.lr=0.5") != base
    # The blocks each epoch is cut into, and the logits' encoding, change the batches: without
    # a store, those a precompute of the config would make.
    for changed in ("precompute.chunk_rows=7", "precompute.encoding=int8"):
        for method in ("ce", "pskd", "kd"):
            assert key(f"distill.method={method}", changed) != key(f"distill.method={method}")
    assert key("precompute.chunks_per_shard=2") == base


def test_term_sums_add_each_term_times_its_rows() -> None:
    """The epoch's loss sums: Σ term · rows per name, in one stack and add a step; terms that
    change mid-epoch keep what was summed under their names."""
    from pipeline.distill import TermSums

    sums = TermSums()
    steps = [({"ce": 1.5, "kd": 0.25, "total": 2.0}, 64), ({"ce": 0.5, "kd": 1.0, "total": 1.0}, 7)]
    steps += [({"ce": 2.0, "total": 3.0}, 10)]  # e.g. another method's terms
    for terms, rows in steps:
        sums.add({k: torch.tensor(v) for k, v in terms.items()}, rows)
    assert sums.total() == pytest.approx(2.0 * 64 + 1.0 * 7 + 3.0 * 10)
    got = {k: float(v) for k, v in sums.totals().items()}
    assert got == pytest.approx({"ce": 96 + 3.5 + 20, "kd": 16 + 7, "total": 128 + 7 + 30})


def test_config_key_follows_the_store_a_run_reads(tiny_run) -> None:
    """A run that reads a store cuts its batches from that store's chunks: precompute.chunk_rows
    in the config (which a finished store of the same inputs does not follow) is not its block
    layout, and a store of the same inputs with other chunks is another run."""
    from pipeline.distill import config_key
    from storage import open_store

    config = tiny_run.config("distill.method=kd")
    with open_store(config.store_path) as store:
        rows = store.layout.chunk_rows
    stale = tiny_run.config("distill.method=kd", f"precompute.chunk_rows={rows * 2}")
    assert config_key(stale) == config_key(config)
    other = tiny_run.config("distill.method=kd", f"distill.store={tiny_run.store32}")
    with open_store(tiny_run.store32) as store:
        assert store.layout.encoding != config.precompute.encoding
    assert config_key(other) != config_key(config)
