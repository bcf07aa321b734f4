"""CRD: Centered Reward Distillation (METHODS.md §4), one readable loop.

Three LoRA adapters on the one base model:
  ``policy``  the trained weights theta;
  ``sampler`` an EMA snapshot of the policy that draws the rollouts;
  ``old``     an EMA snapshot that defines the implicit reward's reference v_old.
Both snapshots start equal to the policy and follow it after every epoch,
``snap <- d snap + (1 - d) theta``, each with its own decay schedule (``crd.decays``).

Per epoch:
  1. pick the epoch's prompts (the same on every process), take this process's share;
  2. sample G images per prompt from the *sampler* snapshot (ODE, no CFG by default),
     keeping only the clean latents x0 (no trajectories);
  3. score them, gather rewards from all processes, group advantages A (global std),
     targets ``a = clip(A, -5, 5) / 10 + 0.5``;
  4. for each minibatch of whole prompt groups and each training time t:
        x_t = (1 - t) x0 + t eps,  u = eps - x0
        l   = implicit_reward(v_theta(x_t), v_old(x_t), u)       (student: no CFG)
        L   = crd_loss(l, a, groups, beta) [+ crd_kl(v_theta, v_base^CFG(4.5), a)]
     backward; average gradients over processes, clip, step, EMA;
  5. move the sampler and old snapshots toward the policy;
  6. log, evaluate (policy adapter, EMA weights when on), checkpoint.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from flowopd.algorithms import add_noise, crd_kl, crd_loss, crd_targets, implicit_reward
from flowopd.config.crd import CRDConfig
from flowopd.engine.batches import minibatches
from flowopd.engine.run import Run, TrainState, end_epoch, setup_run
from flowopd.eval.periodic import evaluate_when_due
from flowopd.rollouts import (
    GroupScores,
    epoch_prompts,
    epoch_rollouts,
    sampler_spec,
    seed_for,
    task_data,
)

POLICY, SAMPLER, OLD = "policy", "sampler", "old"
SNAPSHOTS = (SAMPLER, OLD)

__all__ = ["train_crd", "update_snapshot", "group_batches", "POLICY", "SAMPLER", "OLD"]


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


def group_batches(
    num_groups: int, group_size: int, groups_per_batch: int, generator: torch.Generator
) -> list[Tensor]:
    """Shuffle whole prompt groups into minibatches of sample rows.

    Rows ``g * G .. g * G + G - 1`` are the images of local group ``g`` (as
    ``collect_rollouts`` lays them out). Each minibatch holds ``groups_per_batch`` whole
    groups, so ``crd_loss`` centers every image over all images of its prompt.
    Returns a list of (groups_per_batch * G,) long tensors.
    """
    order = torch.randperm(num_groups, generator=generator)  # (num_groups,)
    offsets = torch.arange(group_size)
    return [
        (order[i : i + groups_per_batch, None] * group_size + offsets).reshape(-1)
        for i in range(0, num_groups, groups_per_batch)
    ]


def _training_noise(
    shape: Sequence[int], keys: Sequence[tuple[int | str, ...]], device: torch.device
) -> Tensor:
    """One N(0, I) draw per row from its own seed: (B, *shape). Per-image seeds make the
    noise independent of minibatch composition and process count."""
    draws = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed_for(*k)))
        for k in keys
    ]
    return torch.stack(draws).to(device)


def train_crd(cfg: CRDConfig) -> Run:
    """Run CRD as configured; returns the finished ``Run`` (model, paths, history)."""
    # 1. set-up: processes, model + policy LoRA and its two snapshots (the policy's LoRA
    #    shape, starting equal to it), data and rewards, train state; resume
    run = setup_run(cfg, adapter=POLICY)
    model, world, rank = run.model, run.world, run.rank
    s, t, c = cfg.sample, cfg.train, cfg.crd
    params = model.adapter_parameters(POLICY)
    _add_snapshots(model, cfg.model.lora, params)
    datasets, rewards, labels = task_data(cfg)  # mixing alternates between datasets
    ts = TrainState(run, POLICY, t, snapshots=SNAPSHOTS)
    logger, start_epoch = ts.start(cfg.output.resume)

    n_prompts = cfg.prompts_per_process(world)
    spec = sampler_spec(cfg)  # no Flow-GRPO-Fast window: only the clean samples are kept
    for epoch in range(start_epoch, t.epochs):
        t0 = time.time()
        d = cfg.data.dataset_for_epoch(epoch)
        # 2. sample: the epoch's prompts (the same everywhere, this process takes whole
        #    groups), G images each from the sampler snapshot; only clean samples are kept
        prompts = epoch_prompts(datasets[d], s.prompts_per_epoch, t.seed, epoch)
        mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]
        model.transformer.eval()
        with model.adapter_active(SAMPLER):
            ro = epoch_rollouts(
                cfg, model, mine, rank * n_prompts, spec, epoch, record=False, reward=rewards[d]
            )
        t_sample = time.time() - t0 - ro.score_seconds

        # 3. score: rewards -> group advantages over the whole (gathered) epoch -> targets
        t1 = time.time() - ro.score_seconds  # scoring time includes scoring during sampling
        scores = GroupScores.gather(ro, std=c.adv_std, clip=t.adv_clip)
        a_all = crd_targets(scores.advantages, clip=t.adv_clip)  # (N_all,) in [0, 1]
        a = scores.mine(a_all, rank, len(ro)).to(model.device)  # (N,)
        x0, cond, group_ids = ro.latents.float(), ro.cond, ro.group_ids  # x0: (N, C, h, w)
        del ro  # images and records are no longer needed
        t_score = time.time() - t1

        # 4. train on forward-noised clean samples, minibatches of whole prompt groups;
        #    then the snapshots follow the policy, each with its own decay
        t2 = time.time()
        stats = _train_epoch(cfg, ts, x0, cond, group_ids, a, epoch, rank)
        t_train = time.time() - t2
        decays = c.decays(ts.opt_steps)
        update_snapshot(model.adapter_parameters(SAMPLER), params, decays.sampler)
        update_snapshot(model.adapter_parameters(OLD), params, decays.old)

        # 5. log, evaluate, checkpoint
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        record.update(scores.record())
        record.update(
            opt_steps=ts.opt_steps, images=len(scores.rewards) * (epoch + 1), dataset=labels[d]
        )
        record.update({"decay/sampler": decays.sampler, "decay/old": decays.old})
        record["times_per_batch"] = c.times_used
        record.update({"time/sample": t_sample, "time/score": t_score, "time/train": t_train})
        end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)

    # final policy adapter in the diffusers format (EMA weights when EMA is on)
    ts.finish(logger)
    return run


def _add_snapshots(model, lora, params: list) -> None:
    """The sampler and old snapshots: adapters of the policy's LoRA shape, equal to it."""
    for name in SNAPSHOTS:
        model.add_adapter(
            name,
            rank=lora.rank,
            alpha=lora.alpha,
            target_modules=lora.target_modules,
            init=lora.init if lora.init != "default" else True,
        )
        update_snapshot(model.adapter_parameters(name), params, 0.0)


def _train_epoch(
    cfg: CRDConfig,
    ts: TrainState,
    x0: Tensor,
    cond,
    group_ids: Tensor,
    a: Tensor,
    epoch: int,
    rank: int,
) -> dict[str, list[float]]:
    """Inner epochs of minibatches of whole prompt groups; per minibatch, the training
    times it uses (all, or a random subset in grid order, the same on every process, so
    ranks step through the same sigmas together), one ``_time_loss`` backward each; the
    optimizer steps at the accumulation boundaries. Returns the stats."""
    t, c, G = cfg.train, cfg.crd, cfg.sample.group_size
    grid = c.time_grid(ts.run.model.shift)  # (num_times,) training times, 1 -> ~0
    acc_steps = cfg.gradient_accumulation_steps(ts.run.world)
    stats: dict[str, list[float]] = defaultdict(list)
    ts.run.model.transformer.train()
    gen = torch.Generator().manual_seed(seed_for(t.seed, "shuffle", epoch, rank))
    n_groups = len(x0) // G
    split = partial(group_batches, n_groups, G, cfg.groups_per_batch)
    for mb in minibatches(
        n_groups,
        cfg.groups_per_batch,
        gen,
        accumulation=acc_steps,
        inner_epochs=t.inner_epochs,
        split=split,
    ):
        rows = mb.rows
        tgen = torch.Generator().manual_seed(seed_for(t.seed, "times", epoch, mb.inner, mb.index))
        picked = torch.randperm(len(grid), generator=tgen)[: c.times_used].sort().values
        for k in picked.tolist():
            keys = [
                (t.seed, "crd-noise", epoch, mb.inner, int(group_ids[i]), int(i) % G, k)
                for i in rows
            ]
            loss, st = _time_loss(
                cfg,
                ts.run.model,
                x0[rows],
                cond[rows],
                a[rows],
                group_ids[rows],
                float(grid[k]),
                keys,
            )
            (loss / (len(picked) * acc_steps)).backward()
            for key, val in st.items():
                stats[key].append(val)
        if mb.step:
            stats["grad_norm"].append(ts.step(loss))
    return stats


def _time_loss(
    cfg: CRDConfig, model, xb: Tensor, cb, ab: Tensor, gb: Tensor, sigma: float, keys: list
) -> tuple[Tensor, dict]:
    """CRD's loss of one minibatch at one training time sigma:
    x_t = (1 - t) x0 + t eps, u = eps - x0, l = implicit_reward(v_theta, v_old, u),
    L = crd_loss(l, a, groups, beta) [+ crd_kl(v_theta, v_base^CFG, a)]."""
    c, w_student = cfg.crd, cfg.model.guidance_scale
    eps = _training_noise(xb.shape[1:], keys, xb.device)  # (B, C, h, w)
    x_t = add_noise(xb, eps, sigma)
    u = eps - xb  # target velocity
    # frozen forwards first, the policy's last: no adapter switch may come between the
    # policy forward and its backward (switching toggles requires_grad, and gradient
    # checkpointing re-runs the forward in the backward with whichever adapter is active)
    with torch.no_grad():
        with model.adapter_active(OLD):
            v_old = model.velocity(x_t, sigma, cb, guidance_scale=w_student)
        if c.kl_anchor:
            with model.adapters_disabled():
                v_base = model.velocity(x_t, sigma, cb, guidance_scale=c.anchor_guidance_scale)
    v = model.velocity(x_t, sigma, cb, guidance_scale=w_student, cfg_grad=cfg.train.cfg_grad)
    implicit = implicit_reward(v, v_old, u, normalize=c.normalize)  # (B,)
    loss, st = crd_loss(implicit, ab, gb, beta=c.beta)
    if c.kl_anchor:
        kl, kl_st = crd_kl(v, v_base, ab, beta_kl=c.beta_kl)
        loss = loss + kl
        st.update(kl_st)
    st["total_loss"] = float(loss.detach())
    return loss, st
