"""Import ``pipeline.kernels`` without the store package and its dependencies.

``pipeline.errors`` imports ``storage.errors`` (for ``StoreError``), and importing any submodule
of ``storage`` first runs ``storage/__init__.py``, which imports the store (numpy, the encodings,
and each backend whose library imports: zarr with numcodecs, h5py). The GPU image has h5py but not
zarr, numcodecs or dask, and ``storage/`` changes under other work; the loss kernels need none of
it. ``isolate_storage()`` registers ``storage`` as a bare package over the real directory (its
``__init__`` not run), so ``storage.errors`` loads on its own, with the real ``StoreError``.
Call it before anything imports ``pipeline``; only scripts that never use the store itself
(``tests.gpu.check_kernels``, ``tests.benchmarks.bench_losses``) may.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

#: Packages the GPU scripts must not import (absent from the device image, or slow to import).
HEAVY = ("dask", "h5py", "numcodecs", "onnxruntime", "zarr")


def isolate_storage() -> None:
    """Make ``import storage.errors`` skip ``storage/__init__.py`` (no-op once storage is in)."""
    if "storage" in sys.modules:
        return
    root = Path(__file__).resolve().parents[2] / "storage"
    spec = importlib.machinery.ModuleSpec("storage", None, is_package=True)
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(root)]
    sys.modules["storage"] = module


def heavy_modules() -> list[str]:
    """The ``HEAVY`` packages imported so far in this process."""
    return sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
