"""Export a teacher to ONNX and prove it computes what PyTorch computes (after timm's onnx_export).

The export writes one self-contained file with a dynamic batch axis, runs ``onnx.checker``, then
runs real batches through ONNX Runtime (CPU provider) and through the PyTorch model and compares:

    max_abs_diff = max |ORT(x) - torch(x)|  ≤ atol (1e-4, float32)
    top-1 agreement on every row whose top-2 logit gap exceeds 2·atol (closer rows may tie)

The tolerance is absolute, sized for trained teachers (logits of ~10-100). float32 keeps about
7 significant digits, so an untrained deep net whose logits reach 1e6 fails it with an exact
export; the record's ``max_abs_logit`` shows the scale.

The record of that check is written as JSON beside the ONNX file (``teacher.onnx.parity.json``).
The file is exported under a temporary name and moved into place only when parity passes, so a
``teacher.onnx`` on disk is always one that passed.

Exporter: ``torch.onnx.export(dynamo=True)`` (the torch.export-based exporter, the default since
PyTorch 2.9; the TorchScript one is deprecated and slated for removal). Tested here with torch
2.13 on every model of the zoo with a dynamic batch, batches 1, 3 and 17: within float32 rounding
of PyTorch. It writes opset 18 or more; asked for 17 it logs a failed down-conversion and
silently writes 18, so for opset ≤ 17 "auto" uses the legacy TorchScript exporter, which does
write 17 (and exports 10-30× faster: 0.1-0.2 s against 2-8 s here).
``external_data=False`` keeps the weights inside the file (the dynamo default may split them out).

``onnx``, ``onnxruntime`` and ``onnxscript`` are imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import MIN_OPSET
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, publish, temp_beside

DEFAULT_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ParityError(UserError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; ``record`` holds the figures."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def parity_path(onnx_path: str | os.PathLike[str]) -> Path:
    """Where the parity record of ``onnx_path`` lives: ``<file>.parity.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".parity.json")


def _failed_path(onnx_path: Path) -> Path:
    """Where the record of a failed parity check of ``onnx_path`` lives."""
    return onnx_path.with_name(onnx_path.name + ".parity-failed.json")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    versions["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(ImportError):
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    return versions


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (deprecations, 'torchvision is not installed' notes)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            # Not even ERROR: a failed export is reported as one line (UserError) by the caller.
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _as_numpy(batch: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


def _parity_record(
    onnx_path: Path, model: nn.Module, batches: Sequence[torch.Tensor | np.ndarray], atol: float
) -> dict[str, Any]:
    """Run ``batches`` through ONNX Runtime (CPU) and the model; the comparison, not judged."""
    from pipeline.ort import make_session

    if not batches:
        raise UserError("the parity check needs at least one batch of real images")
    session = make_session(onnx_path, provider="cpu")
    input_name = session.get_inputs()[0].name
    was_training = model.training
    model.eval()
    max_diff, scale, rows, agree, ambiguous, nonfinite, torch_nonfinite = 0.0, 0.0, 0, 0, 0, 0, 0
    sizes: list[int] = []
    try:
        for batch in batches:
            x = _as_numpy(batch)  # (B, C, H, W)
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).float().numpy()  # (B, K)
            out = session.run(None, {input_name: x})[0]  # (B, K)
            if out.shape != ref.shape:
                raise UserError(
                    f"ONNX Runtime returned {out.shape} where PyTorch returned {ref.shape} for a "
                    f"batch of {len(x)}; re-export the model"
                )
            finite = np.isfinite(out).all() and np.isfinite(ref).all()
            nonfinite += int(not finite)
            torch_nonfinite += int(not np.isfinite(ref).all())  # the model's fault, not ONNX's
            max_diff = max(max_diff, float(np.abs(out - ref).max()) if finite else float("inf"))
            scale = max(scale, float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0)))
            top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
            # Rows whose best two logits are within 2·atol may legitimately swap within atol.
            clear = (top2[:, 1] - top2[:, 0]) > 2 * atol
            same = out.argmax(axis=1) == ref.argmax(axis=1)
            agree += int(same.sum())
            ambiguous += int((~same & ~clear).sum())
            rows += len(x)
            sizes.append(len(x))
    finally:
        model.train(was_training)
    disagreements = rows - agree - ambiguous
    return {
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "passed": max_diff <= atol and disagreements == 0 and nonfinite == 0,
        "max_abs_diff": max_diff,
        "atol": atol,
        "max_abs_logit": scale,
        "top1_agreement": agree / rows,
        "top1_disagreements": disagreements,
        "top1_ambiguous_rows": ambiguous,
        "nonfinite_batches": nonfinite,
        "torch_nonfinite_batches": torch_nonfinite,
        "batches": len(sizes),
        "rows": rows,
        "batch_sizes": sizes,
        "providers": session.get_providers(),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


#: Δ within this fraction of the largest logit is float32 rounding, not an export fault.
ROUNDING = 1e-5


def _other_exporter(exporter: str | None) -> str:
    """The setting that selects the exporter other than ``exporter`` ("" where not known): the
    export stage passes exporter "auto", so export.opset is what picks one."""
    return {
        "dynamo": "export.opset=17 (the TorchScript exporter)",
        "torchscript": f"export.opset={DEFAULT_OPSET} (the dynamo exporter)",
    }.get(exporter or "", "")


def _verdict(record: dict[str, Any], what: str) -> None:
    if record["passed"]:
        return
    diff, largest = record["max_abs_diff"], record["max_abs_logit"]
    rounding = (
        record["nonfinite_batches"] == 0
        and record["top1_agreement"] == 1.0
        and diff <= ROUNDING * largest
    )
    if record.get("torch_nonfinite_batches"):  # e.g. a diverged teacher: no exporter helps
        fix = (
            f"PyTorch's own outputs are NaN/inf in {record['torch_nonfinite_batches']} batches, "
            "so the teacher's weights or outputs are NaN/inf, not the export at fault: retrain "
            "the teacher (a lower teacher.lr) or give another teacher.checkpoint"
        )
    elif rounding:  # e.g. logits of 1e4 (an untrained net's batch norm): float32 itself rounds
        fix = (
            f"Δ is {diff / largest:.1g} of the largest logit, float32 rounding at that size: "
            f"if the logits are meant to be this large, set export.atol={float(f'{2 * diff:.1g}')}"
        )
    else:
        other = _other_exporter(record.get("exporter"))
        fix = "check the model for export-unsafe ops"
        fix += f" or re-export with {other}" if other else ""
    raise ParityError(
        f"{what} fails the parity check against PyTorch: max |Δ| = {diff:.3g} "
        f"(atol {record['atol']:.3g}; largest |logit| {largest:.3g}), top-1 "
        f"agreement {record['top1_agreement']:.4f}, "
        f"{record['nonfinite_batches']} batches with NaN/inf; it was not kept — {fix}",
        record,
    )


def check_onnx_parity(
    onnx_path: str | os.PathLike[str],
    model: nn.Module,
    batches: Sequence[torch.Tensor | np.ndarray],
    *,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Compare an ONNX file with the PyTorch model on real batches; the record if it passes.

    Args:
        onnx_path: the ONNX file.
        model: the PyTorch model it should equal (run in eval mode, mode restored after).
        batches: float32 image batches (B, C, H, W), tensors or arrays.
        atol: the largest |ORT - PyTorch| accepted.

    Raises:
        ParityError: (a UserError) over tolerance, a clear top-1 disagreement, or NaN/inf.
    """
    record = _parity_record(Path(onnx_path), model, batches, atol)
    _verdict(record, str(onnx_path))
    return record


def _dump_json(record: dict[str, Any], f: Any) -> None:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    with atomic_write(path, "w") as f:
        _dump_json(record, f)


def _torch_export(
    model: nn.Module, sample: torch.Tensor, path: Path, opset: int, dynamic: bool, exporter: str
) -> None:
    if exporter == "dynamo":
        dims = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=dims,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    else:
        axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes=axes,
            dynamo=False,
            do_constant_folding=True,
        )


def _check_self_contained(path: Path) -> int:
    """Refuse external data or a model that does not check; return its ONNX opset."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if external:
        raise UserError(
            f"the exported ONNX file keeps {len(external)} weights in external data files "
            f"(e.g. {external[0]}); export with external_data=False so it is one file"
        )
    onnx.checker.check_model(model, full_check=True)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def export_onnx(
    model: nn.Module,
    sample_batch: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    parity_batches: Sequence[torch.Tensor | np.ndarray] | None = None,
    atol: float = 1e-4,
    exporter: str = "auto",
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``model`` to one ONNX file at ``path``, check it, keep it only if parity passes.

    Args:
        model: the teacher (exported in eval mode; its mode is restored after).
        sample_batch: a float32 batch (B, C, H, W) that fixes C, H, W (and B if not dynamic).
        path: the ONNX file to write; the record goes to ``<path>.parity.json``.
        opset: ONNX opset (≥ 18 with the dynamo exporter).
        dynamic_batch: a symbolic batch axis, so any batch size runs.
        parity_batches: real batches for the parity check; None: ``[sample_batch]``.
        atol: largest accepted |ORT - PyTorch| in float32.
        exporter: "dynamo", "torchscript" or "auto" (dynamo for opset ≥ 18, else torchscript).
        provenance: recorded with the parity result (the export stage's checkpoint hash, which
            precompute checks, so an ONNX file of an older teacher is never run).

    Returns:
        The parity record (also written as JSON beside the file).

    Raises:
        ParityError: over tolerance (nothing is published; an earlier export at ``path``
            stays, the failed record is written to ``<path>.parity-failed.json``); UserError for
            bad arguments or an export that does not check.
    """
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(
            f"export.opset={opset} is outside the opsets this onnx writes ({MIN_OPSET}..{newest}):"
            f" choose one in that range (default {DEFAULT_OPSET})"
        )

    if exporter not in EXPORTERS:
        raise UserError(
            f"unknown ONNX exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}"
        )
    if exporter == "auto":
        exporter = "dynamo" if opset >= 18 else "torchscript"
    if exporter == "dynamo" and opset < 18:
        raise UserError(
            f"the dynamo ONNX exporter writes opset 18 or newer, {opset} was asked; "
            "set export.opset to 18 or use exporter 'torchscript'"
        )
    sample = torch.as_tensor(_as_numpy(sample_batch))
    if sample.ndim != 4 or len(sample) == 0:
        raise UserError(f"sample_batch must be (B, C, H, W) images, got {tuple(sample.shape)}")
    if dynamic_batch and len(sample) == 1:
        # torch.export specialises a size-1 dimension to the constant 1.
        sample = sample.repeat(2, 1, 1, 1)
    batches = list(parity_batches) if parity_batches is not None else [sample_batch]

    path = Path(path)
    # Refused before the export, not after it published the file and failed on its record.
    for dest in (path, parity_path(path), _failed_path(path)):
        if dest.exists() and not dest.is_file():
            raise UserError(f"{dest} is a folder, not a file: move it away or set another run_dir")
    was_training = model.training
    model.eval()
    with temp_beside(path, ".tmp.onnx") as tmp:
        try:
            return _export_checked(
                model,
                sample,
                batches,
                tmp,
                path,
                opset,
                dynamic_batch,
                exporter,
                atol,
                provenance or {},
            )
        finally:
            model.train(was_training)
            # The dynamo exporter may leave "<name>.data" beside the file when external data is on.
            Path(str(tmp) + ".data").unlink(missing_ok=True)


def _export_checked(
    model: nn.Module,
    sample: torch.Tensor,
    batches: list,
    tmp: Path,
    path: Path,
    opset: int,
    dynamic_batch: bool,
    exporter: str,
    atol: float,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Export to ``tmp``, check it, and publish it as ``path`` only if the parity check passed."""
    import onnx

    try:
        with _quiet_exporter():
            _torch_export(model, sample, tmp, opset, dynamic_batch, exporter)
        written = _check_self_contained(tmp)
    except UserError:
        raise
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        other = _other_exporter(exporter)
        raise UserError(
            f"ONNX export of {type(model).__name__} failed ({first[:200]}); try "
            f"{f'{other} or ' if other else ''}a model without data-dependent control flow"
        ) from e
    if written != opset:  # the dynamo exporter falls back to the opset it knows, silently
        raise UserError(
            f"export.opset={opset} was asked but the {exporter} exporter wrote opset {written}: "
            f"set export.opset to {written}"
        )
    record = _parity_record(tmp, model, batches, atol)
    record.update(
        **provenance,
        onnx_file=path.name,
        opset=written,
        exporter=exporter,
        dynamic_batch=dynamic_batch,
        input_shape=[None if dynamic_batch else len(sample), *sample.shape[1:]],
        model=type(model).__name__,
    )
    if not record["passed"]:
        # An earlier export at `path` stays: precompute runs it only if its record names this
        # very checkpoint (provenance), so a file of an older teacher is never used.
        _write_json(_failed_path(path), record)
        _verdict(record, f"the ONNX export of {type(model).__name__}")
    # The record is on disk before the file is published: a full disk fails before either is
    # replaced, never leaving a new file without its record.
    with temp_beside(parity_path(path)) as record_tmp:
        with open(record_tmp, "w") as f:
            _dump_json(record, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
        publish(record_tmp, parity_path(path))
    _failed_path(path).unlink(missing_ok=True)
    return record
