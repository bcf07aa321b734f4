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
import warnings
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from flowopd.algorithms import (
    add_noise,
    crd_kl,
    crd_loss,
    crd_targets,
    group_advantages,
    implicit_reward,
)
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
from flowopd.recipes.crd_config import CRDConfig
from flowopd.rollouts import collect_rollouts, epoch_prompts, load_prompts, seed_for

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
    run = setup_run(cfg, adapter=POLICY)
    model, out, world, rank = run.model, run.out, run.world, run.rank
    s, t, c = cfg.sample, cfg.train, cfg.crd
    G, w_student = s.group_size, cfg.model.guidance_scale

    # -- the snapshots: the policy's LoRA shape, starting equal to the policy --------------
    lora = cfg.model.lora
    params = model.adapter_parameters(POLICY)
    for name in SNAPSHOTS:
        with warnings.catch_warnings():  # peft warns on every adapter after the first
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(
                name, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                init=lora.init if lora.init != "default" else True,
            )  # fmt: skip
        update_snapshot(model.adapter_parameters(name), params, 0.0)

    # -- data and rewards: one entry per dataset (mixing alternates between them) ----------
    if cfg.data.datasets:
        datasets = [load_prompts(d.path, task=d.reward or None) for d in cfg.data.datasets]
        rewards = [build_reward(cfg.reward, d.reward) for d in cfg.data.datasets]
        labels = [d.label for d in cfg.data.datasets]
    else:
        datasets, rewards, labels = [load_prompts(cfg.data.train)], [build_reward(cfg.reward)], [""]

    # -- optimiser, EMA, guard, logger; resume --------------------------------------------
    ts = TrainState(run, POLICY, t, snapshots=SNAPSHOTS)
    logger = RunLogger(out, enabled=run.main)
    start_epoch = ts.resume(cfg.output.resume)
    logger.truncate_from(start_epoch)

    n_prompts = cfg.prompts_per_process(world)
    acc_steps = cfg.gradient_accumulation_steps(world)
    grid = c.time_grid(model.shift)  # (num_times,) training times, 1 -> ~0
    for epoch in range(start_epoch, t.epochs):
        t0 = time.time()
        d = cfg.data.dataset_for_epoch(epoch)
        # 1. prompts: the same global list everywhere, this process takes whole groups
        prompts = epoch_prompts(datasets[d], s.prompts_per_epoch, t.seed, epoch)
        mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]

        # 2. rollouts from the sampler snapshot; only the clean samples are kept
        model.transformer.eval()
        with model.adapter_active(SAMPLER):
            ro = collect_rollouts(
                model, mine, rank * n_prompts, G, num_steps=s.num_steps, kind=s.kind,
                noise_level=s.noise_level, guidance_scale=w_student, batch_size=s.batch_size,
                seed=t.seed, epoch=epoch, record=False,
                reward=rewards[d],  # scored batch by batch while the next batch samples
                same_initial_noise=s.same_initial_noise, antithetic=s.antithetic,
            )  # fmt: skip
        t_sample = time.time() - t0 - ro.score_seconds

        # 3. rewards -> group advantages over the whole (gathered) epoch -> targets in [0, 1]
        t1 = time.time() - ro.score_seconds  # scoring time includes scoring during sampling
        local_r = ro.rewards
        all_r = dist.gather_cat(local_r)
        all_g = dist.gather_cat(ro.group_ids)
        adv_all = group_advantages(all_r, all_g, std=t.adv_std, clip=t.adv_clip)
        a_all = crd_targets(adv_all, clip=t.adv_clip)  # (N_all,)
        a = a_all[rank * len(ro) : (rank + 1) * len(ro)].to(model.device)  # (N,)
        x0, cond, group_ids = ro.latents.float(), ro.cond, ro.group_ids  # x0: (N, C, h, w)
        del ro  # images and records are no longer needed
        t_score = time.time() - t1

        # 4. train on forward-noised clean samples, minibatches of whole prompt groups
        t2 = time.time()
        stats: dict[str, list[float]] = defaultdict(list)
        model.transformer.train()
        gen = torch.Generator().manual_seed(seed_for(t.seed, "shuffle", epoch, rank))
        for inner in range(t.inner_epochs):
            batches = group_batches(len(x0) // G, G, cfg.groups_per_batch, gen)
            for b_idx, rows in enumerate(batches):
                xb, cb, ab, gb = x0[rows], cond[rows], a[rows], group_ids[rows]
                # the times this minibatch trains on: all, or a random subset in grid order,
                # the same on every process (ranks step through the same sigmas together)
                tgen = torch.Generator().manual_seed(seed_for(t.seed, "times", epoch, inner, b_idx))
                picked = torch.randperm(len(grid), generator=tgen)[: c.times_used].sort().values
                for k in picked.tolist():
                    sigma = float(grid[k])
                    keys = [
                        (t.seed, "crd-noise", epoch, inner, int(gb[i]), int(rows[i]) % G, k)
                        for i in range(len(rows))
                    ]
                    eps = _training_noise(xb.shape[1:], keys, xb.device)  # (B, C, h, w)
                    x_t = add_noise(xb, eps, sigma)
                    u = eps - xb  # target velocity
                    # frozen forwards first, the policy's last: no adapter switch may come
                    # between the policy forward and its backward (switching toggles
                    # requires_grad, and gradient checkpointing re-runs the forward in the
                    # backward with whichever adapter is active then)
                    with torch.no_grad():
                        with model.adapter_active(OLD):
                            v_old = model.velocity(x_t, sigma, cb, guidance_scale=w_student)
                        if c.kl_anchor:
                            with model.adapters_disabled():
                                v_base = model.velocity(
                                    x_t, sigma, cb, guidance_scale=c.anchor_guidance_scale
                                )
                    v = model.velocity(x_t, sigma, cb, guidance_scale=w_student,
                                       cfg_grad=t.cfg_grad)  # fmt: skip
                    implicit = implicit_reward(v, v_old, u, normalize=c.normalize)  # (B,)
                    loss, st = crd_loss(implicit, ab, gb, beta=c.beta)
                    if c.kl_anchor:
                        kl, kl_st = crd_kl(v, v_base, ab, beta_kl=c.beta_kl)
                        loss = loss + kl
                        st.update(kl_st)
                    st["total_loss"] = float(loss.detach())
                    (loss / (len(picked) * acc_steps)).backward()
                    for key, val in st.items():
                        stats[key].append(val)
                if (b_idx + 1) % acc_steps == 0 or b_idx + 1 == len(batches):
                    stats["grad_norm"].append(ts.step(loss))
        t_train = time.time() - t2

        # 5. the snapshots follow the policy, each with its own decay
        decays = c.decays(ts.opt_steps)
        update_snapshot(model.adapter_parameters(SAMPLER), params, decays.sampler)
        update_snapshot(model.adapter_parameters(OLD), params, decays.old)

        # 6. log, evaluate, checkpoint
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        record.update(advantage_stats(all_r, all_g, adv_all, clip=t.adv_clip))
        record.update(
            reward_mean=float(all_r.mean()), reward_std=float(all_r.std()),
            opt_steps=ts.opt_steps, images=len(all_r) * (epoch + 1), dataset=labels[d],
        )  # fmt: skip
        record.update({"decay/sampler": decays.sampler, "decay/old": decays.old})
        record["times_per_batch"] = c.times_used
        record.update({"time/sample": t_sample, "time/score": t_score, "time/train": t_train})
        end_epoch(run, cfg, ts, logger, epoch, record)

    # final policy adapter in the diffusers format (EMA weights when EMA is on)
    ts.save_final()
    logger.close()
    return run
