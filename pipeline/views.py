"""Replayable augmentation views: the same augmented image for the teacher and the student.

Teacher and student must see the same augmented image ("patient and consistent", Beyer et al.,
2022). View ``v`` of sample ``n`` is made from parameters drawn by a counter-based generator keyed
by ``(seed, v, n)``: a splitmix64 hash chain in numpy uint64 arithmetic, so the numbers depend on
nothing else — not the machine, batch size, worker count, sample order or world size — and can be
recomputed at any time or read back from the store's ``view_params`` (V, N, P) int16.

    h = mix(mix(mix(mix(mix(GOLDEN ^ DOMAIN) ^ seed) ^ v) ^ column)   # mix: splitmix64 finaliser
    u = mix(h ^ n)                                                   # vectorised over n
    dx = (u >> 32) * (2 * pad + 1) >> 32                             # an integer in [0, 2 * pad]

``view_params`` columns (``P = NUM_VIEW_PARAMS = 3``):

    0  dx    left edge of the crop in the zero-padded image, in [0, 2 * pad]; pad = no shift
    1  dy    top edge of the crop in the zero-padded image, in [0, 2 * pad]; pad = no shift
    2  flip  1: mirror horizontally (after the crop), 0: not

The crop has the image's own size, so a view is the image shifted by (pad - dx, pad - dy) pixels
with zeros filling in, then maybe mirrored. With ``identity_view0`` (the default) view 0 is the
clean image: dx = dy = pad, flip = 0. V = 1 with identity_view0 is the plain clean-image setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError

NUM_VIEW_PARAMS = 3
"""P, the width of a row of view parameters (columns: dx, dy, flip)."""
P = NUM_VIEW_PARAMS
COL_DX, COL_DY, COL_FLIP = 0, 1, 2

#: Names the generator in the spec's dict: a change of algorithm must change the fingerprint.
GENERATOR = "splitmix64-chain-v1"

_MASK64 = (1 << 64) - 1
# The domain word keeps the view-parameter stream apart from other uses of the same seed.
_DOMAIN_VIEWS = 0x6C6F676974766965  # ASCII "logitvie"


@dataclass(frozen=True)
class AugmentSpec:
    """How views are drawn: zero padding + random crop of the image's own size, and flips."""

    pad: int = 2
    """Zero padding in pixels on each side; crop offsets dx, dy lie in [0, 2 * pad]."""
    flip: bool = True
    """Random horizontal flips (probability 1/2)."""
    identity_view0: bool = True
    """View 0 is the clean image (dx = dy = pad, no flip)."""

    def __post_init__(self) -> None:
        if not 0 <= int(self.pad) <= 1000:
            raise ConfigError(f"augment pad must be in [0, 1000], got {self.pad}")

    def to_dict(self) -> dict:
        """JSON-able, fixed key order; what the store's fingerprint hashes."""
        return {
            "generator": GENERATOR,
            "pad": int(self.pad),
            "flip": bool(self.flip),
            "identity_view0": bool(self.identity_view0),
            "crop": "image_size",
            "columns": ["dx", "dy", "flip"],
        }


@dataclass(frozen=True)
class PreprocessSpec:
    """uint8 -> float32: ``(x / 255 - mean[c]) / std[c]``, mean and std in [0, 1] units."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Plain floats so to_dict() is JSON-able and hashes the same from numpy or YAML input.
        bad = "preprocess mean and std must be finite numbers, std > 0"
        try:
            mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        except (TypeError, ValueError, OverflowError):  # a string, or an int beyond any float
            raise ConfigError(f"{bad}; got a value that is no such number") from None
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if not self.mean or len(self.mean) != len(self.std):
            raise ConfigError(f"preprocess mean {self.mean} and std {self.std} need equal lengths")
        # NaN would train on NaN inputs and inf std on all-zero ones, both without an error.
        if not all(map(math.isfinite, self.mean + self.std)) or min(self.std) <= 0:
            raise ConfigError(f"{bad}; got mean {self.mean}, std {self.std}")

    def to_dict(self) -> dict:
        return {"scale": 255, "mean": list(self.mean), "std": list(self.std), "dtype": "float32"}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 with full avalanche; wraps modulo 2**64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uint64(words: tuple[int, ...], counters: np.ndarray) -> np.ndarray:
    """One uint64 per counter, a pure function of (words, counter): (B,) uint64.

    Args:
        words: the key (domain, seed, view, column, ...), any Python ints (taken modulo 2**64).
        counters: (B,) non-negative integers, e.g. sample indices.
    """
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for w in words:
            h = _mix(np.asarray(h ^ np.uint64(int(w) & _MASK64), dtype=np.uint64))
        return _mix(h ^ np.asarray(counters).astype(np.uint64))


def _bounded(u: np.ndarray, n: int) -> np.ndarray:
    """Integers in [0, n) from uint64 draws by multiply-shift (bias below 2**-17 for n <= 2**15)."""
    return ((u >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)


def _indices(indices: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be >= 0")
    return idx


def view_params(
    seed: int, view: int, indices: np.ndarray | torch.Tensor | list[int], spec: AugmentSpec
) -> np.ndarray:
    """Parameters of view ``view`` of samples ``indices``: int16 (B, P), columns dx, dy, flip."""
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    idx = _indices(indices)
    out = np.empty((idx.size, NUM_VIEW_PARAMS), dtype=np.int16)
    out[:, COL_DX] = out[:, COL_DY] = spec.pad
    out[:, COL_FLIP] = 0
    if view == 0 and spec.identity_view0:
        return out
    key = (_DOMAIN_VIEWS, seed, view)
    if spec.pad:
        out[:, COL_DX] = _bounded(counter_uint64((*key, COL_DX), idx), 2 * spec.pad + 1)
        out[:, COL_DY] = _bounded(counter_uint64((*key, COL_DY), idx), 2 * spec.pad + 1)
    if spec.flip:
        out[:, COL_FLIP] = counter_uint64((*key, COL_FLIP), idx) >> np.uint64(63)
    return out


def apply_view(
    images: torch.Tensor, params: np.ndarray | torch.Tensor, spec: AugmentSpec
) -> torch.Tensor:
    """The views of a batch: uint8 (B, C, H, W) in, uint8 (B, C, H, W) out, one gather.

    Pixel (i, j) of the output comes from padded pixel (dy + i, dx + j), or (dy + i, dx + W-1-j)
    when flipped — the crop is taken first, then mirrored.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(params, torch.Tensor):
        p = params.to(device=images.device, dtype=torch.int64)
    else:
        p = torch.as_tensor(np.asarray(params), dtype=torch.int64, device=images.device)
    b, c, h, w = images.shape
    if p.shape != (b, NUM_VIEW_PARAMS):
        raise ValueError(f"params must be ({b}, {NUM_VIEW_PARAMS}), got {tuple(p.shape)}")
    pad = spec.pad
    if b and (p[:, :2].min() < 0 or p[:, :2].max() > 2 * pad or p[:, 2].min() < 0):
        raise ValueError(
            f"view params out of range for pad={pad}: offsets must lie in [0, {2 * pad}]"
        )
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (B, C, H+2p, W+2p), zeros
    wp = w + 2 * pad
    rows = p[:, COL_DY, None] + torch.arange(h, device=images.device)  # (B, H)
    j = torch.arange(w, device=images.device)
    cols = p[:, COL_DX, None] + torch.where(p[:, COL_FLIP, None] > 0, w - 1 - j, j)  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)  # (B, 1, H*W)
    out = torch.gather(padded.reshape(b, c, -1), 2, flat.expand(b, c, h * w))
    return out.reshape(b, c, h, w)


def normalize(images: torch.Tensor, preprocess: PreprocessSpec) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W): ``(x / 255 - mean[c]) / std[c]``."""
    c = images.shape[1]
    if len(preprocess.mean) not in (1, c):
        raise ValueError(f"preprocess has {len(preprocess.mean)} channel(s), images have {c}")
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=images.device)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=images.device)
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
