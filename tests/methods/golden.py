"""Golden values from the formulas of METHODS.md in plain numpy float64, row by row.

Written independently of ``pipeline.methods`` and ``pipeline.kernels``: probabilities (not log
space), explicit loops, the target column removed with ``np.delete``. Only for moderate logits.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def per_row(value: float | np.ndarray, batch: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (batch,))


def zscore(z: np.ndarray, eps: float = 1e-7, ddof: int = 1) -> np.ndarray:
    return (z - z.mean()) / (z.std(ddof=ddof) + eps)


def kd_rows(s: np.ndarray, t: np.ndarray, temp, zs: bool = False, eps: float = 1e-7, ddof=1):
    out = []
    for b, tb in enumerate(per_row(temp, len(s))):
        sb, tt = (zscore(s[b], eps, ddof), zscore(t[b], eps, ddof)) if zs else (s[b], t[b])
        out.append(tb**2 * kl(softmax(tt / tb), softmax(sb / tb)))
    return np.array(out)


def dkd_rows(s: np.ndarray, t: np.ndarray, y: np.ndarray, temp, zs: bool = False):
    tckd, nckd = [], []
    for b, tb in enumerate(per_row(temp, len(s))):
        sb, tt = (zscore(s[b]), zscore(t[b])) if zs else (s[b], t[b])
        p, q = softmax(tt / tb), softmax(sb / tb)
        yb = int(y[b])
        tckd.append(tb**2 * kl(np.array([p[yb], 1 - p[yb]]), np.array([q[yb], 1 - q[yb]])))
        p_hat = softmax(np.delete(tt, yb) / tb)
        q_hat = softmax(np.delete(sb, yb) / tb)
        nckd.append(tb**2 * kl(p_hat, q_hat))
    return np.array(tckd), np.array(nckd)


def ats_rows(s, t, y, tau1: float, tau2: float, s_tau: float, form: str = "ce") -> np.ndarray:
    out = []
    for b in range(len(s)):
        tau = np.array([tau1 if c == y[b] else tau2 for c in range(s.shape[1])])
        p = softmax(t[b] / tau)
        log_q = np.log(softmax(s[b] / s_tau))
        ce = -sum(p[c] * log_q[c] for c in range(len(p)))
        entropy = -sum(pc * math.log(pc) for pc in p if pc > 0)
        out.append(s_tau**2 * (ce - entropy if form == "kl" else ce))
    return np.array(out)


def ce(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([-math.log(softmax(s[b])[y[b]]) for b in range(len(s))]))


def pskd_targets(prev, y, alpha_T: float, epoch: int, num_epochs: int, classes: int):
    alpha = alpha_T * (epoch + 1) / num_epochs
    q = np.zeros((len(y), classes))
    for b in range(len(y)):
        q[b, y[b]] = 1.0
        if epoch > 0:
            q[b] = (1 - alpha) * q[b] + alpha * prev[b]
    return q


def pskd(s, prev, y, alpha_T, epoch, num_epochs) -> float:
    q = pskd_targets(prev, y, alpha_T, epoch, num_epochs, s.shape[1])
    return float(np.mean([-(q[b] * np.log(softmax(s[b]))).sum() for b in range(len(s))]))


def ctkd_tau0(t_start=1.0, t_range=20.0, theta0=1.0) -> float:
    return t_start + t_range / (1 + math.exp(-theta0))


def total(name: str, s, t, y, epoch: int, num_epochs: int) -> float:
    """The default-config ``total`` of each registry name, epoch 0-based (METHODS.md)."""
    warm = min((epoch + 1) / 20, 1.0)  # DKD's warm-up counts epochs from 1
    tau = ctkd_tau0()
    if name == "kd":
        return 0.1 * ce(s, y) + 0.9 * kd_rows(s, t, 4.0).mean()
    if name == "dkd":
        tc, nc = dkd_rows(s, t, y, 4.0)
        return ce(s, y) + warm * (tc.mean() + 8 * nc.mean())
    if name in ("ctkd", "ctkd+kd"):
        return 0.1 * ce(s, y) + 0.9 * kd_rows(s, t, tau).mean()
    if name == "ctkd+dkd":
        tc, nc = dkd_rows(s, t, y, tau)
        return ce(s, y) + tc.mean() + 2 * nc.mean()
    if name in ("ls", "ls+kd"):
        return 0.1 * ce(s, y) + 9 * kd_rows(s, t, 2.0, zs=True).mean()
    if name == "ls+dkd":
        tc, nc = dkd_rows(s, t, y, 2.0, zs=True)
        return ce(s, y) + warm * (9 * tc.mean() + 72 * nc.mean())
    if name == "ls+ctkd":
        return 0.1 * ce(s, y) + 9 * kd_rows(s, t, tau, zs=True).mean()
    if name == "ats":
        return 0.5 * ce(s, y) + 0.5 * ats_rows(s, t, y, 4.0, 2.0, 1.0).mean()
    if name == "pskd":
        return pskd(s, t, y, 0.8, epoch, num_epochs)
    raise KeyError(f"no golden total for {name!r}: add one when registering a method")
