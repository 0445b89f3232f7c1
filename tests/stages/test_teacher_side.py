"""teacher → export → precompute end to end on the tiny synthetic config.

The store must hold exactly what the teacher computes in PyTorch for each stored view, its
view parameters must rebuild the very input tensors, a SIGKILLed precompute must resume to the
same arrays as an uninterrupted one, and two dask workers must write what one process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.data import splits
from pipeline.models import load_model_from_checkpoint
from pipeline.views import apply_view, normalize
from storage import open_store
from tests.stages.common import (
    ARRAYS,
    ROOT,
    TINY,
    assert_same_store,
    build_tiny_run,
    fails,
    raw_arrays,
)

# float32 so that the comparison with PyTorch is not blurred by the encoding; 4 chunks per shard
# so that a view is two shards and a crash can land between them.
SETTINGS = ["precompute.encoding=float32", "precompute.chunks_per_shard=4"]


def _args(stage: str, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"run_dir={run_dir}", *SETTINGS]
    return [
        stage,
        "--config",
        str(TINY),
        *[a for s in sets for a in ("--set", s)],
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("tiny"), _args)


def _copy_teacher(run: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("teacher.pt", "teacher.onnx", "teacher.onnx.parity.json"):
        shutil.copy2(run / name, dest / name)
    return dest


def test_store_equals_pytorch_for_every_view(run: Path) -> None:
    config = load_config(TINY, [f"run_dir={run}", *SETTINGS])
    train, _ = splits(config)
    model = load_model_from_checkpoint(run / "teacher.pt").eval()
    with open_store(run / "store.zarr") as store:
        assert store.complete
        assert store.layout.num_views == config.augment.views == 2
        np.testing.assert_array_equal(store.labels, train.labels)
        indices = np.arange(len(train))
        for view in range(store.layout.num_views):
            x, _, params = train.batch(indices, view=view)
            with torch.no_grad():
                expected = model(x).numpy()
            stored = store.read(indices, view=view)
            assert np.abs(stored - expected).max() <= 1e-4
            stored_params = store.read_array("view_params", indices, view=view)
            np.testing.assert_array_equal(stored_params, params)
            # The stored parameters alone rebuild the exact input tensor, byte for byte.
            images, _ = train.dataset.get_batch(indices)
            replayed = normalize(apply_view(images, stored_params, train.spec), train.preprocess)
            assert torch.equal(replayed, x)
        # The two views are different images, and view 0 is the clean one.
        assert not np.array_equal(
            store.read_array("view_params", indices, 0), store.read_array("view_params", indices, 1)
        )
        assert torch.equal(train.batch(indices, view=0)[0], train.batch(indices)[0])


def test_fingerprint_names_what_the_store_was_made_from(run: Path) -> None:
    import json

    record = json.loads((run / "teacher.onnx.parity.json").read_text())
    with open_store(run / "store.zarr") as store:
        fp = store.fingerprint
    assert fp["onnx_sha256"] == record["onnx_sha256"]
    assert {"dataset", "preprocess", "augment", "seed", "rows"} <= set(fp)


def test_rerun_of_a_finished_stage_changes_nothing(run: Path) -> None:
    before = raw_arrays(run / "store.zarr")
    mtime = (run / "teacher.pt").stat().st_mtime_ns
    assert main(_args("teacher", run)) == 0
    assert main(_args("precompute", run)) == 0
    assert (run / "teacher.pt").stat().st_mtime_ns == mtime
    after = raw_arrays(run / "store.zarr")
    for name in ARRAYS:
        np.testing.assert_array_equal(before[name], after[name])


def test_a_finished_export_is_not_redone(run: Path, tmp_path: Path, capsys) -> None:
    """An export of the same checkpoint with the same settings is skipped (a large teacher's
    export and parity check take minutes, and a given teacher.checkpoint has no teacher.pt for
    make to see); another setting, another checkpoint or a changed file exports again."""
    again = _copy_teacher(run, tmp_path / "again")
    onnx, record = again / "teacher.onnx", again / "teacher.onnx.parity.json"
    # The module's run was exported by this code: its record names the export's key.
    stamp = (onnx.stat().st_mtime_ns, record.read_bytes())
    assert main(_args("export", again)) == 0
    assert "up to date" in capsys.readouterr().out
    assert (onnx.stat().st_mtime_ns, record.read_bytes()) == stamp
    # Another export setting: exported and checked again.
    assert main(_args("export", again, "--set", "export.atol=2e-4")) == 0
    assert "up to date" not in capsys.readouterr().out
    assert json.loads(record.read_text())["atol"] == 2e-4
    # A file changed since its check is exported again, not trusted.
    with open(onnx, "ab") as f:
        f.write(b"\0")
    assert main(_args("export", again, "--set", "export.atol=2e-4")) == 0
    assert "up to date" not in capsys.readouterr().out
    assert main(_args("precompute", again, "--set", "export.atol=2e-4")) == 0


def test_sigkill_half_way_then_rerun_equals_uninterrupted(run: Path, tmp_path: Path) -> None:
    crashed = _copy_teacher(run, tmp_path / "crashed")
    # The child is the real precompute stage; its store writes are counted and the process
    # SIGKILLs itself after the 6th (view 0 is 4 writes of 64 rows: half of view 1 is written).
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from storage.base import LogitStore
        from pipeline.__main__ import main
        write, count = LogitStore.write, [0]
        def counted(self, *args, **kwargs):
            write(self, *args, **kwargs)
            count[0] += 1
            if count[0] == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        LogitStore.write = counted
        sys.exit(main({_args("precompute", crashed)!r}))
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with open_store(crashed / "store.zarr") as store:
        done = np.asarray(store.done)
        assert done[0].all() and 0 < done[1].sum() < done[1].size, done
    assert main(_args("precompute", crashed)) == 0
    clean, resumed = raw_arrays(run / "store.zarr"), raw_arrays(crashed / "store.zarr")
    for name in ARRAYS:
        np.testing.assert_array_equal(resumed[name], clean[name], err_msg=name)


def test_two_dask_workers_equal_one_process(run: Path, tmp_path: Path) -> None:
    parallel = _copy_teacher(run, tmp_path / "parallel")
    assert main(_args("precompute", parallel, "--workers", "2")) == 0
    one, two = raw_arrays(run / "store.zarr"), raw_arrays(parallel / "store.zarr")
    for name in ARRAYS:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)


def test_precompute_tf32_reaches_the_session(run: Path, tmp_path: Path, monkeypatch) -> None:
    """``precompute.tf32`` (default false: float32 logits on the GPU too) is what the ONNX
    Runtime session is made with; on this CPU the store is the same either way."""
    import pipeline.precompute as precompute

    seen = []
    make_session = precompute.make_session

    def spy(path, provider, threads, fp16, tf32):
        seen.append(tf32)
        return make_session(path, provider, threads, fp16, tf32)

    monkeypatch.setattr(precompute, "make_session", spy)
    allowed = _copy_teacher(run, tmp_path / "tf32")
    assert main([*_args("precompute", allowed), "--set", "precompute.tf32=true"]) == 0
    assert seen == [True]
    assert load_config(TINY, []).precompute.tf32 is False
    one, two = raw_arrays(run / "store.zarr"), raw_arrays(allowed / "store.zarr")
    np.testing.assert_array_equal(two["logits"], one["logits"])


def test_an_onnx_changed_after_export_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    changed = _copy_teacher(run, tmp_path / "changed")
    with open(changed / "teacher.onnx", "ab") as f:
        f.write(b"\0")  # any change: the file is no longer the one whose parity was checked
    assert main(_args("precompute", changed)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run the export stage again" in err
    assert not (changed / "store.zarr").exists()


def test_more_views_do_not_retrain_the_teacher(run: Path, tmp_path: Path) -> None:
    """augment.views is what precompute stores; the teacher's training views are drawn fresh
    every epoch whatever it is, so asking for more views keeps the teacher."""
    again = _copy_teacher(run, tmp_path / "views")
    before = (again / "teacher.pt").read_bytes()
    assert main(_args("teacher", again, "--set", "augment.views=3")) == 0
    assert (again / "teacher.pt").read_bytes() == before
    assert not (again / "teacher.state.pt").exists()  # nothing trained


def test_an_onnx_of_another_checkpoint_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    """The teacher retrained (or replaced) since the export: its ONNX file is never run."""
    stale = _copy_teacher(run, tmp_path / "stale")
    checkpoint = torch.load(stale / "teacher.pt", weights_only=False)
    first = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][first] += 1.0
    torch.save(checkpoint, stale / "teacher.pt")
    assert main(_args("precompute", stale)) == 2
    err = capsys.readouterr().err
    assert "was exported from another teacher checkpoint than" in err
    assert "run the export stage again" in err and err.count("\n") == 1
    assert not (stale / "store.zarr").exists()


def test_a_store_from_other_inputs_is_refused_and_kept(run: Path, tmp_path: Path, capsys) -> None:
    other = _copy_teacher(run, tmp_path / "other")
    shutil.copytree(run / "store.zarr", other / "store.zarr")
    before = raw_arrays(other / "store.zarr")
    assert main([*_args("precompute", other), "--set", "augment.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "made from other inputs" in err and "--overwrite" in err
    after = raw_arrays(other / "store.zarr")
    for name in ARRAYS:
        np.testing.assert_array_equal(after[name], before[name])


class _GpuLikeSession:
    """A CPU session that reports the CUDA provider: ``Runner`` then takes its CUDA path,
    which ``_fake_gpu`` routes to the CPU session with ``shift`` added to the logits."""

    def __init__(self, real, shift):
        self.real, self.shift = real, shift

    def __getattr__(self, name):
        return getattr(self.real, name)

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _fake_gpu(monkeypatch, shift) -> list[str]:
    """Precompute's session is a "GPU" whose logits are the CPU's plus ``shift(logits)``; the
    providers each session was asked for are returned (the check's own session is the CPU's)."""
    import pipeline.precompute as precompute
    from pipeline.ort import Runner

    asked = []
    make_session = precompute.make_session

    def fake_make_session(path, provider, threads, fp16, tf32):
        asked.append(provider)
        real = make_session(path, "cpu", threads, False, False)
        return real if provider == "cpu" else _GpuLikeSession(real, shift)

    def run_cuda(self, batch):
        x = self.session.real.run([self.output_name], {self.input_name: batch})[0]
        return (x + self.session.shift(x)).astype(np.float32)

    monkeypatch.setattr(precompute, "make_session", fake_make_session)
    monkeypatch.setattr(Runner, "_run_cuda", run_cuda)
    return asked


def _parity_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "precompute.parity.json").read_text())


def test_a_gpu_session_is_checked_against_the_cpu_float32_one(
    run: Path, tmp_path: Path, monkeypatch
) -> None:
    """A session that is not ONNX Runtime's CPU float32 one (CUDA, fp16, TF32) first runs
    precompute.parity_rows rows beside the CPU float32 session: within parity_rtol it fills the
    store, and precompute.parity.json records how far apart the two were."""
    close = _copy_teacher(run, tmp_path / "close")
    asked = _fake_gpu(monkeypatch, lambda x: np.float32(1e-5) * np.abs(x).max())
    assert main(_args("precompute", close)) == 0
    assert asked == ["auto", "cpu"]  # the store's session, then the check's
    record = _parity_record(close)
    assert record["checked"] and record["passed"] and record["provider"] == "cuda"
    assert record["precision"] == "float32" and record["rtol"] == 1e-3
    assert record["rows"] == 64 and record["disagreements"] == 0
    want = raw_arrays(run / "store.zarr")["logits"]
    got = raw_arrays(close / "store.zarr")["logits"]
    # The store holds the "GPU's" logits: the CPU's plus the shift the record measured.
    shift = got - want
    assert shift.min() > 0
    np.testing.assert_allclose(record["max_abs_diff"], shift[0, :64].max(), rtol=1e-3)
    np.testing.assert_allclose(record["largest_logit"], np.abs(want[0, :64]).max(), rtol=1e-6)
    # A CPU session is the float32 reference itself: recorded, not checked.
    assert _parity_record(run) == {"checked": False, "precision": "float32", "provider": "cpu"}


def test_a_gpu_session_off_from_the_cpu_is_refused(
    run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Logits 10 % of their scale off (an fp16 graph that saturates, a provider fault) stop
    precompute before a row is written; the one-line error gives the figures and the fixes."""
    off = _copy_teacher(run, tmp_path / "off")
    _fake_gpu(
        monkeypatch, lambda x: np.float32(0.1) * np.abs(x).max() * (x == x.max(1, keepdims=True))
    )
    err = fails(
        capsys,
        [*_args("precompute", off), "--set", "precompute.fp16=false"],
        "float32 logits on cuda are off from ONNX Runtime's CPU float32 ones",
        "max |Δ|",
        "use precompute.provider=cpu",
        "precompute.parity_rtol",
    )
    assert "allowed 0.001" in err
    assert not (off / "store.zarr").exists() and not (off / "precompute.parity.json").exists()
    # The same session with the check widened, or turned off, fills the store.
    assert main([*_args("precompute", off), "--set", "precompute.parity_rtol=0.2"]) == 0
    record = _parity_record(off)
    assert record["checked"] and record["passed"]
    want = 0.1 * record["largest_logit"] / max(1.0, record["largest_logit"])
    assert record["relative_diff"] == pytest.approx(want, rel=1e-5) and want > 1e-3
    shutil.rmtree(off / "store.zarr")
    assert main([*_args("precompute", off), "--set", "precompute.parity_rows=0"]) == 0
    assert _parity_record(off) == {"checked": False, "precision": "float32", "provider": "cuda"}


def test_session_parity_figures_equal_an_independent_float64_computation() -> None:
    from pipeline.ort import session_parity

    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((50, 7)) * 8).astype(np.float32)
    got = ref + (rng.standard_normal(ref.shape) * 0.05).astype(np.float32)
    got[3] = ref[3][::-1]  # one row whose top-1 moves
    record = session_parity(got, ref, rtol=0.01)
    r, g = torch.tensor(ref, dtype=torch.float64), torch.tensor(got, dtype=torch.float64)
    assert record["max_abs_diff"] == pytest.approx(float((g - r).abs().max()), rel=1e-12)
    assert record["largest_logit"] == pytest.approx(float(r.abs().max()), rel=1e-12)
    for t in (1, 4):
        kl = torch.nn.functional.kl_div(
            torch.log_softmax(g / t, 1), torch.log_softmax(r / t, 1), log_target=True,
            reduction="none",
        ).sum(1)  # fmt: skip
        assert record[f"kl_T{t}"] == pytest.approx(float(kl.max()), rel=1e-9)
    allowed = 0.01 * float(r.abs().max())
    top2 = r.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * allowed
    moved = r.argmax(1) != g.argmax(1)
    assert record["disagreements"] == int((moved & clear).sum()) >= 1
    assert not record["passed"]  # row 3 is far off, and its top-1 moved
    assert session_parity(ref, ref, rtol=1e-9)["passed"]
    assert session_parity(ref, ref, rtol=1e-9)["kl_T1"] == 0.0


@pytest.mark.realdata
def test_fashion_mnist_subset_end_to_end(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    """The real files: a small teacher on 512 images, 2 views stored, spot-checked against
    PyTorch (float16 store: within float16 rounding of the logits)."""
    sets = [
        f"run_dir={tmp_path}",
        "data.kind=fashion_mnist",
        f"data.path={fashion_mnist_dir}",
        "data.train_subset=512",
        "data.test_subset=256",
        "data.options={}",
        "teacher.epochs=1",
    ]
    args = [a for s in sets for a in ("--set", s)]
    for stage in ("teacher", "export", "precompute"):
        assert main([stage, "--config", str(TINY), *args, "--quiet"]) == 0, stage
    config = load_config(TINY, sets)
    train, _ = splits(config)
    assert train.image_shape == (1, 28, 28) and train.num_classes == 10
    model = load_model_from_checkpoint(tmp_path / "teacher.pt").eval()
    indices = np.arange(0, 512, 7)
    with open_store(tmp_path / "store.zarr") as store:
        assert store.complete and store.layout.num_samples == 512
        for view in range(2):
            x, _, _ = train.batch(indices, view=view)
            with torch.no_grad():
                expected = model(x).numpy()
            stored = store.read(indices, view=view)
            assert np.abs(stored - expected).max() <= 2e-3 * max(1.0, np.abs(expected).max())


def test_bad_inputs_of_the_teacher_side(run: Path, tmp_path: Path, capsys) -> None:
    # Dataset files missing: says how to install them or where to point the config.
    fails(
        capsys,
        [
            "teacher",
            "--config",
            str(TINY),
            "--set",
            f"run_dir={tmp_path / 'a'}",
            "--set",
            "data.kind=fashion_mnist",
            "--set",
            f"data.path={tmp_path / 'nowhere'}",
            "--set",
            "data.options={}",
            "--quiet",
        ],
        "dataset-fashion-mnist",
    )
    # A corrupt IDX file names the file.
    idx = tmp_path / "fm"
    idx.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (idx / name).write_bytes(b"\x00\x00\x08\x03garbage")
    fails(
        capsys,
        [
            "teacher",
            "--config",
            str(TINY),
            "--set",
            f"run_dir={tmp_path / 'b'}",
            "--set",
            "data.kind=fashion_mnist",
            "--set",
            f"data.path={idx}",
            "--set",
            "data.options={}",
            "--quiet",
        ],
        "train-images-idx3-ubyte",
    )
    # An ONNX teacher with another number of classes than the dataset.
    other = _copy_teacher(run, tmp_path / "classes")
    fails(
        capsys,
        _args("precompute", other, "--set", "data.options.num_classes=7"),
        "classes",
    )
    # An unknown provider.
    fails(
        capsys,
        _args(
            "precompute", _copy_teacher(run, tmp_path / "prov"), "--set", "precompute.provider=tpu"
        ),
        "tpu",
        "auto",
    )
    # An unreachable dask scheduler: refused quickly, naming the address.
    fails(
        capsys,
        _args(
            "precompute", _copy_teacher(run, tmp_path / "dask"), "--scheduler", "tcp://127.0.0.1:9"
        ),
        "tcp://127.0.0.1:9",
        "dask scheduler",
    )
    # A teacher checkpoint that does not fit the model name it claims.
    bad = _copy_teacher(run, tmp_path / "ckpt")
    (bad / "teacher.pt").write_bytes((bad / "teacher.pt").read_bytes()[:100])
    fails(capsys, _args("export", bad), "teacher.pt")
    # A teacher's training state cut short (a disk that filled up) names the file and the fix.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "teacher.state.pt").write_bytes(b"PK\x03\x04 not a whole file")
    fails(capsys, _args("teacher", cut), "teacher.state.pt is truncated or corrupt", "afresh")
    # The store from a different teacher (another ONNX file) is refused, not overwritten. A
    # teacher.pt of another config is refused too: the other teacher trains once it is deleted.
    swapped = _copy_teacher(run, tmp_path / "swapped")
    shutil.copytree(run / "store.zarr", swapped / "store.zarr")
    fails(
        capsys,
        _args("teacher", swapped, "--set", "teacher.seed=5"),
        "teacher.pt is a teacher trained with another config (teacher.seed was 0, is 5)",
    )
    (swapped / "teacher.pt").unlink()
    assert main(_args("teacher", swapped, "--set", "teacher.seed=5")) == 0
    assert main(_args("export", swapped, "--set", "teacher.seed=5")) == 0
    fails(
        capsys,
        _args("precompute", swapped, "--set", "teacher.seed=5"),
        "onnx_sha256",
        "--overwrite",
    )
    for name in ARRAYS:
        np.testing.assert_array_equal(
            raw_arrays(swapped / "store.zarr")[name], raw_arrays(run / "store.zarr")[name]
        )


def test_a_gpu_session_with_non_finite_logits_is_refused_with_its_fix(
    run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """An fp16 graph that overflows gives inf where the CPU float32 session's logits are finite:
    the session is refused with its fix, not blamed on the images or the checkpoint."""
    inf = _copy_teacher(run, tmp_path / "inf")
    _fake_gpu(monkeypatch, lambda x: np.where(x == x.max(1, keepdims=True), np.inf, 0))
    err = fails(
        capsys,
        [*_args("precompute", inf), "--set", "precompute.fp16=true"],
        "float16 session on cuda fails on rows that ONNX Runtime's CPU float32 session computes",
        "set precompute.fp16=false",
    )
    assert "check those images" not in err
    assert not (inf / "store.zarr").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot start")
def test_dask_overwrite_with_a_session_that_cannot_start_keeps_the_store(
    run: Path, tmp_path: Path
) -> None:
    """--overwrite on a dask cluster replaces the old store only once a worker's session is made
    and checked (as in one process): a bad setting leaves the finished store as it was."""
    kept = tmp_path / "kept"
    shutil.copytree(run, kept)
    before = raw_arrays(kept / "store.zarr")
    argv = [*_args("precompute", kept, "--overwrite", "--workers", "1")]
    # A view more: a store of other inputs, which --overwrite replaces (one of the same is kept).
    assert main([*argv, "--set", "augment.views=3", "--set", "precompute.provider=cuda"]) == 2
    after = raw_arrays(kept / "store.zarr")
    for name in ARRAYS:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_a_worker_session_kept_from_another_run_is_checked_again(run: Path, monkeypatch) -> None:
    """A dask worker keeps its session between tasks; when a run's release() never ran (its
    coordinator killed), a rerun with another parity setting checks its own session."""
    import pickle

    from pipeline.errors import UserError
    from pipeline.precompute import TeacherLogits

    _fake_gpu(monkeypatch, lambda x: np.full_like(x, 0.01))
    train, _ = splits(load_config(TINY, [f"run_dir={run}", *SETTINGS]))

    def task_copy(rtol: float) -> TeacherLogits:  # what a dask task unpickles
        made = TeacherLogits(str(run / "teacher.onnx"), train, 64, "auto", 1, parity_rtol=rtol)
        return pickle.loads(pickle.dumps(made))

    try:
        task_copy(0.5)(0, 0, 64)
        with pytest.raises(UserError, match="are off from ONNX Runtime's CPU float32 ones"):
            task_copy(1e-4)(0, 0, 64)
    finally:
        TeacherLogits.release()


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_a_store_damaged_since_it_was_finished_is_refused_until_repaired(
    run: Path, tmp_path: Path, capsys
) -> None:
    """A shard deleted or cut short after precompute finished: a rerun must not call the store
    complete (it did: it read only the done marks); it names the damage and ``verify --repair``,
    changes nothing, and after the repair recomputes exactly the store of the clean run."""
    damaged = _copy_teacher(run, tmp_path / "damaged")
    store = damaged / "store.zarr"
    shutil.copytree(run / "store.zarr", store)
    (store / "logits" / "c" / "1" / "1" / "0").unlink()
    cut = store / "logits" / "c" / "0" / "0" / "0"
    os.truncate(cut, cut.stat().st_size // 2)
    stamp = damaged / "precompute.done"  # make's record of the finished stage
    stamp.write_text(f"{store}\n")
    before = _files(damaged)
    err = fails(capsys, _args("precompute", damaged), "is damaged", "verify --repair")
    assert "file missing: logits/c/1/1/0" in err and "truncated" in err, err
    assert _files(damaged) == before
    assert main(["verify", "--repair", str(store)]) == 1  # damage found (and marked)
    assert not stamp.exists()  # or `make precompute` would skip the repaired store
    assert main(_args("precompute", damaged)) == 0
    assert_same_store(store, run / "store.zarr")


def test_a_store_that_lost_its_labels_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    """A lost labels chunk reads back as -1: verify passed it, and distill then blamed the
    dataset ("labels differ from the dataset's"). Precompute cannot rewrite it in place."""
    lost = _copy_teacher(run, tmp_path / "lost")
    shutil.copytree(run / "store.zarr", lost / "store.zarr")
    (lost / "store.zarr" / "labels" / "c" / "0").unlink()
    fails(capsys, _args("precompute", lost), "labels missing at all 256 row(s)")
    capsys.readouterr()
    assert main(["verify", "--repair", str(lost / "store.zarr")]) == 1
    out = capsys.readouterr()
    assert "labels missing" in out.out + out.err and "delete" in out.out + out.err, out


def test_a_store_of_another_chunk_layout_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    """A chunk layout the config sets must be the store's: resumed, the store kept its own, and
    runs without a store cut their batches from the config's."""
    other = _copy_teacher(run, tmp_path / "other")
    shutil.copytree(run / "store.zarr", other / "store.zarr")
    argv = [*_args("precompute", other), "--set", "precompute.chunk_rows=16"]
    fails(capsys, argv, "precompute.chunk_rows: store 32 vs now 16", "--overwrite")
    argv = [*_args("precompute", other), "--set", "precompute.chunks_per_shard=2"]
    fails(capsys, argv, "precompute.chunks_per_shard: store 4 vs now 2")


def test_a_ctrl_c_before_the_store_is_replaced_keeps_its_record(
    run: Path, tmp_path: Path, monkeypatch
) -> None:
    """Ctrl-C of ``precompute --overwrite`` with other inputs before the old store goes: the
    record beside it (precompute.config.yaml) still describes it. A Ctrl-C of the store's own
    config records that config."""
    import pipeline.precompute as precompute_module

    kept = _copy_teacher(run, tmp_path / "kept")
    shutil.copytree(run / "store.zarr", kept / "store.zarr")
    record = kept / "precompute.config.yaml"
    shutil.copy2(run / "precompute.config.yaml", record)
    before = record.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    argv = [*_args("precompute", kept, "--overwrite"), "--set", "augment.seed=1"]
    assert main(_args("precompute", kept)) == 0  # this process has run the store's own config
    before = record.read_bytes()
    with monkeypatch.context() as patch:  # stopped before it had its own inputs' fingerprint
        patch.setattr(precompute_module, "store_fingerprint", interrupt)
        assert main(argv) == 130
    assert record.read_bytes() == before
    monkeypatch.setattr(precompute_module, "_open_or_create", interrupt)
    assert main(argv) == 130
    assert record.read_bytes() == before
    record.unlink()
    monkeypatch.setattr(precompute_module, "_finished", lambda *args: False)  # to its resume
    assert main(_args("precompute", kept)) == 130
    assert f"run_dir: {kept}" in record.read_text()


def test_an_export_made_under_the_earlier_key_is_kept(run: Path, tmp_path: Path, capsys) -> None:
    """An export recorded under the key with data.path in it (before 2026-11-27) stays up to
    date: exported again, the ONNX file would differ, and its store be refused."""
    from pipeline.onnx_export import parity_path, sha256_file
    from stages.export import export_key

    kept = _copy_teacher(run, tmp_path / "kept")
    config = load_config(TINY, [f"run_dir={kept}", *SETTINGS])
    record = parity_path(kept / "teacher.onnx")
    doc = json.loads(record.read_text())
    older = export_key(config, sha256_file(kept / "teacher.pt"), located=True)
    assert doc["export_key"] != older
    record.write_text(json.dumps({**doc, "export_key": older}))
    stamp = (kept / "teacher.onnx").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_args("export", kept)) == 0
    assert "up to date" in capsys.readouterr().out
    assert (kept / "teacher.onnx").stat().st_mtime_ns == stamp


def test_overwrite_keeps_a_store_of_the_same_inputs(run: Path, tmp_path: Path, capsys) -> None:
    """--overwrite replaces a store made from other inputs (README); one of these very inputs
    was recomputed whole all the same (make's OVERWRITE=1 left set: every SET change)."""
    dest = _copy_teacher(run, tmp_path / "run")
    shutil.copytree(run / "store.zarr", dest / "store.zarr")
    files = {p: p.stat().st_mtime_ns for p in (dest / "store.zarr").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_args("precompute", dest, "--overwrite", "--set", "distill.epochs=3")) == 0
    assert "was made from these inputs: kept, not replaced" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert_same_store(dest / "store.zarr", run / "store.zarr")
    # Another input (a view more): replaced, as before.
    assert main(_args("precompute", dest, "--overwrite", "--set", "augment.views=3")) == 0
    with open_store(str(dest / "store.zarr")) as store:
        assert store.num_views == 3


@pytest.mark.slow  # a SIGINT timed against a running cluster: `make bench` runs it
def test_ctrl_c_of_a_dask_precompute_is_one_line(run: Path, tmp_path: Path) -> None:
    """The terminal's SIGINT reaches the whole process group: every local dask worker printed
    its KeyboardInterrupt traceback (and a cancelled task its warning) beside the one
    `interrupted:` line (make audit)."""
    dest = _copy_teacher(run, tmp_path / "run")
    argv = _args("precompute", dest, "--workers", "2")
    argv += ["--set", "data.options.num_samples=20000", "--set", "augment.views=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((dest / "store.zarr" / "logits").rglob("c/*/*")):  # a shard written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "interrupted: finished work is kept; rerun the same command to resume"
    ), err
    # No traceback: the workers' were the fix's subject, and one of distributed's own on an
    # interrupt is dropped (storage.parallel._SyncCancelRace); a log line may precede.
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
