"""Flow-OPD: multi-teacher on-policy distillation losses (METHODS.md §3).

Student and teacher SDE steps from the same ``x_t`` are Gaussians with the same
covariance, so the per-step reverse KL is closed form in the velocity gap:

    KL_t = w(t) * mean_elements (v_s - v_T)^2,   w(t) = sde.opd_weight(...)

(equal to ``sde.gaussian_step_kl(mean_s, mean_T, std, dt)``, the exact form). The
velocities are the CFG-combined ones. The dense per-step reward is ``r_t = -KL_t``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowopd.algorithms.grpo import _check_same_shape, clipped_surrogate

__all__ = ["OPD_MODES", "step_kl", "opd_loss", "mar_loss"]

OpdMode = Literal["ppo", "ppo_attached", "gkd"]
OPD_MODES: tuple[str, ...] = ("ppo", "ppo_attached", "gkd")


def step_kl(v_student: Tensor, v_teacher: Tensor, weight: Tensor | float) -> Tensor:
    """Per-step reverse KL from the velocity gap: (B,).

        KL_i = weight_i * mean_elements (v_s,i - v_T,i)^2

    v_student: (B, C, H, W) CFG-combined student velocity (keeps its graph).
    v_teacher: (B, C, H, W) CFG-combined teacher velocity; detached, it is a target.
    weight:    ``sde.opd_weight(sigma, sigma_next, noise_level, sigma_max)``, float,
               0-d or (B,).
    Computed in float32 whatever the network's dtype.
    """
    _check_same_shape(v_student=v_student, v_teacher=v_teacher)
    diff2 = (v_student.float() - v_teacher.detach().float()) ** 2
    mse = diff2.mean(dim=tuple(range(1, diff2.ndim))) if diff2.ndim > 1 else diff2  # (B,)
    w = torch.as_tensor(weight, dtype=torch.float32, device=mse.device)
    if w.ndim > 0 and tuple(w.shape) != tuple(mse.shape):
        raise ValueError(f"weight must be a scalar or ({mse.shape[0]},), got {tuple(w.shape)}")
    return w * mse


def opd_loss(
    log_prob: Tensor | None,
    old_log_prob: Tensor | None,
    kl: Tensor,
    *,
    mode: OpdMode = "ppo",
    clip_range: float = 1e-4,
    adv_clip: float | None = 5.0,
) -> tuple[Tensor, dict[str, float]]:
    """Flow-OPD loss for one trained step, in one of the three published modes.

    ``ppo`` (the paper's form, default): the reward is the advantage, detached,
        A = clip(-KL, -adv_clip, adv_clip).detach()
        L = mean( max( -A rho, -A clip(rho, 1 - eps, 1 + eps) ) )
      Gradients flow only through the ratio rho = exp(logp - logp_old): a
      REINFORCE-style update that lowers the likelihood of high-KL transitions.

    ``ppo_attached`` (the public code's form): the same surrogate with
        A = clip(-KL, -adv_clip, adv_clip)        (gradient kept)
      Since -A rho = KL rho, the gradient is  rho * dKL + KL * d rho: direct regression
      of the student velocity onto the teacher's plus the ``ppo`` term. Note how the
      max/clip acts here: with KL >= 0, when rho < 1 - eps the clipped branch
      (1 - eps) KL wins and only the ratio gradient is cut, the KL regression
      gradient stays; when rho > 1 + eps the unclipped branch wins and both flow.
      Where KL > adv_clip the clamp has zero gradient: those samples get no
      regression signal (only the ratio term, with A = -adv_clip).

    ``gkd``: pure per-step reverse-KL regression, L = mean(KL); no ratio, and
      ``log_prob`` / ``old_log_prob`` may be None.

    The advantage clip applies to both PPO modes, as Flow-GRPO's surrogate clips every
    advantage to +-5 (``adv_clip=None`` disables it). KL >= 0, so A is in [-5, 0].

    log_prob, old_log_prob: (B,) as in ``grpo_loss``; kl: (B,) from ``step_kl`` (keeps
    the student's graph). Returns the scalar loss and stats: loss, kl (mean), reward
    (= -kl), kl_clip_fraction (KL > adv_clip), and for the PPO modes policy_loss,
    clip_fraction, ratio_mean, approx_kl.
    """
    if mode not in OPD_MODES:
        raise ValueError(f"unknown opd mode {mode!r}; valid modes: {', '.join(OPD_MODES)}")
    kl = kl.float()
    with torch.no_grad():
        stats: dict[str, float] = {
            "kl": float(kl.mean()),
            "reward": float(-kl.mean()),
            "kl_clip_fraction": (
                float((kl > adv_clip).float().mean()) if adv_clip is not None else 0.0
            ),
        }
    if mode == "gkd":
        loss = kl.mean()
    else:
        if log_prob is None or old_log_prob is None:
            raise ValueError(f"mode {mode!r} needs log_prob and old_log_prob")
        adv = -kl
        if adv_clip is not None:
            adv = adv.clamp(-adv_clip, adv_clip)
        if mode == "ppo":
            adv = adv.detach()
        loss, ppo_stats = clipped_surrogate(log_prob, old_log_prob, adv, clip_range)
        stats.update(ppo_stats)
    stats["loss"] = float(loss.detach())
    return loss, stats


def mar_loss(
    v_student: Tensor, v_anchor: Tensor, weight: Tensor | float, lam: float
) -> tuple[Tensor, dict[str, float]]:
    """Manifold Anchor Regularization, applied on every prompt whatever its task.

        L_mar = lam * mean_i( w(t) * mean_elements (v_s,i - v_anchor,i)^2 )

    v_student, v_anchor: (B, C, H, W) CFG-combined velocities; the anchor is the frozen
    task-agnostic "aesthetic" teacher (or the base model) and is detached.
    weight: ``sde.opd_weight(...)``, float, 0-d or (B,). lam: 0.02 in the paper,
    0.04 in its configs. Stats: mar_loss, mar_kl (the unscaled mean weighted gap).
    """
    kl = step_kl(v_student, v_anchor, weight)  # (B,)
    kl_mean = kl.mean()
    loss = lam * kl_mean
    return loss, {"mar_loss": float(loss.detach()), "mar_kl": float(kl_mean.detach())}
