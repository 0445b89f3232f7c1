"""The tiny run every distill test trains from, built once per session (about 15 s on 2 cores).

teacher → export → precompute with stages/configs/tiny.yaml (float16 store, 2 views, 32-row
chunks), run through the real command line in this process, and a float32 store of the same
teacher beside it for the offline/online equivalence test. The teacher trains on clean images
for 8 epochs so that its logits carry something for the students to learn.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.config import Config, load_config
from tests.torch_threads import one_thread as one_torch_thread

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "stages" / "configs" / "tiny.yaml"
TEACHER = (
    "teacher.epochs=8",
    "teacher.milestones=[6]",
    "teacher.augment=false",
    "teacher.batch_size=32",
)
# Small batches and few epochs: each student trains in well under a second.
STUDENT = (
    "distill.epochs=4",
    "distill.batch_size=16",
    "distill.milestones=[3]",
    "distill.device=cpu",  # bit-exact comparisons; test_cuda.py runs the same on CUDA
)
#: Environment of the subprocesses the tests start (see ``one_thread``).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in a real process, one thread, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ONE_THREAD},
        timeout=300,
    )


@dataclass(frozen=True)
class TinyRun:
    run_dir: Path
    """teacher.pt, teacher.onnx and store.zarr (float16, V = 2)."""
    store32: Path
    """The same teacher's logits in float32."""

    def sets(self, *overrides: str) -> list[str]:
        """``--set`` values for a student trained in this run."""
        return [f"run_dir={self.run_dir}", *TEACHER, *STUDENT, *overrides]

    def config(self, *overrides: str) -> Config:
        return load_config(TINY, self.sets(*overrides))

    def argv(self, *overrides: str) -> list[str]:
        """Command-line arguments of ``python -m pipeline distill`` for this run."""
        args = ["distill", "--config", str(TINY), "--quiet"]
        for item in self.sets(*overrides):
            args += ["--set", item]
        return args


def _stage(stage: str, sets: list[str]) -> None:
    argv = [stage, "--config", str(TINY), "--quiet"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0, f"{stage} failed"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with tiny batches on a busy 2-core machine, two OpenMP threads spin
    against each other and run several times slower. Subprocesses the tests start do the same,
    so that runs compared bit for bit use the same thread count."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    root = tmp_path_factory.mktemp("distill")
    run, run32 = root / "run", root / "run32"
    with one_torch_thread():  # see one_thread
        for stage in ("teacher", "export", "precompute"):
            _stage(stage, [f"run_dir={run}", *TEACHER])
    run32.mkdir()
    for name in ("teacher.pt", "teacher.onnx", "teacher.onnx.parity.json"):
        shutil.copy(run / name, run32 / name)
    _stage("precompute", [f"run_dir={run32}", *TEACHER, "precompute.encoding=float32"])
    return TinyRun(run, run32 / "store.zarr")
