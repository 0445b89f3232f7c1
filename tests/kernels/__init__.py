"""Tests of the loss kernels. On a machine without CUDA the fused Triton kernels run through
triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports them);
on a CUDA machine they are compiled for the GPU and `python -m tests.gpu.check_kernels` checks
them there, so the CPU-tensor tests below step aside."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch


def require_triton() -> None:
    """triton is a test dependency on Linux (`make setup` installs it): its absence there is a
    broken set-up, not a reason to leave the kernels untested."""
    if importlib.util.find_spec("triton") is not None:
        return
    if sys.platform.startswith("linux"):
        pytest.fail("triton is not installed: run `make setup` (the test extra installs it)")
    pytest.skip(f"triton has no build for {sys.platform}: the fused kernels are Linux-only")


def require_interpreter() -> None:
    """Skip only where the kernels are rightly compiled for a GPU; anywhere else, kernels that
    are not interpreted mean the tests would silently test nothing, which is a failure."""
    require_triton()
    if importlib.import_module("pipeline.kernels.triton_common").interpreted():
        return
    if torch.cuda.is_available():
        pytest.skip(
            "CUDA machine: the kernels are compiled for the GPU; "
            "`python -m tests.gpu.check_kernels` checks them there"
        )
    pytest.fail(
        "TRITON_INTERPRET was not 1 when the Triton kernels were imported "
        "(tests/conftest.py sets it first), so they cannot run on the CPU here"
    )
