"""Model checkpoints: a plain dict of tensors plus plain Python metadata.

``torch.save`` writes it and ``torch.load(..., weights_only=True)`` reads it back, so loading
never unpickles arbitrary objects: a checkpoint from someone else cannot run code. The model is
named, not pickled; loading rebuilds it from the registry with the saved keyword arguments and
refuses a state dict that does not fit it key for key and shape for shape.

    {"format": "logitbank-checkpoint", "version": 1, "model_name": "resnet20",
     "model_kwargs": {"num_classes": 10, "in_channels": 1, "image_size": [28, 28]},
     "state_dict": {name: tensor}, "extra": {...}}
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.fileio import atomic_write

FORMAT = "logitbank-checkpoint"
VERSION = 1
_SHOWN = 5  # keys named in a mismatch message, per kind


@dataclass
class Checkpoint:
    """What a checkpoint file holds, validated for structure (not yet against the model)."""

    model_name: str
    model_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``weights_only=True`` could not load back (e.g. numpy scalars)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ModelError(f"checkpoint {where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ModelError(
        f"checkpoint {where} is a {type(value).__name__}; store plain Python values "
        "(int, float, str, bool, None, list, dict) or tensors"
    )


def _fit(model: nn.Module, state: dict[str, torch.Tensor], model_name: str) -> None:
    """Raise ModelError naming the first missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:_SHOWN])}{', …' if len(keys) > _SHOWN else ''}"
        for label, keys in [
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ]
        if keys
    ]
    if problems:
        raise ModelError(
            f"checkpoint does not fit model {model_name}: {'; '.join(problems)}; check the "
            "model name and num_classes/in_channels/image_size it was trained with"
        )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and metadata atomically (temp file + ``os.replace``).

    Args:
        path: the checkpoint file to write.
        model: the model whose ``state_dict()`` is saved (moved to CPU).
        model_name: its key in ``MODELS``.
        model_kwargs: the ``build_model`` keyword arguments (num_classes, in_channels,
            image_size) that rebuild it.
        extra: plain metadata (epoch, accuracy, config...).

    Raises:
        ModelError: the weights do not fit ``model_name`` built with ``model_kwargs``, or the
            metadata holds values ``weights_only`` loading would refuse.
    """
    from pipeline.models import build_model  # the registry imports this module

    extra = dict(extra or {})
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()}
    _check_plain(kwargs, "model_kwargs")
    _check_plain(extra, "extra")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # Fail now, at save time, rather than when someone loads it hours later.
    _fit(build_model(model_name, **kwargs), state, model_name)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_name": model_name,
        "model_kwargs": kwargs,
        "state_dict": state,
        "extra": extra,
    }
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


ZIP_MAGIC = b"PK\x03\x04"
"""``torch.save`` writes a zip archive; anything else (a bare pickle, a text file) is refused
before a single byte of it is unpickled."""


def load_weights_only(path: str | os.PathLike[str], fix: str) -> Any:
    """``torch.load`` that unpickles tensors and plain containers only; a damaged file is a
    ModelError naming the file, the first line of the cause, and ``fix``.

    A file that is not a ``torch.save`` zip archive is not unpickled at all, and one whose pickle
    names any other Python object (a ``__reduce__`` that would run code) is refused by PyTorch's
    weights-only unpickler before anything is built.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise ModelError(f"{path} cannot be read ({e.strerror or e}); {fix}") from e
    if head != ZIP_MAGIC:
        raise ModelError(
            f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; this is "
            f"{'an empty file' if not head else 'something else, e.g. a bare pickle'}); {fix}"
        )
    if (bad := _damaged_member(path)) is not None:
        raise ModelError(f"{path} is truncated or corrupt ({bad}); {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice to retry unsafely is not for us
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ModelError(f"{path} is truncated or corrupt ({_first_line(e)}); {fix}") from e
        raise ModelError(
            f"{path} holds pickled Python objects other than tensors and plain values "
            f"({_refused_global(e)}); refused unread, since loading them could run code; {fix}"
        ) from e
    except Exception as e:  # a damaged archive raises RuntimeError, KeyError, EOFError, ...
        raise ModelError(f"{path} is truncated or corrupt ({_first_line(e)}); {fix}") from e


def _damaged_member(path: str | os.PathLike[str]) -> str | None:
    """Why the archive's bytes are not those written, or None when every member's CRC-32
    matches. ``torch.load`` checks none: a flipped bit inside a tensor loads as another value
    (a resumed run would then end with other weights, silently)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        return _first_line(e)
    return None if bad is None else f"the bytes of {bad} are not those written: CRC-32 mismatch"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _refused_global(e: BaseException) -> str:
    """What PyTorch's weights-only unpickler refused, e.g. 'it names posix.system'."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it names {found.group(1)}" if found else "objects the weights-only unpickler refuses"


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint with ``weights_only=True`` and check its structure.

    Raises:
        ModelError: the file is missing, truncated or corrupt, or not a logitbank checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found; run the teacher stage or fix the path")
    payload = load_weights_only(path, "re-create it")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is not a logitbank checkpoint; save it with save_checkpoint")
    if payload.get("version") != VERSION:
        raise ModelError(
            f"checkpoint {path} has version {payload.get('version')!r}, this logitbank reads "
            f"{VERSION}; re-create it"
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} has no state_dict of tensors; re-create it")
    return Checkpoint(
        model_name=str(payload.get("model_name")),
        model_kwargs=dict(payload.get("model_kwargs") or {}),
        state_dict=state,
        extra=dict(payload.get("extra") or {}),
    )


def load_model_from_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the named model, load its weights strictly, return it in eval mode on the CPU.

    Raises:
        ModelError: unreadable file, unknown model name, or weights that do not fit the model
            (the message names the first missing / unexpected / mis-shaped keys).
    """
    from pipeline.models import build_model

    ckpt = read_checkpoint(path)
    kwargs = dict(ckpt.model_kwargs)
    if isinstance(kwargs.get("image_size"), list):
        kwargs["image_size"] = tuple(kwargs["image_size"])
    model = build_model(ckpt.model_name, **kwargs)
    _fit(model, ckpt.state_dict, ckpt.model_name)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval()
