"""What a method's loss adds to a training step on a GPU, counted where CI can: kernel launches.

A small student on a GPU is host-bound, so a loss that launches more kernels slows the whole
step (tests/benchmarks/bench_host.py times it). KD-, DKD-based methods and ATS train through
``kd_ce`` / ``dkd_ce`` / ``ats_ce``, two fused kernels with the cross-entropy inside: their loss
launches no more kernels a step than plain cross-entropy does (``kd_ce`` 6 against CE's 8 since
2026-11-27: its kernel checks the targets' range, three launches fewer, and its backward scales
the gradient its forward made, one elementwise launch).
"""

from __future__ import annotations

import pytest

from pipeline import kernels
from pipeline.distill_inputs import method_names
from tests.benchmarks.bench_host import Counter, step_fn, stubbed_launches
from tests.kernels import require_interpreter


def _count_a_step(name: str) -> Counter:
    with stubbed_launches() as launches:
        step = step_fn(name)
        step()  # first call: caches
        counter = Counter()
        before = launches[0]
        with counter:
            step()
        counter.launches = launches[0] - before
    return counter


def _kernels_a_step(name: str) -> tuple[int, int]:
    counter = _count_a_step(name)
    return counter.kernels, counter.launches


@pytest.mark.parametrize("name", ["kd", "ls", "dkd", "ls+dkd", "ats"])
def test_fused_losses_launch_no_more_kernels_than_cross_entropy(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_interpreter()
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    ce, _ = _kernels_a_step("ce")
    apart, _ = _kernels_a_step("kd, CE apart")
    count, launches = _kernels_a_step(name)
    assert launches == 2  # the fused forward and backward (KD's both in its forward)
    assert count <= ce, (count, ce)
    assert apart > ce  # the count can tell: the unfused loss launches more


@pytest.mark.parametrize("name", method_names())
def test_targets_are_range_checked_once_a_step(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The method checks its targets (check_inputs) and the fused kernels, told so, do not
    again; or, for KD's ``kd_ce``, the fused forward kernel checks them as it reads them and one
    assert follows (no separate pass: floor_divide, eq and all were three launches more)."""
    require_interpreter()
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    counter = _count_a_step(name)
    in_kernel = name in ("kd", "ls", "ctkd", "ctkd+kd", "ls+kd", "ls+ctkd")  # the KD module's
    apart = 0 if in_kernel else 1
    assert counter.ops["floor_divide"] == apart and counter.ops["eq"] == apart, dict(counter.ops)
    # Read once either way (on the CPU: the flag or the check's all(); CUDA asserts instead).
    assert counter.ops["_local_scalar_dense"] >= 1, dict(counter.ops)


#: Kernels a training step of these methods' losses launches (forward + backward), on the fused
#: path: CTKD's learned temperature adds its own small ops (sigmoid, the gradient reversal, the
#: (B,) broadcast), PS-KD builds its mixed targets. A check added on the step's path shows here.
#: (CTKD 19 before kd_ce checked the targets in its kernel, 2026-11-27.)
LAUNCH_BUDGET = {"ctkd": 17, "pskd": 25}


@pytest.mark.parametrize("name", sorted(LAUNCH_BUDGET))
def test_methods_with_their_own_ops_keep_to_their_count(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_interpreter()
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    count, _ = _kernels_a_step(name)
    assert count <= LAUNCH_BUDGET[name], (count, LAUNCH_BUDGET[name])
