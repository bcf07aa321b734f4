"""DiffusionNFT: negative-aware fine-tuning on the forward process (METHODS.md,
DiffusionNFT), one readable loop.

Two LoRA adapters on the one base model:
  ``policy``  the trained weights theta;
  ``old``     an EMA snapshot of the policy: it draws the rollouts and defines v_old.
The old snapshot starts equal to the policy and follows it after every epoch,
``old <- eta old + (1 - eta) theta`` with eta = ``nft.decay(step)`` (``old_decay``).

Per epoch:
  1. pick the epoch's prompts (the same on every process), take this process's share;
  2. sample G images per prompt from the *old* snapshot (ODE, CFG-free by default),
     keeping only the clean latents x0;
  3. score them, gather rewards from all processes, group advantages A (global std),
     optimality probabilities ``r = clip(A, -c, c) / (2c) + 1/2``;
  4. for each minibatch of images and each training time t:
        x_t = (1 - t) x0 + t eps,  u = eps - x0
        L   = nft_loss(v_theta(x_t), v_old(x_t), u, r, t, beta)
              [+ kl_beta mean (v_theta - v_base)^2, v_base: adapters off]
     backward; average gradients over processes, clip, step, EMA;
  5. move the old snapshot toward the policy;
  6. log, evaluate (policy adapter, EMA weights when on), checkpoint.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import Tensor

from flowopd.algorithms import add_noise, nft_loss, optimality_probability
from flowopd.algorithms.awm import velocity_kl
from flowopd.config.nft import NFTConfig
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

POLICY, OLD = "policy", "old"

__all__ = ["train_nft", "POLICY", "OLD"]


def train_nft(cfg: NFTConfig) -> Run:
    """Run DiffusionNFT as configured; returns the finished ``Run``."""
    # 1. set-up: processes, model + policy LoRA and its old snapshot (equal to it), data
    #    and rewards, train state; resume
    run = setup_run(cfg, adapter=POLICY)
    model, world, rank = run.model, run.world, run.rank
    t, c = cfg.train, cfg.nft
    params = model.adapter_parameters(POLICY)
    add_snapshots(model, cfg.model.lora, params, (OLD,))
    datasets, rewards, labels = task_data(cfg)
    ts = TrainState(run, POLICY, t, snapshots=(OLD,))
    logger, start_epoch = ts.start(cfg.output.resume)

    spec = sampler_spec(cfg)
    for epoch in range(start_epoch, t.epochs):
        d = cfg.data.dataset_for_epoch(epoch)
        # 2.-3. sample G images per prompt from the old snapshot (clean latents only),
        #       score, gather: group advantages -> optimality probabilities r
        data = clean_epoch(
            cfg, model, datasets[d], rewards[d], OLD, spec, epoch, rank, world,
            adv_std=c.adv_std, targets=optimality_probability,
        )  # fmt: skip

        # 4. train on the re-noised clean samples; 5. the old snapshot follows the policy
        t2 = time.time()
        loss_fn = partial(_time_loss, cfg, model)
        stats = train_image_minibatches(cfg, ts, data, c, loss_fn, "nft-noise", epoch, rank)
        t_train = time.time() - t2
        decay = c.decay(ts.opt_steps)
        update_snapshot(model.adapter_parameters(OLD), params, decay)

        # 6. log, evaluate, checkpoint
        extra = {"decay/old": decay, "times_per_batch": c.times_used, "time/train": t_train}
        record = epoch_record(stats, data, ts.opt_steps, epoch, labels[d], extra)
        end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)

    ts.finish(logger)
    return run


def _time_loss(
    cfg: NFTConfig, model, xb: Tensor, cb, rb: Tensor, sigma: float, keys: list
) -> tuple[Tensor, dict]:
    """DiffusionNFT's loss of one minibatch at one training time sigma:
    x_t = (1 - t) x0 + t eps, u = eps - x0,
    L = nft_loss(v_theta, v_old, u, r, t) [+ kl_beta mean (v_theta - v_base)^2]."""
    c, w = cfg.nft, cfg.model.guidance_scale
    eps = training_noise(xb.shape[1:], keys, xb.device)  # (B, C, h, w)
    x_t = add_noise(xb, eps, sigma)
    u = eps - xb  # target velocity
    # frozen forwards first, the policy's last (no adapter switch between the policy's
    # forward and its backward; see recipes/crd.py)
    v_base = None
    with torch.no_grad():
        with model.adapter_active(OLD):
            v_old = model.velocity(x_t, sigma, cb, guidance_scale=w)
        if c.kl_beta > 0:
            with model.adapters_disabled():
                v_base = model.velocity(x_t, sigma, cb, guidance_scale=w)
    v = model.velocity(x_t, sigma, cb, guidance_scale=w, cfg_grad=cfg.train.cfg_grad)
    kl = velocity_kl(v, v_base) if v_base is not None else None
    return nft_loss(
        v, v_old, u, rb, sigma, beta=c.beta, normalize=c.normalize, scale=c.scale,
        kl=kl, kl_beta=c.kl_beta,
    )  # fmt: skip
