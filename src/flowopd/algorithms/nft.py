"""DiffusionNFT: negative-aware fine-tuning on the forward process (METHODS.md, DiffusionNFT).

Zheng et al., arXiv 2509.16117. Rollouts are clean images x0 with rewards; training noises
them again, ``x_t = (1 - t) x0 + t eps`` with target ``u = eps - x0`` (``sft.add_noise``),
and contrasts two *implicit* policies built from the trained velocity v_theta and the
frozen "old" (sampling) velocity v_old at the same x_t:

    v+ = (1 - beta) v_old + beta v_theta      implicit positive policy
    v- = (1 + beta) v_old - beta v_theta      implicit negative policy  (v+ + v- = 2 v_old)

Each image carries an optimality probability r in [0, 1] (``optimality_probability``); the
positive branch regresses the good images and the negative branch the bad ones:

    L = mean_i [ r_i ||v+_i - u_i||^2 + (1 - r_i) ||v-_i - u_i||^2 ]     (the paper's form)

Per sample the minimiser is ``v_theta* = v_old + (2r - 1)(u - v_old) / beta``: towards u
for r > 1/2, away from it for r < 1/2, nowhere (v_old) at r = 1/2. At v_theta = v_old (the
first step after a snapshot) both branches equal v_old and the gradient is
``beta (2r - 1)`` times the flow-matching gradient: an advantage-weighted FM step.

``nft_loss`` defaults to the public code's form (per-branch self-normalised x0-space
errors, the whole scaled by 5 / beta); METHODS.md lists each difference from the paper
and the argument that selects it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowopd.algorithms.advantages import crd_targets
from flowopd.algorithms.grpo import _check_same_shape

__all__ = ["optimality_probability", "implicit_velocities", "nft_loss", "old_decay"]

Normalize = Literal["adaptive", "plain"]


def _mean_over_elements(x: Tensor) -> Tensor:
    """(B, ...) -> (B,): the mean over every dimension but the first."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _per_sample_sigma(sigma: Tensor | float, b: int, device: torch.device) -> Tensor:
    """float, 0-d or (B,) -> (B,) float32."""
    t = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if t.ndim == 0:
        return t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"sigma must be a float, 0-d or ({b},), got {tuple(t.shape)}")
    return t


def optimality_probability(adv: Tensor, *, clip: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability r in [0, 1] from group advantages: (N,).

        r = 1/2 + 1/2 clip(A / c, -1, 1) = clip(A, -c, c) / (2c) + 1/2,    c = ``clip``

    The paper writes ``r = 1/2 + 1/2 clip((R - E_c R) / Z_c, -1, 1)``; with ``A`` from
    ``group_advantages(std="global")`` (what the public code feeds in) this is Z_c =
    c * global reward std, c = 5 (``train.adv_clip_max``). A = 0 gives 1/2, |A| >= c
    gives 0 or 1. The same map as ``crd_targets``. adv: (N,). Returns float32, detached.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return crd_targets(adv, clip)


def implicit_velocities(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit positive and negative velocities ``(v+, v-)``, each (B, ...).

        v+ = (1 - beta) v_old + beta v_theta
        v- = (1 + beta) v_old - beta v_theta

    v_theta keeps its graph; v_old is detached (the frozen old snapshot). beta > 0 is
    the guidance strength: v+ - v_old = beta (v_theta - v_old) = v_old - v-.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_same_shape(v_theta=v_theta, v_old=v_old)
    v_old = v_old.detach()
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


def _branch_error(v: Tensor, u: Tensor, t: Tensor | None, eps: float) -> Tensor:
    """Per-sample error of one implicit branch: (B,).

    ``t is None`` (plain): mean_elements (v - u)^2.
    Otherwise (adaptive, x0 space): x0_hat - x0 = (x_t - t v) - (x_t - t u) = -t (v - u), so
        e = mean_elements (t (v - u))^2 / sg(max(mean_elements |t (v - u)|, eps))
          = t mean((v - u)^2) / mean|v - u|          (unless clamped)
    """
    err = v - u  # (B, ...)
    if t is None:
        return _mean_over_elements(err**2)
    err = t.view(-1, *([1] * (err.ndim - 1))) * err  # x0-prediction error, up to its sign
    w = _mean_over_elements(err.detach().abs()).clamp_min(eps)  # (B,), a constant
    return _mean_over_elements(err**2) / w


def _add_kl(
    loss: Tensor, kl: Tensor | None, weight: float, b: int, name: str
) -> tuple[Tensor, float]:
    """``loss + weight * mean(kl)`` and the KL's batch mean (0.0 without one).

    ``weight > 0`` needs ``kl`` (B,); with ``weight == 0`` a given KL is only logged, its
    graph kept out of the loss (as ``grpo_loss`` does).
    """
    if weight > 0 and kl is None:
        raise ValueError(f"{name}_beta > 0 needs the per-sample {name} (see awm.velocity_kl)")
    if kl is None:
        return loss, 0.0
    if kl.shape != (b,):
        raise ValueError(f"{name} must have shape ({b},), got {tuple(kl.shape)}")
    term = kl.float().mean()
    return (loss + weight * term if weight > 0 else loss), float(term.detach())


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    target_u: Tensor,
    r: Tensor,
    sigma: Tensor | float | None = None,
    *,
    beta: float = 1.0,
    normalize: Normalize = "adaptive",
    scale: float = 5.0,
    divide_by_beta: bool = True,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
    eps: float = 1e-5,
) -> tuple[Tensor, dict[str, float]]:
    """DiffusionNFT loss for one trained time of a minibatch.

        v+, v-   = implicit_velocities(v_theta, v_old, beta)
        e+-_i    = branch error of v+- against u (plain or adaptive, see below)
        L_policy = (scale / beta) * mean_i [ r_i e+_i + (1 - r_i) e-_i ]
        L        = L_policy + kl_beta * mean_i kl_i

    ``normalize="adaptive"`` (the public code): e = mean (t (v - u))^2 / sg(mean |t (v - u)|),
    the x0-prediction error self-normalised per image and per branch, the normaliser
    detached and clamped to >= ``eps``; needs ``sigma``. ``"plain"`` (the paper's
    objective): e = mean_elements (v - u)^2. The factor is ``scale / beta`` (code:
    5 / beta, which makes the first-step gradient ``clip(A, -5, 5)`` times the per-image
    FM gradient) or ``scale`` with ``divide_by_beta=False``; the paper's form is
    ``normalize="plain", scale=1.0, divide_by_beta=False``.

    v_theta:  (B, ...) trained velocity at x_t (keeps its graph).
    v_old:    (B, ...) old-snapshot velocity at the same x_t (detached here).
    target_u: (B, ...) ``eps - x0`` (detached here).
    r:        (B,) optimality probabilities in [0, 1] (``optimality_probability``).
    sigma:    the time t of x_t: float, 0-d or (B,); needed by ``"adaptive"``.
    kl:       (B,) per-sample KL to the reference, or None; the code's is
              ``awm.velocity_kl(v_theta, v_ref)`` = mean (v_theta - v_base)^2, weight 1e-4.
    Computed in float32. Stats: loss, policy_loss, positive_loss, negative_loss (batch
    means of e+ and e-), optimality_mean, old_deviation = mean (v_theta - v_old)^2, kl.
    """
    if normalize not in ("adaptive", "plain"):
        raise ValueError(f"normalize must be 'adaptive' or 'plain', got {normalize!r}")
    _check_same_shape(v_theta=v_theta, v_old=v_old, target_u=target_u)
    b = v_theta.shape[0]
    r = r.detach().float()
    if r.shape != (b,):
        raise ValueError(f"r must have shape ({b},), got {tuple(r.shape)}")
    if bool((r < 0).any() or (r > 1).any()):
        raise ValueError("r must lie in [0, 1]: map advantages with optimality_probability")
    t = None
    if normalize == "adaptive":
        if sigma is None:
            raise ValueError("normalize='adaptive' needs sigma, the time t of x_t")
        t = _per_sample_sigma(sigma, b, v_theta.device)
    u = target_u.detach().float()
    v_pos, v_neg = implicit_velocities(v_theta.float(), v_old.float(), beta)
    e_pos = _branch_error(v_pos, u, t, eps)  # (B,)
    e_neg = _branch_error(v_neg, u, t, eps)
    factor = scale / beta if divide_by_beta else scale
    policy = factor * (r * e_pos + (1.0 - r) * e_neg).mean()
    loss, kl_mean = _add_kl(policy, kl, kl_beta, b, "kl")
    with torch.no_grad():
        stats = {
            "loss": float(loss),
            "policy_loss": float(policy),
            "positive_loss": float(e_pos.mean()),
            "negative_loss": float(e_neg.mean()),
            "optimality_mean": float(r.mean()),
            "old_deviation": float(((v_theta.float() - v_old.float()) ** 2).mean()),
            "kl": kl_mean,
        }
    return loss, stats


def old_decay(step: int, *, warmup: int = 0, rate: float = 1e-3, max_decay: float = 0.5) -> float:
    """Decay eta of the old (sampling) snapshot after optimizer step ``step``.

        theta_old <- eta theta_old + (1 - eta) theta,
        eta = 0 for step < warmup, else min(rate (step - warmup), max_decay)

    Published schedules (public code, ``return_decay``): the default (GenEval, PickScore,
    HPSv2, multi-reward) ``warmup=0, rate=1e-3, max_decay=0.5``, i.e. min(0.001 step,
    0.5); OCR ``warmup=75, rate=0.0075, max_decay=0.999``, the schedule of CRD's sampler
    (``crd.ema_decays``). eta = 0 makes the old snapshot a copy of the policy (on-policy).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return 0.0 if step < warmup else min(rate * (step - warmup), max_decay)
