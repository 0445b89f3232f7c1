"""Logit distillation methods: KD, DKD, CTKD, logit standardization (LS), ATS, PS-KD.

Functional forms (PyTorch tensors in, batch-mean scalar out; defaults as in METHODS.md)::

    kd.kd_loss(student, teacher, temperature=4.0)
    dkd.dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=4.0)
    ls.standardize(logits, eps=1e-7, *, unbiased=True)
    ls.ls_kd_loss(student, teacher, temperature=2.0)
    ats.ats_loss(student, teacher, target, tau1=4.0, tau2=2.0, student_temperature=1.0,
                 *, form="ce")      # or form="kl"
    ctkd.curriculum_lambda(epoch, max_epochs=10)         # λ_e, epochs counted from 1
    ctkd.GlobalTemperature, ctkd.InstanceTemperature     # nn.Modules: (student, teacher, λ) -> tau
    pskd.soft_targets(prev_probs, target, alpha_T=0.8, epoch=0, num_epochs=300)

Temperatures are a float or a per-sample (B,) tensor (T² applied per sample before the mean).

Training losses come from the registry::

    method = build_method({"name": "ls+dkd", "beta": 6}, num_classes=100)   # or "kd"
    terms = method(student_logits, teacher_logits, target, MethodContext(epoch, num_epochs))
    terms["total"].backward()          # terms also holds the named parts ("ce", "kd", "tckd", ...)
    optimizer = SGD([*student.parameters(), *method.parameters()], ...)   # CTKD's theta

Config format: a name, or a mapping with ``name`` and the method's own keys (anything else is
refused). Names (``METHODS``) and keys, with their defaults:

==============  ========================================================================
``kd``          temperature 4, ce_weight 0.1, kd_weight 0.9
``dkd``         alpha 1, beta 8, temperature 4, ce_weight 1, warmup 20 (epochs)
``ats``         tau1 4, tau2 2, student_temperature 1, lamb 0.5, form "ce" (or "kl")
``pskd``        alpha_T 0.8 (E = ctx.num_epochs)
``ls``          = ``ls+kd``: temperature 2, ce_weight 0.1, kd_weight 9, eps (1e-7), population_std
``ls+dkd``      alpha 1, beta 8 (both × kd_weight 9), temperature 2, ce_weight 1, warmup 20,
                eps, population_std
``ctkd``        = ``ctkd+kd``: ce_weight 0.1, kd_weight 0.9, variant "global" (or "instance"),
                t_start 1, t_range 20, theta0 1, curriculum_epochs 10
``ctkd+dkd``    alpha 1, beta 2, ce_weight 1, warmup 0, and the CTKD keys above
``ls+ctkd``     ce_weight 0.1, kd_weight 9, eps, population_std, and the CTKD keys
==============  ========================================================================

``population_std: true`` is the paper's z-score (population std, eps 0 unless eps is given).
Compositions are those METHODS.md defines: ``ls`` in front of kd, dkd or ctkd, and ctkd's
learned temperature inside kd or dkd; every other combination (``ls+ats``, ``ctkd+ats``,
``dkd+ls``, ``ls+ctkd+dkd``, ...) is refused with a ``MethodError`` rather than guessed.

Context: ``MethodContext.epoch`` is 0-based; DKD's warm-up and CTKD's curriculum count epochs
from 1 (epoch + 1) as their official code does, PS-KD from 0.

PS-KD is self-distillation: its module takes the student's previous-epoch softmax
**probabilities** (B, C) where the others take teacher logits (``method.teacher_input ==
"probabilities"``); the training stage supplies them from the self-teacher store it writes, and
passes ``None`` (or anything) at epoch 0, where the targets are one-hot.

All losses compute through ``pipeline.kernels`` (``kd_rows``, ``dkd_rows``, ``ats_rows``): the
PyTorch reference on CPU, fused Triton kernels on CUDA, one set of formulas.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import MethodError
from pipeline.methods import ats, compose, ctkd, dkd, kd, ls, pskd
from pipeline.methods.ats import ATS
from pipeline.methods.base import Method, MethodContext
from pipeline.methods.pskd import PSKD

__all__ = [
    "COMPOSITIONS",
    "METHODS",
    "Method",
    "MethodContext",
    "ats",
    "build_method",
    "ctkd",
    "dkd",
    "kd",
    "ls",
    "pskd",
]

#: Every accepted method name → the builder of its module (keyword defaults = METHODS.md).
METHODS: dict[str, Callable[..., Method]] = {
    "kd": compose.kd,
    "dkd": compose.dkd,
    "ctkd": compose.ctkd_kd,
    "ls": compose.ls_kd,
    "ats": ATS,
    "pskd": PSKD,
    "ls+kd": compose.ls_kd,
    "ls+dkd": compose.ls_dkd,
    "ls+ctkd": compose.ls_ctkd,
    "ctkd+kd": compose.ctkd_kd,
    "ctkd+dkd": compose.ctkd_dkd,
}

COMPOSITIONS = tuple(name for name in METHODS if "+" in name)

#: Supplied by build_method, never by a config.
_SUPPLIED = ("num_classes",)


def config_keys(name: str) -> tuple[str, ...]:
    """The keys a config for method ``name`` may set (besides ``name``)."""
    params = inspect.signature(METHODS[name]).parameters
    return tuple(key for key in params if key not in _SUPPLIED)


def build_method(config: str | Mapping[str, Any], *, num_classes: int | None = None) -> Method:
    """The method module a config names, ready to call as ``method(s, t, y, ctx)``.

    Args:
        config: a method name, or a mapping with ``name`` and that method's keys.
        num_classes: C; only instance-wise CTKD needs it (its MLP reads 2C logits).
    """
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping) or not isinstance(config.get("name"), str):
        raise MethodError(f"a method config is a name or a mapping with a 'name', got {config!r}")
    raw = config["name"]
    name = raw.strip().lower().replace(" ", "")
    if name not in METHODS:
        if "+" in name:
            raise MethodError(
                f"unknown composition {raw!r}: the defined ones are {', '.join(COMPOSITIONS)}"
            )
        raise MethodError(f"unknown method {raw!r}: known are {', '.join(METHODS)}")
    options = {key: value for key, value in config.items() if key != "name"}
    allowed = config_keys(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise MethodError(
            f"unknown key(s) {', '.join(map(repr, unknown))} for method {name!r}: "
            f"allowed are {', '.join(allowed)}"
        )
    if "num_classes" in inspect.signature(METHODS[name]).parameters:
        options["num_classes"] = num_classes
    try:
        return METHODS[name](**options)
    except TypeError as err:  # e.g. a string where a number belongs, caught by no check above
        raise MethodError(f"bad value in the {name!r} config: {err}") from err
