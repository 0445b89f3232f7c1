"""The ONNX Runtime session that runs the exported teacher, and the batch runner around it.

Provider choice trusts what a session actually runs on, not what ONNX Runtime advertises:
``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` in ``get_available_providers()`` even on a
machine without a GPU (or without cuDNN), and silently falls back to the CPU. So every session is
checked with ``session.get_providers()`` after it is made: "cuda" that did not start is an error,
"auto" uses CUDA only when it really started.

    session = make_session("runs/x/teacher.onnx", provider="auto")
    check_io(session, num_classes=10, input_shape=(1, 28, 28))
    logits = Runner(session, num_classes=10).run(images, indices)  # (B, K) float32

``onnxruntime`` and ``onnx`` are imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import UserError

if TYPE_CHECKING:
    import onnxruntime

PROVIDERS: dict[str, str] = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
"""Provider names accepted by ``make_session`` (plus "auto") → ONNX Runtime's names."""

_SHOWN = 8  # sample indices named in a NaN/inf message
#: Set to 1 to let ONNX Runtime log why its CUDA provider did not start.
ORT_VERBOSE_ENV = "LOGITBANK_ORT_VERBOSE"


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cuda_device_present() -> bool:
    """A cheap hint that a GPU exists, so "auto" does not make ORT log a failed CUDA start."""
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken torch must not stop inference on the CPU
        return False


def _session_options(threads: int | None) -> onnxruntime.SessionOptions:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # One graph, one stream of ops: parallelism inside ops (intra) pays, between ops (inter)
    # only adds a second pool competing for the same cores.
    so.intra_op_num_threads = threads if threads is not None else available_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT's warnings about fallbacks are checked below
    return so


def _fp16_model_bytes(onnx_path: Path) -> bytes:
    """The model converted to float16 inside, float32 at its inputs and outputs.

    Uses ``onnxconverter_common`` (in the ``gpu`` extra, not a core dependency): without it,
    fp16 is refused.
    """
    try:
        from onnxconverter_common import float16  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(
            "fp16 inference needs the onnxconverter_common package, which is not installed; "
            "set precompute.fp16=false (float32) or pip install onnxconverter-common (the "
            "gpu extra)"
        ) from None
    import onnx

    model = onnx.load(str(onnx_path))
    # keep_io_types: the runner keeps feeding float32 images and reading float32 logits; the
    # casts sit at the graph's edges.
    return float16.convert_float_to_float16(model, keep_io_types=True).SerializeToString()


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph (or function): initializers, sparse ones, constants, nested
    subgraphs."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def check_external_data(onnx_path: str | os.PathLike[str]) -> None:
    """Refuse an ONNX file whose external data lies outside its own folder.

    ONNX keeps large weights in files named inside the model (``location``); a model from someone
    else could name ``../../etc/shadow`` or an absolute path, and ONNX Runtime or ``onnx.load``
    would read it. The model is parsed without its external data and every location checked
    before anything opens one; metadata (``metadata_props``) is never used as a path at all.

    Raises:
        UserError: an unparsable file, or a location that is absolute or leaves the folder.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends: not a model at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{path} is not a readable ONNX model ({first[:160]}); re-run the export stage"
        ) from None
    folder = path.resolve().parent
    graphs = [model.graph, *(f for f in model.functions)]
    for tensor in (t for g in graphs for t in _tensors(g)):
        if not uses_external_data(tensor):
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise UserError(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                f"model's folder; refused unread — use a model whose external data sits next "
                f"to it (or re-export it as one file)"
            )


def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN before the CUDA provider needs them (``onnxruntime.preload_dlls``).

    The provider's library is opened lazily and needs ``libcudart``/``libcublas``/``libcudnn``;
    pip installs them under ``site-packages/nvidia/*/lib``, which is not on the loader's path, so
    without this the provider fails to start and ONNX Runtime silently stays on the CPU. The
    function (ORT ≥ 1.21) takes them from an imported CUDA PyTorch or from those packages. Anything
    it cannot load is left to the session check that follows, which names the failure.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or not _cuda_device_present():
        return
    # It prints a line per library it cannot find; the one-line error below says what matters.
    # A library it cannot load is left to the session check as well.
    quiet = (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))
    with quiet[0], quiet[1], contextlib.suppress(Exception):
        preload()


def make_session(
    onnx_path: str | os.PathLike[str],
    provider: str = "auto",
    threads: int | None = None,
    fp16: bool = False,
    tf32: bool = False,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the provider asked for, verified to be the one running.

    Args:
        onnx_path: the exported model (one self-contained file).
        provider: "auto" (CUDA when it actually starts, else CPU), "cuda" or "cpu".
        threads: intra-op threads on the CPU; None: the cores this process may use.
        fp16: run in float16 inside the graph (CUDA only; needs ``onnxconverter_common``).
        tf32: let the CUDA provider run float32 convolutions and matrix products in TF32
            (its own default: float32 sessions were ~1e-2 off torch's logits on an H100);
            False, the default here, keeps a float32 session float32 on the GPU as on the CPU.

    Raises:
        UserError: unknown provider, "cuda" asked but not active, fp16 unavailable, or a
            missing / unreadable ONNX file.
    """
    import onnxruntime as ort

    if provider not in ("auto", *PROVIDERS):
        raise UserError(
            f"unknown ONNX Runtime provider {provider!r}; choose one of: auto, "
            f"{', '.join(PROVIDERS)}"
        )
    if threads is not None and threads < 1:
        raise UserError(f"threads must be ≥ 1 or None (all cores), got {threads}")
    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} not found; run the export stage first")
    check_external_data(path)  # before ONNX Runtime (or the fp16 converter) opens any of it

    listed = ort.get_available_providers()
    if provider == "cuda" and PROVIDERS["cuda"] not in listed:
        raise UserError(
            f"provider 'cuda' was requested but this onnxruntime {ort.__version__} has no CUDA "
            f"provider (it lists {', '.join(listed)}: a CPU-only build); pip install "
            "onnxruntime-gpu, or use provider 'cpu' or 'auto'"
        )
    want_cuda = provider == "cuda" or (
        provider == "auto" and PROVIDERS["cuda"] in listed and _cuda_device_present()
    )
    if fp16 and not want_cuda:
        raise UserError(
            "fp16 inference is only offered on the CUDA provider, and this session runs on "
            "the CPU; set precompute.fp16=false"
        )
    model: str | bytes = _fp16_model_bytes(path) if fp16 else str(path)

    def create(providers: list) -> onnxruntime.InferenceSession:
        try:
            return ort.InferenceSession(model, _session_options(threads), providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... classes
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"ONNX Runtime cannot load {path} ({first[:200]}); re-run the export stage"
            ) from e

    if want_cuda:
        _preload_cuda_libraries(ort)
        # ORT's CUDA provider allows TF32 unless told not to (use_tf32, ORT >= 1.18): the
        # stored logits would then differ from the parity-checked float32 model (~1e-2).
        cuda_options = {"use_tf32": "1" if tf32 else "0"}
        # A CUDA provider that cannot start logs its reason through ORT's default logger, in
        # colour, before this module's own one-line error: kept quiet unless asked for.
        verbose = os.environ.get(ORT_VERBOSE_ENV, "") not in ("", "0")
        if not verbose:
            ort.set_default_logger_severity(4)
        try:
            session = create([(PROVIDERS["cuda"], cuda_options), PROVIDERS["cpu"]])
        finally:
            if not verbose:  # ONNX Runtime's default again (it has no getter to restore from)
                ort.set_default_logger_severity(2)
        active = session.get_providers()
        if active and active[0] == PROVIDERS["cuda"]:
            return session
        if provider == "cuda":
            raise UserError(
                f"provider 'cuda' was requested but ONNX Runtime's CUDA provider is not active "
                f"(active: {', '.join(active)}; it is listed as available but did not start: "
                f"no GPU, or a CUDA/cuDNN mismatch: {ORT_VERBOSE_ENV}=1 shows ONNX Runtime's "
                "reason); use provider 'cpu' or 'auto'"
            )
        if fp16:
            raise UserError(
                "fp16 inference needs the CUDA provider, which did not start; "
                "set precompute.fp16=false"
            )
    return create([PROVIDERS["cpu"]])


def active_provider(session: onnxruntime.InferenceSession) -> str:
    """ "cuda" or "cpu": the provider that runs the session's first node."""
    return "cuda" if session.get_providers()[0] == PROVIDERS["cuda"] else "cpu"


def _shape_str(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "batch" for d in shape) + ")"


def check_io(
    session: onnxruntime.InferenceSession, num_classes: int, input_shape: Sequence[int]
) -> None:
    """Check that the model takes the dataset's images and gives one logit per class.

    Args:
        session: the session of the exported teacher.
        num_classes: K, the dataset's classes.
        input_shape: the dataset's (C, H, W).

    Raises:
        UserError: more than one input/output, an input shape that does not fit (C, H, W) or
            an output width other than K; the message shows both shapes.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(
            f"the ONNX model has {len(inputs)} inputs and {len(outputs)} outputs, a teacher has "
            "one of each (images → logits); export it with pipeline.onnx_export"
        )
    expected_in = ("batch", *input_shape)
    shape = list(inputs[0].shape)
    fits = len(shape) == 4 and all(
        not isinstance(d, int) or d == want for d, want in zip(shape[1:], input_shape)
    )
    if not fits or len(input_shape) != 3:
        raise UserError(
            f"the ONNX model takes inputs {_shape_str(shape)} but the dataset's images are "
            f"{_shape_str(expected_in)}; export a teacher built for this dataset"
        )
    out = list(outputs[0].shape)
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != num_classes):
        raise UserError(
            f"the ONNX model gives logits {_shape_str(out)} but the dataset has {num_classes} "
            f"classes, i.e. (batch, {num_classes}); export a teacher trained on this dataset"
        )


def check_finite(logits: np.ndarray, indices: Sequence[int] | np.ndarray | None = None) -> None:
    """Raise UserError naming the samples whose logits hold NaN or ±inf.

    Args:
        logits: (B, K) logits.
        indices: the dataset index of each row (B,); None: row numbers in the batch.
    """
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if bad.size == 0:
        return
    ids = np.asarray(indices)[bad] if indices is not None else bad
    shown = ", ".join(str(int(i)) for i in ids[:_SHOWN]) + (", …" if ids.size > _SHOWN else "")
    what = "samples" if indices is not None else "batch rows"
    raise UserError(
        f"the teacher's logits are NaN/inf for {ids.size} of {len(logits)} {what}: {shown}; "
        "check those images (NaN pixels?) and the teacher checkpoint"
    )


#: Largest accepted max |session - CPU float32| / max(1, largest |logit|) of a precompute session
#: that is not ONNX Runtime's CPU float32 one, by the precision it runs in (``session_parity``).
#: Loose on purpose: they refuse a broken session (an fp16 graph that saturates, a provider bug),
#: not the rounding of a GPU. H100, resnet56: TF32 was 4e-3 to 1.5e-2 off in max |Δ|, fp16 2e-2.
SESSION_RTOL: dict[str, float] = {"float32": 1e-3, "tf32": 5e-2, "float16": 5e-2}


def session_parity(logits: np.ndarray, reference: np.ndarray, rtol: float) -> dict[str, Any]:
    """How far a session's logits are from the CPU float32 session's on the same images.

    Args:
        logits: (B, K) from the session that will fill the store (CUDA, fp16, TF32).
        reference: (B, K) from ONNX Runtime's CPU provider in float32 (what export checked).
        rtol: the largest accepted max |Δ| relative to max(1, the largest |reference logit|).

    Returns:
        ``max_abs_diff``, ``largest_logit``, ``relative_diff``, ``rtol``, the top-1
        ``disagreements`` among rows whose two best reference logits are further apart than
        twice the accepted difference (closer rows may swap), the largest per-row
        ``kl_T1``/``kl_T4`` = KL(softmax(reference/T) || softmax(logits/T)) in float64 (what a
        KD loss at that temperature would see), and ``passed``.
    """
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(logits, dtype=np.float64)
    max_diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    largest = float(np.abs(ref).max()) if ref.size else 0.0
    allowed = rtol * max(1.0, largest)
    disagreements = 0
    if ref.shape[1] >= 2:
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * allowed
        disagreements = int((ref.argmax(1) != got.argmax(1))[clear].sum())
    record: dict[str, Any] = {
        "rows": int(ref.shape[0]),
        "max_abs_diff": max_diff,
        "largest_logit": largest,
        "relative_diff": max_diff / max(1.0, largest),
        "rtol": rtol,
        "disagreements": disagreements,
    }
    for t in (1, 4):
        lp, lq = _log_softmax(ref / t), _log_softmax(got / t)
        kl = (np.exp(lp) * (lp - lq)).sum(axis=1) if ref.size else np.zeros(1)
        record[f"kl_T{t}"] = float(max(0.0, kl.max()))
    record["passed"] = max_diff <= allowed and disagreements == 0
    return record


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def describe_parity(record: dict[str, Any]) -> str:
    """One line of figures from ``session_parity``."""
    return (
        f"max |Δ| {record['max_abs_diff']:.2g} ({record['relative_diff']:.2g} of the largest "
        f"|logit| {record['largest_logit']:.3g}; allowed {record['rtol']:.2g}), "
        f"{record['disagreements']} clear top-1 disagreement(s), KL at T=1 "
        f"{record['kl_T1']:.2g}, at T=4 {record['kl_T4']:.2g}, over {record['rows']} rows"
    )


class Runner:
    """Runs float32 image batches through a session; returns float32 logits.

    On the CPU provider this is ``session.run``. On CUDA it uses I/O binding: the batch is bound
    as a host input (ORT copies it to the device) and the logits are written into an output
    buffer preallocated on the device, one per batch size seen (normally two: the full batch
    and the last, partial one), then copied back once.

    The CPU path is what the tests exercise; the CUDA path runs on a GPU machine
    (``tests/gpu/check_ort.py``, BENCHMARKS.md).
    """

    def __init__(
        self, session: onnxruntime.InferenceSession, num_classes: int | None = None
    ) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        width = session.get_outputs()[0].shape[-1]
        if num_classes is None and isinstance(width, int):
            num_classes = width
        self.num_classes = num_classes
        self.device = active_provider(session)
        self._outputs: dict[int, Any] = {}  # batch size → OrtValue (B, K) on the device

    def _run_cuda(self, batch: np.ndarray) -> np.ndarray:
        """I/O-bound run on the CUDA provider."""
        import onnxruntime as ort

        if self.num_classes is None:
            raise UserError("Runner on CUDA needs num_classes to preallocate its output buffer")
        b = batch.shape[0]
        if b not in self._outputs:
            self._outputs[b] = ort.OrtValue.ortvalue_from_shape_and_type(
                [b, self.num_classes], np.float32, "cuda", 0
            )
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_ortvalue_output(self.output_name, self._outputs[b])
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return self._outputs[b].numpy()  # one device → host copy, (B, K)

    def run(
        self, batch: np.ndarray, indices: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """Logits (B, K) float32 for images (B, C, H, W).

        Args:
            batch: float32 images, already preprocessed as the teacher was trained.
            indices: dataset index of each row, used to name samples with NaN/inf logits.

        Raises:
            UserError: a batch that is not 4-D, logits of the wrong shape, or NaN/inf logits.
        """
        if batch.ndim != 4:
            raise UserError(f"a batch must be (B, C, H, W) images, got shape {batch.shape}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            if self.device == "cuda":
                logits = self._run_cuda(batch)
            else:
                logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        except UserError:
            raise
        except Exception as e:  # ORT's InvalidArgument/Fail/...: e.g. a static-batch model
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"ONNX Runtime failed on a batch of shape {batch.shape} ({first[:200]}); "
                "check the batch against the model's input (check_io)"
            ) from e
        k = self.num_classes if self.num_classes is not None else logits.shape[-1]
        if logits.shape != (batch.shape[0], k):
            raise UserError(
                f"the ONNX model returned logits {logits.shape} for a batch of "
                f"{batch.shape[0]}, expected ({batch.shape[0]}, {k}); re-export the teacher"
            )
        check_finite(logits, indices)
        return logits.astype(np.float32, copy=False)
