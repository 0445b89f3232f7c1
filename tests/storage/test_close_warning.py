"""Rows of a shard left unfinished at close are not kept (a shard is written, and marked done,
only whole): the warning counts them, and the whole chunks among them, so nobody takes a close
for a flush of every chunk."""

from __future__ import annotations

import numpy as np
import pytest

from storage import StoreWarning, create_store, open_store


@pytest.mark.parametrize("backend, suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_close_counts_the_rows_it_does_not_keep(tmp_path, backend, suffix):
    path = str(tmp_path / f"s{suffix}")
    x = np.ones((40, 3), np.float32)
    with create_store(path, 40, 3, 2, chunk_rows=4, chunks_per_shard=4, backend=backend) as store:
        store.write(0, 0, x[:26])  # shard 0 whole; shard 1: 10 of its 16 rows, 2 whole chunks
        store.write(1, 35, x[:5])  # the last shard (32..39): 5 of its 8 rows, 1 whole chunk
        with pytest.warns(StoreWarning) as caught:
            store.close()
    message = str(caught[0].message)
    assert (
        "15 row(s) written to unfinished shards not kept at close (view 0 shard 1: 10 of 16 "
        "rows; view 1 shard 2: 5 of 8 rows; 3 whole chunk(s) among them): a shard is written "
        "and marked done only once all its rows are there"
    ) in message
    with open_store(path) as store:
        assert store.done[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
        assert not store.done[1].any()


def test_precompute_reports_the_warning_in_one_line(tmp_path, capfd):
    """An interrupted precompute closes its store with rows of unfinished shards: one line on
    stderr ("warning: ..."), not Python's warning with its file, line and source echoed."""
    import warnings

    from pipeline.precompute import _close_quietly

    store = create_store(str(tmp_path / "s.zarr"), 40, 3, chunk_rows=4, chunks_per_shard=4)
    store.write(0, 0, np.ones((6, 3), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing else may escape as a Python warning
        _close_quietly(store)
    err = capfd.readouterr().err
    assert err.startswith("warning: store ") and err.count("\n") == 1
    assert "6 row(s) written to unfinished shards not kept at close" in err
