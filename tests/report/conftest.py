"""A tiny store for the sweep and report tests, built once per session (about 10 s on 2 cores).

The approach of tests/distill/conftest.py (teacher → export → precompute through the real command
line, in this process, one intra-op thread) with tiny.yaml's own short teacher: these tests
compare what the report says with what the students wrote, not how well they learned.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.__main__ import main
from tests.distill.conftest import ONE_THREAD, REPO, TINY, one_thread
from tests.torch_threads import one_thread as one_torch_thread

__all__ = ["ONE_THREAD", "REPO", "TINY", "argv", "one_thread"]

#: Every student on the CPU: the same numbers on any machine, and nothing waits for a GPU.
STUDENT = ("distill.device=cpu",)


def argv(stage: str, run_dir: Path, *overrides: str) -> list[str]:
    """Arguments of ``python -m pipeline STAGE`` with tiny.yaml in ``run_dir``."""
    args = [stage, "--config", str(TINY), "--quiet"]
    for item in (f"run_dir={run_dir}", *STUDENT, *overrides):
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with teacher.pt, teacher.onnx and store.zarr (float16, V = 2), no students."""
    run = tmp_path_factory.mktemp("report") / "run"
    with one_torch_thread():  # see tests/distill/conftest.py's one_thread
        for stage in ("teacher", "export", "precompute"):
            assert main(argv(stage, run)) == 0, f"{stage} failed"
    return run
