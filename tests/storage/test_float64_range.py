"""Finite float64 logits beyond float32's range are refused as such (every encoding starts from
float32), not cast to inf with numpy's overflow warning and then called "NaN or inf"."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from storage import BadWriteError, create_store


@pytest.mark.parametrize("encoding", ["float32", "float16", "topk"])
def test_float64_beyond_float32_is_named(tmp_path, encoding):
    x = np.zeros((4, 3))
    x[1, 0], x[3, 2] = 1e39, -4e38
    with create_store(str(tmp_path / "s.zarr"), 4, 3, encoding=encoding, topk=1) as store:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "overflow encountered in cast"
            with pytest.raises(BadWriteError, match=r"beyond float32's range .* in rows 1, 3: "):
                store.write(0, 0, x)
        assert not store.done.any()
        x[1, 0], x[3, 2] = np.inf, 3e38  # inf is still inf; 3e38 fits float32
        with pytest.raises(BadWriteError, match=r"1 row\(s\) hold NaN or inf logits \(rows 1\)"):
            store.write(0, 0, x)
        x[1, 0] = 2.0
        if encoding == "float32":
            store.write(0, 0, x)
            assert store.read(np.arange(4))[3, 2] == np.float32(3e38)
