"""``distill`` under ``torchrun``: one process per device, each training on its own blocks.

    torchrun --standalone --nproc_per_node=W -m pipeline distill ...     (make distill NPROC=W)

Rank and world size come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The process group is NCCL on CUDA (rank r on
cuda:LOCAL_RANK) and gloo on the CPU, and every collective gives up after ``distill.ddp_timeout_s``.
With WORLD_SIZE unset or 1 nothing here does anything: the run is the one-process run, bit for bit.

How the work is split, and why:

- Rows: rank r reads blocks r, r + W, r + 2W, ... of the epoch's shuffled block order
  (``BlockSampler`` shard r of W), so ranks read disjoint, chunk-aligned blocks and every row is
  trained on once per epoch. (Teacher views that fit ``distill.memory_budget_mb`` are held in RAM by
  every rank: the budget is per process.)
- Steps: DDP hangs unless every rank makes the same number of optimizer steps. An epoch keeps the
  one-process count S = ceil(N / distill.batch_size), and each rank spreads its own rows evenly
  over those S steps (``BlockSampler.step_rows``). distill.batch_size thus stays the global batch,
  no row is dropped or repeated for the remainder, and the schedule sees the same steps for any W.
- Gradients: rank r scales its loss by W · b_r / B (b_r its rows of the step, B all ranks' rows),
  so DDP's average of the ranks' gradients is exactly the gradient of the mean loss over the
  step's B rows. The method's own parameters (CTKD's temperature) are not in the model DDP wraps;
  their gradients are averaged with one all_reduce per step. All ranks then hold the same weights.
  Batch-norm statistics are per rank, as in any DDP run; rank 0's are broadcast after each epoch,
  so every rank evaluates, and rank 0 saves, the same weights.
- Outputs: rank 0 alone writes config.yaml, state.pt, metrics.jsonl, student.pt and the progress
  output; the metrics are sums over all ranks. Test accuracy: evaluation batch i (the batches of
  a one-process evaluation) runs on rank i mod W and the correct counts are summed, which equals
  a one-process evaluation of the same weights exactly.
- Resume: state.pt (rank 0, atomically, after each epoch) adds every rank's RNG state to what one
  process saves; every rank loads it, so a killed run resumed with the same W ends as an
  uninterrupted one (bit for bit with 2 gloo ranks; with 3 or more the gradients' all-reduce may
  sum in another order after a resume: differences of ~1e-8, measured up to 6e-8). Weights,
  optimizer, schedule, step count and CTKD's temperature mean the same for any W, so a state saved
  with another world size resumes too (from there on the steps train on other rows: well defined,
  not bit-reproducible). The world size is not in the config key.
- Errors: a failure before the first step is shared with one collective and rank 0 prints its one
  line (before the group exists every rank of a node sees the same config and environment, so only
  local rank 0 prints). A later failure prints one line on the failing rank, naming it; the others
  fail at their next collective (or time out), end with one line each, and torchrun stops them and
  adds its own report.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distill_inputs import DistillError
from pipeline.errors import EXPECTED_ERRORS


class RankStopped(DistillError):
    """This rank stops because of an error another rank reports (the CLI prints nothing)."""


class EveryRankError(DistillError):
    """An error every rank meets at the same point with the same values (a diverged loss, from
    sums all-reduced over the ranks): rank 0 reports it without a rank in front."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistillError(f"{name}={value!r} is not a whole number: start with torchrun") from None


@dataclass
class World:
    """This process's place among the ranks of a run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    owns_group: bool = False
    """Whether :meth:`start` created the process group (and :meth:`stop` destroys it)."""
    timeout_s: float = 0.0
    """How long a collective waits for the other ranks (when :meth:`start` made the group)."""

    @classmethod
    def from_env(cls) -> World:
        """The ranks torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
        size = _env_int("WORLD_SIZE") or 1
        if size <= 1:
            return cls()
        rank = _env_int("RANK")
        if rank is None or not 0 <= rank < size:
            raise DistillError(
                f"WORLD_SIZE={size} but RANK={os.environ.get('RANK')!r}: start the ranks with "
                f"torchrun (python -m torch.distributed.run), which sets both"
            )
        local = _env_int("LOCAL_RANK")
        local_size = _env_int("LOCAL_WORLD_SIZE")
        return cls(rank, size, rank if local is None else local, local_size or size)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the outputs and prints."""
        return self.rank == 0

    def where(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # ---- the group ---------------------------------------------------------------------------
    def start(self, device: torch.device, timeout_s: float) -> None:
        """Join the other ranks (NCCL on CUDA, gloo on the CPU); a no-op for one process."""
        if not self.distributed:
            return
        if dist.is_initialized():  # the caller made the group: use it, leave it to them
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.size):
                raise DistillError(
                    f"the process group is rank {dist.get_rank()} of {dist.get_world_size()} but "
                    f"the environment says {self.where()}: initialise it from torchrun's variables"
                )
            return
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise DistillError(
                f"WORLD_SIZE={self.size} but {', '.join(missing)} unset: start the ranks with "
                f"torchrun (python -m torch.distributed.run --standalone --nproc_per_node=N)"
            )
        try:
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, ValueError, TimeoutError) as exc:
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise DistillError(
                f"{self.where()} could not join the others at {where} within "
                f"{timeout_s:g} s ({_first_line(exc)}): start every rank with the same torchrun "
                f"command, or raise distill.ddp_timeout_s"
            ) from None
        self.owns_group, self.timeout_s = True, timeout_s

    def stop(self) -> None:
        """Leave the group this object created (also after a failure: it then tears down at once
        instead of aborting the process at exit)."""
        if self.owns_group and dist.is_initialized():
            with contextlib.suppress(RuntimeError):  # a failed group may refuse: exiting anyway
                dist.destroy_process_group()
        self.owns_group = False

    # ---- collectives (each a no-op for one process) -----------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: object) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (exact for integers)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def agree(self, error: BaseException | None) -> None:
        """After the set-up: stop every rank if any failed; rank 0 raises the (first) error."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        failed = [(r, m) for r, m in enumerate(self.gather(_message(error))) if m is not None]
        if not failed:
            return
        if self.main and error is not None:
            raise error
        rank, message = failed[0]
        if self.main:
            raise DistillError(f"rank {rank} of {self.size}: {message}")
        raise RankStopped(f"{self.where()} stops: rank {rank} failed ({message})") from None

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` inside DistributedDataParallel (the module itself for one process)."""
        if not self.distributed:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` (buffers, method parameters) on every rank."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t.data, 0)

    def average_grads_(self, params: list[nn.Parameter]) -> None:
        """The mean over the ranks of the gradients of ``params`` (those DDP does not reduce),
        in one all_reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.distributed or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def explain(self, exc: BaseException) -> BaseException:
        """``exc`` as this rank reports it: a project error names the rank; a collective that
        failed because another rank died or hung becomes one line."""
        if not self.distributed or isinstance(exc, RankStopped | EveryRankError):
            return exc
        if isinstance(exc, EXPECTED_ERRORS) and not str(exc).startswith("rank "):
            exc.args = (f"{self.where()}: {exc}", *exc.args[1:])
            return exc
        if is_peer_failure(exc):
            what = _first_line(exc)
            limit = (
                f"distill.ddp_timeout_s={self.timeout_s:g} s"
                if self.timeout_s
                else "the process group's timeout"
            )
            why = (
                f"another rank did not answer within {limit}"
                if "timed out" in what.lower()
                else "another rank stopped (its own error, or the signal that killed it, is on "
                "another line)"
            )
            return DistillError(
                f"{self.where()}: {why} ({what}); rerun the same command to resume from the last "
                f"finished epoch"
            )
        return exc


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed (a peer died, or a timeout)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        key in text for key in ("gloo", "NCCL", "Connection closed by peer", "Timed out")
    )


def _message(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return str(error) or type(error).__name__


def _first_line(exc: BaseException) -> str:
    """The gist of a (backend) error: its first sentence, without a source location."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", lines[0] if lines else "")
    return (text.split(". ")[0] or type(exc).__name__)[:200]


def pick_device(name: str, world: World | None = None) -> torch.device:
    """``distill.device`` as a torch device; ``auto`` takes CUDA when there is one, and under
    torchrun rank r takes cuda:LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DistillError("distill.device=cuda but no CUDA device is visible: use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda" or world is None or not world.distributed:
        return torch.device(name)
    count = torch.cuda.device_count()
    if world.local_size > count:  # the same check on every rank of the node
        raise DistillError(
            f"{world.local_size} processes on this node but {count} CUDA device(s) visible: start "
            f"at most {count} (torchrun --nproc_per_node={count}), one per device"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)
