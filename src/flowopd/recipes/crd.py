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
from functools import partial

import torch
from torch import Tensor

from flowopd.algorithms import add_noise, crd_kl, crd_loss, crd_targets, implicit_reward
from flowopd.config.crd import CRDConfig
from flowopd.engine.batches import minibatches
from flowopd.engine.run import Run, TrainState, end_epoch, setup_run
from flowopd.eval.periodic import evaluate_when_due
from flowopd.recipes.forward import (
    add_snapshots,
    clean_epoch,
    epoch_record,
    minibatch_times,
    training_noise,
    update_snapshot,
)
from flowopd.rollouts import sampler_spec, seed_for, task_data

POLICY, SAMPLER, OLD = "policy", "sampler", "old"
SNAPSHOTS = (SAMPLER, OLD)

__all__ = ["train_crd", "update_snapshot", "group_batches", "POLICY", "SAMPLER", "OLD"]


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


def train_crd(cfg: CRDConfig) -> Run:
    """Run CRD as configured; returns the finished ``Run`` (model, paths, history)."""
    # 1. set-up: processes, model + policy LoRA and its two snapshots (the policy's LoRA
    #    shape, starting equal to it), data and rewards, train state; resume
    run = setup_run(cfg, adapter=POLICY)
    model, world, rank = run.model, run.world, run.rank
    t, c = cfg.train, cfg.crd
    params = model.adapter_parameters(POLICY)
    add_snapshots(model, cfg.model.lora, params, SNAPSHOTS)
    datasets, rewards, labels = task_data(cfg)  # mixing alternates between datasets
    ts = TrainState(run, POLICY, t, snapshots=SNAPSHOTS)
    logger, start_epoch = ts.start(cfg.output.resume)

    spec = sampler_spec(cfg)  # no Flow-GRPO-Fast window: only the clean samples are kept
    for epoch in range(start_epoch, t.epochs):
        d = cfg.data.dataset_for_epoch(epoch)
        # 2. sample: the epoch's prompts (the same everywhere, this process takes whole
        #    groups), G images each from the sampler snapshot; only clean samples are kept
        # 3. score: rewards -> group advantages over the whole (gathered) epoch -> targets
        data = clean_epoch(
            cfg, model, datasets[d], rewards[d], SAMPLER, spec, epoch, rank, world,
            adv_std=c.adv_std, targets=crd_targets,
        )  # fmt: skip

        # 4. train on forward-noised clean samples, minibatches of whole prompt groups;
        #    then the snapshots follow the policy, each with its own decay
        t2 = time.time()
        stats = _train_epoch(cfg, ts, data.x0, data.cond, data.group_ids, data.weights, epoch, rank)
        t_train = time.time() - t2
        decays = c.decays(ts.opt_steps)
        update_snapshot(model.adapter_parameters(SAMPLER), params, decays.sampler)
        update_snapshot(model.adapter_parameters(OLD), params, decays.old)

        # 5. log, evaluate, checkpoint
        extra = {"decay/sampler": decays.sampler, "decay/old": decays.old,
                 "times_per_batch": c.times_used}  # fmt: skip
        record = epoch_record(stats, data, ts.opt_steps, epoch, labels[d], extra)
        record["time/train"] = t_train
        end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)

    # final policy adapter in the diffusers format (EMA weights when EMA is on)
    ts.finish(logger)
    return run


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
        for sigma, keys in minibatch_times(
            grid, c.times_used, mb, group_ids, G, t.seed, epoch, "crd-noise"
        ):
            loss, st = _time_loss(
                cfg, ts.run.model, x0[rows], cond[rows], a[rows], group_ids[rows], sigma, keys
            )
            (loss / (c.times_used * acc_steps)).backward()
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
    eps = training_noise(xb.shape[1:], keys, xb.device)  # (B, C, h, w)
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
