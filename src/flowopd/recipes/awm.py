"""AWM: Advantage Weighted Matching on the forward process (METHODS.md, AWM), one
readable loop.

Two LoRA adapters on the one base model:
  ``policy``  the trained weights theta; it also draws the rollouts (on-policy);
  ``ema_kl``  an EMA snapshot of the policy, the target of the EMA KL (only when
              ``awm.ema_kl_beta`` > 0). It starts equal to the policy and follows it after
              every epoch, ``ema <- d ema + (1 - d) theta``, d = ``awm.ema_decay(step)``.

Per epoch:
  1. pick the epoch's prompts (the same on every process), take this process's share;
  2. sample G images per prompt from the policy (ODE, CFG-free by default), keeping only
     the clean latents x0;
  3. score them, gather rewards from all processes, group advantages A (global std);
  4. for each minibatch of images and each of its training times t (one per stratum of
     the grid):
        x_t   = (1 - t) x0 + t eps,  u = eps - x0
        log p = -phi(mean (v_theta(x_t) - u)^2, t)                  awm_log_prob
        L     = awm_loss(log p, A)  [on policy: mean_i -A'_i log p_i in gradient]
                + kl_beta mean KL(v_theta, v_base) + ema_kl_beta mean KL(v_theta, v_ema)
     backward; average gradients over processes, clip, step, EMA;
  5. move the EMA-KL snapshot toward the policy;
  6. log, evaluate (policy adapter, EMA weights when ``train.ema``), checkpoint.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import Tensor

from flowopd.algorithms import add_noise
from flowopd.algorithms.awm import awm_log_prob, awm_loss, velocity_kl
from flowopd.config.awm import AWMConfig
from flowopd.engine.run import Run, TrainState, end_epoch, setup_run
from flowopd.eval.periodic import evaluate_when_due
from flowopd.recipes.forward import (
    add_snapshots,
    clean_epoch,
    epoch_record,
    train_image_minibatches,
    training_noise,
    update_snapshot,
)
from flowopd.rollouts import sampler_spec, task_data

POLICY, EMA_KL = "policy", "ema_kl"

__all__ = ["train_awm", "POLICY", "EMA_KL"]


def train_awm(cfg: AWMConfig) -> Run:
    """Run AWM as configured; returns the finished ``Run``."""
    # 1. set-up: processes, model + policy LoRA and (with the EMA KL) its EMA snapshot,
    #    data and rewards, train state; resume
    run = setup_run(cfg, adapter=POLICY)
    model, world, rank = run.model, run.world, run.rank
    t, c = cfg.train, cfg.awm
    params = model.adapter_parameters(POLICY)
    snapshots = (EMA_KL,) if c.ema_kl_beta > 0 else ()
    add_snapshots(model, cfg.model.lora, params, snapshots)
    datasets, rewards, labels = task_data(cfg)
    ts = TrainState(run, POLICY, t, snapshots=snapshots)
    logger, start_epoch = ts.start(cfg.output.resume)

    spec = sampler_spec(cfg)
    for epoch in range(start_epoch, t.epochs):
        d = cfg.data.dataset_for_epoch(epoch)
        # 2.-3. sample G images per prompt from the policy (clean latents only), score,
        #       gather: group advantages A (awm_loss clips and rescales them)
        data = clean_epoch(
            cfg, model, datasets[d], rewards[d], POLICY, spec, epoch, rank, world,
            adv_std=c.adv_std,
        )  # fmt: skip

        # 4. train on the re-noised clean samples; 5. the EMA snapshot follows the policy
        t2 = time.time()
        loss_fn = partial(_time_loss, cfg, model)
        stats = train_image_minibatches(cfg, ts, data, c, loss_fn, "awm-noise", epoch, rank)
        t_train = time.time() - t2
        extra = {"times_per_batch": c.times_used, "time/train": t_train}
        if snapshots:
            extra["decay/ema_kl"] = decay = c.ema_decay(ts.opt_steps)
            update_snapshot(model.adapter_parameters(EMA_KL), params, decay)

        # 6. log, evaluate, checkpoint
        record = epoch_record(stats, data, ts.opt_steps, epoch, labels[d], extra)
        end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)

    ts.finish(logger)
    return run


def _time_loss(
    cfg: AWMConfig, model, xb: Tensor, cb, ab: Tensor, sigma: float, keys: list
) -> tuple[Tensor, dict]:
    """AWM's loss of one minibatch at one training time sigma:
    x_t = (1 - t) x0 + t eps, u = eps - x0, log p = awm_log_prob(v_theta, u, t),
    L = awm_loss(log p, A) [+ kl_beta KL(v_theta, v_base)] [+ ema_kl_beta KL(v_theta, v_ema)];
    on policy (the published setting): the ratio is exactly 1."""
    c, w = cfg.awm, cfg.model.guidance_scale
    eps = training_noise(xb.shape[1:], keys, xb.device)  # (B, C, h, w)
    x_t = add_noise(xb, eps, sigma)
    u = eps - xb  # target velocity
    # frozen forwards first, the policy's last (no adapter switch between the policy's
    # forward and its backward; see recipes/crd.py)
    v_base = v_ema = None
    with torch.no_grad():
        if c.kl_beta > 0:
            with model.adapters_disabled():
                v_base = model.velocity(x_t, sigma, cb, guidance_scale=w)
        if c.ema_kl_beta > 0:
            with model.adapter_active(EMA_KL):
                v_ema = model.velocity(x_t, sigma, cb, guidance_scale=w)
    v = model.velocity(x_t, sigma, cb, guidance_scale=w, cfg_grad=cfg.train.cfg_grad)
    kl = partial(velocity_kl, v, sigma=sigma, weighting=c.kl_weighting)
    log_prob = awm_log_prob(v, u, sigma, weighting=c.weighting, ghuber_power=c.ghuber_power)
    return awm_loss(
        log_prob, ab, adv_clip=cfg.train.adv_clip, adv_max=c.adv_max,
        kl=kl(v_base) if v_base is not None else None, kl_beta=c.kl_beta,
        ema_kl=kl(v_ema) if v_ema is not None else None, ema_kl_beta=c.ema_kl_beta,
    )  # fmt: skip
