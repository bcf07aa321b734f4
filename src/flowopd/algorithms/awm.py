"""AWM: Advantage Weighted Matching (METHODS.md, AWM).

Xue et al., arXiv 2509.25050. A policy gradient whose log-likelihood is the pretraining
objective itself. Rollouts are clean images x0; training noises them again,
``x_t = (1 - t) x0 + t eps``, ``u = eps - x0`` (``sft.add_noise``), and the (transformed)
flow-matching error stands in for -log p_theta(x0 | c):

    log p_i = -phi(mse_i, t_i),     mse_i = mean_elements (v_theta,i - u_i)^2

Each image's term is weighted by its advantage, PPO-style:

    rho_i = exp(log p_i - log p_old,i)
    L     = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps))
            + kl_beta * mean_i KL_ref,i + ema_kl_beta * mean_i KL_ema,i

On policy (log p_old = log p detached, the published setting) rho = 1 and
``grad L = mean_i A_i grad phi(mse_i, t_i)``: descent lowers the matching error of the
images with A > 0 and raises it for A < 0. With phi(m, t) = m this is, in gradient, the
advantage-weighted flow-matching loss ``mean_i A_i ||v_theta,i - u_i||^2``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowopd.algorithms.grpo import _check_same_shape, clipped_surrogate
from flowopd.algorithms.nft import _add_kl, _mean_over_elements, _per_sample_sigma

__all__ = ["AWM_WEIGHTINGS", "awm_log_prob", "awm_loss", "velocity_kl", "ema_kl_decay"]

Weighting = Literal["uniform", "t", "t2", "huber", "ghuber"]
AWM_WEIGHTINGS: tuple[str, ...] = ("uniform", "t", "t2", "huber", "ghuber")
_DELTA = 1e-10  # the public code's floor inside the huber roots


def awm_log_prob(
    v_theta: Tensor,
    target_u: Tensor,
    sigma: Tensor | float | None = None,
    *,
    weighting: Weighting = "ghuber",
    ghuber_power: float = 0.25,
) -> Tensor:
    """AWM's stand-in for log p_theta(x0 | c): ``-phi(mse, t)``, (B,).

        mse = mean_elements (v_theta - u)^2
        uniform: phi = mse                     t:     phi = t mse
        t2:      phi = t^2 mse                 huber: phi = t (sqrt(mse + d) - sqrt(d))
        ghuber:  phi = t ((mse + d)^p - d^p) / p,     d = 1e-10, p = ``ghuber_power``

    All are increasing in mse; their gradient is ``phi'(mse) grad mse`` with phi' = 1,
    t, t^2, t / (2 sqrt(mse + d)) and t (mse + d)^(p - 1): the robust ones (the published
    ``ghuber``, p = 0.25) damp images the model fits badly. ``"t2"`` is the code's
    ``'t**2'``; only ``"uniform"`` ignores ``sigma``.

    v_theta: (B, ...) velocity at x_t (keeps its graph); target_u: (B, ...) ``eps - x0``
    (detached); sigma: the time t of x_t, float, 0-d or (B,). Computed in float32.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")
    _check_same_shape(v_theta=v_theta, target_u=target_u)
    mse = _mean_over_elements((v_theta.float() - target_u.detach().float()) ** 2)  # (B,)
    if weighting == "uniform":
        return -mse
    if sigma is None:
        raise ValueError(f"weighting={weighting!r} needs sigma, the time t of x_t")
    t = _per_sample_sigma(sigma, mse.shape[0], mse.device)
    if weighting == "t":
        return -t * mse
    if weighting == "t2":
        return -(t**2) * mse
    if weighting == "huber":
        return -t * (torch.sqrt(mse + _DELTA) - _DELTA**0.5)
    if ghuber_power <= 0:
        raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
    p = ghuber_power
    return -t * ((mse + _DELTA) ** p - _DELTA**p) / p


def awm_loss(
    log_prob: Tensor,
    advantages: Tensor,
    old_log_prob: Tensor | None = None,
    *,
    clip_range: float = 1.0,
    adv_clip: float = 5.0,
    adv_max: float | None = 1.0,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
    ema_kl: Tensor | None = None,
    ema_kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """AWM loss for one trained time of a minibatch.

        A'       = clip(A, -adv_clip, adv_clip) / adv_clip * adv_max
        rho      = exp(log_prob - old_log_prob)
        L_policy = mean( max(-A' rho, -A' clip(rho, 1 - clip_range, 1 + clip_range)) )
        L        = L_policy + kl_beta * mean(kl) + ema_kl_beta * mean(ema_kl)

    ``old_log_prob=None`` is the published on-policy setting: the detached ``log_prob``
    itself, so rho = 1 exactly and dL/dlog_prob_i = -A'_i / B (the clip never binds).
    The published A' spans [-1, 1] (``adv_max=1``); ``adv_max=None`` keeps clip(A).

    log_prob:     (B,) ``awm_log_prob`` of the current policy (keeps its graph).
    advantages:   (B,) group advantages (``group_advantages(std="global")``; detached).
    old_log_prob: (B,) the same quantity under the sampling snapshot (same x_t, t, eps).
    kl, ema_kl:   (B,) ``velocity_kl`` to the reference (base) and to the EMA snapshot.
    Stats: loss, policy_loss, clip_fraction, ratio_mean, approx_kl (as ``grpo_loss``),
    log_prob_mean, kl, ema_kl (batch means, 0.0 when not given).
    """
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
    a = advantages.detach().float().clamp(-adv_clip, adv_clip)  # (B,)
    if adv_max is not None:
        a = a / adv_clip * adv_max
    old = log_prob.detach() if old_log_prob is None else old_log_prob
    policy, stats = clipped_surrogate(log_prob, old, a, clip_range)
    b = log_prob.shape[0]
    loss, stats["kl"] = _add_kl(policy, kl, kl_beta, b, "kl")
    loss, stats["ema_kl"] = _add_kl(loss, ema_kl, ema_kl_beta, b, "ema_kl")
    stats["log_prob_mean"] = float(log_prob.detach().float().mean())
    stats["loss"] = float(loss.detach())
    return loss, stats


def velocity_kl(
    v_theta: Tensor,
    v_other: Tensor,
    sigma: Tensor | float | None = None,
    *,
    weighting: Literal["uniform", "elbo"] = "uniform",
    noise_level: float = 0.7,
) -> Tensor:
    """Per-sample KL surrogate between two velocity fields at the same x_t: (B,).

        uniform: KL = mean_elements (v_theta - v_other)^2
        elbo:    KL = mean_elements (v_theta - v_other)^2 / (2 s_t^2),
                 s_t = noise_level * sqrt(t / (1 - min(t, 0.99)))

    ``uniform`` is AWM's published choice (``kl_weight='Uniform'``) and DiffusionNFT's
    only one; ``elbo`` is the Flow-GRPO SDE step's KL without its dt (the public AWM
    code hard-codes noise_level 0.7 there). v_other (the base model with the adapter
    disabled, or an EMA snapshot) is detached. sigma: float, 0-d or (B,), t > 0.
    """
    if weighting not in ("uniform", "elbo"):
        raise ValueError(f"weighting must be 'uniform' or 'elbo', got {weighting!r}")
    _check_same_shape(v_theta=v_theta, v_other=v_other)
    gap = _mean_over_elements((v_theta.float() - v_other.detach().float()) ** 2)  # (B,)
    if weighting == "uniform":
        return gap
    if sigma is None:
        raise ValueError("weighting='elbo' needs sigma, the time t of x_t")
    t = _per_sample_sigma(sigma, gap.shape[0], gap.device)
    var = noise_level**2 * t / (1.0 - t.clamp(max=0.99))  # s_t^2
    return gap / (2.0 * var)


def ema_kl_decay(step: int, *, rate: float = 1e-3, max_decay: float = 0.3) -> float:
    """Decay of AWM's EMA snapshot (the target of ``ema_kl``) after optimizer step ``step``.

        theta_ema <- d theta_ema + (1 - d) theta,    d = min(rate * step, max_decay)

    Published: min(0.001 step, 0.3) (``kl_ema_decay_type='linear'``), applied once per
    epoch. d = 0 copies the policy: the EMA-KL then anchors to the epoch's starting policy.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(rate * step, max_decay)
