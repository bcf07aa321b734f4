"""Group-relative advantages (Flow-GRPO, METHODS.md §2) and CRD's targets (§4).

A batch holds ``N`` images, ``G`` per prompt; ``group_ids`` (N,) says which prompt each
image belongs to. Ids are arbitrary integers: they need not be contiguous, sorted or
start at 0 (a distributed gather interleaves them), only equal within a prompt.

All statistics are population statistics (``ddof = 0``), as ``np.std`` in the public
Flow-GRPO code.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "group_mean",
    "group_advantages",
    "nonzero_group_mask",
    "advantage_stats",
    "crd_targets",
]

StdKind = Literal["global", "group"]


def _group_index(group_ids: Tensor, n: int) -> tuple[Tensor, int]:
    """Map arbitrary ids (N,) to contiguous ``0..G-1`` indices; returns (index (N,), G)."""
    if group_ids.ndim != 1 or group_ids.shape[0] != n:
        raise ValueError(f"group_ids must have shape ({n},), got {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def _scatter_mean(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Mean of ``values`` (N,) per group: (G,)."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    counts = counts.index_add(0, index, torch.ones_like(values))
    return sums / counts


def _constant_groups(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """(G,) bool: the groups whose values are all exactly equal."""
    g_max = torch.full((num_groups,), -torch.inf, dtype=values.dtype, device=values.device)
    g_max = g_max.scatter_reduce(0, index, values, reduce="amax")
    g_min = torch.full((num_groups,), torch.inf, dtype=values.dtype, device=values.device)
    g_min = g_min.scatter_reduce(0, index, values, reduce="amin")
    return g_max == g_min


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """Each element's group mean, broadcast back to the elements: (N,) -> (N,).

    ``out[i] = mean_{j : group_ids[j] == group_ids[i]} values[j]``. Differentiable.
    """
    index, num_groups = _group_index(group_ids.to(values.device), values.shape[0])
    return _scatter_mean(values, index, num_groups)[index]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: StdKind = "global",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Tensor:
    """Group-relative advantages of Flow-GRPO.

        A_i = clip( (r_i - mean_{g(i)} r) / (s + eps), -clip, clip )

    with ``s`` the population std of *all* rewards in the batch (``std="global"``, the
    default of Flow-GRPO's configs) or of the rewards of the image's own prompt group
    (``std="group"``). ``clip=None`` disables clipping.

    A group whose rewards are all equal gets advantages of exactly 0 (not a float
    rounding residue of ``r - mean``), so ``nonzero_group_mask`` can drop it reliably.

    rewards: (N,) float; group_ids: (N,) int. Returns (N,) float32, detached.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if std not in ("global", "group"):
        raise ValueError(f"std must be 'global' or 'group', got {std!r}")
    # float64 for the statistics: rewards can be large (PickScore ~ 20) while their
    # differences within a group are ~1e-2, and float32 means lose those digits.
    r = rewards.detach().to(torch.float64)
    index, num_groups = _group_index(group_ids.to(r.device), r.shape[0])
    mean = _scatter_mean(r, index, num_groups)  # (G,)
    centered = r - mean[index]  # (N,)

    # Constant groups carry no signal: make their advantage exactly zero.
    constant = _constant_groups(r, index, num_groups)[index]  # (N,)
    centered = torch.where(constant, torch.zeros_like(centered), centered)

    if std == "global":
        scale = r.std(unbiased=False) if r.numel() > 1 else r.new_zeros(())
    else:
        var = _scatter_mean(centered**2, index, num_groups)  # (G,) population variance
        scale = var.sqrt()[index]  # (N,)
    adv = centered / (scale + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(torch.float32)


def nonzero_group_mask(adv: Tensor, group_ids: Tensor, *, atol: float = 0.0) -> Tensor:
    """Boolean mask (N,) of the images whose prompt group has some ``|A| > atol``.

    Groups whose advantages are all zero (every image got the same reward) contribute
    nothing to the policy gradient but still cost a forward/backward pass: drop them.

    adv: (N,) or (N, T) (per trained step); group_ids: (N,) int. Returns (N,) bool.
    """
    per_image = adv.detach().abs().reshape(adv.shape[0], -1).amax(dim=1) > atol  # (N,)
    index, num_groups = _group_index(group_ids.to(adv.device), adv.shape[0])
    # count per group in int64 (bool accumulation is not supported on every device)
    hits = torch.zeros(num_groups, dtype=torch.long, device=adv.device)
    hits = hits.index_add(0, index, per_image.long())
    return (hits > 0)[index]


def advantage_stats(
    rewards: Tensor, group_ids: Tensor, adv: Tensor | None = None, *, clip: float = 5.0
) -> dict[str, float]:
    """Logging statistics of a batch of grouped rewards (detached Python floats).

    reward_mean, reward_std (global, population), group_std_mean (mean within-group
    std), zero_std_group_frac (fraction of *prompts* whose rewards are all equal: they
    carry no signal), num_groups; with ``adv``: adv_abs_mean and adv_clip_frac
    (fraction of images with ``|A| >= clip``).
    """
    r = rewards.detach().to(torch.float64)
    index, num_groups = _group_index(group_ids.to(r.device), r.shape[0])
    mean = _scatter_mean(r, index, num_groups)
    group_std = _scatter_mean((r - mean[index]) ** 2, index, num_groups).sqrt()  # (G,)
    constant = _constant_groups(r, index, num_groups)  # (G,)
    stats = {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(unbiased=False)) if r.numel() > 1 else 0.0,
        "group_std_mean": float(group_std.mean()),
        "zero_std_group_frac": float(constant.double().mean()),
        "num_groups": float(num_groups),
    }
    if adv is not None:
        a = adv.detach().float()
        stats["adv_abs_mean"] = float(a.abs().mean())
        stats["adv_clip_frac"] = float((a.abs() >= clip).float().mean())
    return stats


def crd_targets(adv: Tensor, clip: float = 5.0) -> Tensor:
    """CRD's reward targets in [0, 1] (METHODS.md §4): ``a = clip(A, -5, 5) / 10 + 0.5``.

    In general ``a = clip(A, -c, c) / (2c) + 0.5``, so the targets span [0, 1] for any
    ``clip = c``; the published value is c = 5. A = 0 (an average image) maps to 0.5.

    adv: (N,) group advantages (global std). Returns (N,) float32, detached.
    """
    return adv.detach().float().clamp(-clip, clip) / (2 * clip) + 0.5
