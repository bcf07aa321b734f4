"""Flow-GRPO's clipped policy loss and KL-to-reference penalty (METHODS.md §2).

One call covers one trained denoising step of a minibatch of B trajectories; the recipe
averages or accumulates over steps. ``log_prob`` is the per-element-mean log-density of
``sde.sde_step`` (which is why the clip range is as small as 1e-4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowopd.sde import gaussian_step_kl

__all__ = ["grpo_loss", "reference_kl", "clipped_surrogate"]


def _check_same_shape(**tensors: Tensor) -> None:
    # (B,) against (B, 1) would silently broadcast to (B, B): refuse mismatched shapes.
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def clipped_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate, shared by GRPO and the PPO modes of Flow-OPD.

        rho = exp(logp - logp_old)
        L   = mean( max( -A * rho, -A * clip(rho, 1 - eps, 1 + eps) ) )

    ``old_log_prob`` is detached (it is data from the rollout); ``advantages`` is used
    as given, so gradients flow through it if it is attached (Flow-OPD's
    ``ppo_attached``). All (B,). Returns the scalar loss and its stats.
    """
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    log_ratio = log_prob.float() - old_log_prob.detach().float()  # (B,)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "policy_loss": float(loss),
            "clip_fraction": float(((ratio - 1.0).abs() > clip_range).float().mean()),
            "ratio_mean": float(ratio.mean()),
            # 0.5 E[(log rho)^2]: second-order estimate of KL(old || new), as logged publicly
            "approx_kl": float(0.5 * (log_ratio**2).mean()),
        }
    return loss, stats


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float = 1e-4,
    kl: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Flow-GRPO loss for one trained step.

        rho      = exp(logp_theta - logp_old)
        L_policy = mean( max( -A * rho, -A * clip(rho, 1 - eps, 1 + eps) ) )
        L        = L_policy + beta * mean(kl)

    log_prob:     (B,) log-prob of the rollout's x' under the current policy (grad).
    old_log_prob: (B,) log-prob recorded at collection time (detached here).
    advantages:   (B,) group advantages (detached here: they are data).
    kl:           (B,) per-sample KL to the reference (``reference_kl``), or None.
    beta:         KL weight (0.04 GenEval/OCR, 0.01 PickScore in the paper).

    Stats: loss, policy_loss, kl (mean, 0 when no kl is given), clip_fraction (fraction
    with |rho - 1| > eps), ratio_mean, approx_kl = 0.5 mean((logp - logp_old)^2).
    """
    loss, stats = clipped_surrogate(log_prob, old_log_prob, advantages.detach(), clip_range)
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs the per-sample kl (see reference_kl)")
    kl_mean = 0.0
    if kl is not None:
        _check_same_shape(log_prob=log_prob, kl=kl)
        kl_term = kl.float().mean()
        kl_mean = float(kl_term.detach())
        if beta > 0:  # beta == 0: log the KL, keep its graph out of the loss
            loss = loss + beta * kl_term
    stats["kl"] = kl_mean
    stats["loss"] = float(loss.detach())
    return loss, stats


def reference_kl(
    mean_theta: Tensor,
    mean_ref: Tensor,
    std: Tensor | float,
    dt: Tensor | float | None = None,
    *,
    exact: bool = False,
) -> Tensor:
    """Per-sample KL between the policy's and the reference's SDE steps: (B,).

    Default (``exact=False``), the public Flow-GRPO code's form, without the dt factor:
        KL = mean_elements (mean_theta - mean_ref)^2 / (2 std^2)
    Exact Gaussian KL of the Euler–Maruyama step (``exact=True``, needs ``dt``):
        KL = mean_elements (mean_theta - mean_ref)^2 / (2 std^2 (-dt))

    The default is the public form so that ``beta`` values from Flow-GRPO's configs
    (0.04, 0.01) mean the same thing here; the exact form is ``1 / (-dt)`` (about 10x
    for 10 steps) larger and needs a correspondingly smaller beta. ``dt`` is ignored
    unless ``exact`` is set, so a recipe can always pass it and switch by config.

    mean_theta, mean_ref: (B, ...) step means from ``sde.sde_step`` (the reference is
    the base model with the adapter disabled, same CFG); std: ``StepOutput.std``
    (sigma_t, not the transition std); dt: float, 0-d or (B,), negative.
    """
    if exact and dt is None:
        raise ValueError("exact=True needs dt = sigma_next - sigma")
    return gaussian_step_kl(mean_theta, mean_ref.detach(), std, dt if exact else None)
