"""Bad input, tried: every row of README's bad-input table is one case here, run for real.

Each case runs the real command line (``pipeline.__main__.main`` in this process, or
``python -m pipeline`` in a subprocess where what matters is what reaches a real terminal) on a
copy of one tiny run (teacher → export → precompute, built once per module) and checks: exit
status 2, stderr exactly one line, ``error: `` and the table's message, no traceback anywhere,
and every file that was there before byte for byte the same after.

The table in README.md is generated from ``CASES`` (``python -m tests.test_bad_inputs
--markdown``) and a test checks that README holds exactly that table, so the two cannot drift.
In a message, ``RUN`` stands for the run folder of the case and ``…`` for a part that varies
(hashes, a library's own words, long lists).

Faults of the environment are injected, not real: the tests run as root (permissions do not stop
root) and cannot mount a full or read-only file system, so the write call itself raises the
OSError (ENOSPC, EROFS, EACCES) for paths under the run folder — by monkeypatching in this
process, or by a ``sitecustomize.py`` on ``PYTHONPATH`` in a subprocess, which also makes a
dependency (zarr, onnxruntime, distributed) fail to import.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "stages" / "configs" / "tiny.yaml"
README = REPO / "README.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
#: What every config-driven case sets: the tiny run, in the case's own folder.
BASE_SETS = ("teacher.epochs=1", "distill.device=cpu", "distill.epochs=1")
MARKER = "PWNED"  # what a malicious pickle would create in the case folder, if it ran
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def stage(name: str, *sets: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """argv of a config-driven stage in the case's run folder ``{run}``."""
    argv = [name, "--config", "{tiny}", "--quiet"]
    for item in ("run_dir={run}", *BASE_SETS, *sets):
        argv += ["--set", item]
    return (*argv, *extra)


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    what: str
    """The bad input, for the table."""
    argv: tuple[str, ...]
    """Command-line arguments; ``{run}`` is the case's run folder, ``{tiny}`` tiny.yaml."""
    message: str
    """The message after ``error: ``; ``RUN`` = the run folder, ``…`` = varies."""
    prepare: Callable[[Path], None] | None = None
    """Makes the bad input in the run folder (a copy of the tiny run)."""
    fault: tuple[str, str, str] | None = None
    """(errno name, call, path under the run folder): that call raises that OSError there."""
    block: str | None = None
    """A module made unimportable (subprocess only)."""
    subprocess: bool = False
    rerun_ok: bool = False
    """After the failure, the same command without the fault succeeds (it resumes)."""
    env: dict[str, str] | None = None
    """Environment variables set for the command."""


# ---- how each bad input is made ------------------------------------------------------------
def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda run: (run / name).write_text(text)


def _append(name: str, data: bytes) -> Callable[[Path], None]:
    def go(run: Path) -> None:
        with open(run / name, "ab") as f:
            f.write(data)

    return go


def _remove(*names: str) -> Callable[[Path], None]:
    def go(run: Path) -> None:
        for name in names:
            target = run / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    return go


def _then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def go(run: Path) -> None:
        for step in steps:
            step(run)

    return go


def _evil(marker: Path) -> object:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Evil()


def _fashion(files: dict[str, bytes]) -> Callable[[Path], None]:
    def go(run: Path) -> None:
        from pipeline.datasets import write_idx

        folder = run / "fm"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 64), ("t10k", 32)):
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, np.uint8))
        for name, data in files.items():
            path = folder / name
            data = data or path.read_bytes()[:1000]  # b"": the file cut short
            path.write_bytes(data)
            if name.endswith(".gz"):
                (folder / name[:-3]).unlink()

    return go


def _fashion_labels_short(run: Path) -> None:
    from pipeline.datasets import write_idx

    _fashion({})(run)
    write_idx(run / "fm" / "train-labels-idx1-ubyte", np.zeros(60, np.uint8))


def _fashion_without_test(run: Path) -> None:
    """Fashion-MNIST without its t10k files, a diverged student of another config, sweep.done."""
    _fashion({})(run)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (run / "fm" / name).unlink()
    hot = run / "distill" / "hot"
    hot.mkdir(parents=True)
    (hot / "config.yaml").write_text("distill: {lr: 100000000.0}\n")
    (hot / "diverged.json").write_text(json.dumps({"config_hash": "other", "record": {}}))
    (run / "sweep.done").write_text("done\n")


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda run: np.savez(run / "data.npz", **arrays)


def _cifar_evil(run: Path) -> None:
    folder = run / "cifar-10-batches-py"
    folder.mkdir()
    payload = pickle.dumps({"data": _evil(run / MARKER)})
    for name in ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))):
        (folder / name).write_bytes(payload)


def _teacher(make: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda run: make(run / "teacher.pt")


def _torch_save(obj_of: Callable[[Path], object], name: str) -> Callable[[Path], None]:
    def go(run: Path) -> None:
        import torch

        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj_of(run), path)

    return go


def _cut(name: str) -> Callable[[Path], None]:
    def go(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])

    return go


def flip_a_tensor_bit(path: Path) -> None:
    """One flipped bit in the middle of the largest member (a tensor's bytes) of a torch.save
    zip: ``torch.load`` alone would load another value without a word."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[header + 26 : header + 30])
    data[header + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _reseal_parity(run: Path) -> None:
    """Make the parity record name the ONNX file as it is now (a file someone else made)."""
    from pipeline.onnx_export import parity_path, sha256_file

    record = json.loads(parity_path(run / "teacher.onnx").read_text())
    record["onnx_sha256"] = sha256_file(run / "teacher.onnx")
    parity_path(run / "teacher.onnx").write_text(json.dumps(record))


def _onnx_garbage(run: Path) -> None:
    (run / "teacher.onnx").write_bytes(b"\x08\x07garbage" * 64)
    _reseal_parity(run)


def _onnx_external_outside(run: Path) -> None:
    """The teacher, its first weight moved to ``../secret.bin`` (outside the run folder)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(run / "teacher.onnx"))
    weight = model.graph.initializer[0]
    (run.parent / "secret.bin").write_bytes(weight.raw_data or b"\0" * 64)
    set_external_data(weight, location="../secret.bin")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    (run / "teacher.onnx").write_bytes(model.SerializeToString())
    _reseal_parity(run)


def _store_attrs(**changes: object) -> Callable[[Path], None]:
    """Edit the store's group attributes in zarr.json (a key set to None is removed)."""

    def go(run: Path) -> None:
        meta = run / "store.zarr" / "zarr.json"
        doc = json.loads(meta.read_text())
        for key, value in changes.items():
            if key == "onnx_sha256":
                doc["attributes"]["fingerprint"][key] = value
            elif value is None:
                del doc["attributes"][key]
            else:
                doc["attributes"][key] = value
        meta.write_text(json.dumps(doc))

    return go


def _unfinished(run: Path) -> None:
    import zarr

    zarr.open_group(str(run / "store.zarr"), mode="r+")["done"][1] = 0


def _not_a_store(run: Path) -> None:
    shutil.rmtree(run / "store.zarr")
    (run / "store.zarr").mkdir()
    (run / "store.zarr" / "notes.txt").write_text("my notes, not a store\n")


_KNOWN_TEACHER = "model, epochs, batch_size, lr, momentum, weight_decay, milestones, gamma, …"
_SETUP = "a dependency is missing (No module named {!r}): run `make setup` to install logitbank's requirements"  # noqa: E501

CASES: list[Case] = [
    # ---- configs ----
    Case("config-missing", "config", "`--config` names a file that does not exist",
         ("teacher", "--config", "{run}/nowhere.yaml"),
         "config file RUN/nowhere.yaml not found: give the path of a YAML config "
         "(e.g. stages/configs/default.yaml)"),
    Case("config-bad-yaml", "config", "a config that is not valid YAML",
         ("teacher", "--config", "{run}/bad.yaml"),
         "config file RUN/bad.yaml is not valid YAML (line 2): fix its syntax",
         prepare=_write("bad.yaml", "teacher: [1, 2\n")),
    Case("config-not-a-mapping", "config", "a YAML list instead of sections",
         ("teacher", "--config", "{run}/list.yaml"),
         "config file RUN/list.yaml must hold a mapping of sections, not list: configs are YAML "
         "(section: {key: value})",
         prepare=_write("list.yaml", "- teacher\n- export\n")),
    Case("config-code-tag", "config", "a YAML tag that would run code (`!!python/object/apply`)",
         ("teacher", "--config", "{run}/tag.yaml"),
         "config file RUN/tag.yaml is not valid YAML (line 1): fix its syntax",
         prepare=_write("tag.yaml", f"run_dir: !!python/object/apply:os.system ['touch {MARKER}']\n")),  # noqa: E501
    Case("config-duplicate-key", "config", "a key given twice in one section (YAML kept the "
         "last)", ("teacher", "--config", "{run}/twice.yaml"),
         "config file RUN/twice.yaml: key 'method' is given twice (line 3): keep one",
         prepare=_write("twice.yaml", "distill:\n  method: kd\n  method: dkd\n")),
    Case("config-folder", "config", "`--config` names a folder",
         ("teacher", "--config", "{run}"),
         "config file RUN is a folder, not a file: give the path of a YAML config "
         "(e.g. stages/configs/default.yaml)"),
    Case("config-unknown-key", "config", "an unknown key (a typo)",
         stage("teacher", "teacher.lrr=0.1"),
         f"unknown config key teacher.lrr: known keys in teacher are {_KNOWN_TEACHER}"),
    Case("config-wrong-type", "config", "a value of the wrong type",
         stage("teacher", "teacher.epochs=abc"),
         "teacher.epochs must be int, got 'abc'"),
    Case("config-out-of-range", "config", "a value out of range",
         stage("teacher", "augment.views=0"),
         "augment.views must be > 0, got 0"),
    Case("config-diverging-lr", "config", "a learning rate the student diverges at "
         "(`distill.lr=1e8`)", stage("distill", "distill.lr=1e8", "distill.name=hot"),
         "hot diverged: its loss became non-finite in epoch 1/1 (ce nan, kd nan, total nan); "
         "stopped with no student (metrics.jsonl shows the epoch, no state to resume): lower "
         "distill.lr or the method's loss weights, under another distill.name (or delete this "
         "run's folder)"),
    Case("config-diverging-teacher-lr", "config", "a learning rate the teacher diverges at "
         "(`teacher.lr=1e9`; it saved a teacher of NaN weights)",
         stage("teacher", "teacher.lr=1e9"),
         "the teacher diverged: its loss became non-finite in epoch 1/1 (train_loss nan); "
         "stopped with no teacher.pt (no state to resume): lower teacher.lr",
         prepare=_remove("teacher.pt")),
    Case("config-huge-number", "config", "a number past a float's range (`1` and 400 zeros)",
         stage("distill", "distill.lr=1" + "0" * 400),
         "distill.lr must be a finite number, got a 401-digit number"),
    Case("config-test-subset-zero", "config", "`data.test_subset=0` (it reached the records "
         "of teacher, export and precompute)", stage("teacher", "data.test_subset=0"),
         "data.test_subset must be > 0, got 0"),
    Case("config-options-name", "config", "`method_options` holding `name` (it trained that "
         "method under the other's label)",
         stage("distill", "distill.method_options={name: dkd}"),
         "method_options cannot hold 'name' (got 'dkd'): set the method itself (distill.method, "
         "or a sweep run's method) instead"),
    Case("config-bad-choice", "config", "a value not among the choices",
         stage("teacher", "distill.device=tpu"),
         "distill.device must be one of auto, cpu, cuda, got 'tpu'"),
    Case("config-bad-override", "config", "`--set` without `=value`",
         ("teacher", "--config", "{tiny}", "--set", "teacher.epochs"),
         "override 'teacher.epochs' must look like section.key=value"),
    # ---- command-line arguments ----
    Case("cli-unknown-stage", "CLI", "an unknown stage", ("frobnicate",),
         "python -m pipeline: argument STAGE: invalid choice: 'frobnicate' (choose from …); "
         "see `python -m pipeline --help`", subprocess=True),
    Case("cli-not-a-number", "CLI", "a number argument that is not a number",
         ("plan", "-N", "ten", "-C", "10"),
         "python -m pipeline plan: argument --num-samples/-N: invalid int value: 'ten'; "
         "see `python -m pipeline plan --help`", subprocess=True),
    Case("cli-missing-argument", "CLI", "a required argument left out", ("verify",),
         "python -m pipeline verify: the following arguments are required: store; "
         "see `python -m pipeline verify --help`"),
    Case("cli-plan-out-of-range", "CLI", "`plan` with no rows", ("plan", "-N", "0", "-C", "10"),
         "num_samples must be > 0, got 0: give the dataset's row count"),
    Case("cli-negative-workers", "CLI", "`--workers -1`",
         stage("precompute", extra=("--workers", "-1")), "precompute.workers must be >= 0, got -1"),
    Case("cli-bad-scheduler", "CLI", "`--scheduler` that is not an address",
         stage("precompute", extra=("--scheduler", "nonsense")),
         "precompute.scheduler must be a dask scheduler address like tcp://host:8786, "
         "got 'nonsense'"),
    Case("cli-zero-nproc", "CLI", "`distill --nproc 0`",
         stage("distill", extra=("--nproc", "0")), "--nproc must be at least 1, got 0"),
    # ---- datasets ----
    Case("data-missing", "dataset", "Fashion-MNIST files not there",
         stage("teacher", "data.kind=fashion_mnist", "data.path={run}/nowhere", "data.options={}"),
         "Fashion-MNIST file train-images-idx3-ubyte(.gz) not found in RUN/nowhere; "
         "run `apt-get install dataset-fashion-mnist` or set the data path"),
    Case("data-idx-truncated", "dataset", "an IDX file cut short",
         stage("teacher", "data.kind=fashion_mnist", "data.path={run}/fm", "data.options={}"),
         "RUN/fm/train-images-idx3-ubyte: 1000 bytes but its IDX header (64, 28, 28) needs "
         "50192; the file is truncated or corrupt — re-download or reinstall it",
         prepare=_fashion({"train-images-idx3-ubyte": b""})),
    Case("data-idx-not-idx", "dataset", "a file that is not IDX at all",
         stage("teacher", "data.kind=fashion_mnist", "data.path={run}/fm", "data.options={}"),
         "RUN/fm/train-images-idx3-ubyte: not an IDX file (bad magic number 3c68746d)",
         prepare=_fashion({"train-images-idx3-ubyte": b"<html>404 not found</html>"})),
    Case("data-idx-gzip-corrupt", "dataset", "a corrupt `.gz` IDX file",
         stage("teacher", "data.kind=fashion_mnist", "data.path={run}/fm", "data.options={}"),
         "RUN/fm/train-images-idx3-ubyte.gz: unreadable IDX file (…); re-download or reinstall it",
         prepare=_fashion({"train-images-idx3-ubyte.gz": b"\x1f\x8b\x08\x00garbage"})),
    Case("data-idx-label-count", "dataset", "fewer labels than images",
         stage("teacher", "data.kind=fashion_mnist", "data.path={run}/fm", "data.options={}"),
         "RUN/fm/train-labels-idx1-ubyte: expected 64 uint8 labels, got uint8 (60,); the files do "
         "not belong together", prepare=_fashion_labels_short),
    Case("data-test-files-missing", "dataset", "a Fashion-MNIST folder without its test files, "
         "beside a diverged student's folder (its record was deleted, its config rewritten)",
         stage("distill", "data.kind=fashion_mnist", "data.path={run}/fm", "data.options={}",
               "distill.method=ce", "distill.name=hot"),
         "Fashion-MNIST file t10k-images-idx3-ubyte(.gz) not found in RUN/fm; run `apt-get "
         "install dataset-fashion-mnist` or set the data path", prepare=_fashion_without_test),
    Case("sweep-test-files-missing", "dataset", "the same for a sweep (each run failed, exit 1, "
         "sweep.done deleted)",
         stage("sweep", "data.kind=fashion_mnist", "data.path={run}/fm", "data.options={}",
               "sweep.runs=[{method: ce, name: fm}]"),
         "Fashion-MNIST file t10k-images-idx3-ubyte(.gz) not found in RUN/fm; run `apt-get "
         "install dataset-fashion-mnist` or set the data path", prepare=_fashion_without_test),
    Case("data-array-missing", "dataset", "an `.npz` path that does not exist",
         stage("teacher", "data.kind=array", "data.path={run}/nope.npz", "data.options={}"),
         "array dataset RUN/nope.npz does not exist; set the data path"),
    Case("data-array-empty", "dataset", "an empty dataset (0 images)",
         stage("teacher", "data.kind=array", "data.path={run}/data.npz", "data.options={}"),
         "RUN/data.npz: the train split holds no images; give a dataset with at least one image",
         prepare=_npz(images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64))),
    Case("data-array-pickled", "dataset", "an `.npz` holding a pickled object array",
         stage("teacher", "data.kind=array", "data.path={run}/data.npz", "data.options={}"),
         "array 'images' is unreadable (Object arrays cannot be loaded when allow_pickle=False); "
         "store plain numeric arrays",
         prepare=_npz(images=np.array([{"a": 1}] * 3, dtype=object), labels=np.zeros(3, int))),
    Case("data-cifar-malicious", "dataset", "a CIFAR batch whose pickle would run code",
         stage("teacher", "data.kind=cifar10", "data.path={run}/cifar-10-batches-py",
               "data.options={}"),
         "RUN/cifar-10-batches-py/…: not a valid CIFAR pickle (UnpicklingError: "
         "refusing to load global posix.system); use the official files", prepare=_cifar_evil),
    Case("data-class-count", "dataset", "a dataset with 7 classes, the store has 10",
         stage("distill", "data.options.num_classes=7"),
         "store RUN/store.zarr holds 10 classes but the dataset has 7: use the store made for "
         "this dataset"),
    # ---- checkpoints ----
    Case("ckpt-missing", "checkpoint", "no teacher checkpoint", stage("export"),
         "checkpoint RUN/teacher.pt not found; run the teacher stage or fix the path",
         prepare=_remove("teacher.pt")),
    Case("ckpt-truncated", "checkpoint", "a checkpoint cut short", stage("export"),
         "RUN/teacher.pt is truncated or corrupt (…); re-create it", prepare=_cut("teacher.pt")),
    Case("ckpt-bit-flip", "checkpoint", "one flipped bit inside the checkpoint's weights",
         stage("export"),
         "RUN/teacher.pt is truncated or corrupt (the bytes of … are not those written: CRC-32 "
         "mismatch); re-create it", prepare=_teacher(lambda p: flip_a_tensor_bit(p))),
    Case("ckpt-not-a-checkpoint", "checkpoint", "a text file as the checkpoint", stage("export"),
         "RUN/teacher.pt is not a PyTorch checkpoint (torch.save writes a zip archive; this is "
         "something else, e.g. a bare pickle); re-create it",
         prepare=_write("teacher.pt", "these are not the weights\n")),
    Case("ckpt-bare-pickle", "checkpoint", "a bare pickle (not unpickled at all)", stage("export"),
         "RUN/teacher.pt is not a PyTorch checkpoint (torch.save writes a zip archive; this is "
         "something else, e.g. a bare pickle); re-create it",
         prepare=_teacher(lambda p: p.write_bytes(pickle.dumps(_evil(p.parent / MARKER))))),
    Case("ckpt-malicious", "checkpoint", "a `torch.save` file whose pickle would run code",
         stage("export"),
         "RUN/teacher.pt holds pickled Python objects other than tensors and plain values "
         "(it names posix.system); refused unread, since loading "
         "them could run code; re-create it",
         prepare=_torch_save(lambda run: {"state_dict": _evil(run / MARKER)}, "teacher.pt"),
         subprocess=True),
    Case("record-folder", "config", "a folder where a stage records its config (the export "
         "was done, then a traceback)", stage("export"),
         "RUN/export.config.yaml is a folder where the export stage records its config: move it "
         "away or set another run_dir",
         prepare=_then(_remove("export.config.yaml"),
                       lambda run: (run / "export.config.yaml").mkdir())),
    Case("ckpt-state-not-a-state", "checkpoint", "a teacher training state that is no "
         "training state (a list)", stage("teacher"),
         "RUN/teacher.state.pt is not a teacher training state (a list): delete it to train the "
         "teacher afresh",
         prepare=_then(_remove("teacher.pt"), _torch_save(lambda run: [1, 2, 3],
                                                           "teacher.state.pt"))),
    Case("ckpt-not-logitbank", "checkpoint", "a PyTorch file that is no logitbank checkpoint",
         stage("export"),
         "RUN/teacher.pt is not a logitbank checkpoint; save it with save_checkpoint",
         prepare=_torch_save(lambda run: {"weight": __import__("torch").zeros(3)}, "teacher.pt")),
    Case("ckpt-class-count", "checkpoint", "a teacher for 10 classes, a dataset of 7",
         stage("export", "data.options.num_classes=7"),
         "teacher RUN/teacher.pt was built for 10 classes, 1 input channel(s) and (16, 16) images; "
         "the dataset has 7, 1 and (16, 16): train or give a teacher for this dataset"),
    Case("ckpt-other-config", "checkpoint", "a finished teacher, then a teacher setting "
         "changed (`teacher.lr=0.001`): it was silently retrained over",
         stage("teacher", "teacher.lr=0.001"),
         "RUN/teacher.pt is a teacher trained with another config (teacher.lr was …, is 0.001): "
         "set another run_dir to train this one, or delete RUN/teacher.pt and what was made from "
         "it (teacher.onnx, the store, the students) to train this one here"),
    Case("ckpt-malicious-resume", "checkpoint", "a student's resume state whose pickle would "
         "run code", stage("distill", "distill.name=evil"),
         "RUN/distill/evil/state.pt holds pickled Python objects other than tensors and plain "
         "values (it names posix.system); refused unread, since "
         "loading them could run code; delete it to train this student afresh",
         prepare=_torch_save(lambda run: {"epoch": 0, "x": _evil(run / MARKER)},
                             "distill/evil/state.pt")),
    # ---- ONNX files ----
    Case("onnx-missing", "ONNX", "no ONNX file", stage("precompute"),
         "ONNX file RUN/teacher.onnx not found: run the export stage first",
         prepare=_remove("teacher.onnx")),
    Case("onnx-changed", "ONNX", "an ONNX file changed since its parity check", stage("precompute"),
         "RUN/teacher.onnx is not the file whose parity check passed (teacher.onnx.parity.json: "
         "passed=True, sha256 … vs file …): run the export stage again",
         prepare=_append("teacher.onnx", b"\0")),
    Case("onnx-no-parity", "ONNX", "no parity record", stage("precompute"),
         "RUN/teacher.onnx has no readable parity record (teacher.onnx.parity.json): run the "
         "export stage, which writes it", prepare=_remove("teacher.onnx.parity.json")),
    Case("onnx-parity-not-object", "ONNX", "a parity record that is JSON but not an object",
         stage("precompute"),
         "RUN/teacher.onnx has no readable parity record (teacher.onnx.parity.json): run the "
         "export stage, which writes it", prepare=_write("teacher.onnx.parity.json", "[1, 2]")),
    Case("onnx-corrupt", "ONNX", "a corrupt ONNX file (its parity record resealed)",
         stage("precompute"),
         "RUN/teacher.onnx is not a readable ONNX model (…); re-run the export stage",
         prepare=lambda run: (_remove("store.zarr")(run), _onnx_garbage(run))),
    Case("onnx-input-shape", "ONNX", "images of 3 channels, the model takes 1",
         stage("precompute", "data.options.channels=3"),
         "the ONNX model takes inputs (batch, 1, 16, 16) but the dataset's images are "
         "(batch, 3, 16, 16); export a teacher built for this dataset",
         prepare=_remove("store.zarr")),
    Case("onnx-class-count", "ONNX", "a model of 10 classes, a dataset of 7",
         stage("precompute", "data.options.num_classes=7"),
         "the ONNX model gives logits (batch, 10) but the dataset has 7 classes, i.e. (batch, 7); "
         "export a teacher trained on this dataset", prepare=_remove("store.zarr")),
    Case("onnx-external-outside", "ONNX", "external data at `../secret.bin` (outside its folder)",
         stage("precompute"),
         "RUN/teacher.onnx: tensor '…' keeps its data at '../secret.bin', outside the model's "
         "folder; refused unread — use a model whose external data sits next to it (or "
         "re-export it as one file)",
         prepare=lambda run: (_remove("store.zarr")(run), _onnx_external_outside(run))),
    # ---- stores ----
    Case("store-not-a-store", "store", "a folder that is not a store", ("verify", "{run}"),
         "RUN is not a logit store: give the path of a store made by precompute (a .zarr "
         "directory or an .h5 file)"),
    Case("store-missing", "store", "a store path that does not exist",
         ("audit", "{run}/none.zarr"),
         "RUN/none.zarr does not exist: give the path of a store made by precompute (a .zarr "
         "directory or an .h5 file)"),
    Case("store-other-teacher", "store", "another teacher's store in the run folder",
         stage("precompute"),
         "the existing store RUN/store.zarr was made from other inputs (onnx_sha256: store "
         "'00000000' vs now '…'): pass --overwrite (make: OVERWRITE=1) to replace it, or use "
         "another run_dir",
         prepare=_store_attrs(onnx_sha256="00000000")),
    Case("store-other-inputs", "store", "a store made with other augmentation",
         stage("distill", "augment.pad=1"),
         "store RUN/store.zarr was made from other inputs (augment: store '…' vs expected '…'): "
         "point to the store made for this dataset and config, or run precompute again into a "
         "new path"),
    Case("store-unfinished", "store", "an unfinished store (view 1 not done)", stage("distill"),
         "store RUN/store.zarr is unfinished (8 chunk(s) of the first 2 view(s) missing): rerun "
         "precompute to finish it", prepare=_unfinished),
    Case("store-fewer-views", "store", "more views asked than stored",
         stage("distill", "distill.views=3"),
         "distill.views=3 but store RUN/store.zarr holds 2 view(s): ask for at most 2, or "
         "precompute with augment.views=3"),
    Case("store-newer-schema", "store", "a store of a newer schema", ("verify", "{run}/store.zarr"),
         "store RUN/store.zarr has schema version 99, newer than this logitbank reads (1): "
         "upgrade logitbank", prepare=_store_attrs(schema_version=99)),
    Case("store-url-unreachable", "store", "an `s3://` store whose endpoint cannot be reached",
         ("verify", "s3://bucket/store.zarr"),
         'object storage said: Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket/'
         'store.zarr" (EndpointConnectionError): check the store\'s URL (does the bucket exist?), '
         "the endpoint (AWS_ENDPOINT_URL for an S3-compatible service), the credentials and the "
         "network; finished work is kept and a rerun resumes",
         env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
              "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1"},
         subprocess=True),  # a fresh process: fsspec caches a filesystem per endpoint
    Case("store-damaged-attrs", "store", "a store whose attributes lack `num_views`",
         ("verify", "{run}/store.zarr"),
         "store RUN/store.zarr lacks the attribute(s) num_views: its metadata is damaged; run "
         "precompute again into a new path", prepare=_store_attrs(num_views=None)),
    Case("store-path-attr", "store", "a store attribute holding a path (`../../etc/passwd`)",
         ("verify", "{run}/store.zarr"),
         "chunk_rows must be an integer, got '../../etc/passwd'",
         prepare=_store_attrs(chunk_rows="../../etc/passwd")),
    Case("store-overwrite-not-a-store", "store", "`--overwrite` where a folder is not a store",
         stage("precompute", extra=("--overwrite",)),
         "RUN/store.zarr exists and is not a logit store: choose another path; nothing was "
         "changed", prepare=_not_a_store),
    # ---- environment ----
    Case("env-disk-full", "environment", "disk full while writing shards (ENOSPC injected)",
         stage("precompute"),
         "no space left on the device (RUN/store.zarr/logits/c/1/…): free space on that disk or "
         "choose another run_dir; finished work is kept and a rerun resumes",
         prepare=_remove("store.zarr"), fault=("ENOSPC", "open", "store.zarr/logits/c/1")),
    Case("env-disk-full-new-store", "environment", "disk full while creating the store "
         "(ENOSPC injected; the rerun then succeeds)", stage("precompute"),
         "no space left on the device (RUN/store.zarr/.writer.lock): free space on that disk or "
         "choose another run_dir; finished work is kept and a rerun resumes",
         prepare=_remove("store.zarr"), fault=("ENOSPC", "open", "store.zarr"),
         subprocess=True, rerun_ok=True),
    Case("env-read-only", "environment", "a read-only run folder (EROFS injected)",
         stage("precompute"),
         "read-only file system (RUN/store.zarr/.writer.lock): make the folder writable or "
         "choose another run_dir; finished work is kept and a rerun resumes",
         prepare=_remove("store.zarr"), fault=("EROFS", "open", "store.zarr")),
    Case("env-permission-denied", "environment", "no permission to replace `teacher.onnx` "
         "(EACCES injected; the old file stays)", stage("export", "export.atol=2e-4"),
         "permission denied (RUN/teacher.onnx): make the folder writable or choose another "
         "run_dir; finished work is kept and a rerun resumes",
         fault=("EACCES", "replace", "teacher.onnx")),
    Case("env-disk-full-record", "environment", "disk full as a stage records its config, its "
         "work done (ENOSPC injected; it was a traceback)", stage("export"),
         "no space left on the device (RUN/export.config.yaml): free space on that disk or choose "
         "another run_dir; finished work is kept and a rerun resumes",
         fault=("ENOSPC", "replace", "export.config.yaml")),
    Case("env-no-zarr", "environment", "zarr not installed", ("verify", "{run}/store.zarr"),
         "RUN/store.zarr is a zarr store, but zarr is not installed: run `make setup`",
         block="zarr", subprocess=True),
    Case("env-no-onnxruntime", "environment", "onnxruntime not installed", stage("precompute"),
         _SETUP.format("onnxruntime"), prepare=_remove("store.zarr"), block="onnxruntime",
         subprocess=True),
    Case("env-no-distributed", "environment", "dask.distributed not installed, `--workers 2`",
         stage("precompute", extra=("--workers", "2")),
         _SETUP.format("distributed"),
         prepare=_remove("store.zarr"), block="distributed", subprocess=True),
    Case("env-scheduler-unreachable", "environment", "a dask scheduler nobody listens at",
         stage("precompute", extra=("--scheduler", "tcp://127.0.0.1:9")),
         "cannot reach the dask scheduler at tcp://127.0.0.1:9 (…): start it with `dask "
         "scheduler` and workers with `dask worker tcp://127.0.0.1:9`, or fix the address",
         prepare=_remove("store.zarr")),
]  # fmt: skip
BY_ID = {case.id: case for case in CASES}


# ---- the table ---------------------------------------------------------------------------
def markdown() -> str:
    """README's bad-input table, from ``CASES``."""
    rows = [
        "| # | case | area | bad input | message (after `error: `) |",
        "| ---: | --- | --- | --- | --- |",
    ]
    for number, case in enumerate(CASES, 1):
        message = case.message.replace("|", "\\|")
        rows.append(f"| {number} | `{case.id}` | {case.area} | {case.what} | {message} |")
    return "\n".join(rows)


def test_readme_table_is_the_cases() -> None:
    text = README.read_text()
    assert BEGIN in text and END in text, "README.md lacks the bad-input table markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == markdown(), "regenerate it: python -m tests.test_bad_inputs --markdown"
    assert len(CASES) >= 30 and len(BY_ID) == len(CASES)


# ---- running a case ----------------------------------------------------------------------
def _matches(line: str, message: str) -> bool:
    """``line`` is ``message`` with each ``…`` standing for any text."""
    pattern = ".*?".join(re.escape(part) for part in message.split("…"))
    return re.fullmatch(pattern, line) is not None


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, but writer locks (any writer records its pid)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _argv(case: Case, run: Path) -> list[str]:
    return [a.replace("{run}", str(run)).replace("{tiny}", str(TINY)) for a in case.argv]


SITECUSTOMIZE = '''
"""Test faults for tests/test_bad_inputs.py: LB_BLOCK makes a module unimportable, LB_FAULT
("ENOSPC|/abs/path/prefix") makes opening a file for writing there raise that OSError."""
import builtins, errno, importlib.abc, io, os, sys

_block = os.environ.get("LB_BLOCK")
if _block:
    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == _block or name.startswith(_block + "."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _Blocker())

_fault = os.environ.get("LB_FAULT")
if _fault:
    _code, _prefix = _fault.split("|", 1)
    _errno, _os_open = getattr(errno, _code), os.open

    def _open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and os.fspath(path).startswith(_prefix):
            raise OSError(_errno, os.strerror(_errno), os.fspath(path))
        return _os_open(path, flags, *args, **kwargs)
    os.open = _open
'''


def _inject(monkeypatch: pytest.MonkeyPatch, fault: tuple[str, str, str], run: Path) -> None:
    code, call, where = fault
    number, prefix = getattr(errno, code), str(run / where)

    def refuse(path: object) -> None:
        if os.fspath(path).startswith(prefix):
            raise OSError(number, os.strerror(number), os.fspath(path))

    if call == "open":
        real_open, real_io_open = os.open, io.open

        def fake_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_open(path, flags, *args, **kwargs)

        def fake_io_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+"):
                refuse(file)
            return real_io_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_io_open)
    else:
        real_replace = os.replace

        def fake_replace(src, dst, *args, **kwargs):
            refuse(dst)
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", fake_replace)


def _subprocess(case: Case, run: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(site)}
    if case.block:
        env["LB_BLOCK"] = case.block
    if case.fault:
        code, _, where = case.fault
        env["LB_FAULT"] = f"{code}|{run / where}"
    env.update(case.env or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *_argv(case, run)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run every case copies: teacher.pt, teacher.onnx (+ parity), store.zarr."""
    from pipeline.__main__ import main
    from tests.torch_threads import one_thread

    run = tmp_path_factory.mktemp("bad-inputs") / "base"
    with one_thread():
        for name in ("teacher", "export", "precompute"):
            argv = [a.replace("{run}", str(run)).replace("{tiny}", str(TINY)) for a in stage(name)]
            assert main(argv) == 0, name
    return run


def _prepared(case: Case, base: Path, root: Path) -> Path:
    run = root / case.id
    shutil.copytree(base, run)
    if case.prepare is not None:
        case.prepare(run)
    return run


@pytest.fixture(scope="module")
def subprocess_results(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The subprocess cases, run a few at a time (each pays an interpreter start-up)."""
    root = tmp_path_factory.mktemp("bad-inputs-sub")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cases = [c for c in CASES if c.subprocess]
    runs = {c.id: _prepared(c, base, root) for c in cases}
    before = {c.id: _snapshot(runs[c.id]) for c in cases}
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda c: _subprocess(c, runs[c.id], site), cases)
        return {c.id: (result, runs[c.id], before[c.id]) for c, result in zip(cases, done)}


def _check(case: Case, run: Path, status: int, out: str, err: str, before: dict) -> None:
    assert "Traceback" not in out + err, err
    assert status == 2, (status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    line = lines[0][len("error: ") :].replace(str(run), "RUN")
    assert _matches(line, case.message), f"\n got: {line}\nwant: {case.message}"
    after = _snapshot(run)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"files already there were changed or lost: {changed}"
    assert not (run / MARKER).exists(), "a pickle from a file ran code"


@pytest.mark.parametrize("case", [c for c in CASES if not c.subprocess], ids=lambda c: c.id)
def test_bad_input_in_process(case, base, tmp_path, capsys, monkeypatch) -> None:
    from pipeline.__main__ import main

    run = _prepared(case, base, tmp_path)
    before = _snapshot(run)
    monkeypatch.chdir(run)  # a stray relative write would land (and be seen) here
    with monkeypatch.context() as patch:
        if case.fault:
            _inject(patch, case.fault, run)
        for name, value in (case.env or {}).items():
            patch.setenv(name, value)
        status = main(_argv(case, run))
    captured = capsys.readouterr()
    _check(case, run, status, captured.out, captured.err, before)
    if case.rerun_ok:
        assert main(_argv(case, run)) == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.subprocess], ids=lambda c: c.id)
def test_bad_input_in_a_real_process(case, subprocess_results) -> None:
    from pipeline.__main__ import main

    result, run, before = subprocess_results[case.id]
    _check(case, run, result.returncode, result.stdout, result.stderr, before)
    if case.rerun_ok:
        assert main(_argv(case, run)) == 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m tests.test_bad_inputs --markdown")
    print(markdown())
