from __future__ import annotations

from tests.storage.conformance import LogitStoreTests


class TestZarrLogitStore(LogitStoreTests):
    backend = "zarr"
    suffix = ".zarr"
