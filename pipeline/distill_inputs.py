"""What a distill run reads, checked before the first step: the method, the store, the teacher,
and the batch plan built on them (:func:`build_sources`).

A store is only usable when it was made from this very dataset and augmentation: its class count,
row count and labels must be the dataset's, its fingerprint (dataset hash, preprocessing and
augmentation spec, seed) must match, the views asked for must be stored and finished, and the
augmentation parameters it recorded must be those the view generator gives — so the student's
replayed images are provably the teacher's. Each refusal is one line naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config
from pipeline.data import Split
from pipeline.distill_data import EpochBatches, StoreRows, ViewParams
from pipeline.distill_pskd import SelfTeacher
from pipeline.errors import MethodError, ModelError, UserError
from pipeline.methods import METHODS, Method, MethodContext, build_method
from pipeline.methods.base import check_student, check_target
from pipeline.models import load_model_from_checkpoint
from pipeline.views import NUM_VIEW_PARAMS, view_params
from storage import LogitStore, check_fingerprint, make_layout, open_store
from storage.base import labels_problem
from storage.sampler import BlockSampler
from storage.urls import is_url

if TYPE_CHECKING:  # distill_ddp imports this module
    from pipeline.distill_ddp import World


class DistillError(UserError):
    """A store, state file or run folder the distill stage cannot use as it is."""


class CrossEntropy(Method):
    """``ce``: plain cross-entropy on the labels, the baseline every method is compared with."""

    teacher_input = "none"

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        target: torch.Tensor,
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        check_target(target, student.shape[0], check_student(student))
        ce = F.cross_entropy(student, target)
        return {"ce": ce, "total": ce}


def method_names() -> list[str]:
    return ["ce", *METHODS]


def build_student_method(name: str, options: dict[str, Any], num_classes: int) -> Method:
    """The training loss for ``distill.method``: ``ce`` or anything ``build_method`` accepts."""
    key = name.strip().lower().replace(" ", "")
    if key == "ce":
        if options:
            raise MethodError(
                f"method 'ce' takes no options, got {', '.join(map(repr, sorted(options)))}"
            )
        return CrossEntropy()
    if key not in METHODS and "+" not in key:
        raise MethodError(f"unknown method {name!r}: known are {', '.join(method_names())}")
    if "name" in options:  # it would replace the method, and the run be labelled with another
        raise MethodError(
            f"method_options cannot hold 'name' (got {options['name']!r}): set the method "
            f"itself (distill.method, or a sweep run's method) instead"
        )
    return build_method({"name": key, **options}, num_classes=num_classes)


def store_path(config: Config) -> Path | str:
    """``distill.store`` (a path, or an fsspec URL kept a string) or the run's own store."""
    store = config.distill.store
    if not store:
        return config.store_path
    return store if is_url(store) else Path(store)


def open_teacher_store(config: Config, train: Split) -> tuple[LogitStore, int, np.ndarray]:
    """The teacher's store, checked against ``train``: (store, views used, params (V, N, P))."""
    path = store_path(config)
    store = open_store(path)
    try:
        views = _check_store(store, config, train)
        return store, views, _stored_params(store, views, train)
    except BaseException:
        store.close()
        raise


def check_teacher_store(config: Config, train: Split) -> None:
    """``open_teacher_store``'s checks of the store against ``train`` and the config's views,
    without reading every chunk's checksum or the view parameters (the run does both): what the
    sweep runs for each store before its first student trains."""
    with open_store(store_path(config)) as store:
        _check_store(store, config, train, intact=False)


def _check_store(store: LogitStore, config: Config, train: Split, intact: bool = True) -> int:
    path = store.path
    if store.num_classes != train.num_classes:
        raise DistillError(
            f"store {path} holds {store.num_classes} classes but the dataset has "
            f"{train.num_classes}: use the store made for this dataset"
        )
    if store.num_samples != len(train):
        raise DistillError(
            f"store {path} holds {store.num_samples} rows but the training set has {len(train)}: "
            f"use the store made for this dataset (and the same data.train_subset)"
        )
    labels = store.labels
    if problem := labels_problem(labels, store.num_classes, required=True):
        raise DistillError(f"store {path}: {problem}: delete it and run precompute again")
    if not np.array_equal(labels, train.labels):
        bad = np.flatnonzero(labels != train.labels)
        raise DistillError(
            f"store {path}: labels differ from the dataset's at {len(bad)} row(s) (first: row "
            f"{bad[0]}, store {labels[bad[0]]} vs dataset {train.labels[bad[0]]}): use the store "
            f"made for this dataset"
        )
    check_fingerprint(path, store.fingerprint, train.fingerprint())
    if config.distill.views is None and store.num_views != config.augment.views:
        # ce and PS-KD (no teacher store) plan with augment.views: every method of a run must
        # see the same views.
        raise DistillError(
            f"store {path} holds {store.num_views} view(s) but augment.views="
            f"{config.augment.views}: set augment.views={store.num_views} as precompute had it, "
            f"or distill.views to train on the first n of them"
        )
    wanted = config.distill.views or store.num_views
    if wanted > store.num_views:
        raise DistillError(
            f"distill.views={wanted} but store {path} holds {store.num_views} view(s): ask for "
            f"at most {store.num_views}, or precompute with augment.views={wanted}"
        )
    missing = [(v, c) for v, c in store.missing_chunks() if v < wanted]
    if missing:
        raise DistillError(
            f"store {path} is unfinished ({len(missing)} chunk(s) of the first {wanted} view(s) "
            f"missing): rerun precompute to finish it"
        )
    if intact:  # damaged chunks are refused now, not epochs into the run (reads check them too)
        store.require_intact(range(wanted), config.distill.memory_budget_mb << 20)
    if store.layout.view_param_width != NUM_VIEW_PARAMS:
        raise DistillError(
            f"store {path} keeps {store.layout.view_param_width} augmentation parameter(s) per "
            f"row, not {NUM_VIEW_PARAMS}: it cannot replay the teacher's images; precompute again"
        )
    return wanted


def _stored_params(store: LogitStore, views: int, train: Split) -> np.ndarray:
    """The stored view parameters (V, N, P) int16, refused unless the generator agrees."""
    rows = np.arange(store.num_samples)
    table = np.empty((views, store.num_samples, NUM_VIEW_PARAMS), np.int16)
    for v in range(views):
        table[v] = store.read_array("view_params", rows, view=v)
        expected = view_params(train.augment.seed, v, rows, train.spec)
        if not np.array_equal(table[v], expected):
            n = int(np.flatnonzero((table[v] != expected).any(axis=1))[0])
            raise DistillError(
                f"store {store.path}: view {v} row {n} was made with augmentation parameters "
                f"{table[v, n].tolist()}, the generator gives {expected[n].tolist()}: the store "
                f"comes from another augmentation; precompute it again"
            )
    return table


def online_teacher(config: Config, train: Split, device: torch.device) -> torch.nn.Module:
    """The teacher checkpoint in memory, in eval mode, for ``teacher_source: online``."""
    model = load_model_from_checkpoint(config.teacher_checkpoint)
    channels, height, width = train.image_shape
    with torch.no_grad():
        probe = model(torch.zeros(1, channels, height, width))
    if probe.shape[1] != train.num_classes:
        raise ModelError(
            f"teacher {config.teacher_checkpoint} predicts {probe.shape[1]} classes, the dataset "
            f"has {train.num_classes}"
        )
    return model.to(device).eval()


@dataclass
class Sources:
    """Where one run's batches and teacher signal come from."""

    batches: EpochBatches
    store: LogitStore | None = None
    """The teacher's store (``teacher_source: store``)."""
    teacher: nn.Module | None = None
    """The teacher in memory (``teacher_source: online``)."""
    self_teacher: SelfTeacher | None = None
    """PS-KD's per-epoch stores of the student's own logits."""
    reads_disk: bool = False
    """Whether batches read logits from disk during the epoch (a store's views not held in
    RAM, or PS-KD's previous epoch): what a prefetch thread can hide."""

    def prefetch_depth(self, asked: int | None, device: torch.device) -> int:
        """``distill.prefetch``, or where it is None (auto): 2 on CUDA or when batches read the
        disk, else 0 (on the CPU the thread would only compete with the step)."""
        if asked is not None:
            return asked
        return 2 if device.type == "cuda" or self.reads_disk else 0


def build_sources(
    config: Config,
    train: Split,
    needs: str,
    device: torch.device,
    out: Path,
    key: str,
    world: World | None = None,
    accepted: tuple[str, ...] = (),
) -> Sources:
    """The batch plan and the logit sources for a method that ``needs`` logits,
    probabilities (PS-KD) or nothing (ce). Under DDP (``world``) this rank's share of the
    blocks. ``key``: the run's config hash (PS-KD's stores record it); ``accepted``: the keys
    of the same run made by earlier versions, whose stores a resumed run reads too."""
    cfg = config.distill
    rank, ranks = (world.rank, world.size) if world is not None else (0, 1)
    if needs == "probabilities" and ranks > 1 and config.precompute.backend != "zarr":
        # Ranks write their own blocks of the self-teacher store at once: zarr takes parallel
        # writes of whole shards; an HDF5 file has one writer, and sending every rank's logits
        # to rank 0 would cost N × C of traffic and memory each epoch.
        raise DistillError(
            f"PS-KD under torchrun writes its self-teacher store from every rank, which "
            f"precompute.backend={config.precompute.backend} cannot: set precompute.backend=zarr "
            f"(PS-KD reads no teacher store) or run on one process"
        )
    store = teacher = self_teacher = None
    params = ViewParams(train)
    views = cfg.views or config.augment.views
    if needs == "logits" and cfg.teacher_source == "store":
        store, views, table = open_teacher_store(config, train)
        params = ViewParams(train, table)
        block_rows = store.layout.chunk_rows
    else:
        # Without a store, the blocks a precompute with this config would have made: the plan
        # (and so the batches) is then the same as when reading that store.
        block_rows = make_layout(
            len(train),
            train.num_classes,
            views,
            config.precompute.encoding,
            config.precompute.chunk_rows,
        ).chunk_rows
        if needs == "logits":
            teacher = online_teacher(config, train, device)
    # The others shuffle over all rows when the teacher's views fit in RAM (as storage's
    # LogitBatches does); PS-KD writes as it reads, so it keeps to windows of blocks.
    budget = cfg.memory_budget_mb << 20
    in_ram = needs != "probabilities" and views * len(train) * train.num_classes * 4 <= budget
    sampler = BlockSampler(
        num_samples=len(train),
        block_rows=block_rows,
        num_views=views,
        window=-(-len(train) // block_rows) if in_ram else cfg.window,
        seed=cfg.seed,
        view_policy=cfg.view_policy,
        shard=rank,
        num_shards=ranks,
    )
    sampler.steps(cfg.batch_size)  # refuses a split that leaves a rank without rows for a step
    rows = StoreRows(store, in_ram=in_ram) if store is not None else None
    batches = EpochBatches(sampler, cfg.batch_size, train, params, rows, pin=device.type == "cuda")
    if needs == "probabilities":
        self_teacher = SelfTeacher(
            out / "pskd",
            num_samples=len(train),
            num_classes=train.num_classes,
            block_rows=block_rows,
            labels=train.labels,
            encoding=cfg.pskd_encoding,
            backend=config.precompute.backend,
            fingerprint={"config_hash": key, **train.fingerprint()},
            world=world,
            accepted=(key, *accepted),
        )
    reads_disk = self_teacher is not None or (store is not None and not in_ram)
    return Sources(batches, store, teacher, self_teacher, reads_disk)
