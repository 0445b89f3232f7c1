from __future__ import annotations

from tests.storage.conformance import LogitStoreTests


class TestH5LogitStore(LogitStoreTests):
    backend = "hdf5"
    suffix = ".h5"
