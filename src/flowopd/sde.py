"""Flow-matching sampling math: schedules, ODE / SDE / CPS steps, step KLs, OPD weight.

Stateless float32 functions on tensors; nothing here knows about models or diffusers.

Notation (METHODS.md §1): the rectified-flow path is ``x_t = (1 - t) x_0 + t * eps`` with
``t = 1`` pure noise and ``t = 0`` data; a model predicts the velocity ``v = eps - x_0``.
A step goes from ``sigma`` to ``sigma_next < sigma``, ``dt = sigma_next - sigma < 0``.

``sigma`` / ``sigma_next`` may be Python floats, 0-d tensors, or per-sample tensors of
shape ``(B,)``; they broadcast against ``x`` of shape ``(B, ...)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "StepOutput",
    "timesteps",
    "shift_sigmas",
    "ode_step",
    "sde_step",
    "cps_step",
    "sde_std",
    "gaussian_step_kl",
    "opd_weight",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class StepOutput(NamedTuple):
    """Result of one stochastic step.

    prev_sample: (B, ...) the next state x'.
    log_prob:    (B,) log-density of ``prev_sample`` under N(mean, std_total^2), averaged
                 over all non-batch elements (a per-element mean, not a sum).
    mean:        (B, ...) the Gaussian mean of the step.
    std:         the step's noise scale, broadcastable to (B, ...): ``sigma_t`` for the
                 Flow-GRPO SDE (the transition std is ``std * sqrt(-dt)``), the full
                 transition std for CPS.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3 time shift: ``s' = shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def timesteps(num_steps: int, shift: float = 3.0, *, num_train_timesteps: int = 1000) -> Tensor:
    """FlowMatchEuler inference sigmas, exactly as diffusers builds them for SD3.

    diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n)`` takes n points
    linearly spaced between the shifted training sigmas' max (1) and min, shifts them again
    (the min is shifted twice: a diffusers quirk kept for equivalence), and appends 0:

        s_min = shift(1 / N)
        sigmas = shift(linspace(1, s_min, n)) ++ [0]

    Returns: (num_steps + 1,) float32, from 1 down to 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n_train = num_train_timesteps
    s_min = shift * (1.0 / n_train) / (1.0 + (shift - 1.0) * (1.0 / n_train))
    # diffusers goes through float timesteps t = sigma * N and numpy float64 linspace
    ts = torch.linspace(1.0 * n_train, s_min * n_train, num_steps, dtype=torch.float64)
    sig = shift_sigmas(ts / n_train, shift).to(torch.float32)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float32)])


def _bcast(s: float | Tensor, x: Tensor) -> Tensor:
    """A float, 0-d or (B,) tensor as a float32 tensor broadcastable to ``x`` (B, ...)."""
    t = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"per-sample sigma must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


def _per_sample_mean(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t


def ode_step(v: Tensor, x: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Euler step of the probability-flow ODE: ``x' = x + v * (sigma_next - sigma)``.

    v, x: (B, ...). Returns (B, ...) float32.
    """
    x = x.float()
    dt = _bcast(sigma_next, x) - _bcast(sigma, x)
    return x + v.float() * dt


def sde_std(
    sigma: float | Tensor, noise_level: float, sigma_max: float, like: Tensor | None = None
) -> Tensor:
    """Flow-GRPO noise scale ``sigma_t = a * sqrt(sigma / (1 - sigma))``.

    Where ``sigma == 1`` the denominator uses ``sigma_max`` (the schedule's second value),
    as the public code does, so the first step has a finite std.
    """
    s = _bcast(sigma, like) if like is not None else torch.as_tensor(sigma, dtype=torch.float32)
    denom = 1.0 - torch.where(s == 1.0, torch.as_tensor(sigma_max, dtype=s.dtype), s)
    return noise_level * torch.sqrt(s / denom)


def _gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-element Gaussian log-density averaged over non-batch dims: (B,)."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x.detach() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))  # a deterministic step carries no density
    return _per_sample_mean(lp)


def sde_step(
    v: Tensor,
    x: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    *,
    sigma_max: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Euler–Maruyama step of the marginal-preserving SDE of Flow-GRPO (METHODS.md §1).

        std  = a * sqrt(sigma / (1 - sigma))                  (sigma == 1 -> sigma_max)
        mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
        x'   = mean + std * sqrt(-dt) * noise
        logp = mean_elements log N(x'; mean, (std sqrt(-dt))^2)

    v, x: (B, ...). If ``prev_sample`` is given it is scored (log_prob of that x') instead
    of sampling a new one; otherwise ``noise`` (B, ...) or fresh N(0, I) noise is used.
    ``noise_level = 0`` gives exactly ``ode_step``. All math in float32.
    """
    x = x.float()
    v = v.float()
    s = _bcast(sigma, x)
    s_next = _bcast(sigma_next, x)
    dt = s_next - s
    std = sde_std(sigma, noise_level, sigma_max, like=x)
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    step_std = std * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_sample = mean + step_std * noise.float()
    prev_sample = prev_sample.float()
    log_prob = _gaussian_log_prob(prev_sample, mean, step_std)
    return StepOutput(prev_sample, log_prob, mean, std)


def cps_step(
    v: Tensor,
    x: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    *,
    sigma_max: float | None = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Coefficients-preserving sampling step (CPS, METHODS.md §1).

        std    = sigma_next * sin(a * pi / 2)
        x0_hat = x - sigma v,   x1_hat = x + (1 - sigma) v
        mean   = x0_hat (1 - sigma_next) + x1_hat sqrt(sigma_next^2 - std^2)
        x'     = mean + std * noise
        logp   = -mean_elements (x' - mean)^2          (unnormalised, as published)

    ``sigma_max`` is accepted for signature symmetry with ``sde_step`` and unused.
    """
    del sigma_max
    x = x.float()
    v = v.float()
    s = _bcast(sigma, x)
    s_next = _bcast(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    mean = x0_hat * (1 - s_next) + x1_hat * torch.sqrt(torch.clamp(s_next**2 - std**2, min=0))
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.float()
    log_prob = _per_sample_mean(-((prev_sample.detach() - mean) ** 2))
    return StepOutput(prev_sample, log_prob, mean, torch.as_tensor(std))


def gaussian_step_kl(
    mean_a: Tensor, mean_b: Tensor, std: Tensor | float, dt: Tensor | float | None = None
) -> Tensor:
    """Per-sample KL between two Gaussian steps that share their std: (B,).

    Public-code form (``dt=None``), as Flow-GRPO's code computes its KL penalty:
        KL = mean_elements (mean_a - mean_b)^2 / (2 std^2)
    Exact form for the SDE step, whose transition std is ``std * sqrt(-dt)``:
        KL = mean_elements (mean_a - mean_b)^2 / (2 std^2 (-dt))
    (per-element mean, consistent with ``log_prob``). For CPS, ``std`` is the full
    transition std, so ``dt=None`` is the exact form.

    mean_a, mean_b: (B, ...); std, dt: float, 0-d, (B,) or broadcastable to (B, ...).
    """
    mean_a = mean_a.float()
    mean_b = mean_b.float()
    var = _as_bcast(std, mean_a) ** 2
    if dt is not None:
        var = var * (-_as_bcast(dt, mean_a))
    return _per_sample_mean((mean_a - mean_b) ** 2 / (2 * var))


def _as_bcast(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 1 and x.ndim > 1:
        return _bcast(t, x)
    return t


def opd_weight(
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    sigma_max: float,
) -> Tensor:
    """Weight w(t) turning a squared velocity gap into the exact per-step reverse KL.

    Two SDE steps from the same x differ only in v, so their means differ by
    ``dv (1 + std^2 (1 - t) / (2t)) dt`` and (METHODS.md §3)

        KL_t = w(t) * mean_elements (v_s - v_T)^2,
        w(t) = (-dt / 2) * (std (1 - t) / (2t) + 1 / std)^2,   std = sde_std(t)

    sigma, sigma_next: float, 0-d or (B,). Returns a tensor of the same shape (float32).
    """
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    dt = s_next - s
    std = sde_std(s, noise_level, sigma_max)
    return (-dt / 2) * (std * (1 - s) / (2 * s) + 1 / std) ** 2
