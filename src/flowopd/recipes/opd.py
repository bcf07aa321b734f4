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
from torch import Tensor

from flowopd.algorithms import mar_loss, opd_loss, step_kl
from flowopd.config.opd import OPDConfig
from flowopd.engine import distributed as dist
from flowopd.engine.batches import minibatches
from flowopd.engine.run import Run, TrainState, end_epoch, setup_run
from flowopd.eval.periodic import evaluate_when_due
from flowopd.recipes.teachers import (
    TeacherSet,
    check_tasks,
    load_teachers,
    mixed_epoch_prompts,
    teacher_velocities,
)
from flowopd.rewards.combine import build_reward
from flowopd.rollouts import (
    Rollouts,
    epoch_prompts,
    epoch_rollouts,
    load_datasets,
    rescore_step,
    sampler_spec,
    seed_for,
    trained_steps,
)
from flowopd.sampling import SamplerSpec
from flowopd.sde import opd_weight

STUDENT = "student"


def train_opd(cfg: OPDConfig) -> Run:
    """Run Flow-OPD as configured; returns the finished ``Run`` (model, paths, history)."""
    o, s, t = cfg.opd, cfg.sample, cfg.train

    # 1. set-up. Every task of the training prompts needs a teacher (checked before
    #    loading the model, so a wrong config fails in a second); then the student, the
    #    teachers and the anchor as adapters on one base; rewards (logging only)
    datasets, ratio = load_datasets(cfg.data)
    routes = o.teacher_of()
    check_tasks(datasets, routes, o.routing_key)
    run = setup_run(cfg, adapter=None if o.init else STUDENT)
    model, world, rank = run.model, run.world, run.rank
    if o.init:
        model.load_adapter(str(Path(o.init).expanduser()), STUDENT)
        model.set_adapter(STUDENT, trainable=True)
    teachers = load_teachers(
        model, o.teachers, anchor=o.anchor if o.mar_lambda > 0 else None, key=o.routing_key
    )
    tasks = sorted(routes)  # task index for gathering per-task stats
    rewards = None
    if cfg.has_reward:
        sections = [d.reward for d in cfg.data.datasets] if cfg.data.datasets else [""]
        rewards = [build_reward(cfg.reward, name) for name in sections]
    ts = TrainState(run, STUDENT, t)
    logger, start_epoch = ts.start(cfg.output.resume)

    n_prompts = cfg.prompts_per_process(world)
    for epoch in range(start_epoch, t.epochs):
        t0 = time.time()
        # 2. sample: the epoch's prompts (mixed over the datasets, the same everywhere;
        #    this process takes a contiguous share), G trajectories each with the student
        prompts, which = _epoch_prompts(cfg, datasets, ratio, epoch)
        mine = slice(rank * n_prompts, (rank + 1) * n_prompts)
        spec = sampler_spec(cfg, epoch)
        model.transformer.eval()
        ro = epoch_rollouts(cfg, model, prompts[mine], rank * n_prompts, spec, epoch)
        dataset_of = torch.tensor(which[mine]).repeat_interleave(s.group_size)  # (N,)
        task_of = torch.tensor([tasks.index(r[o.routing_key]) for r in ro.records])  # (N,)
        t_sample = time.time() - t0

        # 3. score: task rewards, for the logs only
        t1 = time.time()
        local_r = None if rewards is None else _task_rewards(ro, rewards, dataset_of)
        t_score = time.time() - t1

        # 4. train: distil on the recorded steps
        t2 = time.time()
        stats, kl_sum, n_steps = _train_epoch(cfg, ts, ro, teachers, spec, epoch, rank)
        t_train = time.time() - t2

        # 5. log, evaluate, checkpoint
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        # KL per sample (mean over its trained steps and inner epochs), over all processes
        all_kl = dist.gather_cat(kl_sum / (n_steps * t.inner_epochs))
        record.update(_per_task(all_kl, local_r, dist.gather_cat(task_of), tasks))
        record.update(opt_steps=ts.opt_steps, images=len(all_kl) * (epoch + 1))
        record.update({"time/sample": t_sample, "time/score": t_score, "time/train": t_train})
        end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)

    # final student adapter in the diffusers format (EMA weights when EMA is on)
    ts.finish(logger)
    return run


def _epoch_prompts(
    cfg: OPDConfig, datasets: list[list[dict]], ratio: list, epoch: int
) -> tuple[list[dict], list[int]]:
    """The epoch's global prompt list and each prompt's dataset index: one dataset per
    epoch with ``opd.mix: epoch``, else mixed by ``ratio``."""
    s, seed = cfg.sample, cfg.train.seed
    if cfg.data.datasets and cfg.opd.mix == "epoch":
        d = cfg.data.dataset_for_epoch(epoch)
        prompts = epoch_prompts(datasets[d], s.prompts_per_epoch, seed, epoch)
        return prompts, [d] * len(prompts)
    return mixed_epoch_prompts(datasets, ratio, s.prompts_per_epoch, seed, epoch)


def _task_rewards(ro: Rollouts, rewards: list, dataset_of: Tensor) -> Tensor:
    """(N,) rewards, each sample scored by its dataset's reward."""
    local_r = torch.zeros(len(ro))
    for d in dataset_of.unique().tolist():
        idx = (dataset_of == d).nonzero().flatten().tolist()
        texts, meta = [ro.prompts[i] for i in idx], [ro.records[i] for i in idx]
        local_r[idx] = rewards[d](ro.images[idx], texts, meta).float().cpu()
    return local_r


def _per_task(all_kl: Tensor, all_r: Tensor | None, all_task: Tensor, tasks: list) -> dict:
    """KL (and reward, when scored) overall and per task, over all processes."""
    record = {"kl": float(all_kl.mean())}
    for i, task in enumerate(tasks):
        if (all_task == i).any():
            record[f"kl/{task}"] = float(all_kl[all_task == i].mean())
    if all_r is not None:
        all_r = dist.gather_cat(all_r)
        record.update(reward_mean=float(all_r.mean()), reward_std=float(all_r.std()))
        for i, task in enumerate(tasks):
            if (all_task == i).any():
                record[f"reward/{task}"] = float(all_r[all_task == i].mean())
    return record


def _train_epoch(
    cfg: OPDConfig,
    ts: TrainState,
    ro: Rollouts,
    teachers: TeacherSet,
    spec: SamplerSpec,
    epoch: int,
    rank: int,
) -> tuple[dict[str, list[float]], Tensor, int]:
    """Inner epochs of minibatches: per trained step j, re-score the recorded step with the
    student (grad), the routed teachers' and the anchor's velocities (no grad), then
    ``opd_loss`` (+ MAR), backward; the optimizer steps at the accumulation boundaries.
    Returns the stats, each sample's KL summed over its trained steps (N,), and the number
    of trained steps."""
    model, o, t = ts.run.model, cfg.opd, cfg.train
    steps = trained_steps(ro.trajectory.stochastic, spec.num_steps, o.timestep_fraction)
    acc_steps = cfg.gradient_accumulation_steps(ts.run.world)
    routed = teachers.adapters_for(ro.records)  # (N,) teacher adapter names
    sig = ro.trajectory.sigmas
    sigma_max = float(sig[1])
    kl_sum = torch.zeros(len(ro))  # per-sample sum over trained steps, for per-task logs
    stats: dict[str, list[float]] = defaultdict(list)
    model.transformer.train()
    gen = torch.Generator().manual_seed(seed_for(t.seed, "shuffle", epoch, rank))
    for mb in minibatches(
        len(ro), cfg.train_batch_size, gen, accumulation=acc_steps, inner_epochs=t.inner_epochs
    ):
        traj, cond = ro.trajectory[mb.rows], ro.cond[mb.rows]
        mb_teachers = [routed[i] for i in mb.rows.tolist()]
        for j in steps:
            step, v_s = rescore_step(model, traj, j, cond, spec, cfg_grad=t.cfg_grad)
            v_t, v_a = teacher_velocities(
                model,
                traj.latents[:, j],
                float(sig[j]),
                cond,
                mb_teachers,
                teachers.anchor,
                guidance_scale=spec.guidance_scale,
                fused=o.fused_forward,
            )
            w = opd_weight(float(sig[j]), float(sig[j + 1]), spec.noise_level, sigma_max)
            kl = step_kl(v_s, v_t, w)  # (B,)
            loss, st = opd_loss(
                step.log_prob,
                traj.log_probs[:, j],
                kl,
                mode=o.mode,
                clip_range=o.clip_range,
                adv_clip=t.adv_clip,
            )
            st.pop("reward")  # -kl; "reward" in the logs means the task reward
            if v_a is not None:
                mar, mar_st = mar_loss(v_s, v_a, w, o.mar_lambda)
                loss = loss + mar
                st.update(mar_st)
            (loss / (len(steps) * acc_steps)).backward()
            kl_sum[mb.rows] += kl.detach().cpu()
            for k, v in st.items():
                stats[k].append(v)
        if mb.step:
            stats["grad_norm"].append(ts.step(loss))
    return stats, kl_sum, len(steps)
