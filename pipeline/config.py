"""Typed run configuration: YAML in, dataclasses out, strict about every key.

A config is plain YAML read with ``yaml.safe_load`` (no code-executing tags). Every key must be a
field of the dataclasses below — a typo is an error that lists the keys that exist, never silently
ignored — and every value is checked against the field's type. Overrides come from the command
line as ``--set section.key=value``, the value parsed as YAML (``--set teacher.milestones=[5,8]``).
Each stage writes the resolved config next to its outputs, so a result always says how it was made.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError
from storage.encodings import ENCODINGS
from storage.urls import is_url


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"
    """Dataset kind: fashion_mnist, cifar10, cifar100, array, image_folder or synthetic."""
    path: str | None = None
    """Where the dataset's files are; None: the kind's default (Debian's package for
    Fashion-MNIST)."""
    train_subset: int | None = None
    """Use only the first n training rows (quick runs); None: all."""
    test_subset: int | None = None
    """Use only the first n test rows; None: all."""
    options: dict = field(default_factory=dict)
    """Extra arguments of the dataset kind (synthetic: num_samples, image_size, channels, ...)."""


@dataclass
class AugmentConfig:
    views: int = 4
    """V, augmentation views per sample stored by precompute."""
    pad: int = 2
    """Random-crop padding in pixels (crop offsets in [0, 2*pad])."""
    flip: bool = True
    """Random horizontal flips."""
    seed: int = 0
    """Seed of the counter-based generator of view parameters."""
    identity_view0: bool = True
    """View 0 is the clean image (no crop shift, no flip)."""


@dataclass
class TeacherConfig:
    model: str = "resnet20"
    """A name from the model zoo (pipeline.models.MODELS)."""
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [5, 8])
    """Epochs at which the learning rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    seed: int = 0
    augment: bool = True
    """Train on random views (fresh each epoch) rather than clean images."""
    checkpoint: str | None = None
    """Use this existing checkpoint instead of training (the user's own teacher)."""


@dataclass
class ExportConfig:
    opset: int = 18
    """ONNX opset (the dynamo exporter writes 18 or newer)."""
    atol: float = 1e-4
    """Largest |ONNX Runtime - PyTorch| accepted on the parity batches (float32)."""
    parity_batches: int = 4
    """Real batches of the training set checked for parity."""


ORT_PROVIDERS = ("auto", "cuda", "cpu")
STORE_BACKENDS = ("zarr", "hdf5")
MIN_OPSET = 7  # the oldest opset ONNX Runtime runs


@dataclass
class PrecomputeConfig:
    encoding: str = "float16"
    """How logits are stored: float32, float16, bfloat16, int8, topk."""
    backend: str = "zarr"
    """Store backend: zarr (default) or hdf5."""
    batch_size: int = 256
    provider: str = "auto"
    """ONNX Runtime provider: auto, cuda or cpu."""
    fp16: bool = False
    """Run the CUDA provider in float16 (GPU only)."""
    tf32: bool = False
    """Let the CUDA provider use TF32 for float32 convolutions and matrix products (faster;
    logits off by ~1e-2 on an H100). False keeps the GPU's logits float32 like the CPU's."""
    workers: int = 0
    """0: one process; n > 0: a local dask cluster of n workers."""
    scheduler: str | None = None
    """Address of a running dask.distributed scheduler (overrides workers)."""
    store: str | None = None
    """Where the store goes: a path, or an fsspec URL for the zarr backend (s3://bucket/x.zarr,
    file:///shared/x.zarr); None: RUN_DIR/store.zarr (.h5). distill reads it by default."""
    chunk_rows: int | None = None
    """Rows per chunk; None: about 1 MiB per chunk."""
    chunks_per_shard: int | None = None
    """Chunks per shard file (zarr); None: about 32 MiB per shard. A shard is the unit of
    writing, resuming and parallel work."""
    threads: int | None = None
    """ONNX Runtime intra-op threads; None: the cores this process may use."""
    parity_rows: int = 64
    """Rows of view 0 that a session other than the CPU's float32 one (CUDA, fp16, TF32) also
    runs through ONNX Runtime's CPU provider in float32 before it writes anything, to check its
    logits (recorded in RUN_DIR/precompute.parity.json); 0: no check."""
    parity_rtol: float | None = None
    """Largest accepted max |Δ| of that check, relative to max(1, the largest |logit|); None:
    1e-3 for float32, 5e-2 for TF32 and fp16 (pipeline.ort.SESSION_RTOL)."""


@dataclass
class DistillConfig:
    """A student trained from the store (recipe defaults: METHODS.md's CIFAR-100 recipe)."""

    student: str = "resnet8x4"
    """A name from the model zoo (pipeline.models.MODELS)."""
    method: str = "kd"
    """A method of pipeline.methods.METHODS (kd, dkd, ctkd, ls, ats, pskd, ls+dkd, ...) or ce
    (cross-entropy only, the baseline; needs no store)."""
    method_options: dict = field(default_factory=dict)
    """The method's own keys (e.g. {temperature: 2, beta: 6}); unset keys keep METHODS.md's."""
    teacher_source: str = "store"
    """Where teacher logits come from: store (the precomputed store) or online (the teacher
    checkpoint run in memory on the same inputs; for equivalence checks). ce and pskd read no
    teacher logits either way."""
    store: str | None = None
    """Path of the teacher's store; None: the run's own (precompute.store if set, else
    RUN_DIR/store.zarr, or store.h5 with precompute.backend=hdf5)."""
    views: int | None = None
    """Use the first n stored views; None: all of them."""
    view_policy: str = "epoch"
    """Which view the student sees: epoch (view = epoch mod V for every row), block (a random
    view per block of rows) or sample (a random view per row, drawn from (seed, epoch, row);
    free when the views fit memory_budget_mb, else each block is read once per view)."""
    window: int = 8
    """Blocks (store chunks) read together and shuffled as one pool of rows."""
    memory_budget_mb: int = 1024
    """Teacher views that fit this many MiB decoded (float32) are kept in RAM and shuffled over
    all rows instead of per window."""
    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    """0.05; METHODS.md uses 0.01 for MobileNet/ShuffleNet students and 0.1 for PS-KD."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    """Nesterov momentum (PS-KD's official recipe)."""
    schedule: str = "multistep"
    """Learning-rate schedule per epoch: multistep (milestones, gamma) or cosine."""
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    """Epochs at which multistep multiplies the learning rate by ``gamma``."""
    gamma: float = 0.1
    seed: int = 0
    """Seed of the student's initialisation and of the batch order."""
    pskd_encoding: str = "float32"
    """Encoding of PS-KD's self-teacher store (the student's own logits each epoch)."""
    device: str = "auto"
    """auto (CUDA when there is one), cpu or cuda."""
    eval_batch_size: int = 512
    prefetch: int | None = None
    """Batches prepared ahead by a background thread (0: none, everything in the loop). None:
    2 on CUDA, or where the teacher's logits or PS-KD's are read from disk during the epoch; 0 on
    the CPU with them in RAM, where the thread only competes with the step for the GIL and the
    cores (an MLP student trained 1.7x faster without it, BENCHMARKS.md)."""
    name: str | None = None
    """Output folder under RUN_DIR/distill; None: STUDENT-METHOD-sSEED (+ -online)."""
    ddp_timeout_s: float = 600
    """Under torchrun: seconds a rank waits for the others (start-up, each step's gradient
    average, epoch end) before it stops with an error instead of hanging."""

    def __post_init__(self) -> None:
        for key in (
            "epochs",
            "batch_size",
            "lr",
            "window",
            "eval_batch_size",
            "memory_budget_mb",
            "ddp_timeout_s",
        ):
            _positive(getattr(self, key), f"distill.{key}")
        for key in ("momentum", "weight_decay"):
            _positive(getattr(self, key), f"distill.{key}", allow_zero=True)
        if self.prefetch is not None:
            _positive(self.prefetch, "distill.prefetch", allow_zero=True)
        _positive(self.gamma, "distill.gamma")
        if self.views is not None:
            _positive(self.views, "distill.views")
        choices = {
            "teacher_source": ("store", "online"),
            "view_policy": ("epoch", "block", "sample"),
            "schedule": ("multistep", "cosine"),
            "device": ("auto", "cpu", "cuda"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"distill.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        _check_milestones(self.milestones, "distill.milestones")
        _check_seed(self.seed, "distill.seed")
        _check_name(self.name, "distill.name")


#: A student folder name's limit: file systems take 255 bytes, and suffixes are added to it.
MAX_NAME_BYTES = 200


def _check_name(name: str | None, what: str) -> None:
    """A student's folder name: None (named after student and method) or a plain folder name."""
    if name is not None and (not name or "/" in name or name[0] == "."):
        raise ConfigError(f"{what} must be a plain folder name, got {name!r}")
    if name is not None and len(name.encode()) > MAX_NAME_BYTES:  # -sSEED, .tmp suffixes to come
        raise ConfigError(
            f"{what} must be at most {MAX_NAME_BYTES} bytes (a folder name), got "
            f"{len(name.encode())}: shorten it"
        )


def _default_sweep_runs() -> list[dict]:
    return [{"method": m} for m in ("ce", "kd", "dkd", "ctkd", "ls+kd", "ls+dkd", "ats", "pskd")]


#: Distill keys a sweep run may not set: the seed comes from ``sweep.seeds``.
_SWEEP_FIXED = ("seed",)


@dataclass
class SweepConfig:
    """Many students from one store (the ``sweep`` stage): every run × every seed, one after
    another, each a copy of ``distill`` with the run's keys replaced."""

    runs: list[dict] = field(default_factory=_default_sweep_runs)
    """Each run a mapping of distill keys: ``method`` (required), and optionally ``student``,
    ``method_options`` (not inherited from ``distill``: options belong to their method), ``name``
    (the folder, ``-sSEED`` appended; default STUDENT-METHOD-sSEED) or any other distill key
    except ``seed``. Unset keys keep ``distill``'s values."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Each run is trained once per seed (``distill.seed``)."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("sweep.runs is empty: list at least one run, e.g. [{method: kd}]")
        if not self.seeds:
            raise ConfigError("sweep.seeds is empty: give at least one seed, e.g. [0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sweep.seeds has a seed twice: {self.seeds}")
        for seed in self.seeds:
            _check_seed(seed, "sweep.seeds")
        hints = typing.get_type_hints(DistillConfig)
        known = [f.name for f in dataclasses.fields(DistillConfig) if f.name not in _SWEEP_FIXED]
        runs = []
        for i, run in enumerate(self.runs):
            where = f"sweep.runs[{i}]"
            if not isinstance(run, dict):
                raise ConfigError(f"{where} must be a mapping of distill keys, got {run!r}")
            for key in run:
                if key in _SWEEP_FIXED:
                    raise ConfigError(f"{where}.{key}: a run's seeds come from sweep.seeds")
                if key not in hints:
                    raise ConfigError(
                        f"unknown key {where}.{key}: a run sets distill keys, known are "
                        f"{', '.join(known)}"
                    )
            if not isinstance(run.get("method"), str):
                raise ConfigError(f"{where} needs a method (e.g. {{method: kd}}), got {run!r}")
            run = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in run.items()}
            # checked before the sweep appends "-s<seed>": an empty name would pass as "-s0"
            _check_name(run.get("name"), f"{where}.name")
            runs.append(run)
        self.runs = runs


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Where every stage writes its outputs (checkpoints, ONNX file, store, metrics)."""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        _check_seed(self.augment.seed, "augment.seed")
        _check_seed(self.teacher.seed, "teacher.seed")
        _positive(self.augment.views, "augment.views")
        _positive(self.teacher.epochs, "teacher.epochs", allow_zero=True)
        _positive(self.teacher.batch_size, "teacher.batch_size")
        _positive(self.teacher.lr, "teacher.lr")
        for key in ("momentum", "weight_decay"):
            _positive(getattr(self.teacher, key), f"teacher.{key}", allow_zero=True)
        _positive(self.teacher.gamma, "teacher.gamma")
        _check_milestones(self.teacher.milestones, "teacher.milestones")
        for key in ("train_subset", "test_subset"):
            if getattr(self.data, key) is not None:  # None: every row
                _positive(getattr(self.data, key), f"data.{key}")
        _positive(self.precompute.batch_size, "precompute.batch_size")
        for key in ("threads", "chunk_rows", "chunks_per_shard"):
            if getattr(self.precompute, key) is not None:  # None: chosen automatically
                _positive(getattr(self.precompute, key), f"precompute.{key}")
        _positive(self.precompute.parity_rows, "precompute.parity_rows", allow_zero=True)
        rtol = self.precompute.parity_rtol
        if rtol is not None and not (0 < rtol < math.inf):
            raise ConfigError(f"precompute.parity_rtol must be a finite number > 0, got {rtol}")
        choices = (
            ("precompute.encoding", self.precompute.encoding, tuple(ENCODINGS)),
            ("precompute.backend", self.precompute.backend, STORE_BACKENDS),
            ("distill.pskd_encoding", self.distill.pskd_encoding, tuple(ENCODINGS)),
        )
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.precompute.provider not in ORT_PROVIDERS:
            raise ConfigError(
                f"precompute.provider must be one of {', '.join(ORT_PROVIDERS)}, got "
                f"{self.precompute.provider!r}"
            )
        _positive(self.export.atol, "export.atol")
        _positive(self.export.parity_batches, "export.parity_batches")
        if self.export.opset < MIN_OPSET:
            raise ConfigError(f"export.opset must be >= {MIN_OPSET}, got {self.export.opset}")
        if self.augment.pad < 0:
            raise ConfigError(f"augment.pad must be >= 0, got {self.augment.pad}")
        if self.precompute.workers < 0:
            raise ConfigError(f"precompute.workers must be >= 0, got {self.precompute.workers}")
        address = self.precompute.scheduler
        if address is not None and not _SCHEDULER_ADDRESS.fullmatch(address):
            raise ConfigError(
                f"precompute.scheduler must be a dask scheduler address like "
                f"tcp://host:8786, got {address!r}"
            )

    # Where each stage's outputs live: fixed names inside run_dir.
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def teacher_checkpoint(self) -> Path:
        return (
            Path(self.teacher.checkpoint)
            if self.teacher.checkpoint
            else (self.run_path / "teacher.pt")
        )

    @property
    def onnx_path(self) -> Path:
        return self.run_path / "teacher.onnx"

    @property
    def store_path(self) -> Path | str:
        """``precompute.store`` (a URL stays a string) or RUN_DIR/store.zarr (.h5)."""
        if self.precompute.store:
            store = self.precompute.store
            return store if is_url(store) else Path(store)
        suffix = ".zarr" if self.precompute.backend == "zarr" else ".h5"
        return self.run_path / f"store{suffix}"


#: A dask.distributed address: [protocol://]host:port, the host a name, an IPv4 or [IPv6].
_SCHEDULER_ADDRESS = re.compile(r"(?:[a-z][a-z0-9+.-]*://)?(?:\[[0-9A-Fa-f:.]+\]|[\w.-]+):\d{1,5}")


def _check_milestones(milestones: list[int], name: str) -> None:
    if sorted(milestones) != milestones or min(milestones, default=1) < 1:
        raise ConfigError(f"{name} must be increasing epochs >= 1, got {milestones}")


#: Seeds seed numpy's generators (non-negative integers) and torch's (at most 2**64 - 1).
MAX_SEED = 2**64 - 1


def _check_seed(seed: int, name: str) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{name}: a seed is a whole number from 0 to 2**64 - 1, got {seed!r}")


#: The largest whole number a setting takes: any count fits numpy's int64, any value a float.
MAX_INT = 2**62


def _positive(value: float, name: str, allow_zero: bool = False) -> None:
    # an int is finite, and may be too large for a float (math.isfinite would raise)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(
            f"{name} must be at most 2**62, got a {len(str(abs(value)))}-digit number"
        )
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value}")


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (YAML would keep the
    last silently: ``method: kd`` then ``method: dkd`` trained DKD). Checked as each mapping is
    composed, as written: merged keys (``<<: *anchor``) are not among them, and may be
    overridden."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue  # a merge, or a key that is no scalar (the constructor refuses it)
            key = (key_node.tag, key_node.value)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(
                    f"key {key_node.value!r} is given twice (line {line}): keep one"
                )
            seen.add(key)
        return node


_MERGE = "tag:yaml.org,2002:merge"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "not found"
            raise ConfigError(
                f"config file {path} {what}: give the path of a YAML config "
                f"(e.g. stages/configs/default.yaml)"
            )
        try:
            loader = _UniqueKeyLoader(path.read_text())  # what yaml.safe_load does, and more
            try:
                raw = loader.get_single_data() or {}
            finally:
                loader.dispose()
        except _DuplicateKey as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where else ""
            raise ConfigError(f"config file {path} is not valid YAML{at}: fix its syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, not "
                f"{type(raw).__name__}: configs are YAML (section: {{key: value}})"
            )
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = parsed
    return _build(Config, raw, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top)'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}: known keys in "
            f"{prefix.rstrip('.') or 'the top level'} are {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML value against a field's type (ints are accepted where floats are)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, key) for v in value]
    if hint is Any or (hint is dict and isinstance(value, dict)):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > MAX_INT:  # float() of 1e400 would raise
            raise ConfigError(
                f"{key} must be a finite number, got a {len(str(abs(value)))}-digit number"
            )
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is bool and isinstance(value, bool):
        return value
    if hint in (int, str) and isinstance(value, hint) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be {_name(hint)}, got {value!r}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_resolved(config: Config, path: str | Path) -> None:
    """Write the config as resolved (defaults + file + overrides) next to a stage's output.

    A kill mid-write (its fsync is the long part) leaves the old file and a temporary one
    beside it; the next write removes such leftovers first. Two commands finishing together
    may each take the other's temporary file for a leftover: a write whose own was removed
    writes again (the file is the same config either way)."""
    from pipeline.fileio import write_text_over_leftovers

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_over_leftovers(path, yaml.safe_dump(to_dict(config), sort_keys=False))
