"""Signal-to-noise ratio of a stochastic policy gradient, from independent per-group samples.

Online RL updates are averages of per-prompt-group gradients g_1 .. g_n (each group's
advantages sum to zero, so groups are the independent unit). With mean mu = E[g] and
covariance Sigma, the per-group SNR is

    s = ||mu||^2 / tr(Sigma)

and an update averaging n groups has SNR n s; its expected cosine with mu is about
sqrt(n s / (1 + n s)). So 1 / s groups are needed for an update whose signal equals its
noise: the sample-efficiency ceiling of an estimator, whatever the learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gradient_snr", "gradient_snr_stderr", "update_cosine"]


def gradient_snr(grads: Tensor) -> float:
    """Unbiased estimate of ``||mu||^2 / tr(Sigma)`` from n independent gradients (n, P).

        g_bar   = mean_k g_k
        tr_hat  = sum_k ||g_k - g_bar||^2 / (n - 1)       (unbiased for tr(Sigma))
        mu2_hat = ||g_bar||^2 - tr_hat / n                 (unbiased for ||mu||^2)
        s       = mu2_hat / tr_hat

    Can come out negative when the signal is below the estimate's own noise (about
    ``sqrt(2 / n)`` times ``1 / n``-scaled noise): read it as "indistinguishable from 0".
    """
    if grads.ndim != 2 or grads.shape[0] < 2:
        raise ValueError(f"need (n >= 2, P) gradients, got {tuple(grads.shape)}")
    g = grads.double()
    n = g.shape[0]
    mean = g.mean(0)
    tr = ((g - mean) ** 2).sum() / (n - 1)
    if float(tr) == 0.0:
        raise ValueError("the gradients are all equal: no noise to compare against")
    mu2 = (mean**2).sum() - tr / n
    return float(mu2 / tr)


def gradient_snr_stderr(grads: Tensor, draws: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`gradient_snr`: its std over ``draws`` resamples
    of the n gradients (with replacement). Figures within ~2 of these of 0 are noise."""
    gen = torch.Generator().manual_seed(seed)
    g = grads.double()
    n = g.shape[0]
    # the statistic needs only the Gram matrix: resamples cost O(n^2), not O(n P)
    gram = g @ g.T
    vals = []
    for _ in range(draws):
        idx = torch.randint(n, (n,), generator=gen)
        k = gram[idx][:, idx]
        mean_sq = k.sum() / n**2  # ||g_bar||^2
        tr = (k.diagonal().sum() - n * mean_sq) / (n - 1)
        if float(tr) > 0:
            vals.append(float((mean_sq - tr / n) / tr))
    return float(torch.tensor(vals).std()) if len(vals) > 1 else float("nan")


def update_cosine(snr: float, groups: int) -> float:
    """Expected cosine between an update of ``groups`` groups and the true gradient:
    ``sqrt(n s / (1 + n s))`` (0 for s <= 0)."""
    ns = max(snr, 0.0) * groups
    return math.sqrt(ns / (1.0 + ns))
