"""Supervised flow matching: the loss used for SFT cold starts and pretraining toys.

On the rectified-flow path ``x_t = (1 - t) x0 + t eps`` the target velocity is
``u = eps - x0`` (METHODS.md notation: t = 1 noise, t = 0 data).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowopd.sde import shift_sigmas

__all__ = ["add_noise", "flow_matching_loss", "sample_training_sigmas"]


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Forward process ``x_t = (1 - t) x0 + t eps``.

    x0, noise: (B, ...); sigma: float, 0-d or (B,). Returns (B, ...) float32.
    """
    x0 = x0.float()
    t = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)
    if t.ndim == 1:
        t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - t) * x0 + t * noise.float()


def flow_matching_loss(
    v_pred: Tensor, x0: Tensor, noise: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Conditional flow-matching loss ``mean( (v_pred - (eps - x0))^2 )``.

    v_pred: (B, ...) velocity predicted at ``add_noise(x0, noise, t)``; x0, noise:
    (B, ...). The mean is over every element (batch included), in float32.
    Stats: loss.
    """
    if not (v_pred.shape == x0.shape == noise.shape):
        raise ValueError(
            f"shape mismatch: v_pred {tuple(v_pred.shape)}, x0 {tuple(x0.shape)}, "
            f"noise {tuple(noise.shape)}"
        )
    target = noise.detach().float() - x0.detach().float()  # (B, ...)
    loss = ((v_pred.float() - target) ** 2).mean()
    return loss, {"loss": float(loss.detach())}


def sample_training_sigmas(
    n: int,
    generator: torch.Generator | None = None,
    *,
    kind: Literal["logit_normal", "uniform"] = "logit_normal",
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Draw n training times t in (0, 1) for flow matching: (n,) float32.

    ``logit_normal`` (SD3's choice, "rf/lognorm(0, 1)" in Esser et al. 2024):
    ``t = sigmoid(z)``, ``z ~ N(logit_mean, logit_std^2)``, which concentrates training
    on intermediate times, where the velocity is hardest to predict. ``uniform``:
    ``t ~ U(0, 1)``. Then the SD3 time shift ``t' = shift t / (1 + (shift - 1) t)``
    moves mass toward noise, as needed at high resolution; the default 3.0 is SD3.5's
    scheduler shift, as diffusers' SD3 training scripts apply it (they look the sampled
    value up in the shifted training schedule). ``shift=1`` disables it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    device = generator.device if generator is not None else None
    if kind == "logit_normal":
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(z * logit_std + logit_mean)
    elif kind == "uniform":
        t = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    else:
        raise ValueError(f"kind must be 'logit_normal' or 'uniform', got {kind!r}")
    return shift_sigmas(t, shift)
