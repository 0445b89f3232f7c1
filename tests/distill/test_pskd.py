"""PS-KD's self-teacher store: written during epoch e, read in epoch e + 1, never N × C in RAM."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipeline.distill import output_dir, train_student
from pipeline.distill_data import EpochBatches
from pipeline.distill_pskd import FINGERPRINT_KIND, BlockWriter, HostCopies
from pipeline.errors import UserError
from pipeline.models import read_checkpoint
from storage import create_store, open_store
from storage.sampler import BlockSampler


def test_block_writer_writes_whole_blocks_and_buffers_little(tmp_path):
    n, classes, block = 200, 5, 16
    logits = np.random.default_rng(0).standard_normal((n, classes)).astype(np.float32)
    store = create_store(
        tmp_path / "s.zarr", n, classes, 1, "float32", chunk_rows=block, chunks_per_shard=1
    )
    writer = BlockWriter(store, block)
    sampler = BlockSampler(num_samples=n, block_rows=block, window=3, seed=1)
    most = 0
    for group, perm in sampler.windows(0):  # the order training visits rows in
        rows = np.concatenate([np.arange(a, b) for a, b, _ in group])[perm]
        for part in np.array_split(rows, 5):
            writer.add(part, logits[part])
            most = max(most, len(writer._pending))
    writer.close()
    assert most <= 3  # at most one window of blocks pending, never the whole epoch
    with open_store(tmp_path / "s.zarr") as done:
        assert done.complete
        np.testing.assert_array_equal(done.read(np.arange(n)), logits)


def test_block_writer_refuses_an_unfinished_epoch(tmp_path):
    store = create_store(
        tmp_path / "s.zarr", 64, 3, 1, "float32", chunk_rows=16, chunks_per_shard=1
    )
    writer = BlockWriter(store, 16)
    writer.add(np.arange(20), np.zeros((20, 3), np.float32))
    with pytest.raises(UserError, match=r"block\(s\) \[1\] incomplete"):
        writer.close()


def test_pskd_reads_last_epochs_own_logits(tiny_run, monkeypatch):
    config = tiny_run.config("distill.method=pskd", "distill.epochs=3", "distill.name=pskd-spy")
    out = output_dir(config)
    checked = {}
    real_call = EpochBatches.__call__

    def spy(self, epoch, previous=None):
        # Epoch e reads the store written in e - 1: batch.previous holds exactly its rows.
        assert (previous is None) == (epoch == 0)
        if previous is not None:
            assert previous.store.path == str(out / "pskd" / f"epoch{epoch - 1:04d}.zarr")
            assert previous.store.fingerprint["kind"] == FINGERPRINT_KIND
            assert previous.store.fingerprint["epoch"] == epoch - 1
        for batch in real_call(self, epoch, previous):
            if previous is not None:
                stored = previous.store.read(batch.indices)
                assert np.isfinite(stored).all()
                assert torch.equal(batch.previous, torch.from_numpy(stored))
                checked[epoch] = checked.get(epoch, 0) + len(batch.indices)
            yield batch

    monkeypatch.setattr(EpochBatches, "__call__", spy)
    path = train_student(config, progress=False)
    assert checked == {1: 256, 2: 256}
    # Only the last epoch's store is left; nothing N × C went into the checkpoint.
    assert sorted(p.name for p in (out / "pskd").iterdir()) == ["epoch0002.zarr"]
    with open_store(out / "pskd" / "epoch0002.zarr") as last:
        assert last.complete and last.num_views == 1 and last.encoding == "float32"
    ckpt = read_checkpoint(path)
    assert ckpt.extra["method_state"] == {}
    assert not any(t.shape == (256, 10) for t in _tensors([ckpt.state_dict, ckpt.extra]))


class Stop(Exception):
    pass


def _tensors(obj):
    """Every tensor inside nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _stopped_in_epoch_1(tiny_run, name: str):
    """(config, run folder) of a 2-epoch PS-KD run stopped at its second epoch's first step:
    epoch 0's self-teacher store written, the state saved."""
    config = tiny_run.config("distill.method=pskd", "distill.epochs=2", f"distill.name={name}")

    def stop(epoch, step, terms):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_student(config, progress=False, on_step=stop)
    return config, output_dir(config)


def test_a_missing_self_teacher_store_is_refused_on_resume(tiny_run):
    config, out = _stopped_in_epoch_1(tiny_run, "pskd-gone")
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 0
    assert not any(t.shape == (256, 10) for t in _tensors(state))  # no P_prev in the state
    shutil.rmtree(out / "pskd" / "epoch0000.zarr")
    with pytest.raises(UserError, match="epoch0000.zarr of epoch 1 is missing"):
        train_student(config, progress=False)


@pytest.mark.parametrize("damage", ["chunk", "metadata"])
def test_a_damaged_self_teacher_store_says_to_train_afresh(tiny_run, damage):
    """A damaged self-teacher store is the run's own file: the fix is to train the student
    afresh, not the teacher store's (``verify --repair`` and precompute, which never writes it)."""
    config, out = _stopped_in_epoch_1(tiny_run, f"pskd-damaged-{damage}")
    store = out / "pskd" / "epoch0000.zarr"
    if damage == "chunk":
        target = max((p for p in (store / "logits" / "c").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)  # fmt: skip
    else:
        target = store / "zarr.json"
    target.write_bytes(target.read_bytes()[:-9])
    with pytest.raises(UserError) as caught:
        train_student(config, progress=False)
    message = str(caught.value)
    assert message.startswith(f"PS-KD self-teacher store {store} ")
    assert message.endswith(f": delete {out} to train this student afresh")
    assert "precompute" not in message and len(message.splitlines()) == 1


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA"))],
)  # fmt: skip
def test_host_copies_hand_every_steps_rows_over_in_order(device):
    """On CUDA a step's rows arrive later (copied without a sync), the last ones at flush; the
    rows are the step's own even though the device tensor is overwritten meanwhile."""
    got = []
    copies = HostCopies(lambda idx, rows: got.append((idx, rows.copy())), torch.device(device))
    sent = []
    buf = torch.empty((8, 5), device=device)
    for step, size in enumerate([8, 8, 3, 8]):  # a short batch between full ones
        idx = np.arange(size) + 10 * step
        buf[:size] = torch.arange(size * 5, dtype=torch.float32, device=device).view(size, 5) + step
        copies.add(idx, buf[:size])
        sent.append((idx, buf[:size].cpu().numpy().copy()))
        assert len(got) == step + 1 if device == "cpu" else len(got) <= step
    copies.flush()
    assert len(got) == len(sent)
    for (i1, r1), (i2, r2) in zip(got, sent):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(r1, r2)


class _Event:
    """A stand-in for a CUDA event: done when the test says so; counts the waits on it."""

    waits = 0

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        _Event.waits += 1
        self.done = True


class _RingOnCPU(HostCopies):
    """HostCopies' CUDA bookkeeping on the CPU: plain buffers, events the test completes."""

    def __init__(self, sink, ring: int) -> None:
        super().__init__(sink, torch.device("cpu"), ring)
        self.cuda = True
        self.events: list[_Event] = []

    def _buffer(self, rows: int, cols: int) -> torch.Tensor:
        return torch.empty((rows, cols), dtype=torch.float32)

    def _record(self, logits: torch.Tensor) -> _Event:
        self.events.append(_Event())
        return self.events[-1]


def test_host_copies_wait_only_when_every_buffer_is_pending():
    """The ring: finished copies are handed over at the next add, oldest first; the host waits
    (for the oldest) only when all ``ring`` buffers hold rows not handed over, so a buffer is
    never overwritten before its rows reached the sink; a wider batch reallocates after a
    flush."""
    got = []
    copies = _RingOnCPU(lambda idx, rows: got.append((idx.copy(), rows.copy())), ring=3)
    _Event.waits = 0
    sent = []

    def add(step: int, size: int = 4) -> None:
        idx = np.arange(size) + 100 * step
        logits = torch.full((size, 5), float(step))
        copies.add(idx, logits)
        sent.append((idx, logits.numpy().copy()))

    for step in range(3):  # the GPU is slow: no copy finishes
        add(step)
    assert got == [] and _Event.waits == 0
    add(3)  # all 3 buffers pending: wait for the oldest, then reuse its buffer
    assert [int(i[0]) for i, _ in got] == [0] and _Event.waits == 1
    copies.events[1].done = copies.events[2].done = True
    add(4)  # steps 1 and 2 finished meanwhile: handed over without a wait
    assert [int(i[0]) for i, _ in got] == [0, 100, 200] and _Event.waits == 1
    add(5, size=7)  # a larger batch: the pending rows first, then new buffers
    copies.flush()
    assert [int(i[0]) for i, _ in got] == [0, 100, 200, 300, 400, 500]
    for (i1, r1), (i2, r2) in zip(got, sent, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(r1, r2)


@pytest.mark.parametrize(
    ("message", "cause"),
    [
        ("store P: the metadata of its logits array (logits/zarr.json) is unreadable (E: x): "
         "delete the store and run precompute again",
         "the metadata of its logits array (logits/zarr.json) is unreadable (E: x)"),
        ("store P is damaged (HDF5 cannot read its metadata: OSError: x): delete it and run "
         "precompute again", "is damaged (HDF5 cannot read its metadata: OSError: x)"),
        ("store P lacks the attribute(s) num_views: its metadata is damaged; run precompute "
         "again into a new path", "lacks the attribute(s) num_views: its metadata is damaged"),
        ("P is not a logit store: give the path of a store made by precompute (a .zarr "
         "directory or an .h5 file)", "is not a logit store"),
        ("store P: reading view 0 chunk(s) 3 failed (ValueError: truncated): run `python -m "
         "pipeline verify --repair P` (...) and rerun precompute, or delete the store",
         "reading view 0 chunk(s) 3 failed (ValueError: truncated)"),
    ],
)  # fmt: skip
def test_a_self_teacher_store_error_keeps_its_cause_not_its_fix(message, cause):
    """What the store says went wrong goes into the PS-KD line; its fix (precompute's) and its
    path (said once already) do not."""
    from pipeline.distill_pskd import _cause
    from storage import StoreCorruptError

    path = "/run/distill/x/pskd/epoch0000.zarr"
    assert _cause(StoreCorruptError(message.replace("P", path)), path) == cause.replace("P", path)


def test_a_run_stopped_under_an_earlier_key_resumes_from_its_self_teacher_store(tiny_run):
    """A PS-KD run stopped before its config key changed form (its state and self-teacher
    store record an older key, one ``accepted_keys`` still takes) resumes: its state was
    accepted, its store refused ("made from other inputs"), so no PS-KD run could resume."""
    import zarr

    from pipeline.distill import accepted_keys, config_key

    config, out = _stopped_in_epoch_1(tiny_run, "pskd-older-key")
    older = config_key(config, located=True)  # the form before 2026-11-27: data.path in it
    assert older in accepted_keys(config) and older != config_key(config)
    state = torch.load(out / "state.pt", weights_only=True)
    torch.save({**state, "config_hash": older}, out / "state.pt")
    group = zarr.open_group(str(out / "pskd" / "epoch0000.zarr"), mode="r+")
    group.attrs["fingerprint"] = {**group.attrs["fingerprint"], "config_hash": older}
    train_student(config, progress=False)
    assert (out / "student.pt").is_file()
