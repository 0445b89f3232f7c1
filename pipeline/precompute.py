"""Precompute: the teacher's raw logits for V replayable views of every training sample.

One process: an ONNX Runtime session (CUDA with I/O binding when a GPU really runs it, else the CPU
with all graph optimisations and one intra-op thread per core), with input preparation, inference
and encoding/writing overlapped (:mod:`pipeline.overlap`). With ``workers`` or ``scheduler``: dask
tasks that each own whole shards, each worker process with its own session
(:func:`storage.parallel.write_parallel`). Either way the store resumes where it stopped — only
shards not marked done are computed — and records labels, view parameters and a fingerprint (ONNX
sha256, dataset hash, preprocessing and augmentation spec, seed).

On a cluster every worker must reach the ONNX file, the dataset and the store at the same
locations as the coordinator (shared storage, or a store URL): paths are sent absolute, and each
worker checks its ONNX file's sha256 against the store's fingerprint before computing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import Config, to_dict
from pipeline.data import Split, splits
from pipeline.errors import UserError
from pipeline.fileio import write_text_over_leftovers
from pipeline.onnx_export import parity_path, sha256_file
from pipeline.ort import (
    SESSION_RTOL,
    Runner,
    active_provider,
    available_cores,
    check_io,
    describe_parity,
    make_session,
    session_parity,
)
from pipeline.overlap import run_overlapped
from pipeline.views import NUM_VIEW_PARAMS
from storage import NotAStoreError, StoreError, StoreWarning, create_store, open_store
from storage.layout import format_plan, plan
from storage.parallel import write_parallel
from storage.urls import is_url

# What a worker thread built for the running precompute (dataset, ONNX Runtime session), reused by
# its next tasks: dask hands every task its own unpickled copy of the producer, and a session (a
# CUDA one above all) or an image-folder index costs seconds to build. Per thread (thread id →
# (key, split, runner)), since a session's I/O-bound output buffers are not shared between
# concurrent tasks; emptied by ``TeacherLogits.release`` when the run ends.
_LOADED: dict[int, tuple[str, Split, Runner, dict | None]] = {}


@dataclass
class TeacherLogits:
    """``produce(view, start, stop) -> (logits, view_params)``: picklable for dask workers, which
    each build their own dataset and ONNX Runtime session on first use (and keep them for the
    run's next tasks).

    ``onnx_sha256``, when given, is checked against the ONNX file where the session is built:
    on a cluster, a worker whose copy of the file differs refuses to compute.
    """

    onnx_path: str
    split: Split
    batch_size: int = 256
    provider: str = "auto"
    threads: int | None = None
    fp16: bool = False
    tf32: bool = False
    onnx_sha256: str | None = None
    parity_rows: int = 64
    parity_rtol: float | None = None
    #: The figures of the session's check against the CPU float32 session (``check_parity``),
    #: or None when the session is that one (or the check is off).
    parity: dict | None = field(default=None, repr=False)
    _runner: Any = field(default=None, repr=False)
    _unpickled: bool = field(default=False, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runner": None, "parity": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _unpickled=True)

    def _key(self) -> str:
        """What the loaded session and dataset depend on (dataclass reprs are deterministic)."""
        split = self.split
        return repr(
            (
                self.onnx_path,
                self.onnx_sha256,
                split.data,
                split.split,
                split.augment,
                self.provider,
                self.threads,
                self.fp16,
                self.tf32,
                self.parity_rows,
                self.parity_rtol,
            )
        )

    def _reuse_loaded(self) -> None:
        if self._runner is None and self._unpickled:
            loaded = _LOADED.get(threading.get_ident())
            if loaded is not None and loaded[0] == self._key():
                _, self.split, self._runner, self.parity = loaded

    @property
    def runner(self) -> Runner:
        self._reuse_loaded()
        if self._runner is None:
            self._check_onnx_file()
            session = make_session(
                self.onnx_path, self.provider, self.threads, self.fp16, self.tf32
            )
            check_io(session, self.split.num_classes, self.split.image_shape)
            runner = Runner(session, self.split.num_classes)
            self.parity = self.check_parity(runner)
            self._runner = runner
            if self._unpickled:
                _LOADED[threading.get_ident()] = (
                    self._key(),
                    self.split,
                    self._runner,
                    self.parity,
                )
        return self._runner

    @property
    def precision(self) -> str:
        """What the session computes in: float32, tf32 or float16."""
        return "float16" if self.fp16 else "tf32" if self.tf32 else "float32"

    def check_parity(self, runner: Runner) -> dict | None:
        """Run the first ``parity_rows`` rows of view 0 through ``runner`` and through ONNX
        Runtime's CPU provider in float32 (the session export's parity check vouches for), and
        refuse a session whose logits are further apart than ``parity_rtol`` allows: a GPU
        session (TF32, fp16, another convolution algorithm) is checked before it writes a row.
        None (no check) for a CPU session, which is that float32 session itself."""
        rows = min(self.parity_rows, len(self.split))
        if runner.device == "cpu" or rows == 0:
            return None
        rtol = self.parity_rtol if self.parity_rtol is not None else SESSION_RTOL[self.precision]
        reference = Runner(
            make_session(self.onnx_path, "cpu", self.threads, False, False), self.split.num_classes
        )
        fix = {
            "float16": "set precompute.fp16=false",
            "tf32": "set precompute.tf32=false",
            "float32": "use precompute.provider=cpu",
        }[self.precision]
        got, want = [], []
        for a in range(0, rows, self.batch_size):
            x, _ = self.inputs(0, a, min(a + self.batch_size, rows))
            indices = np.arange(a, a + len(x))
            want.append(reference.run(x, indices))
            try:
                got.append(runner.run(x, indices))
            except UserError as exc:  # NaN/inf (an fp16 graph that overflows) where the CPU's
                # float32 logits of the same images are finite: the session's fault
                raise UserError(
                    f"the teacher's {self.precision} session on {runner.device} fails on rows "
                    f"that ONNX Runtime's CPU float32 session computes "
                    f"({str(exc).split('; ')[0]}); {fix}"
                ) from None
        del reference  # a CPU copy of the teacher: not kept for the run
        record = session_parity(np.concatenate(got), np.concatenate(want), rtol)
        record.update(provider=runner.device, precision=self.precision)
        if not record["passed"]:
            # the fix before the figures: a dask worker's error is cut to its first 300 chars
            raise UserError(
                f"the teacher's {self.precision} logits on {runner.device} are off from ONNX "
                f"Runtime's CPU float32 ones ({fix}, or raise precompute.parity_rtol if that "
                f"is acceptable): {describe_parity(record)}"
            )
        return record

    @staticmethod
    def release() -> None:
        """Drop the sessions and datasets this process keeps between tasks (run on every worker
        when a parallel precompute ends, so that an idle worker holds no GPU memory)."""
        _LOADED.clear()

    def _check_onnx_file(self) -> None:
        """On a worker: the file must be readable there and be the one the store was made from."""
        if self.onnx_sha256 is None:
            return
        host = socket.gethostname()
        try:
            digest = sha256_file(Path(self.onnx_path))
        except OSError as exc:
            raise UserError(
                f"ONNX file {self.onnx_path} is not readable on {host} ({exc.strerror or exc}): "
                f"every dask worker needs it at this path (shared storage, or a copy)"
            ) from None
        if digest != self.onnx_sha256:
            raise UserError(
                f"ONNX file {self.onnx_path} on {host} is not the one the store is made from "
                f"(sha256 {digest[:12]} vs {self.onnx_sha256[:12]}): copy the same teacher.onnx "
                f"to every dask worker"
            )

    def describe(self) -> str:
        """The device this producer's session runs on ("cpu", or "cuda" with the GPU it sees)."""
        device = active_provider(self.runner.session)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if device == "cuda" and visible:
            device = f"{device} (CUDA_VISIBLE_DEVICES={visible})"
        if self.parity is not None:
            diff = self.parity["max_abs_diff"]
            device += f", {self.precision}, vs CPU float32 max |Δ| {diff:.2g}"
        return device

    def inputs(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Model input (B, C, H, W) float32 and view parameters (B, P) of rows [start, stop)."""
        self._reuse_loaded()
        x, _, params = self.split.batch(np.arange(start, stop), view=view)
        return x.numpy(), params

    def __call__(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits (n, C) and view parameters (n, P) of rows [start, stop) of ``view``; the
        next batch's input is prepared while ONNX Runtime runs this one, as in one process."""
        runner = self.runner  # loaded (or reused) in this thread, before the helper starts
        jobs = [(a, min(a + self.batch_size, stop)) for a in range(start, stop, self.batch_size)]
        out: list[np.ndarray] = []
        params: list[np.ndarray] = []

        def compute(inputs: tuple) -> np.ndarray:
            (a, b), (x, _) = inputs
            return runner.run(x, np.arange(a, b))

        def keep(job: tuple, inputs: tuple, logits: np.ndarray) -> None:
            out.append(logits)  # jobs reach ``keep`` in order
            params.append(inputs[1][1])

        run_overlapped(jobs, lambda job: (job, self.inputs(view, *job)), compute, keep)
        return np.concatenate(out), np.concatenate(params)


def checked_onnx_sha256(onnx_path: Path, checkpoint: Path | None = None) -> str:
    """The ONNX file's sha256, refused unless its export passed the parity check (a file changed
    or replaced since then was never compared with PyTorch) and, when ``checkpoint`` is given and
    the record names one, was exported from that very checkpoint."""
    record_path = parity_path(onnx_path)
    try:
        record = json.loads(record_path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        raise UserError(
            f"{onnx_path} has no readable parity record ({record_path.name}): run the export "
            f"stage, which writes it"
        ) from None
    digest = sha256_file(onnx_path)
    source = record.get("checkpoint_sha256")
    known = checkpoint is not None and source is not None and checkpoint.is_file()
    if known and sha256_file(checkpoint) != source:
        raise UserError(
            f"{onnx_path} was exported from another teacher checkpoint than {checkpoint} "
            f"(changed since): run the export stage again"
        )
    if not record.get("passed") or record.get("onnx_sha256") != digest:
        raise UserError(
            f"{onnx_path} is not the file whose parity check passed ({record_path.name}: "
            f"passed={record.get('passed')}, sha256 {str(record.get('onnx_sha256'))[:12]} vs "
            f"file {digest[:12]}): run the export stage again"
        )
    return digest


#: In run_dir once precompute has finished (the Makefile's target for the stage).
DONE_FILE = "precompute.done"
#: In run_dir: the session of the last one-process precompute and its check (``check_parity``).
PARITY_FILE = "precompute.parity.json"


def store_fingerprint(config: Config, train: Split) -> dict:
    """What the store's logits depend on: the ONNX file, the dataset and its views, and the
    precision the teacher ran in (``inference``; distill does not check it, precompute refuses
    to resume a store in another one)."""
    pc = config.precompute
    precision = "float16" if pc.fp16 else "tf32" if pc.tf32 else "float32"
    return {
        "onnx_sha256": checked_onnx_sha256(config.onnx_path, config.teacher_checkpoint),
        **train.fingerprint(),
        "inference": precision,
    }


def _close_quietly(store: Any) -> None:
    """Close the store; its StoreWarning (rows of unfinished shards not kept, on an interrupt)
    is one line on stderr, not Python's warning with its file, line and source."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreWarning)
        store.close()
    for w in caught:
        if issubclass(w.category, StoreWarning):
            print(f"warning: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def precompute(config: Config, *, overwrite: bool = False, progress: bool = True) -> Path | str:
    """Fill (or finish) the run's logit store; return its path (or URL)."""
    pc = config.precompute
    path = config.store_path
    if not config.onnx_path.is_file():
        raise UserError(f"ONNX file {config.onnx_path} not found: run the export stage first")
    _RESOLVED.pop(str(path), None)  # an earlier run's, in this process: not this one's
    train, _ = splits(config)
    fingerprint = store_fingerprint(config, train)
    _RESOLVED[str(path)] = (to_dict(config), len(train), train.num_classes, fingerprint)
    if overwrite and _same_inputs_there(config, train, fingerprint):
        # --overwrite replaces a store of other inputs: this one is resumed (or is complete).
        print(f"precompute: {path} was made from these inputs: kept, not replaced", flush=True)
        overwrite = False
    views = config.augment.views
    dask = bool(pc.workers or pc.scheduler)
    if dask:
        # Worker processes (on other machines, in other directories) get absolute paths, their
        # own core count (threads None), and check their ONNX file against the fingerprint.
        threads = pc.threads if pc.scheduler else pc.threads or _threads_per_worker(pc.workers)
        produce = TeacherLogits(
            os.path.abspath(config.onnx_path),
            _split_for_workers(train),
            pc.batch_size,
            pc.provider,
            threads,
            pc.fp16,
            pc.tf32,
            onnx_sha256=fingerprint["onnx_sha256"],
            parity_rows=pc.parity_rows,
            parity_rtol=pc.parity_rtol,
        )
        if overwrite:  # a worker's session is made and checked before the old store goes
            _check_a_worker(produce, pc.workers, pc.scheduler)
    elif not overwrite and _finished(config, train, fingerprint):
        return path  # no session to build (on a GPU: a CUDA session and its check)
    else:
        threads = pc.threads or available_cores()
        produce = TeacherLogits(
            str(config.onnx_path), train, pc.batch_size, pc.provider, threads, pc.fp16, pc.tf32,
            parity_rows=pc.parity_rows, parity_rtol=pc.parity_rtol,
        )  # fmt: skip
        # The session is made and checked (provider, fp16, classes, its logits against the CPU
        # float32 session's) before the store is created, opened or replaced.
        produce.runner  # noqa: B018
    store = _open_or_create(config, train, fingerprint, overwrite)
    if not dask:  # once the store is this run's: a refused run leaves the last record
        _write_parity_record(config, produce)
    if overwrite:  # the stamp of a finished precompute no longer holds
        (config.run_path / DONE_FILE).unlink(missing_ok=True)
    if progress:
        print(format_plan(plan(store.layout, pc.backend), pc.backend), flush=True)
    todo = store.missing_shards()
    rows = sum(b - a for _, a, b in todo)
    if not todo:
        store.close()
        return path
    if progress and not dask:
        provider = active_provider(produce.runner.session)
        print(f"ONNX Runtime on {provider}, {threads} thread(s)", flush=True)
        if produce.parity is not None:
            print(
                f"{produce.precision} session vs CPU float32: {describe_parity(produce.parity)}",
                flush=True,
            )
    bar = tqdm(
        total=rows,
        unit="rows",
        unit_scale=True,
        disable=not progress,
        desc=f"precompute {views} view(s)",
        smoothing=0.1,
    )
    by_worker: Counter[tuple[str, str]] = Counter()

    def on_task(task: dict) -> None:
        by_worker.update([(task["worker"], task["device"])])
        # the store now holds the workers' logits (each checked its session, in the summary):
        # a one-process run's record no longer describes it
        (config.run_path / PARITY_FILE).unlink(missing_ok=True)

    try:
        if dask:
            store.close()  # write_parallel takes the writer lock itself
            write_parallel(
                str(path),
                produce,
                workers=pc.workers or None,
                scheduler=pc.scheduler,
                progress=bar.update,
                on_task=on_task,
            )
        else:
            jobs = [
                (v, a, min(a + pc.batch_size, b))
                for v, s, b in todo
                for a in range(s, b, pc.batch_size)
            ]

            def compute(inputs: tuple) -> np.ndarray:
                (_view, start, stop), (x, _) = inputs
                return produce.runner.run(x, np.arange(start, stop))

            def write(job: tuple, inputs: tuple, logits: np.ndarray) -> None:
                store.write(job[0], job[1], logits, inputs[1][1])
                bar.update(len(logits))

            run_overlapped(jobs, lambda job: (job, produce.inputs(*job)), compute, write)
            _close_quietly(store)
    finally:
        bar.close()
        _close_quietly(store)
        if progress and by_worker:
            print(
                f"dask: {sum(by_worker.values())} shard(s) on {len(by_worker)} worker(s): "
                + "; ".join(f"{w} on {d}: {n}" for (w, d), n in sorted(by_worker.items())),
                flush=True,
            )
    with open_store(path) as done:
        _refuse_damaged(done)
        if not done.complete:
            raise UserError(
                f"store {path} is still missing {len(done.missing_chunks())} chunk(s) "
                f"after precompute: rerun it to finish"
            )
    return path


def _write_parity_record(config: Config, produce: TeacherLogits) -> None:
    """RUN_DIR/precompute.parity.json: the session this run fills the store with, and how far
    its logits were from the CPU float32 session's (``checked`` false for that session itself,
    which export's parity check covers)."""
    runner = produce.runner
    record = {"provider": runner.device, "precision": produce.precision, "checked": False}
    if produce.parity is not None:
        record.update(produce.parity, checked=True)
    config.run_path.mkdir(parents=True, exist_ok=True)
    # a kill in its fsync left a temporary file beside it (the fault campaign found one)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_text_over_leftovers(config.run_path / PARITY_FILE, text)


def _check_a_worker(produce: TeacherLogits, workers: int | None, scheduler: str | None) -> None:
    """Build (and check) a dask worker's session in one task, then free it: what would refuse
    the run is refused before ``--overwrite`` replaces the old store."""
    from storage.parallel import dask_client, task_resources

    with dask_client(workers or None, scheduler) as client:
        resources = task_resources(client.scheduler_info()["workers"])
        try:
            client.submit(TeacherLogits.describe, produce, pure=False, resources=resources).result()
        finally:
            with contextlib.suppress(Exception):
                client.run(TeacherLogits.release)


def _finished(config: Config, train: Split, fingerprint: dict) -> bool:
    """Whether the run's store is there, made from this run's inputs, and complete (a store
    of other inputs is refused, as when resuming it)."""
    try:
        store = open_store(config.store_path)
    except NotAStoreError:
        return False
    _check_same_inputs(store, config, len(train), train.num_classes, fingerprint)
    with store:
        if not store.complete:
            return False
        _refuse_damaged(store)  # every chunk marked done, but a shard file may be gone or cut
        return True


def _same_inputs_there(config: Config, train: Split, fingerprint: dict) -> bool:
    """Whether a readable, undamaged store of this run's very inputs is at the store path (what
    ``--overwrite`` keeps: it replaces a store of other inputs, not one it would recompute
    byte for byte)."""
    try:
        store = open_store(config.store_path)
    except StoreError:  # nothing there, or unreadable: for --overwrite to replace
        return False
    try:
        _check_same_inputs(store, config, len(train), train.num_classes, fingerprint)
    except UserError:  # other inputs (and closed)
        return False
    with store:
        try:
            _refuse_damaged(store)
        except UserError:
            return False
    return True


def _refuse_damaged(store: Any) -> None:
    """Refuse (one line: the damage and ``verify --repair``) a store whose chunks marked done
    lack their files or lie outside them (a shard deleted or cut short since), or whose labels
    are lost: a rerun would otherwise resume it, or call it complete, as it is. Reads no logits.
    """
    report = store.verify(data=False)
    report.missing.clear()  # chunks not done yet: this run computes them
    if not report.ok:
        raise UserError(report.summary())


#: store path → (config, rows, classes, fingerprint) of the precompute run in this process:
#: what made_with compares, without hashing the ONNX file and the dataset again on a Ctrl-C.
_RESOLVED: dict[str, tuple[dict, int, int, dict]] = {}


def made_with(config: Config) -> bool:
    """Whether the run's store was made from ``config``'s inputs, in its shape and layout (the
    command line asks on Ctrl-C before it records the config beside the store: a precompute
    stopped before it created, resumed or replaced the store has not made it; one stopped
    before it had its inputs' fingerprint had not touched it)."""
    resolved = _RESOLVED.get(str(config.store_path))
    if resolved is None or resolved[0] != to_dict(config):
        return False
    try:
        store = open_store(config.store_path)
    except StoreError:
        return False
    with store:
        try:
            _check_same_inputs(store, config, *resolved[1:])
        except UserError:
            return False
    return True


def _threads_per_worker(workers: int) -> int:
    """ONNX Runtime threads for each process of a local cluster: the cores shared out."""
    return max(1, available_cores() // max(1, workers))


def _split_for_workers(train: Split) -> Split:
    """The split with a relative dataset path made absolute: workers run in other directories."""
    data_path = train.data.path
    if not data_path or is_url(str(data_path)) or os.path.isabs(data_path):
        return train
    data = dataclasses.replace(train.data, path=os.path.abspath(data_path))
    return dataclasses.replace(train, data=data)


def _open_or_create(config: Config, train: Split, fingerprint: dict, overwrite: bool):
    pc = config.precompute
    path = config.store_path
    if not overwrite:
        try:
            store = open_store(path, mode="a")
        except NotAStoreError:
            store = None  # nothing there yet (or something else: create_store refuses it)
        if store is not None:
            _check_same_inputs(store, config, len(train), train.num_classes, fingerprint)
            try:
                _refuse_damaged(store)
            except UserError:
                store.close()
                raise
            return store
    if not is_url(str(path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    config.run_path.mkdir(parents=True, exist_ok=True)
    return create_store(
        path,
        len(train),
        train.num_classes,
        config.augment.views,
        encoding=pc.encoding,
        chunk_rows=pc.chunk_rows,
        chunks_per_shard=pc.chunks_per_shard,
        backend=pc.backend,
        fingerprint=fingerprint,
        labels=train.labels,
        view_param_width=NUM_VIEW_PARAMS,
        overwrite=overwrite,
    )


def _check_same_inputs(
    store: Any, config: Config, rows: int, classes: int, fingerprint: dict
) -> None:
    """Refuse (and close) an existing store made from other inputs than this run's."""
    mismatch = {
        k: (store.fingerprint.get(k), v)
        for k, v in fingerprint.items()
        if store.fingerprint.get(k) != v
        and (k != "inference" or k in store.fingerprint)  # stores made before it was recorded
    }
    lay, pc = store.layout, config.precompute
    shape = (lay.num_views, lay.num_samples, lay.num_classes, lay.encoding)
    want = (config.augment.views, rows, classes, pc.encoding)
    # A chunk layout the config sets (None: automatic) is the store's, or the run's batches
    # (cut from the store's chunks) differ from those of a run without a store (from the config).
    for key in ("chunk_rows", "chunks_per_shard"):
        if getattr(pc, key) is not None and getattr(pc, key) != getattr(lay, key):
            mismatch[f"precompute.{key}"] = (getattr(lay, key), getattr(pc, key))
    if mismatch or shape != want:
        store.close()
        what = "; ".join(f"{k}: store {a!r} vs now {b!r}" for k, (a, b) in mismatch.items())
        what = what or f"(V, N, C, encoding) store {shape} vs now {want}"
        raise UserError(
            f"the existing store {store.path} was made from other inputs ({what}): "
            f"pass --overwrite (make: OVERWRITE=1) to replace it, or use another run_dir"
        )
