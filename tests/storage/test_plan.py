"""``plan`` against a real zarr store: its bytes (but the JSON metadata) and its files exactly.

It had counted a view's last chunk at its rows, where zarr stores it padded to whole chunk rows
(10,000 rows in 8,192-row chunks: 0.9 MiB planned, 1.4 MiB on disk), and guessed the metadata
files (33 for 22).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from storage import create_store
from storage.layout import plan


@pytest.mark.parametrize(
    ("n", "c", "v", "encoding", "width", "sizes"),
    [
        (10000, 10, 2, "float16", 3, {}),  # one full chunk and a padded one a view
        (1000, 37, 3, "int8", 3, {"chunk_rows": 64, "chunks_per_shard": 2}),
        (1000, 37, 3, "topk", 0, {"chunk_rows": 64, "chunks_per_shard": 3}),
        (300, 5, 1, "bfloat16", 0, {"chunk_rows": 64, "chunks_per_shard": 4}),
    ],
)
def test_plan_is_what_zarr_writes(tmp_path, n, c, v, encoding, width, sizes):
    path = str(tmp_path / "s.zarr")
    rng = np.random.default_rng(0)
    store = create_store(path, n, c, v, encoding=encoding, view_param_width=width,
                         labels=np.zeros(n, np.int64), **sizes)  # fmt: skip
    for view, a, b in store.missing_shards():
        params = np.zeros((b - a, width), np.int16) if width else None
        store.write(view, a, rng.standard_normal((b - a, c)).astype(np.float32), params)
    layout = store.layout
    store.close()
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    data = [f for f in files if not f.endswith(("zarr.json", ".writer.lock"))]
    expected = plan(layout)
    assert expected["files"] == len(files)
    assert expected["disk_bytes"] == sum(os.path.getsize(f) for f in data)
