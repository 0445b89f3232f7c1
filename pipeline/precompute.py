"""Precompute: the teacher's raw logits for V replayable views of every training sample.

One process: an ONNX Runtime session (CUDA with I/O binding when a GPU really runs it, else the CPU
with all graph optimisations and one intra-op thread per core), with input preparation, inference
and encoding/writing overlapped (:mod:`pipeline.overlap`). With ``workers`` or ``scheduler``: dask
tasks that each own whole shards, each worker process with its own session
(:func:`storage.parallel.write_parallel`). Either way the store resumes where it stopped — only
shards not marked done are computed — and records labels, view parameters and a fingerprint (ONNX
sha256, dataset hash, preprocessing and augmentation spec, seed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import Split, splits
from pipeline.errors import UserError
from pipeline.onnx_export import parity_path, sha256_file
from pipeline.ort import Runner, active_provider, available_cores, check_io, make_session
from pipeline.overlap import run_overlapped
from pipeline.views import NUM_VIEW_PARAMS
from storage import create_store, open_store
from storage.layout import format_plan, plan
from storage.parallel import write_parallel


@dataclass
class TeacherLogits:
    """``produce(view, start, stop) -> (logits, view_params)``: picklable for dask workers, which
    each build their own dataset and ONNX Runtime session on first use."""

    onnx_path: str
    split: Split
    batch_size: int = 256
    provider: str = "auto"
    threads: int | None = None
    fp16: bool = False
    _runner: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runner": None}

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            session = make_session(self.onnx_path, self.provider, self.threads, self.fp16)
            check_io(session, self.split.num_classes, self.split.image_shape)
            self._runner = Runner(session, self.split.num_classes)
        return self._runner

    def inputs(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Model input (B, C, H, W) float32 and view parameters (B, P) of rows [start, stop)."""
        x, _, params = self.split.batch(np.arange(start, stop), view=view)
        return x.numpy(), params

    def __call__(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        out, params = [], []
        for a in range(start, stop, self.batch_size):
            b = min(a + self.batch_size, stop)
            x, p = self.inputs(view, a, b)
            out.append(self.runner.run(x, np.arange(a, b)))
            params.append(p)
        return np.concatenate(out), np.concatenate(params)


def checked_onnx_sha256(onnx_path: Path) -> str:
    """The ONNX file's sha256, refused unless its export passed the parity check: a file changed
    or replaced since then was never compared with PyTorch."""
    record_path = parity_path(onnx_path)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        raise UserError(
            f"{onnx_path} has no readable parity record ({record_path.name}): run the export "
            f"stage, which writes it"
        ) from None
    digest = sha256_file(onnx_path)
    if not record.get("passed") or record.get("onnx_sha256") != digest:
        raise UserError(
            f"{onnx_path} is not the file whose parity check passed ({record_path.name}: "
            f"passed={record.get('passed')}, sha256 {str(record.get('onnx_sha256'))[:12]} vs "
            f"file {digest[:12]}): run the export stage again"
        )
    return digest


def store_fingerprint(config: Config, train: Split) -> dict:
    return {"onnx_sha256": checked_onnx_sha256(config.onnx_path), **train.fingerprint()}


def precompute(config: Config, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Fill (or finish) the run's logit store; return its path."""
    pc = config.precompute
    path = config.store_path
    if not config.onnx_path.is_file():
        raise UserError(f"ONNX file {config.onnx_path} not found: run the export stage first")
    train, _ = splits(config)
    fingerprint = store_fingerprint(config, train)
    views = config.augment.views
    store = _open_or_create(config, train, fingerprint, overwrite)
    if progress:
        print(format_plan(plan(store.layout, pc.backend), pc.backend), flush=True)
    todo = store.missing_shards()
    rows = sum(b - a for _, a, b in todo)
    if not todo:
        store.close()
        return path
    threads = pc.threads or max(1, available_cores() // max(1, pc.workers or 1))
    produce = TeacherLogits(
        str(config.onnx_path), train, pc.batch_size, pc.provider, threads, pc.fp16
    )
    if progress and not (pc.workers or pc.scheduler):
        provider = active_provider(produce.runner.session)
        print(f"ONNX Runtime on {provider}, {threads} thread(s)", flush=True)
    bar = tqdm(
        total=rows,
        unit="rows",
        unit_scale=True,
        disable=not progress,
        desc=f"precompute {views} view(s)",
        smoothing=0.1,
    )
    try:
        if pc.workers or pc.scheduler:
            store.close()  # write_parallel takes the writer lock itself
            write_parallel(
                str(path),
                produce,
                workers=pc.workers or None,
                scheduler=pc.scheduler,
                progress=bar.update,
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
            store.close()
    finally:
        bar.close()
        store.close()
    with open_store(path) as done:
        if not done.complete:
            raise UserError(
                f"store {path} is still missing {len(done.missing_chunks())} chunk(s) "
                f"after precompute: rerun it to finish"
            )
    return path


def _open_or_create(config: Config, train: Split, fingerprint: dict, overwrite: bool):
    pc = config.precompute
    path = config.store_path
    if os.path.lexists(path) and not overwrite:
        store = open_store(path, mode="a")
        mismatch = {
            k: (store.fingerprint.get(k), v)
            for k, v in fingerprint.items()
            if store.fingerprint.get(k) != v
        }
        lay = store.layout
        shape = (lay.num_views, lay.num_samples, lay.num_classes, lay.encoding)
        want = (config.augment.views, len(train), train.num_classes, pc.encoding)
        if mismatch or shape != want:
            store.close()
            what = "; ".join(f"{k}: store {a!r} vs now {b!r}" for k, (a, b) in mismatch.items())
            what = what or f"(V, N, C, encoding) store {shape} vs now {want}"
            raise UserError(
                f"the existing store {path} was made from other inputs ({what}): "
                f"pass --overwrite to replace it, or use another run_dir"
            )
        return store
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
