"""Shared fixtures: the real Fashion-MNIST files (Debian's dataset-fashion-mnist package)."""

from __future__ import annotations

import os

import torch

# Without CUDA, the fused Triton kernels run through triton's interpreter. triton decides when a
# kernel module is first imported, so this is set here, before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import atexit
import shutil
import tempfile

# Image folders' file digests are cached (pipeline.datasets.digests) in a folder of the session,
# not the user's ~/.cache; the subprocesses the tests start inherit it.
if "LOGITBANK_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="logitbank-test-cache-")
    os.environ["LOGITBANK_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, True)
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline.datasets import FASHION_MNIST_DIR

_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in _FILES)


def _apt_install() -> str:
    """Try to install the package; '' on success, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so the test set-up cannot install it"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
    # Try the cached package lists first; refresh them only if the package is unknown there.
    for cmd in (install, ["apt-get", "update", "-q"], install):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if done.returncode == 0 and cmd is install:
            return ""
    tail = (done.stderr or done.stdout).strip().splitlines()
    return f"apt-get failed: {tail[-1] if tail else done.returncode}"


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The folder of the four Fashion-MNIST IDX files; installs them (root + apt) or skips."""
    folder = Path(FASHION_MNIST_DIR)
    if _complete(folder):
        return folder
    reason = _apt_install()
    if not reason and _complete(folder):
        return folder
    pytest.skip(
        "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist "
        f"({reason or f'installed, but the files are not in {folder}'})"
    )


# Property tests draw the same examples on every run (CI must not pass or fail by chance); set
# HYPOTHESIS_PROFILE=explore to draw fresh ones while developing.
settings.register_profile("logitbank", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "logitbank"))
