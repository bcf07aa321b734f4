"""Flow-GRPO: online RL for flow-matching models (METHODS.md §1-2), one readable loop.

Per epoch:
  1. pick the epoch's prompts (the same on every process), take this process's share;
  2. sample G images per prompt with the SDE sampler, recording log-probs;
  3. score them, gather rewards from all processes, group-relative advantages;
  4. for each minibatch and trained step: re-score the recorded step with the current
     weights (ratio), KL to the base (adapter off, same CFG), clipped surrogate, backward;
     average gradients over processes, clip, step, EMA;
  5. log, evaluate (EMA weights, 40-step ODE), checkpoint.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from flowopd.algorithms import grpo_loss, reference_kl
from flowopd.config.grpo import GRPOConfig
from flowopd.engine.batches import minibatches
from flowopd.engine.run import Run, TrainState, end_epoch, setup_run
from flowopd.eval.periodic import evaluate_when_due
from flowopd.rollouts import (
    GroupScores,
    Rollouts,
    epoch_prompts,
    epoch_rollouts,
    rescore_step,
    sampler_spec,
    seed_for,
    task_data,
    trained_steps,
)
from flowopd.sampling import SamplerSpec

POLICY = "policy"


def train_grpo(cfg: GRPOConfig) -> Run:
    """Run Flow-GRPO as configured; returns the finished ``Run`` (model, paths, history)."""
    # 1. set-up: processes, model + policy LoRA, data and rewards, train state; resume
    run = setup_run(cfg, adapter=POLICY)
    model, world, rank = run.model, run.world, run.rank
    s, t, g = cfg.sample, cfg.train, cfg.grpo
    datasets, rewards, labels = task_data(cfg)  # GRPO-Mix alternates between datasets
    ts = TrainState(run, POLICY, t)
    logger, start_epoch = ts.start(cfg.output.resume)

    n_prompts = cfg.prompts_per_process(world)
    for epoch in range(start_epoch, t.epochs):
        t0 = time.time()
        d = cfg.data.dataset_for_epoch(epoch)
        # 2. sample: the epoch's prompts (the same everywhere, this process takes a
        #    contiguous share), G images each with the current policy, scored as they come
        prompts = epoch_prompts(datasets[d], s.prompts_per_epoch, t.seed, epoch)
        mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]
        spec = sampler_spec(cfg, epoch)
        model.transformer.eval()
        ro = epoch_rollouts(cfg, model, mine, rank * n_prompts, spec, epoch, reward=rewards[d])
        t_sample = time.time() - t0 - ro.score_seconds

        # 3. score: rewards -> group advantages over the whole (gathered) epoch
        t1 = time.time() - ro.score_seconds  # scoring time includes scoring during sampling
        scores = GroupScores.gather(ro, std=g.adv_std, clip=t.adv_clip)
        adv = scores.mine(scores.advantages, rank, len(ro)).to(model.device)  # (N,)
        t_score = time.time() - t1

        # 4. train on the recorded steps
        t2 = time.time()
        stats = _train_epoch(cfg, ts, ro, adv, spec, epoch, rank)
        t_train = time.time() - t2

        # 5. log, evaluate, checkpoint
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        record.update(scores.record())
        record.update(
            opt_steps=ts.opt_steps, images=len(scores.rewards) * (epoch + 1), dataset=labels[d]
        )
        record.update({"time/sample": t_sample, "time/score": t_score, "time/train": t_train})
        end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)

    # final adapter in the diffusers format (EMA weights when EMA is on)
    ts.finish(logger)
    return run


def _train_epoch(
    cfg: GRPOConfig,
    ts: TrainState,
    ro: Rollouts,
    adv: torch.Tensor,
    spec: SamplerSpec,
    epoch: int,
    rank: int,
) -> dict[str, list[float]]:
    """Inner epochs of minibatches: per trained step, re-score the recorded step with the
    current weights (ratio), KL to the base (adapter off, same CFG), clipped surrogate,
    backward; the optimizer steps at the accumulation boundaries. Returns the stats."""
    model, t, g = ts.run.model, cfg.train, cfg.grpo
    steps = trained_steps(ro.trajectory.stochastic, spec.num_steps, g.timestep_fraction)
    acc_steps = cfg.gradient_accumulation_steps(ts.run.world)
    stats: dict[str, list[float]] = defaultdict(list)
    model.transformer.train()
    gen = torch.Generator().manual_seed(seed_for(t.seed, "shuffle", epoch, rank))
    for mb in minibatches(
        len(ro), cfg.train_batch_size, gen, accumulation=acc_steps, inner_epochs=t.inner_epochs
    ):
        traj, cond, a = ro.trajectory[mb.rows], ro.cond[mb.rows], adv[mb.rows]
        for j in steps:
            step, _ = rescore_step(model, traj, j, cond, spec, cfg_grad=t.cfg_grad)
            kl = None
            if g.beta_kl > 0:
                with torch.no_grad(), model.adapters_disabled():
                    ref, _ = rescore_step(model, traj, j, cond, spec)
                dt = traj.sigmas[j + 1] - traj.sigmas[j]
                kl = reference_kl(step.mean, ref.mean, step.std, dt, exact=g.kl_form == "exact")
            loss, st = grpo_loss(
                step.log_prob,
                traj.log_probs[:, j],
                a,
                clip_range=g.clip_range,
                kl=kl,
                beta=g.beta_kl,
            )
            (loss / (len(steps) * acc_steps)).backward()
            for k, v in st.items():
                stats[k].append(v)
        if mb.step:
            stats["grad_norm"].append(ts.step(loss))
    return stats
