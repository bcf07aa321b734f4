"""Flow-OPD: multi-teacher on-policy distillation (METHODS.md §3), one readable loop.

Per epoch:
  1. pick the epoch's prompts (mixed over the task datasets, the same on every process),
     take this process's share;
  2. the student samples G SDE trajectories per prompt, recording log-probs;
  3. rewards, when configured, score the images -- for the logs only, never the loss;
  4. for each minibatch and trained step j: re-score the recorded step with the student
     (grad); the routed teachers' and the anchor's CFG velocities on the recorded states
     in one no-grad forward with per-sample adapters;
         w_j  = opd_weight(sigma_j, sigma_j+1)           (closed-form Gaussian step KL)
         KL_j = w_j ||v_s - v_T||^2,   MAR_j = w_j ||v_s - v_anchor||^2
         L    = opd_loss(KL_j; ppo | ppo_attached | gkd) + lambda * mean(MAR_j)
     backward; average gradients over processes, clip, step, EMA;
  5. log (KL overall and per task, MAR, ratio, clip fraction, rewards), evaluate (EMA
     weights, 40-step ODE), checkpoint.

All networks are adapters on one base model: the teachers and the anchor (frozen; the
anchor may be the base itself) and the student (trainable).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from flowopd.algorithms import mar_loss, opd_loss, step_kl
from flowopd.engine import distributed as dist
from flowopd.engine.logging import RunLogger
from flowopd.engine.run import (
    Run,
    TrainState,
    build_reward,
    end_epoch,
    setup_run,
)
from flowopd.recipes.opd_config import OPDConfig
from flowopd.recipes.teachers import (
    check_tasks,
    load_teachers,
    mixed_epoch_prompts,
    teacher_velocities,
)
from flowopd.rollouts import (
    collect_rollouts,
    epoch_prompts,
    load_datasets,
    rescore_step,
    sde_window,
    seed_for,
    trained_steps,
)
from flowopd.sde import opd_weight

STUDENT = "student"


def train_opd(cfg: OPDConfig) -> Run:
    """Run Flow-OPD as configured; returns the finished ``Run`` (model, paths, history)."""
    o, s, t = cfg.opd, cfg.sample, cfg.train

    # -- data: every task of the training prompts needs a teacher (checked before loading
    #    the model, so a wrong config fails in a second) ----------------------------------
    datasets, ratio = load_datasets(cfg.data)
    routes = o.teacher_of()
    check_tasks(datasets, routes, o.routing_key)

    # -- model: the student, then teachers and anchor as frozen adapters on the same base --
    run = setup_run(cfg, adapter=None if o.init else STUDENT)
    model, out, world, rank = run.model, run.out, run.world, run.rank
    if o.init:
        model.load_adapter(str(Path(o.init).expanduser()), STUDENT)
        model.set_adapter(STUDENT, trainable=True)
    teachers = load_teachers(
        model, o.teachers, anchor=o.anchor if o.mar_lambda > 0 else None, key=o.routing_key
    )
    tasks = sorted(routes)  # task index for gathering per-task stats

    # rewards: logging only (one per dataset when data.datasets name their own)
    rewards = None
    if cfg.has_reward:
        if cfg.data.datasets:
            rewards = [build_reward(cfg.reward, d.reward) for d in cfg.data.datasets]
        else:
            rewards = [build_reward(cfg.reward)]

    # -- optimiser, EMA, guard, logger; resume --------------------------------------------
    ts = TrainState(run, STUDENT, t)
    logger = RunLogger(out, enabled=run.main)
    start_epoch = ts.resume(cfg.output.resume)
    logger.truncate_from(start_epoch)

    n_prompts = cfg.prompts_per_process(world)
    acc_steps = cfg.gradient_accumulation_steps(world)
    mb = cfg.train_batch_size
    for epoch in range(start_epoch, t.epochs):
        t0 = time.time()
        # 1. prompts: the same global list everywhere, this process takes a contiguous share
        if cfg.data.datasets and o.mix == "epoch":
            d = cfg.data.dataset_for_epoch(epoch)
            prompts = epoch_prompts(datasets[d], s.prompts_per_epoch, t.seed, epoch)
            which = [d] * len(prompts)
        else:
            prompts, which = mixed_epoch_prompts(datasets, ratio, s.prompts_per_epoch, t.seed,
                                                 epoch)  # fmt: skip
        mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]
        window = sde_window(s, t.seed, epoch)

        # 2. rollouts with the current student
        model.transformer.eval()
        ro = collect_rollouts(
            model, mine, rank * n_prompts, s.group_size, num_steps=s.num_steps, kind=s.kind,
            noise_level=s.noise_level, guidance_scale=cfg.model.guidance_scale,
            batch_size=s.batch_size, seed=t.seed, epoch=epoch, sde_window=window,
            same_initial_noise=s.same_initial_noise, antithetic=s.antithetic,
        )  # fmt: skip
        dataset_of = torch.tensor(which[rank * n_prompts : (rank + 1) * n_prompts])
        dataset_of = dataset_of.repeat_interleave(s.group_size)  # (N,)
        task_of = torch.tensor([tasks.index(r[o.routing_key]) for r in ro.records])  # (N,)
        routed = teachers.adapters_for(ro.records)  # (N,) teacher adapter names
        t_sample = time.time() - t0

        # 3. task rewards, for the logs only
        t1 = time.time()
        local_r = None
        if rewards is not None:
            local_r = torch.zeros(len(ro))
            for d in dataset_of.unique().tolist():
                idx = (dataset_of == d).nonzero().flatten().tolist()
                local_r[idx] = (
                    rewards[d](
                        ro.images[idx], [ro.prompts[i] for i in idx], [ro.records[i] for i in idx]
                    )
                    .float()
                    .cpu()
                )
        t_score = time.time() - t1

        # 4. distil on the recorded steps
        t2 = time.time()
        steps = trained_steps(ro.trajectory.stochastic, s.num_steps, t.timestep_fraction)
        sig = ro.trajectory.sigmas
        sigma_max = float(sig[1])
        kl_sum = torch.zeros(len(ro))  # per-sample sum over trained steps, for per-task logs
        stats: dict[str, list[float]] = defaultdict(list)
        model.transformer.train()
        gen = torch.Generator().manual_seed(seed_for(t.seed, "shuffle", epoch, rank))
        for _inner in range(t.inner_epochs):
            order = torch.randperm(len(ro), generator=gen)
            batches = [order[i : i + mb] for i in range(0, len(ro), mb)]
            for b_idx, rows in enumerate(batches):
                traj, cond = ro.trajectory[rows], ro.cond[rows]
                mb_teachers = [routed[i] for i in rows.tolist()]
                for j in steps:
                    step, v_s = rescore_step(model, traj, j, cond, kind=s.kind,
                                             noise_level=s.noise_level,
                                             guidance_scale=cfg.model.guidance_scale,
                                             cfg_grad=t.cfg_grad)  # fmt: skip
                    v_t, v_a = teacher_velocities(
                        model, traj.latents[:, j], float(sig[j]), cond, mb_teachers,
                        teachers.anchor, guidance_scale=cfg.model.guidance_scale,
                        fused=o.fused_forward,
                    )  # fmt: skip
                    w = opd_weight(float(sig[j]), float(sig[j + 1]), s.noise_level, sigma_max)
                    kl = step_kl(v_s, v_t, w)  # (B,)
                    loss, st = opd_loss(step.log_prob, traj.log_probs[:, j], kl, mode=o.mode,
                                        clip_range=t.clip_range, adv_clip=t.adv_clip)  # fmt: skip
                    st.pop("reward")  # -kl; "reward" in the logs means the task reward
                    if v_a is not None:
                        mar, mar_st = mar_loss(v_s, v_a, w, o.mar_lambda)
                        loss = loss + mar
                        st.update(mar_st)
                    (loss / (len(steps) * acc_steps)).backward()
                    kl_sum[rows] += kl.detach().cpu()
                    for k, v in st.items():
                        stats[k].append(v)
                if (b_idx + 1) % acc_steps == 0 or b_idx + 1 == len(batches):
                    stats["grad_norm"].append(ts.step(loss))
        t_train = time.time() - t2

        # 5. log, evaluate, checkpoint
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        # KL per sample (mean over its trained steps and inner epochs), over all processes
        all_kl = dist.gather_cat(kl_sum / (len(steps) * t.inner_epochs))
        all_task = dist.gather_cat(task_of)
        record["kl"] = float(all_kl.mean())
        for i, task in enumerate(tasks):
            if (all_task == i).any():
                record[f"kl/{task}"] = float(all_kl[all_task == i].mean())
        if local_r is not None:
            all_r = dist.gather_cat(local_r)
            record.update(reward_mean=float(all_r.mean()), reward_std=float(all_r.std()))
            for i, task in enumerate(tasks):
                if (all_task == i).any():
                    record[f"reward/{task}"] = float(all_r[all_task == i].mean())
        record.update(opt_steps=ts.opt_steps, images=len(all_kl) * (epoch + 1))
        record.update({"time/sample": t_sample, "time/score": t_score, "time/train": t_train})
        end_epoch(run, cfg, ts, logger, epoch, record)

    # final student adapter in the diffusers format (EMA weights when EMA is on)
    ts.save_final()
    logger.close()
    return run
