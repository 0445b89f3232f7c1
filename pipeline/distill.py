"""The distill stage: a student from the zoo trained from the teacher's stored raw logits.

    for each epoch e:  batches in block order (view e mod V), images replayed from the store's
                       view parameters, raw logits to the device ahead of the step
                       loss = method(student(x), teacher_logits, y, ctx); SGD step
                       test accuracy; state written atomically; one JSON line of metrics

The teacher is never loaded (except with ``teacher_source: online``, the in-memory reference used
to check that the store changes nothing). The method applies its temperature or z-score to the
raw logits on the device, through the fused kernels on CUDA. ``ce`` trains on labels alone and
``pskd`` on the student's own previous-epoch predictions, kept in a self-teacher store.

Resuming: after every epoch the model, optimizer, scheduler, method state (CTKD's temperature),
RNG state, history and epoch go to ``state.pt`` (atomically). The batch order depends only on
(seed, epoch), so a run killed at any point and started again ends with the same weights, bit for
bit on the CPU, as one never interrupted. A finished run is not trained again.

Under ``torchrun`` (``make distill NPROC=n``) each rank trains on its own blocks of every epoch
with the model in DistributedDataParallel, and rank 0 writes the outputs; how the work is split,
and why, is in :mod:`pipeline.distill_ddp`.

Outputs, in ``RUN_DIR/distill/STUDENT-METHOD-sSEED/``: ``student.pt`` (weights_only-loadable,
with test accuracy and config), ``metrics.jsonl`` (one line per epoch), ``config.yaml``,
``state.pt`` while running, ``pskd/`` for PS-KD.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.config import Config, save_resolved, to_dict
from pipeline.data import Split, check_test_split, dataset_sha256, splits
from pipeline.distill_data import ToDevice, prefetch
from pipeline.distill_ddp import EveryRankError, RankStopped, World, pick_device
from pipeline.distill_inputs import (
    DistillError,
    Sources,
    build_sources,
    build_student_method,
    store_path,
)
from pipeline.distill_pskd import HostCopies
from pipeline.distill_state import (
    RunLock,
    Student,
    build_student,
    diverged_before,
    finished,
    load_state,
    restore_metrics,
    rng_state,
    save_diverged,
    save_state,
)
from pipeline.errors import EXPECTED_ERRORS, ModelError
from pipeline.fileio import remove_stale_temps
from pipeline.fingerprint import spec_hash
from pipeline.methods import MethodContext
from pipeline.metrics import divergence, write_metrics
from pipeline.models import MODELS, save_checkpoint
from pipeline.onnx_export import sha256_file
from storage import LogitStore, StoreError, StoreWarning, open_store

StepHook = Callable[[int, int, dict[str, torch.Tensor]], None]
"""``on_step(epoch, step, terms)``: called after each optimizer step (step counts from 1) with the
step's detached loss terms; for tests and custom logging (a ``float`` of a term syncs the GPU)."""


def output_dir(config: Config) -> Path:
    """RUN_DIR/distill/NAME: one folder per student, so many students share one store."""
    cfg = config.distill
    name = cfg.name
    if name is None:
        method = method_of(config)
        online = (
            "-online" if cfg.teacher_source == "online" and method not in ("ce", "pskd") else ""
        )
        name = f"{cfg.student}-{method}-s{cfg.seed}{online}"
    return config.run_path / "distill" / name


NOT_IN_KEY = ("device", "prefetch", "eval_batch_size", "ddp_timeout_s")
"""Distill keys that do not change the trained weights (on one device), so not in the key. Nor
is the world size under torchrun (see :mod:`pipeline.distill_ddp`)."""


def method_of(config: Config) -> str:
    """``distill.method`` in one spelling ("KD", "ls + dkd" are kd, ls+dkd): the folder, the key
    and every check use it, so a respelling is the same run."""
    return config.distill.method.strip().lower().replace(" ", "")


# The class count changes no check of a method's options, only the size of instance-wise CTKD's
# MLP, which build_student builds again with the dataset's.
_CHECK_CLASSES = 2


def check_recipe(config: Config) -> None:
    """What ``build_student`` refuses that needs no data: an unknown student, an unknown method
    or options it does not take or cannot have. Checked first, so that a bad option is named as
    such, not as "a finished run with another config" because it changed the config's key.

    Raises:
        ModelError: an unknown student.
        MethodError: an unknown method, or a bad option.
    """
    cfg = config.distill
    if cfg.student not in MODELS:  # build_model's words
        raise ModelError(f"unknown model {cfg.student!r}; choose one of: {', '.join(MODELS)}")
    # Instance-wise CTKD draws its MLP's weights: from a generator of its own, so that the
    # check leaves the caller's (and a finished run returns with it as it was).
    with torch.random.fork_rng(devices=[]):
        build_student_method(cfg.method, cfg.method_options, _CHECK_CLASSES)


def accepted_keys(config: Config) -> tuple[str, ...]:
    """The keys a finished or saved run of this config may carry: the key, then those of runs
    made before it took the method in one spelling or the block layout in (``config_key``)."""
    blocks = _block_layout(config)  # the store opened once, not once a key
    keys = [
        config_key(config, legacy, spelled, located, blocks=blocks)
        for located in (False, True)
        for legacy in (False, True)
        for spelled in (False, True)
    ]
    return tuple(dict.fromkeys(keys))


_UNREAD = object()  # config_key's blocks: not read yet


def config_key(
    config: Config,
    legacy: bool = False,
    spelled: bool = False,
    located: bool = False,
    *,
    blocks: dict | object | None = _UNREAD,
) -> str:
    """What the weights depend on; a state or checkpoint made with another key is refused
    (``legacy``: the key before the block layout was in it, which a finished run may have;
    ``spelled``: with the method as the config spells it, as before 2026-11-27; ``located``:
    with ``data.path`` where the dataset's content hash is since 2026-11-27, so that a moved
    dataset, or run folder, keeps its students)."""
    d = to_dict(config)
    if not spelled:
        d["distill"]["method"] = method_of(config)
    if not located:
        d["data"]["path"] = dataset_sha256(config.data)
    # Where and how fast it runs is not what it computes: a run may resume on another device or
    # with other prefetch / evaluation batch sizes.
    for key in NOT_IN_KEY:
        d["distill"].pop(key, None)
    spec = {k: d[k] for k in ("distill", "data", "augment")}
    if legacy:  # the key of runs trained before the block layout was part of it
        return spec_hash(spec)
    # The block layout: the blocks every epoch's batches are cut from (the chunks of the store
    # the run reads, or those a precompute of this config would make when it reads none), and
    # the logits' encoding.
    if blocks is _UNREAD:
        blocks = _block_layout(config)
    spec["blocks"] = blocks or {k: d["precompute"][k] for k in ("encoding", "chunk_rows")}
    return spec_hash(spec)


def _block_layout(config: Config) -> dict | None:
    """The encoding and chunk_rows of the store the run reads its teacher's logits from (what
    ``build_sources`` cuts the batches from), or None when it reads none or there is none yet."""

    def layout(store: LogitStore) -> dict:
        return {"encoding": store.layout.encoding, "chunk_rows": store.layout.chunk_rows}

    try:
        return _from_teacher_store(config, layout)
    except StoreError:  # the key of a config whose store is not made yet
        return None


def teacher_fingerprint(config: Config) -> dict | None:
    """What the run's teacher logits come from: the fingerprint of the store it reads, or for an
    online run ``{"teacher_sha256": ...}`` of the checkpoint it runs. A finished or saved run
    made from another (a teacher retrained, precompute rerun) is refused rather than reused. None
    when it reads no teacher (ce, pskd).

    Raises:
        StoreError: the run reads a store that is not there or cannot be opened (its own line:
            a student whose store was moved away is not one "of another config").
    """
    cfg = config.distill
    if cfg.teacher_source == "online" and method_of(config) not in ("ce", "pskd"):
        path = config.teacher_checkpoint
        if not path.is_file():  # the run's own check says so, in its words
            return None
        return {"teacher_sha256": sha256_file(path)}
    return _from_teacher_store(config, lambda store: dict(store.fingerprint))


def reads_teacher_store(config: Config) -> bool:
    """Whether the run's method reads its teacher's logits from a store (not ce, pskd, online)."""
    return config.distill.teacher_source == "store" and method_of(config) not in ("ce", "pskd")


def _from_teacher_store(config: Config, read: Callable[[LogitStore], dict]) -> dict | None:
    """``read`` of the teacher store the run reads, or None when it reads none."""
    if not reads_teacher_store(config):
        return None
    with open_store(store_path(config)) as store:
        return read(store)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    device: torch.device,
    batch_size: int = 512,
    world: World | None = None,
) -> float:
    """Top-1 accuracy (%) on clean images. Under DDP batch i runs on rank i mod W and the counts
    are summed: the one-process batches, so the same result."""
    model.eval()
    world = world or World()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i, start in enumerate(range(0, len(split), batch_size)):
        if i % world.size != world.rank:
            continue
        x, y, _ = split.batch(np.arange(start, min(start + batch_size, len(split))))
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum()
    return 100.0 * int(world.sum_(correct)) / max(1, len(split))


class TermSums:
    """Σ term · rows of each named loss term over an epoch, kept on the device.

    One ``stack`` and one ``add_`` a step whatever the number of terms (a method's terms do not
    change within an epoch; if they do, the sums so far are set aside under their names): on a
    GPU with a small student every launch a step saves is host time saved.
    """

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()
        self.acc: torch.Tensor | None = None  # (len(keys),) float32
        self.done: dict[str, torch.Tensor] = {}

    def add(self, terms: dict[str, torch.Tensor], rows: int) -> None:
        values = torch.stack([v.detach().float() for v in terms.values()])
        if self.acc is not None and tuple(terms) == self.keys:
            self.acc.add_(values, alpha=rows)
            return
        self._set_aside()
        self.keys, self.acc = tuple(terms), values * rows

    def _set_aside(self) -> None:
        if self.acc is not None:
            for key, value in zip(self.keys, self.acc, strict=True):
                self.done[key] = self.done.get(key, 0) + value
        self.acc = None

    def total(self) -> float:
        """The running Σ total · rows (waits for the device: for the progress bar, rarely)."""
        done = float(self.done.get("total", 0.0))
        if self.acc is None or "total" not in self.keys:
            return done
        return done + float(self.acc[self.keys.index("total")])

    def totals(self) -> dict[str, torch.Tensor]:
        """Each term's sum; ends the accumulation."""
        self._set_aside()
        return self.done


def _train_epoch(
    epoch: int,
    step: int,
    config: Config,
    student: Student,
    net: nn.Module,
    src: Sources,
    feeder: ToDevice,
    bar: tqdm,
    on_step: StepHook | None,
    open_stores: list[LogitStore],
    world: World,
) -> tuple[dict, int]:
    """One pass over the training set: (its metrics record, the global step after it).

    ``net`` is the model, or under DDP the model inside DistributedDataParallel."""
    cfg = config.distill
    method = student.method
    needs = method.teacher_input
    net.train()
    method.train()
    previous = writer = None
    if src.self_teacher is not None:
        previous = src.self_teacher.rows(epoch)
        if previous is not None:
            open_stores.append(previous.store)
        writer = src.self_teacher.writer(epoch)
        open_stores.append(writer.store)
        copies = HostCopies(writer.add, feeder.device)
    plan = src.batches.step_rows(epoch)  # (ranks, steps): rows of each rank at each step
    step_total = plan.sum(axis=0)  # (steps,) rows of each step over all ranks
    learned = [p for p in method.parameters() if p.requires_grad]
    device = feeder.device
    sums = TermSums()  # loss terms × rows, summed on the device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    t0 = time.perf_counter()
    depth = src.prefetch_depth(cfg.prefetch, feeder.device)
    batches = feeder(prefetch(src.batches(epoch, previous), depth))
    for i, batch in enumerate(batches):
        logits = net(batch.x)  # (B, K)
        if needs == "logits" and src.teacher is not None:
            with torch.no_grad():
                teacher = src.teacher(batch.x)  # (B, K), online
        elif needs == "logits":
            teacher = batch.teacher  # (B, K) raw logits from the store
        elif needs == "probabilities" and batch.previous is not None:
            teacher = F.softmax(batch.previous.float(), dim=1)  # PS-KD's P_prev (B, K)
        else:
            teacher = None  # ce, or PS-KD's first epoch (one-hot targets)
        terms = method(logits, teacher, batch.y, MethodContext(epoch, cfg.epochs, step))
        loss = terms["total"]
        if world.distributed:  # DDP averages over ranks: weighted, the mean over the step's rows
            loss = loss * (world.size * len(batch.indices) / int(step_total[i]))
        student.opt.zero_grad(set_to_none=True)
        loss.backward()
        world.average_grads_(learned)  # CTKD's temperature: not in the model DDP reduces
        student.opt.step()
        step += 1
        if writer is not None:  # PS-KD: this forward pass is the next epoch's teacher
            copies.add(batch.indices, logits.detach())
        n = len(batch.indices)
        sums.add(terms, n)
        correct += (logits.detach().argmax(1) == batch.y).sum()
        seen += n
        if on_step is not None:
            on_step(epoch, step, {k: v.detach() for k, v in terms.items()})
        bar.update(int(step_total[i]))
        # Reading the sums waits for the GPU (and empties its queue): rarely there.
        every = 100 if device.type == "cuda" else 10
        if not bar.disable and (step % every == 0 or bar.n == bar.total):
            bar.set_postfix(  # under DDP: loss and accuracy of rank 0's rows
                loss=f"{sums.total() / seen:.3f}",
                acc=f"{100 * int(correct) / seen:.1f}",
                rows_s=f"{bar.n / (time.perf_counter() - t0):.0f}",
            )
    if device.type == "cuda":  # the steps still queued on the GPU belong to this epoch's time
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if previous is not None:
        previous.store.close()
    if writer is not None:
        copies.flush()
        writer.close()
    sums = sums.totals()
    if world.distributed:  # every rank's sums, in one all_reduce
        keys = list(sums)
        counts = torch.tensor([seen], dtype=torch.float64, device=device)
        total = world.sum_(torch.cat([*(sums[k].double().view(1) for k in keys), counts]))
        sums = dict(zip(keys, total[:-1], strict=True))
        seen = int(total[-1])
        correct = world.sum_(correct)
    whole = replace(src.batches.sampler, shard=0, num_shards=1)  # every rank's blocks
    record = {
        "epoch": epoch + 1,
        "lr": student.opt.param_groups[0]["lr"],
        "loss": {k: float(v) / max(1, seen) for k, v in sums.items()},
        "train_acc": 100.0 * int(correct) / max(1, seen),
        "rows_per_s": seen / max(seconds, 1e-9),
        "views": np.unique(whole.row_views(epoch, whole.blocks(epoch))).tolist(),
    }
    if world.distributed:
        record["world_size"] = world.size
    return record, step


class DivergedError(EveryRankError):
    """The training loss became NaN or infinite, or grew over ``metrics.GROWTH_LIMIT`` times its
    first epoch's: the run stopped, its last good state kept."""


#: Beside a run's outputs once it diverged (pipeline.distill_state.save_diverged).
DIVERGED_FILE = "diverged.json"


def _diverged_error(
    name: str,
    record: dict,
    epochs: int,
    world: World,
    *,
    marker: Path | None = None,
    section: str = "distill",
) -> DistillError:
    """The one line of a divergence; ``marker``: the diverged.json that recorded it earlier;
    ``section``: where the run's keys are set (``distill``, or a sweep's ``sweep.runs[i]``)."""
    earlier = marker is not None
    epoch = record["epoch"]
    what, detail = record["diverged"]
    kept = f"state.pt keeps epoch {epoch - 1}" if epoch > 1 else "no state to resume"
    message = (
        f"{name} diverged{' in an earlier run' if earlier else ''}: its loss {what} in epoch "
        f"{epoch}/{epochs} ({detail}); stopped with no student (metrics.jsonl shows the epoch, "
        f"{kept}): lower {section}.lr or the method's loss weights, under another {section}.name "
        f"(or delete this run's folder)"
    )
    if earlier:  # e.g. on another device, where the numbers differ, the same run may not
        message += f"; delete {marker} to train it again as it is"
    return DivergedError(message) if world.main else RankStopped(message)


def check_not_diverged(
    config: Config, world: World | None = None, *, section: str = "distill"
) -> None:
    """Raise the run's divergence again when this very run (same config) diverged before: with
    fixed seeds it would only retrain up to the same diverged epoch. ``section``: where the
    run's keys are set (``distill``, or a sweep's ``sweep.runs[i]``), for the advice.

    Raises:
        DivergedError: on rank 0 (RankStopped on the others), naming the epoch.
    """
    out = output_dir(config)
    marker = out / DIVERGED_FILE
    record = next(
        (r for k in accepted_keys(config) if (r := diverged_before(marker, k)) is not None), None
    )
    if record is not None:
        world = world or World.from_env()
        raise _diverged_error(
            out.name, record, config.distill.epochs, world, marker=marker, section=section
        )


def train_student(
    config: Config,
    *,
    progress: bool = True,
    on_step: StepHook | None = None,
    section: str = "distill",
) -> Path:
    """Train (or resume, or skip when finished) one student; return its checkpoint path.

    ``section``: where the run's keys are set, named in the advice of a refusal or divergence
    ("set distill.name"): ``distill``, or ``sweep.runs[i]`` for a sweep's run, which does not
    inherit ``distill.name``.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; see :mod:`pipeline.distill_ddp`."""
    cfg = config.distill
    world = World.from_env()
    device = None  # one process: picked where it always was, after the finished-run check
    if world.distributed:  # the backend depends on the device
        try:
            device = pick_device(cfg.device, world)
            world.start(device, cfg.ddp_timeout_s)
        except EXPECTED_ERRORS as exc:
            if world.local_rank != 0:  # every rank of a node sees the same: local rank 0 says it
                raise RankStopped(str(exc)) from None
            raise
    lock = RunLock(output_dir(config))  # taken by rank 0 in _train, where errors are agreed
    try:
        return _train(config, world, device, progress, on_step, lock, section)
    finally:
        lock.release()
        world.stop()


def _train(
    config: Config,
    world: World,
    device: torch.device | None,
    progress: bool,
    on_step: StepHook | None,
    lock: RunLock,
    section: str,
) -> Path:
    cfg = config.distill
    out = output_dir(config)
    ckpt_path, state_path = out / "student.pt", out / "state.pt"
    try:  # under DDP the ranks agree on the set-up before the first collective of training
        check_recipe(config)  # a bad option is named as such, not as another config's run
        key = config_key(config)  # reads the dataset (its content hash): inside the agreement
        source = teacher_fingerprint(config)
        if finished(ckpt_path, accepted_keys(config), source, section=section):
            if world.main:
                restore_metrics(ckpt_path, out / "metrics.jsonl")
            world.agree(None)
            return ckpt_path
        check_not_diverged(config, world, section=section)
        state = load_state(state_path, accepted_keys(config), source, section=section)
        device = device or pick_device(cfg.device)
        train, test = splits(config)
        check_test_split(test)  # read now: a missing file is refused before any write
        student, kwargs = build_student(config, train, device)
        src = build_sources(
            config, train, student.method.teacher_input, device, out, key, world,
            accepted_keys(config),
        )  # fmt: skip
        if world.main:  # once its inputs are checked: a refused run changes nothing
            # One process per student folder (two would remove each other's temporary files
            # and PS-KD stores); one that finished or saved an epoch since we looked: rerun.
            lock.acquire()
            now = load_state(state_path, accepted_keys(config), source, section=section)
            if ckpt_path.exists() or (now or {}).get("epoch") != (state or {}).get("epoch"):
                raise DistillError(
                    f"{out} was trained by another process while this one started: rerun the "
                    f"same command to find it finished or resume it"
                )
            save_resolved(config, out / "config.yaml")
        history: list[dict] = []
        first = step = 0
        if state is not None:
            saved_by = student.load(state, device, world.rank, world.size)
            history = json.loads(state["history"])
            first, step = int(state["epoch"]) + 1, int(state["step"])
            if saved_by != world.size and world.main and progress:
                print(
                    f"{out.name}: resuming a state saved by {saved_by} process(es) with "
                    f"{world.size}: the same run, but its steps now train on other rows",
                    flush=True,
                )
        if world.main:  # temporary files of writes a kill cut short
            remove_stale_temps(
                out, ("state.pt", "metrics.jsonl", "student.pt", "config.yaml", DIVERGED_FILE)
            )
            (out / DIVERGED_FILE).unlink(missing_ok=True)  # another config's: this one trains
        if state is not None and world.main:
            # A kill between state.pt and metrics.jsonl leaves the metrics an epoch behind.
            write_metrics(out / "metrics.jsonl", history)
        if src.self_teacher is not None and world.main:
            src.self_teacher.keep_only(first - 1)  # a killed epoch's half-written store goes
    except (*EXPECTED_ERRORS, OSError) as exc:
        if not world.distributed:
            raise
        world.agree(exc)
    world.agree(None)

    feeder = ToDevice(device)
    open_stores: list[LogitStore] = [src.store] if src.store is not None else []
    try:
        net = world.wrap(student.model, device)
        for epoch in range(first, cfg.epochs):
            t0 = time.perf_counter()
            bar = tqdm(
                total=len(train),
                disable=not (progress and world.main),
                leave=False,
                unit="rows",
                unit_scale=True,
                desc=f"{out.name} epoch {epoch + 1}/{cfg.epochs}",
            )
            with bar:
                record, step = _train_epoch(
                    epoch, step, config, student, net, src, feeder, bar, on_step, open_stores, world
                )
            student.sched.step()
            world.broadcast_(list(student.model.buffers()))  # batch-norm statistics: rank 0's
            record["test_acc"] = evaluate(student.model, test, device, cfg.eval_batch_size, world)
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            why = divergence(record, history[0])
            if why is not None:  # the same sums on every rank: all stop here
                record["diverged"] = list(why)
                if world.main:  # the epoch stays in the metrics (the report shows it)
                    write_metrics(out / "metrics.jsonl", history)
                    save_diverged(out / DIVERGED_FILE, key, record)
                raise _diverged_error(out.name, record, cfg.epochs, world, section=section)
            rng = world.gather(rng_state(device)) if world.distributed else None
            if world.main:
                save_state(
                    state_path,
                    student,
                    device,
                    epoch=epoch,
                    step=step,
                    history=history,
                    key=key,
                    ranks_rng=rng,
                    source=source,
                )
                write_metrics(out / "metrics.jsonl", history)
                if src.self_teacher is not None:
                    src.self_teacher.keep_only(epoch)  # the next epoch reads this one
            if progress and world.main:
                terms = ", ".join(f"{k} {v:.4f}" for k, v in record["loss"].items())
                print(
                    f"{out.name} epoch {epoch + 1}/{cfg.epochs}: {terms}; train top-1 "
                    f"{record['train_acc']:.2f}%, test top-1 {record['test_acc']:.2f}%",
                    flush=True,
                )
    except BaseException as exc:
        explained = world.explain(exc)  # under DDP: names the rank, or the peer that failed
        if explained is exc:
            raise
        raise explained from None
    finally:
        for store in open_stores:
            with warnings.catch_warnings():  # a failed epoch's unfinished blocks are expected
                warnings.simplefilter("ignore", StoreWarning)
                store.close()

    if world.main:
        save_checkpoint(
            ckpt_path,
            student.model,
            model_name=cfg.student,
            model_kwargs=kwargs,
            extra={
                "test_acc": history[-1]["test_acc"],
                "method": cfg.method,
                "method_state": {k: v.cpu() for k, v in student.method.state_dict().items()},
                "history": json.dumps(history),
                "config_hash": key,
                "config": json.dumps(to_dict(config)),
                "teacher_store": src.store.path if src.store is not None else None,
                # The teacher store's fingerprint (or the online teacher's sha256), as checked
                # when the run started; None for ce and pskd.
                "store_fingerprint": None if source is None else json.dumps(source),
            },
        )
        state_path.unlink(missing_ok=True)
    world.barrier()  # the checkpoint exists on every rank's return
    return ckpt_path
