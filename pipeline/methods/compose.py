"""The registry's builders: one per accepted name, keyword defaults exactly as in METHODS.md.

Each builder's keyword arguments are the keys a method config may set (``build_method`` refuses
any other key); ``num_classes`` is supplied by ``build_method`` itself, not by the config.
Compositions assemble ``KD``/``DKD`` with a ``ZScore`` (``ls``) and/or a learned temperature
(``ctkd``), so no loss is written twice.
"""

from __future__ import annotations

from pipeline.errors import MethodError
from pipeline.methods.base import check_number
from pipeline.methods.ctkd import learned_temperature
from pipeline.methods.dkd import DKD
from pipeline.methods.kd import KD
from pipeline.transforms import ZScore


def _zscore(eps: float | None, population_std: bool) -> ZScore:
    """The official z-score (unbiased std, eps 1e-7), or the paper's (population std, eps 0)."""
    if not isinstance(population_std, bool):
        raise MethodError(f"population_std must be true or false, got {population_std!r}")
    default = 0.0 if population_std else 1e-7
    return ZScore(eps=default if eps is None else eps, unbiased=not population_std)


def kd(*, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> KD:
    """``kd``: Hinton KD, T 4, 0.1 · CE + 0.9 · KD."""
    return KD(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)


def dkd(
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    warmup: int = 20,
) -> DKD:
    """``dkd``: alpha 1, beta 8, T 4, CE weight 1, 20 warm-up epochs."""
    return DKD(alpha=alpha, beta=beta, temperature=temperature, ce_weight=ce_weight, warmup=warmup)


def ls_kd(
    *,
    temperature: float = 2.0,
    ce_weight: float = 0.1,
    kd_weight: float = 9.0,
    eps: float | None = None,
    population_std: bool = False,
) -> KD:
    """``ls`` / ``ls+kd``: KD on z-scored logits, base tau 2, 0.1 · CE + 9 · L_ls."""
    z = _zscore(eps, population_std)
    return KD(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, zscore=z)


def ls_dkd(
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    kd_weight: float = 9.0,
    temperature: float = 2.0,
    ce_weight: float = 1.0,
    warmup: int = 20,
    eps: float | None = None,
    population_std: bool = False,
) -> DKD:
    """``ls+dkd``: DKD on z-scored logits, alpha and beta multiplied by the LS kd weight (9)."""
    # Each checked as given, before the products (a bad one is named as the user wrote it).
    kd_weight = check_number("kd_weight", kd_weight, 0.0)
    alpha, beta = check_number("alpha", alpha, 0.0), check_number("beta", beta, 0.0)
    return DKD(
        alpha=alpha * kd_weight,
        beta=beta * kd_weight,
        temperature=temperature,
        ce_weight=ce_weight,
        warmup=warmup,
        zscore=_zscore(eps, population_std),
    )


def ctkd_kd(
    *,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    variant: str = "global",
    t_start: float = 1.0,
    t_range: float = 20.0,
    theta0: float = 1.0,
    curriculum_epochs: int = 10,
    num_classes: int | None = None,
) -> KD:
    """``ctkd`` / ``ctkd+kd``: KD at the learned tau, 0.1 · CE + 0.9 · KD."""
    tau = learned_temperature(
        variant, num_classes, t_start=t_start, t_range=t_range, theta0=theta0,
        curriculum_epochs=curriculum_epochs,
    )  # fmt: skip
    return KD(temperature=tau, ce_weight=ce_weight, kd_weight=kd_weight)


def ctkd_dkd(
    *,
    alpha: float = 1.0,
    beta: float = 2.0,
    ce_weight: float = 1.0,
    warmup: int = 0,
    variant: str = "global",
    t_start: float = 1.0,
    t_range: float = 20.0,
    theta0: float = 1.0,
    curriculum_epochs: int = 10,
    num_classes: int | None = None,
) -> DKD:
    """``ctkd+dkd``: DKD at the learned tau, CE 1, alpha 1, beta 2, no warm-up."""
    tau = learned_temperature(
        variant, num_classes, t_start=t_start, t_range=t_range, theta0=theta0,
        curriculum_epochs=curriculum_epochs,
    )  # fmt: skip
    return DKD(alpha=alpha, beta=beta, temperature=tau, ce_weight=ce_weight, warmup=warmup)


def ls_ctkd(
    *,
    ce_weight: float = 0.1,
    kd_weight: float = 9.0,
    eps: float | None = None,
    population_std: bool = False,
    variant: str = "global",
    t_start: float = 1.0,
    t_range: float = 20.0,
    theta0: float = 1.0,
    curriculum_epochs: int = 10,
    num_classes: int | None = None,
) -> KD:
    """``ls+ctkd``: KD on z-scored logits with CTKD's learned tau as the base temperature.

    Weights are LS's (0.1 · CE + 9 · L_ls): the learned tau replaces LS's base temperature 2.
    """
    tau = learned_temperature(
        variant, num_classes, t_start=t_start, t_range=t_range, theta0=theta0,
        curriculum_epochs=curriculum_epochs,
    )  # fmt: skip
    z = _zscore(eps, population_std)
    return KD(temperature=tau, ce_weight=ce_weight, kd_weight=kd_weight, zscore=z)
