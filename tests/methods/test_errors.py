"""Bad input raises a one-line MethodError naming the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from pipeline import kernels
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
    "zero temperature": (
        lambda: kd_loss(S, T, 0.0),
        r"temperature must be a finite number > 0, got 0.0",
    ),
    "negative temperature": (lambda: dkd_loss(S, T, Y, temperature=-2.0), r"> 0, got -2.0"),
    "nan temperature": (lambda: ls_kd_loss(S, T, float("nan")), r"> 0, got nan"),
    "tensor temperature <= 0": (
        lambda: kd_loss(S, T, torch.tensor([1.0, 2.0, 0.0, 1.0])),
        r"temperature must be finite and > 0, got 0$",
    ),
    "temperature shape": (
        lambda: kd_loss(S, T, torch.ones(3)),
        r"temperature must be a float or a 0-d, \(1,\) or \(4,\) tensor, got shape \(3,\)",
    ),
    "string temperature": (lambda: kd_loss(S, T, "4"), r"temperature must be a number"),
    "ats tau2 <= 0": (
        lambda: ats_loss(S, T, Y, 4.0, 0.0),
        r"tau2 must be a finite number > 0, got 0.0",
    ),
    "ats tau1 < tau2": (lambda: ats_loss(S, T, Y, 1.0, 2.0), r"tau1 >= tau2.*1.0 < 2.0"),
    "ats student temperature": (
        lambda: ats_loss(S, T, Y, 4.0, 2.0, -1.0),
        r"student_temperature must be a finite number > 0, got -1.0",
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
    "negative eps": (lambda: standardize(S, -1.0), r"eps must be a finite number >= 0, got -1.0"),
    "infinite temperature": (lambda: kd_loss(S, T, float("inf")), r"finite number > 0, got inf"),
    "tensor temperature inf": (
        lambda: kd_loss(S, T, torch.tensor([1.0, float("inf"), 2.0, 1.0])),
        r"temperature must be finite and > 0, got inf",
    ),
    "tensor temperature nan": (
        lambda: dkd_loss(S, T, Y, temperature=torch.tensor([float("nan")])),
        r"temperature must be finite and > 0, got nan",
    ),
    "ats tensor tau1 < tau2": (
        lambda: ats_loss(S, T, Y, torch.tensor([4.0, 1.0, 4.0, 4.0]), torch.tensor([2.0])),
        r"tau1 >= tau2 \(tau1 on the target class\), got 1.0 < 2.0",
    ),
    "dkd infinite beta": (lambda: dkd_loss(S, T, Y, 1.0, float("inf")), r"beta must be a finite"),
    "ats infinite student temperature": (
        lambda: ats_loss(S, T, Y, 4.0, 2.0, float("inf")),
        r"student_temperature must be a finite number > 0, got inf",
    ),
    "infinite eps": (lambda: standardize(S, float("inf")), r"eps must be a finite number >= 0"),
    "nan eps": (lambda: standardize(S, float("nan")), r"eps must be a finite number >= 0, got nan"),
    "pskd negative alpha_T": (
        lambda: soft_targets(T, Y, -0.5, 1, 10),
        r"alpha_T must be a number in \[0, 1\], got -0.5",
    ),
    "pskd raw logits for probabilities": (
        lambda: soft_targets(T, Y, 0.8, 1, 10),
        r"prev_probs must hold probabilities \(rows >= 0 summing to 1\), but row 0 sums to",
    ),
    "pskd prev_probs shape": (
        lambda: build_method("pskd")(S, torch.softmax(T[:, :5], 1), Y, CTX),
        r"prev_probs must have the student's shape \(4, 6\), got \(4, 5\)",
    ),
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
    "pskd alpha_T": (
        lambda: soft_targets(T, Y, 1.5, 1, 10),
        r"alpha_T must be a number in \[0, 1\], got 1.5",
    ),
    "context epoch": (lambda: MethodContext(epoch=-1), r"epoch must be >= 0 \(0-based\)"),
    "context fractional epoch": (
        lambda: MethodContext(epoch=1.5, num_epochs=10),
        r"epoch must be a whole number, got 1.5",
    ),
    "context num_epochs": (lambda: MethodContext(num_epochs=0), r"num_epochs must be >= 1"),
    # The kernels' own API on its reference path (what the CPU runs): as checked as the fused.
    "kernel api target out of range": (
        lambda: kernels.ats_rows(S, T, Y + 6, 2.0, 1.0, 1.0, impl="reference"),
        r"target class \d+ is out of range: classes are 0..5",
    ),
    "kernel api negative target": (
        lambda: kernels.dkd_ce(S, T, Y - 9, 4.0, 1.0, 1.0, 8.0, impl="reference"),
        r"target class -\d+ is out of range",
    ),
    "kernel api string temperature": (
        lambda: kernels.kd_rows(S, T, "4", impl="reference"),
        r"temperature must be a number > 0 or a tensor, got '4'",
    ),
    "kernel api scale shape": (
        lambda: kernels.decode_teacher(T.to(torch.int8), torch.ones(4, 1), torch.zeros(4)),
        r"needs a float \(B,\) scale, got \(4, 1\) for teacher logits of shape \(4, 6\)",
    ),
    "ls+dkd kd_weight": (
        lambda: build_method({"name": "ls+dkd", "kd_weight": -1}),
        r"kd_weight must be a finite number >= 0, got -1",
    ),
    "ls+dkd beta as given": (
        lambda: build_method({"name": "ls+dkd", "beta": -1}),
        r"beta must be a finite number >= 0, got -1$",
    ),
    "ls+dkd kd_weight type": (
        lambda: build_method({"name": "ls+dkd", "kd_weight": "9"}),
        r"kd_weight must be a finite number >= 0, got '9'",
    ),
    "instance ctkd class count": (
        lambda: build_method({"name": "ctkd", "variant": "instance"}, num_classes=12)(S, T, Y, CTX),
        r"instance-wise CTKD was built for 12 classes, got logits of 6",
    ),
    "module target": (
        lambda: build_method("kd")(S, T, Y + 10, CTX),
        r"target class 1\d is out of range",
    ),
    "empty batch": (  # the batch mean of no rows was NaN
        lambda: dkd_loss(S[:0], T[:0], Y[:0]),
        r"student logits hold no rows \(B = 0\): a loss needs a batch of 1 or more",
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


@pytest.mark.parametrize(
    "options, message",
    [
        ({"name": "kd", "temperature": float("inf")}, r"temperature must be a finite number > 0"),
        ({"name": "kd", "ce_weight": float("inf")}, r"ce_weight must be a finite number >= 0"),
        ({"name": "dkd", "alpha": float("inf")}, r"alpha must be a finite number >= 0, got inf"),
        ({"name": "dkd", "beta": float("nan")}, r"beta must be a finite number >= 0, got nan"),
        ({"name": "ctkd", "t_range": float("inf")}, r"t_range must be a finite number >= 0"),
        ({"name": "ctkd", "t_start": float("inf")}, r"t_start must be a finite number > 0"),
        ({"name": "ctkd", "theta0": float("-inf")}, r"theta0 must be a finite number, got -inf"),
        ({"name": "ats", "student_temperature": float("inf")}, r"student_temperature must be a"),
        ({"name": "ats", "lamb": -0.5}, r"lamb must be a number in \[0, 1\], got -0.5"),
        ({"name": "ls", "eps": float("inf")}, r"eps must be a finite number >= 0, got inf"),
        ({"name": "ls", "temperature": float("inf")}, r"temperature must be a finite number > 0"),
    ],
)
def test_non_finite_options_are_refused(options: dict, message: str) -> None:
    """An infinite or NaN hyper-parameter would make every loss NaN, inf or silently 0."""
    with pytest.raises(MethodError, match=message) as err:
        build_method(options, num_classes=6)
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
