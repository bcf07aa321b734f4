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

from flowopd.algorithms import group_advantages, grpo_loss, reference_kl
from flowopd.algorithms.advantages import advantage_stats
from flowopd.engine import distributed as dist
from flowopd.engine.logging import RunLogger
from flowopd.engine.run import (
    Run,
    TrainState,
    build_reward,
    end_epoch,
    setup_run,
)
from flowopd.recipes.grpo_config import GRPOConfig
from flowopd.rollouts import (
    collect_rollouts,
    epoch_prompts,
    load_prompts,
    rescore_step,
    sde_window,
    seed_for,
    trained_steps,
)

POLICY = "policy"


def train_grpo(cfg: GRPOConfig) -> Run:
    """Run Flow-GRPO as configured; returns the finished ``Run`` (model, paths, history)."""
    run = setup_run(cfg, adapter=POLICY)
    model, out, world, rank = run.model, run.out, run.world, run.rank
    s, t = cfg.sample, cfg.train

    # -- data and rewards: one entry per dataset (GRPO-Mix alternates between them) --------
    if cfg.data.datasets:
        datasets = [load_prompts(d.path, task=d.reward or None) for d in cfg.data.datasets]
        rewards = [build_reward(cfg.reward, d.reward) for d in cfg.data.datasets]
        labels = [d.label for d in cfg.data.datasets]
    else:
        datasets, rewards, labels = [load_prompts(cfg.data.train)], [build_reward(cfg.reward)], [""]

    # -- optimiser, EMA, guard, logger; resume --------------------------------------------
    ts = TrainState(run, POLICY, t)
    logger = RunLogger(out, enabled=run.main)
    start_epoch = ts.resume(cfg.output.resume)
    logger.truncate_from(start_epoch)

    n_prompts = cfg.prompts_per_process(world)
    acc_steps = cfg.gradient_accumulation_steps(world)
    mb = cfg.train_batch_size
    for epoch in range(start_epoch, t.epochs):
        t0 = time.time()
        d = cfg.data.dataset_for_epoch(epoch)
        # 1. prompts: the same global list everywhere, this process takes a contiguous share
        prompts = epoch_prompts(datasets[d], s.prompts_per_epoch, t.seed, epoch)
        mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]
        window = sde_window(s, t.seed, epoch)

        # 2. rollouts with the current policy
        model.transformer.eval()
        ro = collect_rollouts(
            model, mine, rank * n_prompts, s.group_size, num_steps=s.num_steps, kind=s.kind,
            noise_level=s.noise_level, guidance_scale=cfg.model.guidance_scale,
            batch_size=s.batch_size, seed=t.seed, epoch=epoch, sde_window=window,
            reward=rewards[d],  # scored batch by batch while the next batch samples
            same_initial_noise=s.same_initial_noise, antithetic=s.antithetic,
        )  # fmt: skip
        t_sample = time.time() - t0 - ro.score_seconds

        # 3. rewards -> group advantages over the whole (gathered) epoch
        t1 = time.time() - ro.score_seconds  # scoring time includes scoring during sampling
        local_r = ro.rewards
        all_r = dist.gather_cat(local_r)
        all_g = dist.gather_cat(ro.group_ids)
        adv_all = group_advantages(all_r, all_g, std=t.adv_std, clip=t.adv_clip)
        adv = adv_all[rank * len(ro) : (rank + 1) * len(ro)].to(model.device)  # (N,)
        t_score = time.time() - t1

        # 4. train on the recorded steps
        t2 = time.time()
        steps = trained_steps(ro.trajectory.stochastic, s.num_steps, t.timestep_fraction)
        stats: dict[str, list[float]] = defaultdict(list)
        model.transformer.train()
        gen = torch.Generator().manual_seed(seed_for(t.seed, "shuffle", epoch, rank))
        for _inner in range(t.inner_epochs):
            order = torch.randperm(len(ro), generator=gen)
            batches = [order[i : i + mb] for i in range(0, len(ro), mb)]
            for b_idx, rows in enumerate(batches):
                traj, cond, a = ro.trajectory[rows], ro.cond[rows], adv[rows]
                for j in steps:
                    step, _ = rescore_step(model, traj, j, cond, kind=s.kind,
                                           noise_level=s.noise_level,
                                           guidance_scale=cfg.model.guidance_scale,
                                           cfg_grad=t.cfg_grad)  # fmt: skip
                    kl = None
                    if t.beta_kl > 0:
                        with torch.no_grad(), model.adapters_disabled():
                            ref, _ = rescore_step(model, traj, j, cond, kind=s.kind,
                                                  noise_level=s.noise_level,
                                                  guidance_scale=cfg.model.guidance_scale)  # fmt: skip
                        dt = traj.sigmas[j + 1] - traj.sigmas[j]
                        kl = reference_kl(
                            step.mean, ref.mean, step.std, dt, exact=t.kl_form == "exact"
                        )
                    loss, st = grpo_loss(step.log_prob, traj.log_probs[:, j], a,
                                         clip_range=t.clip_range, kl=kl, beta=t.beta_kl)  # fmt: skip
                    (loss / (len(steps) * acc_steps)).backward()
                    for k, v in st.items():
                        stats[k].append(v)
                if (b_idx + 1) % acc_steps == 0 or b_idx + 1 == len(batches):
                    stats["grad_norm"].append(ts.step(loss))
        t_train = time.time() - t2

        # 5. log, evaluate, checkpoint
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        record.update(advantage_stats(all_r, all_g, adv_all, clip=t.adv_clip))
        record.update(
            reward_mean=float(all_r.mean()), reward_std=float(all_r.std()),
            opt_steps=ts.opt_steps, images=len(all_r) * (epoch + 1), dataset=labels[d],
        )  # fmt: skip
        record.update({"time/sample": t_sample, "time/score": t_score, "time/train": t_train})
        end_epoch(run, cfg, ts, logger, epoch, record)

    # final adapter in the diffusers format (EMA weights when EMA is on)
    ts.save_final()
    logger.close()
    return run
