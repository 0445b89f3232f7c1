"""The ONNX Runtime session: provider choice checked against what actually runs, CPU options,
input/output checks against the dataset, the batch runner and its NaN/inf detection."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.errors import UserError
from pipeline.models import build_model
from pipeline.onnx_export import export_onnx
from pipeline.ort import Runner, available_cores, check_finite, check_io, make_session


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """small_cnn for 1×28×28, 10 classes, exported (torchscript: fast) with a dynamic batch."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 28).eval()
    path = tmp_path_factory.mktemp("ort") / "teacher.onnx"
    export_onnx(model, torch.randn(2, 1, 28, 28), path, opset=17)
    return model, path


def _cuda_really_works(path: Path) -> bool:
    try:
        make_session(path, provider="cuda")
    except UserError:
        return False
    return True


def test_cpu_session_and_its_options(teacher) -> None:
    _, path = teacher
    session = make_session(path, provider="cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]
    options = session.get_session_options()
    assert options.intra_op_num_threads == available_cores()
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert make_session(path, "cpu", threads=1).get_session_options().intra_op_num_threads == 1


def test_auto_uses_cpu_when_cuda_does_not_start(teacher) -> None:
    _, path = teacher
    if _cuda_really_works(path):
        assert make_session(path, "auto").get_providers()[0] == "CUDAExecutionProvider"
    else:
        assert make_session(path, "auto").get_providers() == ["CPUExecutionProvider"]


def test_cuda_requested_but_not_active_is_an_error(teacher, capfd, monkeypatch) -> None:
    """onnxruntime-gpu lists CUDA as available without a GPU; the session says the truth, in
    one line: ONNX Runtime's own coloured log of why (a missing libcublasLt) is kept off
    stderr unless LOGITBANK_ORT_VERBOSE=1 asks for it."""
    _, path = teacher
    if _cuda_really_works(path):
        pytest.skip("the CUDA provider works on this machine")
    capfd.readouterr()
    with pytest.raises(UserError, match="provider 'cuda' was requested but .* not active"):
        make_session(path, provider="cuda")
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("LOGITBANK_ORT_VERBOSE", "1")
    with pytest.raises(UserError, match="not active"):
        make_session(path, provider="cuda")
    assert "CUDAExecutionProvider" in capfd.readouterr().err  # ORT's reason, as asked


class _FakeSession:
    """Stands in for an InferenceSession whose CUDA provider started; keeps what it was given."""

    made: ClassVar[list] = []

    def __init__(self, model, options, providers) -> None:
        self.providers = providers
        _FakeSession.made.append(providers)

    def get_providers(self) -> list[str]:
        return [p[0] if isinstance(p, tuple) else p for p in self.providers]


def test_cuda_session_is_float32_unless_tf32_is_asked(teacher, monkeypatch) -> None:
    """ORT's CUDA provider runs float32 convolutions in TF32 by default (its use_tf32 option),
    the likely cause of float32 sessions ~1e-2 off torch's logits on an H100. Sessions turn it
    off unless ``tf32`` says otherwise; the CPU provider gets no options."""
    from pipeline import ort as lb_ort

    _, path = teacher
    monkeypatch.setattr(lb_ort, "_cuda_device_present", lambda: True)
    monkeypatch.setattr(lb_ort, "_preload_cuda_libraries", lambda _ort: None)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(lb_ort.PROVIDERS.values()))
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    _FakeSession.made.clear()
    make_session(path, "cuda")
    make_session(path, "auto", tf32=True)
    assert _FakeSession.made == [
        [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
        [("CUDAExecutionProvider", {"use_tf32": "1"}), "CPUExecutionProvider"],
    ]
    _FakeSession.made.clear()
    make_session(path, "cpu", tf32=True)  # nothing to allow on the CPU: not an error
    assert _FakeSession.made == [["CPUExecutionProvider"]]


def test_cuda_asked_of_a_cpu_only_onnxruntime(teacher, monkeypatch) -> None:
    """The image's own onnxruntime (a CPU build) lists no CUDA: the line says which to install,
    not that a GPU is missing."""
    _, path = teacher
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="has no CUDA provider .*CPU-only build.*onnxruntime-gpu"):
        make_session(path, provider="cuda")
    assert make_session(path, "auto").get_providers() == ["CPUExecutionProvider"]


def test_cuda_libraries_preloaded_quietly_where_a_gpu_is(monkeypatch, capfd) -> None:
    """preload_dlls prints a line per missing library; none reaches the user, nothing raises,
    and without a GPU it is not called at all."""
    import types

    from pipeline import ort as lb_ort

    calls = []

    def preload_dlls() -> None:
        calls.append(1)
        print("Failed to load libcudnn.so.9: not found")
        raise OSError("libcudart.so.13: cannot open shared object file")

    fake = types.SimpleNamespace(preload_dlls=preload_dlls)
    monkeypatch.setattr(lb_ort, "_cuda_device_present", lambda: True)
    lb_ort._preload_cuda_libraries(fake)
    assert calls == [1]
    assert capfd.readouterr() == ("", "")
    monkeypatch.setattr(lb_ort, "_cuda_device_present", lambda: False)
    lb_ort._preload_cuda_libraries(fake)
    assert calls == [1]
    lb_ort._preload_cuda_libraries(types.SimpleNamespace())  # ORT < 1.21: no such function


def test_bad_arguments(teacher, tmp_path) -> None:
    _, path = teacher
    with pytest.raises(UserError, match="unknown ONNX Runtime provider 'tpu'; .*auto, cuda, cpu"):
        make_session(path, provider="tpu")
    with pytest.raises(UserError, match="threads"):
        make_session(path, "cpu", threads=0)
    with pytest.raises(UserError, match="not found; run the export stage"):
        make_session(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(UserError, match="is not a readable ONNX model"):
        make_session(tmp_path / "junk.onnx", "cpu")


@pytest.mark.skipif(
    importlib.util.find_spec("onnxconverter_common") is not None,
    reason="onnxconverter_common is installed: fp16 is offered on CUDA",
)
def test_fp16_unavailable_is_a_clear_error(teacher) -> None:
    _, path = teacher
    with pytest.raises(UserError, match="fp16"):
        make_session(path, "cuda", fp16=True)
    with pytest.raises(UserError, match="fp16"):
        make_session(path, "cpu", fp16=True)


def test_check_io(teacher) -> None:
    _, path = teacher
    session = make_session(path, "cpu")
    check_io(session, 10, (1, 28, 28))
    with pytest.raises(UserError, match=r"logits \(batch, 10\) but the dataset has 100 classes"):
        check_io(session, 100, (1, 28, 28))
    with pytest.raises(
        UserError, match=r"inputs \(batch, 1, 28, 28\) but .* images are \(batch, 3, 32, 32\)"
    ):
        check_io(session, 10, (3, 32, 32))


def test_runner_matches_torch_for_any_batch_size(teacher) -> None:
    model, path = teacher
    runner = Runner(make_session(path, "cpu"), num_classes=10)
    assert runner.device == "cpu"
    for b in (1, 3, 17):
        x = torch.randn(b, 1, 28, 28)
        out = runner.run(x.numpy())
        assert out.dtype == np.float32 and out.shape == (b, 10)
        with torch.no_grad():
            np.testing.assert_allclose(out, model(x).numpy(), rtol=0, atol=1e-4)
    # float64 or non-contiguous input is converted, not refused
    x64 = np.asfortranarray(np.random.default_rng(0).standard_normal((2, 1, 28, 28)))
    assert runner.run(x64).shape == (2, 10)
    with pytest.raises(UserError, match=r"\(B, C, H, W\)"):
        runner.run(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(UserError, match=r"failed on a batch of shape \(2, 1, 20, 20\)"):
        runner.run(np.zeros((2, 1, 20, 20), np.float32))


def test_runner_wrong_class_count(teacher) -> None:
    _, path = teacher
    with pytest.raises(UserError, match=r"logits \(2, 10\) .* expected \(2, 7\)"):
        Runner(make_session(path, "cpu"), num_classes=7).run(np.zeros((2, 1, 28, 28), np.float32))


def test_nan_logits_name_the_samples(teacher) -> None:
    """A NaN pixel gives NaN logits for that sample only; the error names dataset indices."""
    _, path = teacher
    runner = Runner(make_session(path, "cpu"), num_classes=10)
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    x[1, 0, 3, 3] = np.nan
    x[4, 0, 0, 0] = np.inf
    with pytest.raises(UserError, match=r"NaN/inf for 2 of 6 samples: 1001, 1004;"):
        runner.run(x, indices=np.arange(1000, 1006))
    with pytest.raises(UserError, match=r"for 2 of 6 batch rows: 1, 4;"):
        runner.run(x)
    runner.run(np.nan_to_num(x, nan=0.0, posinf=0.0), indices=range(6))  # finite again: fine


def test_check_finite_shortens_long_lists() -> None:
    logits = np.full((20, 3), np.inf, np.float32)
    with pytest.raises(UserError, match=r"20 of 20 samples: 0, 1, 2, 3, 4, 5, 6, 7, …"):
        check_finite(logits, indices=list(range(20)))
