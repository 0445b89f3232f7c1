"""Replayable views: the same pixels for any batch, order or worker, and correct crops and flips."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.datasets import synthetic
from pipeline.errors import ConfigError
from pipeline.views import (
    NUM_VIEW_PARAMS,
    AugmentSpec,
    PreprocessSpec,
    apply_view,
    counter_uint64,
    normalize,
    view_params,
)

SPEC = AugmentSpec(pad=2, flip=True)


def _images(n: int = 40, c: int = 3, h: int = 9, w: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def _view_bytes(images: torch.Tensor, seed: int, view: int, idx: np.ndarray) -> bytes:
    return apply_view(images[idx], view_params(seed, view, idx, SPEC), SPEC).numpy().tobytes()


def _reference(images: np.ndarray, params: np.ndarray, pad: int) -> np.ndarray:
    """The slow, obvious per-sample version: zero-pad, crop at (dy, dx), then mirror."""
    out = np.empty_like(images)
    _, _, h, w = images.shape
    for i, (dx, dy, flip) in enumerate(params):
        padded = np.pad(images[i], ((0, 0), (pad, pad), (pad, pad)))
        crop = padded[:, dy : dy + h, dx : dx + w]
        out[i] = crop[:, :, ::-1] if flip else crop
    return out


# --- the generator -------------------------------------------------------------------------------


def test_golden_values() -> None:
    # Pinned: any machine, numpy or torch version must give exactly these numbers.
    got = view_params(0, 1, np.arange(8), SPEC)
    want = [[3, 2, 1], [0, 1, 1], [3, 2, 1], [0, 2, 0], [1, 0, 0], [2, 4, 0], [1, 4, 1], [0, 1, 1]]
    assert got.dtype == np.int16 and got.tolist() == want
    spec4 = AugmentSpec(pad=4)
    assert view_params(12345, 3, [0, 7, 10**9 + 7], spec4).tolist() == [
        [6, 8, 1], [6, 8, 1], [7, 6, 0],
    ]  # fmt: skip
    assert counter_uint64((1, 2, 3), np.array([0, 1, 2**40])).tolist() == [
        5630731884835902905, 9209983370578327956, 2319088747296031684,
    ]  # fmt: skip


def test_params_in_range_and_roughly_uniform() -> None:
    idx = np.arange(20000)
    p = view_params(7, 2, idx, AugmentSpec(pad=3)).astype(np.int64)
    assert p.shape == (20000, NUM_VIEW_PARAMS) and p.min() >= 0 and p[:, :2].max() <= 6
    for col in (0, 1):
        counts = np.bincount(p[:, col], minlength=7)
        assert np.abs(counts / 20000 - 1 / 7).max() < 0.015
    assert set(np.unique(p[:, 2])) == {0, 1} and abs(p[:, 2].mean() - 0.5) < 0.02


def test_identity_view0_and_switches() -> None:
    idx = np.arange(50)
    assert (view_params(5, 0, idx, SPEC) == [2, 2, 0]).all()
    assert not (view_params(5, 0, idx, AugmentSpec(identity_view0=False)) == [2, 2, 0]).all()
    assert (view_params(5, 3, idx, AugmentSpec(pad=0, flip=False)) == [0, 0, 0]).all()
    assert (view_params(5, 3, idx, AugmentSpec(flip=False))[:, 2] == 0).all()
    images = _images()
    ident = apply_view(images, view_params(5, 0, np.arange(40), SPEC), SPEC)
    assert torch.equal(ident, images)


def test_seeds_and_views_differ() -> None:
    idx = np.arange(200)
    base = view_params(0, 1, idx, SPEC)
    assert (base != view_params(1, 1, idx, SPEC)).any(axis=1).mean() > 0.8
    assert (base != view_params(0, 2, idx, SPEC)).any(axis=1).mean() > 0.8


# --- replay: the same pixels whatever the batching -----------------------------------------------


def test_same_bytes_for_any_batch_order_or_split() -> None:
    images = _images(n=64)
    idx = np.arange(64)
    whole = _view_bytes(images, 11, 3, idx)
    row = len(whole) // 64
    for bs in (1, 5, 64):  # batch size
        assert (
            b"".join(_view_bytes(images, 11, 3, idx[s : s + bs]) for s in range(0, 64, bs)) == whole
        )
    perm = np.random.default_rng(0).permutation(64)  # order
    shuffled = _view_bytes(images, 11, 3, perm)
    for k, n in enumerate(perm):
        assert shuffled[k * row : (k + 1) * row] == whole[n * row : (n + 1) * row]
    # Two "workers" taking interleaved rows, reassembled.
    parts = {w: _view_bytes(images, 11, 3, idx[w::2]) for w in (0, 1)}
    merged = [parts[n % 2][(n // 2) * row : (n // 2 + 1) * row] for n in idx]
    assert b"".join(merged) == whole


def _worker_params(args: tuple[int, int, list[int]]) -> list[list[int]]:
    seed, view, idx = args
    return view_params(seed, view, np.array(idx), SPEC).tolist()


def test_same_params_in_other_processes() -> None:
    idx = list(range(0, 1000, 7))
    with ProcessPoolExecutor(2) as pool:
        got = list(pool.map(_worker_params, [(9, 4, idx[::2]), (9, 4, idx[1::2])]))
    want = view_params(9, 4, np.array(idx), SPEC).tolist()
    assert got[0] == want[::2] and got[1] == want[1::2]


# --- correctness against the slow version --------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    pad=st.integers(0, 5),
    c=st.sampled_from([1, 3]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    seed=st.integers(0, 2**63),
    view=st.integers(0, 50),
)
def test_apply_view_matches_reference(
    pad: int, c: int, h: int, w: int, seed: int, view: int
) -> None:
    spec = AugmentSpec(pad=pad, flip=True, identity_view0=False)
    images = _images(n=6, c=c, h=h, w=w, seed=seed % 1000)
    params = view_params(seed, view, np.arange(6), spec)
    got = apply_view(images, params, spec)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    np.testing.assert_array_equal(got.numpy(), _reference(images.numpy(), params, pad))


def test_explicit_shift_and_flip() -> None:
    img = torch.arange(1, 13, dtype=torch.uint8).reshape(1, 1, 3, 4)
    spec = AugmentSpec(pad=1)
    # dx = 2, dy = 0: content moves one pixel left and one down; then mirrored.
    shifted = apply_view(img, np.array([[2, 0, 0]], np.int16), spec)[0, 0]
    assert shifted.tolist() == [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0]]
    flipped = apply_view(img, np.array([[2, 0, 1]], np.int16), spec)[0, 0]
    assert flipped.tolist() == [[0, 0, 0, 0], [0, 4, 3, 2], [0, 8, 7, 6]]


def test_apply_view_rejects_bad_params() -> None:
    images = _images(n=2)
    with pytest.raises(ValueError, match="out of range"):
        apply_view(images, np.array([[5, 0, 0], [0, 0, 0]], np.int16), SPEC)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        apply_view(images, np.zeros((3, 3), np.int16), SPEC)
    with pytest.raises(ConfigError, match="pad"):
        AugmentSpec(pad=-1)


def test_works_on_a_dataset_batch() -> None:
    """A dataset's batch through the replay and normalisation a training step applies, against
    the per-sample reference and the formula in float64."""
    ds = synthetic("train", num_samples=32)
    x, _ = ds.get_batch(np.arange(32))
    params = view_params(0, 1, np.arange(32), SPEC)
    v = apply_view(x, params, SPEC)
    y = normalize(v, PreprocessSpec(ds.mean, ds.std))
    assert y.dtype == torch.float32 and y.shape == (32, 1, 16, 16)
    crops = _reference(x.numpy(), params, SPEC.pad).astype(np.float64)
    want = (crops / 255 - np.asarray(ds.mean).reshape(1, -1, 1, 1)) / np.asarray(ds.std).reshape(
        1, -1, 1, 1
    )
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6, atol=1e-6)


# --- normalisation, specs, policies --------------------------------------------------------------


def test_normalize() -> None:
    images = _images(n=3, c=3)
    pre = PreprocessSpec(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    got = normalize(images, pre)
    want = (images.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).double()) / (
        torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1).double()
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="channel"):
        normalize(_images(n=1, c=2), pre)
    with pytest.raises(ConfigError, match="std"):
        PreprocessSpec(mean=(0.5,), std=(0.0,))


def test_specs_serialise_stably() -> None:
    a = AugmentSpec(pad=2, flip=True).to_dict()
    assert list(a) == ["generator", "pad", "flip", "identity_view0", "crop", "columns"]
    assert json.dumps(a) == json.dumps(AugmentSpec().to_dict())
    assert a != AugmentSpec(pad=3).to_dict() and a != AugmentSpec(identity_view0=False).to_dict()
    p = PreprocessSpec(mean=np.array([0.5], np.float32), std=[0.25]).to_dict()
    assert json.dumps(p) == '{"scale": 255, "mean": [0.5], "std": [0.25], "dtype": "float32"}'


def test_params_as_tensor_and_on_cuda_match() -> None:
    images = _images(n=16)
    params = view_params(3, 2, np.arange(16), SPEC)
    cpu = apply_view(images, params, SPEC)
    assert torch.equal(apply_view(images, torch.from_numpy(params), SPEC), cpu)
    if torch.cuda.is_available():  # the student's input on the GPU is the teacher's on the CPU
        gpu = apply_view(images.cuda(), torch.from_numpy(params).cuda(), SPEC)
        assert torch.equal(gpu.cpu(), cpu)
