"""Bad input raises a one-line MethodError naming the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import MethodError
from pipeline.kernels import reference
from pipeline.methods import MethodContext, build_method
from pipeline.methods.ats import ats_loss
from pipeline.methods.dkd import dkd_loss
from pipeline.methods.kd import kd_loss
from pipeline.methods.ls import ls_kd_loss, standardize
from pipeline.methods.pskd import soft_targets
from tests.methods.conftest import batch

S, T, Y = batch(4, 6, dtype=torch.float32)
CTX = MethodContext(epoch=1, num_epochs=10)

CASES = {
    "zero temperature": (lambda: kd_loss(S, T, 0.0), r"temperature must be > 0, got 0.0"),
    "negative temperature": (lambda: dkd_loss(S, T, Y, temperature=-2.0), r"> 0, got -2.0"),
    "nan temperature": (lambda: ls_kd_loss(S, T, float("nan")), r"> 0, got nan"),
    "tensor temperature <= 0": (
        lambda: kd_loss(S, T, torch.tensor([1.0, 2.0, 0.0, 1.0])),
        r"temperature must be > 0, got min 0",
    ),
    "temperature shape": (
        lambda: kd_loss(S, T, torch.ones(3)),
        r"temperature must be a float or a 0-d, \(1,\) or \(4,\) tensor, got shape \(3,\)",
    ),
    "string temperature": (lambda: kd_loss(S, T, "4"), r"temperature must be a number"),
    "ats tau2 <= 0": (lambda: ats_loss(S, T, Y, 4.0, 0.0), r"tau2 must be > 0, got 0.0"),
    "ats tau1 < tau2": (lambda: ats_loss(S, T, Y, 1.0, 2.0), r"tau1 >= tau2.*1.0 < 2.0"),
    "ats student temperature": (
        lambda: ats_loss(S, T, Y, 4.0, 2.0, -1.0),
        r"student_temperature must be > 0",
    ),
    "ats form": (lambda: ats_loss(S, T, Y, form="js"), r"form must be one of ce, kl, got 'js'"),
    "shapes disagree": (
        lambda: kd_loss(S, T[:, :5]),
        r"teacher must have the student's shape \(4, 6\), got \(4, 5\)",
    ),
    "target shape": (lambda: dkd_loss(S, T, Y[:3]), r"target must be \(4,\).*got \(3,\)"),
    "target too large": (
        lambda: dkd_loss(S, T, torch.tensor([0, 1, 6, 2])),
        r"target class 6 is out of range: classes are 0..5",
    ),
    "negative target": (
        lambda: ats_loss(S, T, torch.tensor([0, -1, 2, 2])),
        r"target class -1 is out of range",
    ),
    "float target": (
        lambda: dkd_loss(S, T, Y.float()),
        r"integer class indices, not torch.float32",
    ),
    "integer student": (lambda: kd_loss(S.long(), T), r"float32 \(or float64\), got torch.int64"),
    "half student": (lambda: kd_loss(S.half(), T), r"float32 \(or float64\), got torch.float16"),
    "bf16 student": (lambda: dkd_loss(S.bfloat16(), T, Y), r"got torch.bfloat16"),
    "int8 teacher": (lambda: kd_loss(S, T.to(torch.int8)), r"decode int8 first"),
    "dkd one class": (
        lambda: dkd_loss(S[:, :1], T[:, :1], torch.zeros(4, dtype=torch.long)),
        r"DKD needs C >= 2 classes, got C = 1",
    ),
    "reference dkd one class": (
        lambda: reference.dkd_rows(S[:, :1], T[:, :1], torch.zeros(4, dtype=torch.long), 1.0),
        r"DKD needs 2 classes or more",
    ),
    "1-d student": (lambda: kd_loss(S[0], T[0]), r"student logits must be a \(B, C\) tensor"),
    "negative eps": (lambda: standardize(S, -1.0), r"eps must be >= 0, got -1.0"),
    "int8 without scale": (
        lambda: reference.decode_teacher(T.to(torch.int8)),
        r"int8 teacher needs its per-row scale and offset",
    ),
    "pskd epoch past the end": (
        lambda: soft_targets(torch.softmax(T, 1), Y, 0.8, 10, 10),
        r"epoch must be in 0..9 \(0-based\), got 10",
    ),
    "pskd no probabilities": (
        lambda: soft_targets(None, Y, 0.8, 3, 10),
        r"needs the previous epoch's probabilities",
    ),
    "pskd alpha_T": (lambda: soft_targets(T, Y, 1.5, 1, 10), r"alpha_T must be in \[0, 1\]"),
    "context epoch": (lambda: MethodContext(epoch=-1), r"epoch must be >= 0"),
    "context num_epochs": (lambda: MethodContext(num_epochs=0), r"num_epochs must be >= 1"),
    "module target": (
        lambda: build_method("kd")(S, T, Y + 10, CTX),
        r"target class 1\d is out of range",
    ),
    "module half student": (lambda: build_method("ls+dkd")(S.half(), T, Y, CTX), r"float16"),
    "module pskd after epoch 0": (
        lambda: build_method("pskd")(S, None, Y, CTX),
        r"previous epoch's probabilities",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_method_error(case: str) -> None:
    call, message = CASES[case]
    with pytest.raises(MethodError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_boundary_values_are_accepted() -> None:
    """The edges of each allowed range work (the checks are not off by one)."""
    assert torch.isfinite(ats_loss(S, T, Y, 2.0, 2.0, 1.0))  # tau1 == tau2 is allowed
    assert torch.isfinite(kd_loss(S, T, 1e-3))
    assert torch.isfinite(dkd_loss(S[:, :2], T[:, :2], Y % 2))  # C = 2: NCKD over one class = 0
    assert torch.isfinite(kd_loss(S, T.half())) and torch.isfinite(kd_loss(S, T.bfloat16()))
    target = torch.tensor([0, 5, 5, 0])
    assert torch.isfinite(
        build_method("dkd")(S, T, target, MethodContext(epoch=9, num_epochs=10))["total"]
    )
    assert soft_targets(torch.softmax(T, 1), Y, 1.0, 9, 10).shape == (4, 6)
