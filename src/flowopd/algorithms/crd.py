"""CRD: Centered Reward Distillation (METHODS.md §4).

KL-regularised reward maximisation has the optimum ``p* ~ p_ref exp(r / beta)``, so
``r(x, c) = beta log(p*/p_ref)(x|c) + beta log Z(c)``. Centering over the images of one
prompt cancels the intractable ``log Z(c)``: CRD regresses the model's centered implicit
reward onto the centered external reward. Works on forward-noised clean rollouts:

    x_t = (1 - t) x0 + t eps,   u = eps - x0        (see ``sft.add_noise``)

Drift controls: a KL anchor to the CFG-guided base with reward-adaptive strength
(``crd_kl``), and EMA "sampler" / "old" snapshots of the policy (``ema_decays``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from flowopd.algorithms.advantages import group_mean

__all__ = ["implicit_reward", "crd_loss", "crd_kl", "EmaDecays", "ema_decays"]


def _per_sample_mean(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t


def implicit_reward(
    v_theta: Tensor,
    v_old: Tensor,
    target_u: Tensor,
    *,
    normalize: Literal["adaptive", "plain"] = "adaptive",
    eps: float = 1e-5,
) -> Tensor:
    """The model's implicit reward relative to the "old" snapshot, per image: (B,).

        l_i = -mean_elements[ (v_theta - u)^2 / w_theta - (v_old - u)^2 / w_old ]

    i.e. how much better the policy fits the image than the old snapshot does (a
    flow-matching-loss difference, a stand-in for log p_theta / p_old).
    ``normalize="adaptive"``: w = mean_elements |v - u| per image, detached and clamped
    to >= ``eps``, so every image contributes on the same scale whatever its t;
    ``normalize="plain"``: w = 1.

    v_theta: (B, ...) policy velocity at x_t (keeps its graph);
    v_old:   (B, ...) old-snapshot velocity at the same x_t (detached: a constant);
    target_u: (B, ...) ``eps - x0``. Computed in float32.
    """
    if normalize not in ("adaptive", "plain"):
        raise ValueError(f"normalize must be 'adaptive' or 'plain', got {normalize!r}")
    if not (v_theta.shape == v_old.shape == target_u.shape):
        raise ValueError(
            f"shape mismatch: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)}, "
            f"target_u {tuple(target_u.shape)}"
        )
    u = target_u.detach().float()
    err_theta = v_theta.float() - u  # (B, ...)
    err_old = v_old.detach().float() - u
    se_theta = _per_sample_mean(err_theta**2)  # (B,)
    se_old = _per_sample_mean(err_old**2)
    if normalize == "adaptive":
        w_theta = _per_sample_mean(err_theta.detach().abs()).clamp_min(eps)
        w_old = _per_sample_mean(err_old.abs()).clamp_min(eps)
        se_theta = se_theta / w_theta
        se_old = se_old / w_old
    return -(se_theta - se_old)


def crd_loss(
    l: Tensor,  # noqa: E741 -- the paper's (and the API's) name for the implicit reward
    a: Tensor,
    group_ids: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, float]]:
    """Centered reward distillation loss.

        L = (1 / beta) * mean_i [ beta (l_i - mean_g l) - (a_i - mean_g a) ]^2

    where ``mean_g`` is the mean over the images of the same prompt (``group_ids``,
    arbitrary integer ids), never over the whole batch: only within one prompt does
    centering cancel log Z(c). The loss is invariant to a per-prompt constant added to
    ``l`` or to ``a``. ``mean_g l`` is detached, as published; this does not change the
    gradient: the residuals ``beta l_c - a_c`` sum to zero within each group, so
    dL/dl_i = 2 (beta l_c,i - a_c,i) / N either way (detaching only saves backward work).

    l: (N,) implicit rewards (``implicit_reward``, keeps its graph);
    a: (N,) reward targets in [0, 1] (``crd_targets``; detached);
    group_ids: (N,) int. A single-image group centers to zero and contributes nothing.

    Stats: loss, implicit_reward_mean, implicit_reward_centered_std (of beta * l_c),
    target_centered_std (of a_c).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if l.ndim != 1 or l.shape != a.shape:
        raise ValueError(f"l and a must both be (N,), got {tuple(l.shape)}, {tuple(a.shape)}")
    implicit = l.float()
    a = a.detach().float()
    l_c = implicit - group_mean(implicit.detach(), group_ids)  # (N,)
    a_c = a - group_mean(a, group_ids)  # (N,)
    loss = ((beta * l_c - a_c) ** 2).mean() / beta
    with torch.no_grad():
        stats = {
            "loss": float(loss),
            "implicit_reward_mean": float(implicit.mean()),
            "implicit_reward_centered_std": float((beta * l_c).pow(2).mean().sqrt()),
            "target_centered_std": float(a_c.pow(2).mean().sqrt()),
        }
    return loss, stats


def crd_kl(
    v_theta: Tensor,
    v_base_cfg: Tensor,
    a: Tensor,
    *,
    beta_kl: float = 0.1,
    m: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL anchor to the CFG-guided base model, with reward-adaptive strength.

        c_i   = m + a_i (1 - m),     m = 1e-4 / beta_kl by default
        L_kl  = beta_kl * mean_i c_i * mean_elements (v_theta,i - v_base,i)^2

    The student is trained and sampled without CFG; ``v_base_cfg`` is the base model's
    velocity with CFG (4.5), detached. c interpolates linearly from ``m`` (a = 0, the
    worst image of its group) to 1 (a = 1, the best), so the floor on the effective
    weight ``beta_kl * c`` is 1e-4 whatever ``beta_kl``.

    v_theta, v_base_cfg: (B, ...); a: (B,) targets in [0, 1] from ``crd_targets``.
    Stats: kl_loss, kl (unweighted mean squared gap), kl_strength_mean (mean c).
    """
    if v_theta.shape != v_base_cfg.shape:
        raise ValueError(
            f"shape mismatch: v_theta {tuple(v_theta.shape)}, v_base {tuple(v_base_cfg.shape)}"
        )
    if beta_kl <= 0:
        raise ValueError(f"beta_kl must be > 0, got {beta_kl}")
    if m is None:
        m = 1e-4 / beta_kl
    c = m + a.detach().float() * (1.0 - m)  # (B,)
    gap = _per_sample_mean((v_theta.float() - v_base_cfg.detach().float()) ** 2)  # (B,)
    if c.shape != gap.shape:
        raise ValueError(f"a must have shape ({gap.shape[0]},), got {tuple(a.shape)}")
    loss = beta_kl * (c * gap).mean()
    stats = {
        "kl_loss": float(loss.detach()),
        "kl": float(gap.detach().mean()),
        "kl_strength_mean": float(c.mean()),
    }
    return loss, stats


class EmaDecays(NamedTuple):
    """EMA decays of CRD's two policy snapshots: ``snap = d * snap + (1 - d) * theta``."""

    sampler: float  # snapshot that draws the rollouts
    old: float  # snapshot that defines the implicit reward's reference v_old


def ema_decays(
    step: int,
    *,
    sampler_warmup: int = 75,
    sampler_rate: float = 0.0075,
    old_start: float = 0.25,
    old_rate: float = 0.005,
    max_decay: float = 0.999,
) -> EmaDecays:
    """CRD's published EMA schedules at optimizer step ``step`` (0-based).

        sampler = 0                                         for step < 75
                  min(0.0075 (step - 75), 0.999)             afterwards
        old     = min(0.25 + 0.005 step, 0.999)

    Decay 0 makes the snapshot a copy of the current policy: rollouts are fully
    on-policy for the first 75 steps, then the sampler lags more and more (0.999 from
    step 209 on); the old snapshot reaches 0.999 at step 150.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    sampler = (
        0.0 if step < sampler_warmup else min(sampler_rate * (step - sampler_warmup), max_decay)
    )
    old = min(old_start + old_rate * step, max_decay)
    return EmaDecays(sampler=sampler, old=old)
