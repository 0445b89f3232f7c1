"""``LogitStoreTests``: the behaviour every store backend must have.

Each backend's test module subclasses it with a few lines (its ``backend`` name and a ``suffix``).
Expected values are computed here independently of the encoders (float64 numpy, ml_dtypes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from storage import (
    BadWriteError,
    FingerprintMismatchError,
    NotAStoreError,
    SchemaVersionError,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    WriterLockedError,
    create_store,
    open_store,
)
from storage.parallel import write_parallel
from storage.sampler import LogitBatches
from tests.storage.producers import SeededLogits, torch_batches

N, C, V, ROWS, PER_SHARD = 1000, 37, 3, 64, 2  # 16 chunks per view, the last one partial
ENCODINGS = ["float32", "float16", "bfloat16", "int8", "topk"]
REPO = Path(__file__).resolve().parents[2]


def teacher_logits(seed: int = 0) -> np.ndarray:
    """(V, N, C) float32 logits with a realistic spread (a few large, most small)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((V, N, C)) * 2.0
    x[..., 0] += 6.0 * rng.random((V, N))  # a confident class
    return x.astype(np.float32)


def expected_stats(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mx = x.max(axis=-1)
    lse = np.log(np.exp(x - mx[..., None]).sum(axis=-1)) + mx
    return np.stack([mx, lse, x.mean(axis=-1), x.std(axis=-1, ddof=1)], axis=-1)


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class LogitStoreTests:
    backend: str
    suffix: str

    # ---- helpers ---------------------------------------------------------------------------
    def path(self, tmp_path: Path, name: str = "store") -> str:
        return str(tmp_path / f"{name}{self.suffix}")

    def make(self, path: str, encoding: str = "float16", **kw):
        kw = {"chunk_rows": ROWS, "chunks_per_shard": PER_SHARD, "labels": np.arange(N) % C, **kw}
        return create_store(path, N, C, V, encoding=encoding, backend=self.backend, **kw)

    def fill_serially(self, path: str, encoding: str) -> None:
        """Create ``path`` and write every shard in this process from ``SeededLogits`` (the
        reference a parallel or interrupted write must equal)."""
        with self.make(path, encoding, view_param_width=3) as store:
            produce = SeededLogits(C)
            for v, a, b in store.missing_shards():
                store.write(v, a, *produce(v, a, b))

    def fill(self, store, x: np.ndarray, pieces: int = 7, seed: int = 0) -> None:
        """Write all views in random-size pieces, in a shuffled order."""
        rng = np.random.default_rng(seed)
        cuts = np.sort(rng.choice(np.arange(1, N), pieces - 1, replace=False))
        ranges = list(zip([0, *cuts], [*cuts, N]))
        jobs = [(v, a, b) for v in range(V) for a, b in ranges]
        for i in rng.permutation(len(jobs)):
            v, a, b = jobs[i]
            store.write(v, int(a), x[v, a:b])

    # ---- round trips -----------------------------------------------------------------------
    @pytest.mark.parametrize("encoding", ENCODINGS)
    def test_round_trip_every_encoding(self, tmp_path, encoding):
        x = teacher_logits()
        path = self.path(tmp_path)
        with self.make(path, encoding) as store:
            self.fill(store, x)
            assert store.complete
        store = open_store(path)
        rng = np.random.default_rng(1)
        for v in range(V):
            idx = rng.integers(0, N, 300)  # random, repeated, unsorted
            idx[:3] = [N - 1, 0, N - 2]  # the last (partial) chunk too
            got = store.read(idx, view=v)
            want = x[v, idx]
            assert got.dtype == np.float32 and got.shape == (len(idx), C)
            if encoding == "float32":
                np.testing.assert_array_equal(got, want)
            elif encoding == "float16":
                np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
            elif encoding == "bfloat16":
                ref = want.astype(ml_dtypes.bfloat16).astype(np.float32)
                np.testing.assert_array_equal(got, ref)
            elif encoding == "int8":
                step = (want.max(1) - want.min(1)) / 254
                assert (np.abs(got - want) <= step[:, None] * 0.5001 + 1e-6).all()
            else:  # topk: the kept values exactly, the row's logsumexp preserved
                k = store.layout.topk
                top = np.argsort(-want, axis=1)[:, :k]
                np.testing.assert_array_equal(
                    np.take_along_axis(got, top, 1),
                    np.take_along_axis(want, top, 1).astype(np.float16).astype(np.float32),
                )
                tail = np.ones_like(got, bool)
                np.put_along_axis(tail, top, False, 1)
                rest = got[tail].reshape(len(got), -1)  # (n, C - k): one flat value a row
                kept = np.take_along_axis(got, top, 1).astype(np.float64)  # (n, k)
                assert (rest == rest[:, :1]).all()
                assert (rest[:, 0] <= kept.min(1)).all()  # never above the smallest kept one
                # The tail value from the formula, in float64 from the stored logsumexp: the
                # mass the kept classes leave, spread evenly, clamped to the smallest kept one.
                lse = store.read_array("stats", idx, view=v)[:, 1].astype(np.float64)
                m = kept.max(1)
                mass = np.exp(lse - m) - np.exp(kept - m[:, None]).sum(1)
                clear = mass > 1e-3 * np.exp(lse - m)  # not eaten by float16 rounding
                value = np.minimum(m + np.log(np.where(clear, mass, 1.0) / (C - k)), kept.min(1))
                assert clear.mean() > 0.5  # the check below covers most rows
                np.testing.assert_allclose(rest[clear, 0], value[clear], rtol=1e-6, atol=1e-6)
                lse = np.log(np.exp(got.astype(np.float64)).sum(1))
                np.testing.assert_allclose(lse, expected_stats(want)[:, 1], rtol=1e-3)
            stats = store.read_array("stats", idx, view=v)
            np.testing.assert_allclose(stats, expected_stats(want), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(store.read_block(v, 0, N)[idx], got)
        np.testing.assert_array_equal(store.labels, np.arange(N) % C)
        store.close()

    def test_opens_with_the_plain_library(self, tmp_path):
        x = teacher_logits()
        path = self.path(tmp_path)
        with self.make(path, "float32") as store:
            self.fill(store, x)
        if self.backend == "zarr":
            import zarr

            group = zarr.open_group(path, mode="r")
            logits, attrs = group["logits"][:], dict(group.attrs)
            done = group["done"][:]
        else:
            import h5py

            with h5py.File(path, "r") as f:
                logits, attrs, done = f["logits"][:], dict(f.attrs), f["done"][:]
        assert logits.shape == (V, N, C)
        np.testing.assert_array_equal(logits, x)
        assert done.shape == (V, -(-N // ROWS)) and done.all()
        assert attrs["num_samples"] == N and attrs["encoding"] == "float32"

    def test_zero_length_read_and_block_into_buffer(self, tmp_path):
        x = teacher_logits()
        path = self.path(tmp_path)
        with self.make(path) as store:
            self.fill(store, x)
        with open_store(path) as store:
            assert store.read([], view=0).shape == (0, C)
            out = np.full((100, C), np.nan, np.float32)
            store.read_block(2, 900, 1000, out=out)
            np.testing.assert_array_equal(out, x[2, 900:].astype(np.float16).astype(np.float32))

    # ---- crash, resume, writers, readers ---------------------------------------------------
    def test_crash_mid_write_then_resume_equals_uninterrupted(self, tmp_path):
        path, clean = self.path(tmp_path, "crashed"), self.path(tmp_path, "clean")
        self.fill_serially(clean, "int8")
        # A child writes rows in odd pieces and SIGKILLs itself half-way.
        child = run_python(f"""
            import os, signal, numpy as np
            from storage import create_store
            from tests.storage.producers import SeededLogits, torch_batches
            s = create_store({path!r}, {N}, {C}, {V}, encoding="int8", backend={self.backend!r},
                             chunk_rows={ROWS}, chunks_per_shard={PER_SHARD},
                             labels=np.arange({N}) % {C}, view_param_width=3)
            produce = SeededLogits({C})
            for i, start in enumerate(range(0, {N}, 50)):
                stop = min(start + 50, {N})
                s.write(0, start, *produce(0, start, stop))
                if i == 12:
                    os.kill(os.getpid(), signal.SIGKILL)
        """)
        assert child.returncode == -signal.SIGKILL, child.stderr
        with open_store(path, mode="a") as store:
            missing = store.missing_shards()
            assert 0 < len(missing) < V * store.layout.num_shards
            assert not store.done[1:].any() and store.done[0].any()
            produce = SeededLogits(C)
            for v, a, b in missing:
                store.write(v, a, *produce(v, a, b))
            assert store.complete
        with open_store(path) as a, open_store(clean) as b:
            for name in [*a.layout.arrays(), "done", "labels"]:
                np.testing.assert_array_equal(self.raw(path, name), self.raw(clean, name))

    def raw(self, path: str, name: str) -> np.ndarray:
        if self.backend == "zarr":
            import zarr

            return zarr.open_group(path, mode="r")[name][:]
        import h5py

        with h5py.File(path, "r") as f:
            return f[name][:]

    def test_a_second_writer_is_refused(self, tmp_path):
        path = self.path(tmp_path)
        store = self.make(path)
        with pytest.raises(WriterLockedError, match="being written by another process"):
            open_store(path, mode="a")
        child = run_python(f"""
            from storage import open_store, WriterLockedError
            try:
                open_store({path!r}, mode="a")
            except WriterLockedError as e:
                print("refused:", e)
        """)
        assert "refused:" in child.stdout and f"pid {os.getpid()}" in child.stdout, child.stderr
        store.close()
        open_store(path, mode="a").close()  # released at close

    def test_readers_never_see_unfinished_chunks(self, tmp_path):
        """A reader process polls while this process writes shard by shard."""
        x = teacher_logits()
        path = self.path(tmp_path)
        store = self.make(path, "float32")
        reader = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
                import time, numpy as np
                from storage import open_store, StoreIncompleteError
                s = open_store({path!r})
                seen, refused, t0 = set(), 0, time.time()
                while len(seen) < {N} and time.time() - t0 < 60:
                    for start in range(0, {N}, {ROWS}):
                        try:
                            got = s.read(np.arange(start, min(start + {ROWS}, {N})), view=1)
                        except StoreIncompleteError:
                            refused += 1
                            continue
                        assert np.isfinite(got).all(), "saw unwritten rows"
                        np.save({str(tmp_path)!r} + f"/seen_{{start}}.npy", got)
                        seen.update(range(start, start + len(got)))
                print("seen", len(seen), "refused", refused)
            """),
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)  # let the reader start against an empty store
        for a in range(0, N, ROWS * PER_SHARD):
            store.write(1, a, x[1, a : a + ROWS * PER_SHARD])
            time.sleep(0.05)
        out, _ = reader.communicate(timeout=90)
        store.close()
        assert reader.returncode == 0 and f"seen {N}" in out, out
        assert int(out.split("refused")[1]) > 0, "the reader never met an unfinished chunk"
        for start in range(0, N, ROWS):
            np.testing.assert_array_equal(
                np.load(tmp_path / f"seen_{start}.npy"), x[1, start : start + ROWS]
            )

    def test_reading_unfinished_chunks_is_refused(self, tmp_path):
        path = self.path(tmp_path)
        with self.make(path) as store:
            store.write(0, 0, teacher_logits()[0, : ROWS * PER_SHARD])
        with open_store(path) as store:
            store.read(np.arange(ROWS * PER_SHARD), view=0)
            with pytest.raises(
                StoreIncompleteError, match=r"view 0 chunk\(s\) 2, 4 are not written"
            ):
                store.read([5, ROWS * PER_SHARD + 1, 300], view=0)

    def test_verify_finds_a_flipped_byte(self, tmp_path):
        path = self.path(tmp_path)
        with self.make(path, "float32") as store:
            self.fill(store, teacher_logits())
        with open_store(path) as store:
            assert store.verify().ok
        offset, chunk = self.chunk_byte(path, view=1, chunk=5)
        with open(offset[0], "r+b") as f:
            f.seek(offset[1])
            byte = f.read(1)
            f.seek(offset[1])
            f.write(bytes([byte[0] ^ 0xFF]))
        with open_store(path) as store:
            report = store.verify()
        assert [(v, c) for v, c, _ in report.damaged] == [(1, chunk)]
        cli = subprocess.run(
            [sys.executable, "-m", "pipeline", "verify", path],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert cli.returncode == 1 and "damaged: view 1 chunk 5" in cli.stdout

    def chunk_byte(self, path: str, view: int, chunk: int) -> tuple[tuple[str, int], int]:
        """(file, offset) of a byte inside one chunk's logits."""
        if self.backend == "zarr":
            shard = chunk // PER_SHARD
            file = Path(path, "logits", "c", str(view), str(shard), "0")
            inner = chunk % PER_SHARD  # chunks are laid out in order inside the shard
            return (str(file), inner * ROWS * C * 4 + 123), chunk
        import h5py

        with h5py.File(path, "r") as f:
            dset = f["logits"]
            info = dset.id.get_chunk_info_by_coord((view, chunk * ROWS, 0))
            return (path, info.byte_offset + 123), chunk

    # ---- parallel --------------------------------------------------------------------------
    def test_dask_parallel_write_equals_serial(self, tmp_path):
        par, ser = self.path(tmp_path, "par"), self.path(tmp_path, "ser")
        self.make(par, "bfloat16", view_param_width=3).close()
        assert write_parallel(par, SeededLogits(C), workers=2) == V * -(-N // (ROWS * PER_SHARD))
        self.fill_serially(ser, "bfloat16")
        for name in ["logits", "stats", "view_params", "done"]:
            np.testing.assert_array_equal(self.raw(par, name), self.raw(ser, name))
        assert write_parallel(par, SeededLogits(C), workers=2) == 0  # nothing left to do

    # ---- bad input -------------------------------------------------------------------------
    def test_bad_input_is_refused_with_one_line(self, tmp_path):
        path = self.path(tmp_path)
        bad = [
            (lambda: create_store(path, 0, C, backend=self.backend), "num_samples must be > 0"),
            (lambda: create_store(path, N, 1, backend=self.backend), "num_classes must be >= 2"),
            (
                lambda: create_store(path, N, C, encoding="f8", backend=self.backend),
                "unknown encoding 'f8'",
            ),
            (lambda: create_store(path, N, C, backend="tiledb"), "unknown or unavailable backend"),
        ]
        for call, message in bad:
            with pytest.raises(StoreError, match=message) as info:
                call()
            assert "\n" not in str(info.value)
        assert not os.path.exists(path)
        store = self.make(path)
        x = teacher_logits()[0]
        with pytest.raises(BadWriteError, match=r"shape \(rows, 37\)"):
            store.write(0, 0, x[:10, :5])
        with pytest.raises(BadWriteError, match="floating point"):
            store.write(0, 0, x[:10].astype(np.int32))
        y = x[:10].copy()
        y[[2, 7], 3] = [np.nan, np.inf]
        with pytest.raises(BadWriteError, match=r"rows 102, 107"):
            store.write(0, 100, y)
        with pytest.raises(BadWriteError, match="out of range"):
            store.write(0, N - 5, x[:10])
        with pytest.raises(BadWriteError, match="view 3 out of range"):
            store.write(3, 0, x[:10])
        with pytest.raises(BadWriteError, match="float16's range"):
            store.write(0, 0, x[:10] * 1e5)
        store.write(0, 0, x[: ROWS * PER_SHARD])
        with pytest.raises(BadWriteError, match="already written"):
            store.write(0, 0, x[:10])
        store.close()
        with open_store(path) as store:
            with pytest.raises(StoreError, match="indices out of range"):
                store.read([0, N])
            np.testing.assert_array_equal(store.read([0], 0)[0], x[0].astype(np.float16))
        with pytest.raises(StoreExistsError, match="--overwrite"):
            self.make(path)
        with open_store(path) as store:  # nothing was overwritten
            assert store.done[0, :PER_SHARD].all()
        with pytest.raises(NotAStoreError, match="does not exist"):
            open_store(str(tmp_path / "nothing"))
        (tmp_path / "plain.txt").write_text("hello")
        with pytest.raises(NotAStoreError, match="is not a logit store"):
            open_store(str(tmp_path / "plain.txt"))
        with pytest.raises(StoreExistsError, match="not a logit store"):
            create_store(str(tmp_path / "plain.txt"), N, C, backend=self.backend, overwrite=True)
        assert (tmp_path / "plain.txt").read_text() == "hello"

    def test_closed_handles_and_argument_types_are_refused_by_name(self, tmp_path):
        """A closed handle neither writes (on zarr it would write without the writer lock) nor
        reads (on HDF5 its closed file failed like a damaged store, advising its deletion);
        a view, start or stop that is no integer is named, not read as damage or as view 1."""
        import torch

        path = self.path(tmp_path)
        x = teacher_logits()[0]
        store = self.make(path, "float32")
        store.write(0, 0, x[: ROWS * PER_SHARD])
        store.close()
        other = open_store(path, mode="a")  # the writer lock is another handle's now
        for call in (
            lambda: store.write(0, ROWS * PER_SHARD, x[: ROWS * PER_SHARD]),
            lambda: store.read([0]),
            lambda: store.read_block(0, 0, 4),
            lambda: store.labels,
            lambda: store.refresh(),
        ):
            with pytest.raises(StoreError, match="is closed: open it again") as info:
                call()
            assert "\n" not in str(info.value)
        # the other handle holds the lock and writes on; the closed one wrote nothing
        assert not other.done[0, PER_SHARD:].any()
        other.write(0, ROWS * PER_SHARD, torch.from_numpy(x[ROWS * PER_SHARD : 4 * ROWS]))
        other.close()
        with open_store(path) as store:
            np.testing.assert_array_equal(store.read(np.arange(4 * ROWS)), x[: 4 * ROWS])
            for bad, name in ((True, "view"), (1.0, "view"), ("1", "view")):
                with pytest.raises(StoreError, match=f"{name} must be an integer"):
                    store.read([0], view=bad)
            bad_blocks = (((0.0, 0, 4), "view"), ((0, 0.0, 4), "start"),
                          ((0, 0, np.float32(4)), "stop"), ((False, 0, 4), "view"))  # fmt: skip
            for args, name in bad_blocks:
                with pytest.raises(StoreError, match=f"{name} must be an integer"):
                    store.read_block(*args)

    def test_rows_int8_cannot_decode_and_numpy_counts(self, tmp_path):
        """int8 refuses a row whose float32 scale and offset would decode to inf (it was stored,
        then read back as inf and reported as damage by verify); numpy integer sizes are
        accepted as the ints they are; a bfloat16 tensor that requires grad is written exactly."""
        import torch

        path = self.path(tmp_path)
        big = np.finfo(np.float32).max
        store = create_store(path, np.int64(8), np.int32(4), backend=self.backend,
                             encoding="int8", chunk_rows=8)  # fmt: skip
        rows = np.tile(np.array([[-1.0, 0.5, 2.0, 3.0]], np.float32), (8, 1))
        rows[5] = [-big, big, 0.0, 1.0]
        with pytest.raises(BadWriteError, match=r"rows 5 span more than int8") as info:
            store.write(0, 0, rows)
        assert "\n" not in str(info.value) and not store.done.any()
        rows[5] = [-big / 2, big / 2, 0.0, 1.0]  # still decodable: kept
        store.write(0, 0, rows)
        store.close()
        with open_store(path) as store:
            back = store.read(np.arange(8))
            assert np.isfinite(back).all() and store.verify().ok
        path = self.path(tmp_path, "bf16")
        t = (3 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))).requires_grad_()
        with create_store(path, 8, 4, backend=self.backend, encoding="bfloat16",
                          chunk_rows=8) as store:  # fmt: skip
            store.write(0, 0, t.bfloat16())
        with open_store(path) as store:
            want = t.detach().bfloat16().float().numpy()
            np.testing.assert_array_equal(store.read(np.arange(8)), want)

    def test_overwrite_replaces_only_a_store(self, tmp_path):
        path = self.path(tmp_path)
        with self.make(path, fingerprint={"model": "a"}) as store:
            store.write(0, 0, teacher_logits()[0, : ROWS * PER_SHARD])
        with self.make(path, overwrite=True, fingerprint={"model": "b"}) as store:
            assert not store.done.any() and store.fingerprint == {"model": "b"}

    def test_fingerprint_mismatch_shows_both(self, tmp_path):
        path = self.path(tmp_path)
        self.make(path, fingerprint={"dataset": "abc", "seed": 1}).close()
        open_store(path, fingerprint={"dataset": "abc"}).close()
        with pytest.raises(
            FingerprintMismatchError, match=r"dataset: store 'abc' vs expected 'xyz'"
        ) as info:
            open_store(path, fingerprint={"dataset": "xyz", "seed": 1})
        assert "seed" not in str(info.value)

    def test_newer_schema_is_refused(self, tmp_path):
        path = self.path(tmp_path)
        self.make(path).close()
        self.set_attr(path, "schema_version", 99)
        with pytest.raises(SchemaVersionError, match="schema version 99.*upgrade logitbank"):
            open_store(path)

    def set_attr(self, path: str, key: str, value) -> None:
        if self.backend == "zarr":
            import zarr

            zarr.open_group(path, mode="r+").attrs[key] = value
        else:
            import h5py

            with h5py.File(path, "r+") as f:
                f.attrs[key] = value

    # ---- training reads --------------------------------------------------------------------
    def filled(self, tmp_path: Path, encoding: str = "float16") -> tuple[str, np.ndarray]:
        x = teacher_logits()
        path = self.path(tmp_path)
        with self.make(path, encoding) as store:
            self.fill(store, x)
        return path, x.astype(np.float16).astype(np.float32)

    @pytest.mark.parametrize("budget", [0, 1 << 30], ids=["streamed", "in-ram"])
    def test_training_batches_cover_every_row_once(self, tmp_path, budget):
        path, x = self.filled(tmp_path)
        batches = LogitBatches(path, 96, window=3, seed=5, memory_budget=budget)
        assert batches.in_ram() == bool(budget)
        for epoch in range(V + 1):
            batches.set_epoch(epoch)
            seen = []
            for idx, views, logits in batches:
                assert (views == epoch % V).all()
                np.testing.assert_array_equal(logits, x[views, idx])
                seen.append(idx.copy())
            seen = np.concatenate(seen)
            assert len(seen) == N and len(np.unique(seen)) == N
            assert len(batches) == -(-N // 96)
        first = next(iter(batches))[0]
        assert len(np.unique(first // ROWS)) > 1, "rows of a batch come from several blocks"

    def test_block_view_policy_and_buffers(self, tmp_path):
        path, _ = self.filled(tmp_path)
        batches = LogitBatches(path, 50, view_policy="block", memory_budget=0, drop_last=True)
        it = iter(batches)
        b0 = next(it)
        kept = [a.copy() for a in b0]
        next(it)  # with two buffers, batch 0 is still intact after batch 1 is drawn
        for a, b in zip(kept, b0):
            np.testing.assert_array_equal(a, b)
        views = np.concatenate([v.copy() for _, v, _ in batches])
        assert len(views) == (N // 50) * 50 and len(np.unique(views)) == V

    @pytest.mark.parametrize("budget", [0, 1 << 30])
    def test_sample_view_policy_reads_each_rows_own_view(self, tmp_path, budget):
        path, _ = self.filled(tmp_path)
        batches = LogitBatches(path, 40, view_policy="sample", memory_budget=budget, window=2)
        seen = []
        with open_store(path) as store:
            for idx, views, logits in batches:
                assert len(np.unique(views)) == V  # rows of one batch use every view
                for v in range(V):
                    rows = views == v
                    np.testing.assert_array_equal(logits[rows], store.read(idx[rows], view=v))
                seen.append(idx.copy())
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N))

    def test_shards_split_blocks_disjointly(self, tmp_path):
        path, _ = self.filled(tmp_path)
        parts = []
        for rank in range(3):
            batches = LogitBatches(path, 64, rank=rank, world_size=3, memory_budget=0)
            parts.append(np.concatenate([i.copy() for i, _, _ in batches]))
        allrows = np.concatenate(parts)
        assert len(allrows) == N and len(np.unique(allrows)) == N
        blocks = [set(p // ROWS) for p in parts]
        assert not (blocks[0] & blocks[1]) and not (blocks[1] & blocks[2])

    def test_dataloader_workers_open_their_own_handles(self, tmp_path):
        import torch

        path, x = self.filled(tmp_path)

        loader = torch.utils.data.DataLoader(
            torch_batches(LogitBatches(path, 64, memory_budget=0)),
            batch_size=None,
            num_workers=2,
            multiprocessing_context="spawn",
        )
        seen = []
        for idx, views, logits in loader:
            np.testing.assert_array_equal(logits.numpy(), x[views.numpy(), idx.numpy()])
            seen.append(idx.numpy())
        seen = np.concatenate(seen)
        assert len(seen) == N and len(np.unique(seen)) == N

    def test_more_views_than_stored_is_refused(self, tmp_path):
        path, _ = self.filled(tmp_path)
        with pytest.raises(StoreError, match="asked for 5 views but store .* holds 3"):
            iter(LogitBatches(path, 8, views=5)).__next__()
