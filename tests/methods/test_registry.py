"""Every registered method, generated from ``METHODS``: values, gradients, wiring, config."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pipeline.kernels as kernels
from pipeline.errors import MethodError
from pipeline.kernels import reference
from pipeline.methods import COMPOSITIONS, METHODS, MethodContext, build_method, config_keys
from tests.kernels import require_interpreter
from tests.methods import golden
from tests.methods.conftest import batch, teacher_for

NAMES = sorted(METHODS)
CTX = MethodContext(epoch=4, num_epochs=30)  # inside DKD's warm-up: the factor shows


def _build(name: str, dtype: torch.dtype = torch.float64):
    return build_method(name, num_classes=7).to(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_terms_are_finite_scalars_and_total_is_golden(name: str) -> None:
    student, teacher, target = batch()
    method = _build(name)
    teacher = teacher_for(method, teacher)
    terms = method(student, teacher, target, CTX)
    assert "total" in terms and len(terms) >= 2
    for key, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), (key, value)
    want = golden.total(name, student.numpy(), teacher.numpy(), target.numpy(), 4, 30)
    assert terms["total"].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_float32_total_matches_float64_golden(name: str) -> None:
    student, teacher, target = batch(dtype=torch.float32)
    method = _build(name, torch.float32)
    teacher = teacher_for(method, teacher)
    got = method(student, teacher, target, CTX)["total"].item()
    s64, t64 = student.double().numpy(), teacher.double().numpy()
    want = golden.total(name, s64, t64, target.numpy(), 4, 30)
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_fused_kernels_give_the_reference_terms_and_gradients(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What CUDA runs (the fused kernels, here in triton's interpreter; KD-based methods with
    their cross-entropy inside the kernel) gives the float64 method's terms and gradients (the
    student's and a learned temperature's) to float32 accuracy."""
    require_interpreter()
    results = {}
    for impl, dtype in [("reference", torch.float64), ("triton", torch.float32)]:
        monkeypatch.setenv(kernels.ENV_VAR, impl)
        student, teacher, target = batch(dtype=dtype)
        student.requires_grad_(True)
        torch.manual_seed(0)  # instance-wise CTKD's MLP: the same weights each time
        method = _build(name, dtype)
        teacher = teacher_for(method, teacher)
        terms = method(student, teacher, target, CTX)
        leaves = [student, *(p for p in method.parameters() if p.requires_grad)]
        results[impl] = (terms, torch.autograd.grad(terms["total"], leaves))
    (exact_terms, exact), (terms, grads) = results["reference"], results["triton"]
    assert terms.keys() == exact_terms.keys()
    for key in terms:  # float32 against float64: the 1e-4 of the float32 golden test
        torch.testing.assert_close(terms[key].double(), exact_terms[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), exact[0], rtol=1e-4, atol=1e-6)
    # dL/dtheta of CTKD sums rows that pull tau both ways: judged against the loss's size.
    scale = max(1.0, abs(exact_terms["total"].item()))
    for grad, want in zip(grads[1:], exact[1:], strict=True):
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_student_and_learned_temperatures_only(name: str) -> None:
    student, teacher, target = batch()
    method = _build(name)
    student.requires_grad_(True)
    teacher = teacher_for(method, teacher).requires_grad_(True)
    method(student, teacher, target, CTX)["total"].backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    params = dict(method.named_parameters())
    assert bool(params) == name.startswith(("ctkd", "ls+ctkd")), sorted(params)
    for pname, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_float64_gradcheck(name: str) -> None:
    student, teacher, target = batch(rows=3, classes=5, scale=1.5)
    method = build_method(name, num_classes=5).double()
    teacher = teacher_for(method, teacher)
    student.requires_grad_(True)

    def total(s: torch.Tensor) -> torch.Tensor:
        return method(s, teacher, target, CTX)["total"]

    assert torch.autograd.gradcheck(total, (student,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_every_method_has_a_golden_total() -> None:
    """The numpy goldens cover every method of the registry (a KeyError otherwise), each a
    finite number on a small batch."""
    for name in METHODS:
        value = golden.total(name, *(x.numpy() for x in batch(rows=1, classes=3)), 0, 1)
        assert np.isfinite(value), name


KERNEL_OF = {"kd": "kd_ce", "dkd": "dkd_ce", "ats": "ats_ce", "pskd": None}


@pytest.mark.parametrize("name", NAMES)
def test_methods_compute_through_the_shared_kernels(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each loss goes through ``pipeline.kernels`` (the dispatcher), not a private copy."""
    calls: list[str] = []

    def logged(fn_name: str):
        def call(*args, **kwargs):
            calls.append(fn_name)
            return getattr(reference, fn_name)(*args, **kwargs)

        return call

    names = ("decode_teacher", "kd_ce", "kd_rows", "dkd_ce", "dkd_rows", "ats_ce", "ats_rows")
    fake = SimpleNamespace(**{n: logged(n) for n in names})
    monkeypatch.setattr(kernels, "_reference", lambda: fake)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    student, teacher, target = batch()
    method = _build(name)
    method(student, teacher_for(method, teacher), target, CTX)
    base = name.split("+")[-1]
    kernel = KERNEL_OF.get(base, "kd_ce")  # ls, ctkd alone are KD-based (with their CE)
    assert calls == ([] if kernel is None else ["decode_teacher", kernel])


def test_registry_names_and_defaults() -> None:
    assert set(METHODS) == {
        "kd", "dkd", "ctkd", "ls", "ats", "pskd",
        "ls+kd", "ls+dkd", "ls+ctkd", "ctkd+kd", "ctkd+dkd",
    }  # fmt: skip
    assert set(COMPOSITIONS) == {"ls+kd", "ls+dkd", "ls+ctkd", "ctkd+kd", "ctkd+dkd"}
    kd, dkd = build_method("kd"), build_method("dkd")
    assert (kd.temperature.value, kd.ce_weight, kd.kd_weight) == (4.0, 0.1, 0.9)
    assert (dkd.alpha, dkd.beta, dkd.temperature.value, dkd.ce_weight, dkd.warmup) == (
        1.0, 8.0, 4.0, 1.0, 20,
    )  # fmt: skip
    ls_dkd = build_method("ls+dkd")
    assert (ls_dkd.alpha, ls_dkd.beta, ls_dkd.temperature.value, ls_dkd.warmup) == (9, 72, 2, 20)
    ct = build_method("ctkd+dkd")
    assert (ct.alpha, ct.beta, ct.ce_weight, ct.warmup) == (1.0, 2.0, 1.0, 0)
    theta = ct.temperature.predictor.theta
    assert theta.item() == 1.0 and ct.temperature.curriculum_epochs == 10
    ats = build_method("ats")
    assert (ats.tau1, ats.tau2, ats.student_temperature, ats.lamb) == (4.0, 2.0, 1.0, 0.5)
    assert build_method("pskd").alpha_T == 0.8
    ls = build_method("ls")
    assert (ls.temperature.value, ls.ce_weight, ls.kd_weight) == (2.0, 0.1, 9.0)
    assert (ls.zscore.eps, ls.zscore.unbiased) == (1e-7, True)


def test_config_overrides_and_population_std() -> None:
    method = build_method({"name": "DKD", "beta": 6, "warmup": 0})
    assert (method.beta, method.warmup) == (6.0, 0)
    paper = build_method({"name": "ls", "population_std": True})
    assert (paper.zscore.eps, paper.zscore.unbiased) == (0.0, False)
    student, teacher, target = batch()
    got = paper(student, teacher, target, CTX)["kd"].item()
    want = golden.kd_rows(student.numpy(), teacher.numpy(), 2.0, zs=True, eps=0.0, ddof=0)
    assert got == pytest.approx(want.mean(), rel=1e-9)
    assert "eps" in config_keys("ls+dkd") and "num_classes" not in config_keys("ctkd")


def test_dkd_warmup_and_ctkd_curriculum_come_from_the_context() -> None:
    student, teacher, target = batch()
    dkd = build_method("dkd")
    parts = dkd(student, teacher, target, MethodContext(epoch=0, num_epochs=30))
    dkd_term = parts["tckd"] + 8 * parts["nckd"]
    for epoch, factor in ((0, 1 / 20), (9, 0.5), (19, 1.0), (25, 1.0)):
        total = dkd(student, teacher, target, MethodContext(epoch=epoch, num_epochs=30))["total"]
        assert total.item() == pytest.approx((parts["ce"] + factor * dkd_term).item(), rel=1e-12)
    ct = build_method("ctkd").double()
    s = student.clone().requires_grad_(True)
    grads = []
    for epoch in (0, 4, 9, 30):  # 0-based: λ(1), λ(5), λ(10), λ(31)
        ct.zero_grad()
        ct(s, teacher, target, MethodContext(epoch=epoch, num_epochs=40))["total"].backward()
        grads.append(ct.temperature.predictor.theta.grad.item())
    lambdas = [0.5 * (1 + math.cos((1 + min(e, 10) / 10) * math.pi)) for e in (1, 5, 10, 31)]
    ratios = np.array(grads) / np.array(lambdas)
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)  # same loss, gradient ∝ λ_e


def test_unknown_names_compositions_and_keys_are_refused() -> None:
    with pytest.raises(MethodError, match=r"unknown method 'fitnet'.*kd, dkd") as err:
        build_method("fitnet")
    assert "\n" not in str(err.value)
    for bad in ("ls+ats", "ctkd+ats", "dkd+ls", "ls+ctkd+dkd", "kd+dkd", "ls+pskd"):
        with pytest.raises(MethodError, match=r"unknown composition.*ls\+kd, ls\+dkd"):
            build_method(bad)
    with pytest.raises(MethodError, match=r"'temprature'.*allowed are temperature"):
        build_method({"name": "kd", "temprature": 3})
    with pytest.raises(MethodError, match=r"'num_classes'"):
        build_method({"name": "ctkd", "num_classes": 10})
    with pytest.raises(MethodError, match="name"):
        build_method({"beta": 2})
    with pytest.raises(MethodError, match=r"temperature must be a finite number > 0, got -1"):
        build_method({"name": "kd", "temperature": -1})
    with pytest.raises(MethodError, match=r"beta must be a finite number >= 0, got 'x'"):
        build_method({"name": "dkd", "beta": "x"})
    with pytest.raises(MethodError, match=r"warmup must be a whole number"):
        build_method({"name": "dkd", "warmup": -2})
    with pytest.raises(MethodError, match=r"lamb must be a number in \[0, 1\], got 1.5"):
        build_method({"name": "ats", "lamb": 1.5})
    with pytest.raises(MethodError, match=r"alpha_T must be a number in \[0, 1\], got 2"):
        build_method({"name": "pskd", "alpha_T": 2})
    with pytest.raises(MethodError, match=r"variant must be one of global, instance, got 'x'"):
        build_method({"name": "ctkd+dkd", "variant": "x"})
    with pytest.raises(MethodError, match=r"needs num_classes"):
        build_method({"name": "ctkd", "variant": "instance"})
    with pytest.raises(MethodError, match=r"population_std must be true or false"):
        build_method({"name": "ls", "population_std": "yes"})
