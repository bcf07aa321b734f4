"""Pieces shared by the recipes that train on forward-noised clean rollouts (CRD, NFT, AWM).

All keep EMA snapshots of the policy LoRA as extra adapters on the one base model, draw
the training noise per image from its own seed, and train each minibatch on a subset of
a fixed grid of training times; NFT and AWM train minibatches of images
(``train_image_minibatches``), CRD of whole prompt groups.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowopd.engine.batches import minibatches
from flowopd.rollouts import GroupScores, epoch_prompts, epoch_rollouts, seed_for

__all__ = [
    "update_snapshot",
    "add_snapshots",
    "training_noise",
    "pick_times",
    "minibatch_times",
    "CleanEpoch",
    "clean_epoch",
    "train_image_minibatches",
    "epoch_record",
]

# one minibatch's loss at one time: (x0 rows, cond rows, weight rows, sigma, noise keys)
TimeLoss = Callable[[Tensor, object, Tensor, float, list], tuple[Tensor, dict[str, float]]]


@torch.no_grad()
def update_snapshot(snapshot: Sequence[Tensor], policy: Sequence[Tensor], decay: float) -> None:
    """EMA step of a snapshot toward the policy, in place: ``snap <- d snap + (1 - d) theta``.

    ``decay = 0`` copies the policy exactly (on-policy sampling during the warm-up).
    snapshot, policy: matching lists of adapter parameters (``adapter_parameters``).
    """
    for s, p in zip(snapshot, policy, strict=True):
        if decay == 0.0:
            s.copy_(p.detach())
        else:
            s.lerp_(p.detach().to(s.dtype), 1.0 - decay)  # s + (1 - d) (p - s)


def add_snapshots(model, lora, params: list, names: Sequence[str]) -> None:
    """Adapters ``names`` of the policy's LoRA shape (``lora``), each equal to ``params``."""
    for name in names:
        model.add_adapter(
            name,
            rank=lora.rank,
            alpha=lora.alpha,
            target_modules=lora.target_modules,
            init=lora.init if lora.init != "default" else True,
        )
        update_snapshot(model.adapter_parameters(name), params, 0.0)


def training_noise(
    shape: Sequence[int], keys: Sequence[tuple[int | str, ...]], device: torch.device
) -> Tensor:
    """One N(0, I) draw per row from its own seed: (B, *shape). Per-image seeds make the
    noise independent of minibatch composition and process count."""
    draws = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed_for(*k)))
        for k in keys
    ]
    return torch.stack(draws).to(device)


def pick_times(
    num_grid: int, used: int, key: tuple[int | str, ...], stratified: bool = False
) -> list[int]:
    """``used`` of the ``num_grid`` time indices in grid order, drawn from ``seed_for(*key)``
    (the same on every process, so ranks step through the same times).

    Uniform: a random subset. Stratified: the grid cut into ``used`` contiguous strata
    (``tensor_split``: sizes differ by at most one), one index drawn in each.
    """
    gen = torch.Generator().manual_seed(seed_for(*key))
    if not stratified:
        return torch.randperm(num_grid, generator=gen)[:used].sort().values.tolist()
    strata = torch.arange(num_grid).tensor_split(used)
    return [int(s[torch.randint(len(s), (1,), generator=gen)]) for s in strata]


def minibatch_times(
    grid: Tensor, used: int, mb, group_ids: Tensor, group_size: int, seed: int, epoch: int,
    noise_tag: str, stratified: bool = False,
) -> Iterator[tuple[float, list[tuple[int | str, ...]]]]:  # fmt: skip
    """Per training time of minibatch ``mb`` (``engine.batches.Minibatch``): the time sigma
    and one noise key per row, ``(seed, noise_tag, epoch, inner, group, index in group, k)``.

    ``used`` of the grid's times (``pick_times``), in grid order. Keys name the image, not
    its row in the minibatch, so the noise is the same for any batching or process count.
    """
    key = (seed, "times", epoch, mb.inner, mb.index)
    picked = pick_times(len(grid), used, key, stratified)
    for k in picked:
        keys = [
            (seed, noise_tag, epoch, mb.inner, int(group_ids[i]), int(i) % group_size, k)
            for i in mb.rows
        ]
        yield float(grid[k]), keys


@dataclass
class CleanEpoch:
    """One epoch's clean rollouts of this process and their per-image training weights.

    scores: the gathered rewards and group advantages (all processes); weights: (N,) this
    process's ``targets(advantages)`` (the advantages without ``targets``) on the model's
    device; x0: (N, C, h, w) float32
    clean latents; cond: N rows; group_ids: (N,) global prompt index; seconds: the log's
    ``time/sample`` and ``time/score``.
    """

    scores: GroupScores
    weights: Tensor
    x0: Tensor
    cond: object
    group_ids: Tensor
    seconds: dict[str, float]


def clean_epoch(
    cfg, model, dataset, reward, adapter: str, spec, epoch: int, rank: int, world: int,
    adv_std: str, targets: Callable[..., Tensor] | None = None,
) -> CleanEpoch:  # fmt: skip
    """Sample and score one epoch, keeping only clean samples.

    The epoch's prompts (the same everywhere; this process takes whole groups), G images
    each from adapter ``adapter`` (no trajectories); rewards gathered from all processes
    -> group advantages A (``adv_std``, clipped to ``train.adv_clip``) -> per-image
    weights ``targets(A, clip=train.adv_clip)`` over the whole epoch (A itself without
    ``targets``), this process's rows.
    """
    t0 = time.time()
    n_prompts = cfg.prompts_per_process(world)
    prompts = epoch_prompts(dataset, cfg.sample.prompts_per_epoch, cfg.train.seed, epoch)
    mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]
    model.transformer.eval()
    with model.adapter_active(adapter):
        ro = epoch_rollouts(
            cfg, model, mine, rank * n_prompts, spec, epoch, record=False, reward=reward
        )
    t_sample = time.time() - t0 - ro.score_seconds
    t1 = time.time() - ro.score_seconds  # scoring time includes scoring during sampling
    clip = cfg.train.adv_clip
    scores = GroupScores.gather(ro, std=adv_std, clip=clip)
    w_all = scores.advantages if targets is None else targets(scores.advantages, clip=clip)
    weights = scores.mine(w_all, rank, len(ro)).to(model.device)  # (N,)
    x0, cond, group_ids = ro.latents.float(), ro.cond, ro.group_ids
    del ro  # images and records are no longer needed
    seconds = {"time/sample": t_sample, "time/score": time.time() - t1}
    return CleanEpoch(scores, weights, x0, cond, group_ids, seconds)


def train_image_minibatches(
    cfg, ts, data: CleanEpoch, times, time_loss: TimeLoss, noise_tag: str, epoch: int,
    rank: int,
) -> dict[str, list[float]]:  # fmt: skip
    """One epoch of training on minibatches of images (NFT, AWM; CRD keeps groups whole).

    Inner epochs of shuffled image minibatches (``engine.batches.minibatches``); per
    minibatch its ``times.times_used`` training times of ``times.time_grid`` (all, or a
    subset in grid order, the same on every process; ``times.stratified``), one
    ``time_loss(x0, cond, weights, sigma, keys)`` each, backward of
    ``loss / (times_used * accumulation)``; the optimizer steps at the accumulation
    boundaries. Returns the per-call stats and ``grad_norm`` per optimizer step.
    """
    t, G = cfg.train, cfg.sample.group_size
    grid = times.time_grid(ts.run.model.shift)  # (grid_size,)
    acc_steps = cfg.gradient_accumulation_steps(ts.run.world)
    stats: dict[str, list[float]] = defaultdict(list)
    ts.run.model.transformer.train()
    gen = torch.Generator().manual_seed(seed_for(t.seed, "shuffle", epoch, rank))
    batches = minibatches(
        len(data.x0), cfg.train_batch_size, gen, accumulation=acc_steps,
        inner_epochs=t.inner_epochs,
    )  # fmt: skip
    for mb in batches:
        rows = mb.rows
        xb, cb, wb = data.x0[rows], data.cond[rows], data.weights[rows]
        for sigma, keys in minibatch_times(
            grid, times.times_used, mb, data.group_ids, G, t.seed, epoch, noise_tag,
            stratified=times.stratified,
        ):  # fmt: skip
            loss, st = time_loss(xb, cb, wb, sigma, keys)
            (loss / (times.times_used * acc_steps)).backward()
            for key, val in st.items():
                stats[key].append(val)
        if mb.step:
            stats["grad_norm"].append(ts.step(loss))
    return stats


def epoch_record(stats: dict[str, list[float]], data: CleanEpoch, opt_steps: int, epoch: int,
                 label: str, extra: dict) -> dict:  # fmt: skip
    """The epoch's log record: mean training stats, reward / advantage statistics,
    optimizer steps, images so far, dataset, ``extra`` (decays, times), the timings."""
    record = {k: float(np.mean(v)) for k, v in stats.items()}
    record.update(data.scores.record())
    images = len(data.scores.rewards) * (epoch + 1)
    record.update(opt_steps=opt_steps, images=images, dataset=label)
    record.update(extra)
    record.update(data.seconds)
    return record
