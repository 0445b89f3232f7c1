"""CTKD: the curriculum, the gradient reversal, and the gradient with respect to tau."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import MethodError
from pipeline.methods import MethodContext, build_method
from pipeline.methods.ctkd import (
    GlobalTemperature,
    InstanceTemperature,
    curriculum_lambda,
    gradient_reversal,
)
from pipeline.methods.dkd import dkd_loss
from pipeline.methods.kd import kd_loss
from tests.methods import golden
from tests.methods.conftest import batch


def test_curriculum_lambda() -> None:
    assert curriculum_lambda(0) == pytest.approx(0.0, abs=1e-15)
    assert curriculum_lambda(5) == pytest.approx(0.5, abs=1e-15)  # cos(1.5π) = 0
    assert curriculum_lambda(10) == pytest.approx(1.0) == curriculum_lambda(200)
    assert curriculum_lambda(1) == pytest.approx(0.5 * (1 + math.cos(1.1 * math.pi)))
    values = [curriculum_lambda(e) for e in range(12)]
    assert values == sorted(values)  # rises monotonically, then stays at λ_max
    assert curriculum_lambda(2, 4, lambda_min=0.2, lambda_max=0.6) == pytest.approx(0.4)
    with pytest.raises(MethodError, match="max_epochs must be a whole number >= 1, got 0"):
        curriculum_lambda(1, 0)
    with pytest.raises(MethodError, match="epoch must be a whole number >= 0"):
        curriculum_lambda(-1)


def test_gradient_reversal() -> None:
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = gradient_reversal(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.6, -1.5]))


@pytest.mark.parametrize("per_sample", [False, True])
def test_dkd_gradient_wrt_tau_equals_central_difference(per_sample: bool) -> None:
    """CTKD+DKD (alpha 1, beta 2): d loss / d tau from autograd vs a central difference."""
    student, teacher, target = batch(6, 11, seed=7)
    tau0 = torch.linspace(1.5, 15.0, 6, dtype=torch.float64) if per_sample else torch.tensor(9.3)
    tau = tau0.clone().to(torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(dkd_loss(student, teacher, target, 1.0, 2.0, tau), tau)
    h = 1e-5
    for i in range(tau.numel()):
        step = torch.zeros_like(tau0, dtype=torch.float64).reshape(-1)
        step[i] = h
        step = step.reshape(tau0.shape)
        up = dkd_loss(student, teacher, target, 1.0, 2.0, tau0 + step)
        down = dkd_loss(student, teacher, target, 1.0, 2.0, tau0 - step)
        fd = ((up - down) / (2 * h)).item()
        assert grad.reshape(-1)[i].item() == pytest.approx(
            fd, rel=1e-6, abs=1e-8
        )  # O(h²) truncation
    assert grad.abs().sum() > 0


def test_dkd_gradient_wrt_tau_is_finite_in_float32() -> None:
    """The official -1000 mask + kl_div gives NaN here; the log-space DKD does not."""
    student, teacher, target = batch(8, 100, seed=2, dtype=torch.float32, scale=30.0)
    ctkd = build_method("ctkd+dkd")
    student.requires_grad_(True)
    for epoch in (0, 9, 50):
        ctkd.zero_grad()
        terms = ctkd(student, teacher, target, MethodContext(epoch=epoch, num_epochs=60))
        terms["total"].backward()
        theta = ctkd.temperature.predictor.theta
        assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0
        assert torch.isfinite(student.grad).all()


def test_theta_gradient_is_reversed_and_scaled_by_lambda() -> None:
    """theta.grad = -λ_e · d(kd_weight · KD at tau(theta)) / d theta (a central difference)."""
    student, teacher, target = batch(5, 8, seed=4)
    method = build_method("ctkd").double()
    ctx = MethodContext(epoch=2, num_epochs=20)  # epoch 3 counted from 1
    method(student, teacher, target, ctx)["total"].backward()
    theta = method.temperature.predictor.theta

    def loss_at(value: float) -> float:
        tau = 1 + 20 / (1 + math.exp(-value))
        return 0.9 * golden.kd_rows(student.numpy(), teacher.numpy(), tau).mean()

    h = 1e-5
    fd = (loss_at(1.0 + h) - loss_at(1.0 - h)) / (2 * h)
    assert theta.grad.item() == pytest.approx(-curriculum_lambda(3) * fd, rel=1e-6)


def test_temperature_modules() -> None:
    student, teacher, _ = batch(4, 6)
    tau = GlobalTemperature()(student, teacher, 1.0)
    assert tau.shape == (1,) and tau.item() == pytest.approx(golden.ctkd_tau0())
    inst = InstanceTemperature(6).double()
    taus = inst(student, teacher, 1.0)
    assert taus.shape == (4,)
    torch.testing.assert_close(taus, torch.full((4,), golden.ctkd_tau0(), dtype=torch.float64))
    with torch.no_grad():
        inst.mlp[2].weight.normal_(0, 0.05)
    taus = inst(student, teacher, 1.0)
    assert ((taus > 1) & (taus < 21)).all() and taus.std() > 0


class _Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, student, teacher, ctx) -> torch.Tensor:
        return self.value


def test_instance_variant_trains_its_mlp_and_leaves_the_student_alone() -> None:
    """The reversed gradient never reaches the student through the MLP's input: the student's
    gradient equals that of the same loss with the predicted taus held fixed."""
    student, teacher, target = batch(5, 6, seed=9)
    ctx = MethodContext(epoch=12, num_epochs=20)
    method = build_method({"name": "ctkd", "variant": "instance"}, num_classes=6).double()
    with torch.no_grad():  # a trained-looking MLP: taus differ per sample and depend on s
        method.temperature.predictor.mlp[2].weight.normal_(0, 0.05)
    s = student.clone().requires_grad_(True)
    terms = method(s, teacher, target, ctx)
    terms["total"].backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    taus = method.temperature.predictor(student, teacher, 1.0).detach()
    assert taus.std() > 0
    fixed = build_method({"name": "kd", "temperature": 1.0}).double()
    fixed.temperature = _Constant(taus)  # the same loss with the taus as constants
    s2 = student.clone().requires_grad_(True)
    again = fixed(s2, teacher, target, ctx)
    again["total"].backward()
    torch.testing.assert_close(again["total"], terms["total"], rtol=1e-12, atol=0)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-12, atol=0)


def test_per_sample_temperature_applies_t_squared_per_sample() -> None:
    student, teacher, _ = batch(3, 5)
    temps = torch.tensor([1.0, 3.0, 9.0], dtype=torch.float64)
    rows = [kd_loss(student[i : i + 1], teacher[i : i + 1], float(temps[i])) for i in range(3)]
    torch.testing.assert_close(kd_loss(student, teacher, temps), torch.stack(rows).mean())
