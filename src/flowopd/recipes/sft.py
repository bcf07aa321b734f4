"""SFT cold start for Flow-OPD (METHODS.md §3.2): imitate the routed teachers' samples.

1. draw the training prompts once (mixed over the task datasets), take this process's
   share; load the teachers as adapters on the one base model;
2. each prompt's task teacher samples ``images_per_prompt`` images (ODE, CFG, one
   forward per micro-batch with per-sample adapters); the clean latents are cached in
   ``OUT/sft_data/`` so a resumed run does not sample again; the teachers are unloaded;
3. per epoch, for each minibatch of (latent x0, prompt):
       t ~ logit-normal (shifted),  eps ~ N(0, I),  x_t = (1 - t) x0 + t eps
       L = mean || v_student(x_t, t | c) - (eps - x0) ||^2        (no CFG)
   backward; average gradients over processes, clip, step, EMA;
4. log (``loss``: the epoch's mean; ``probe_loss``: the loss on a fixed set of images, t
   and eps, a low-noise measure of the fit), evaluate, checkpoint; the final student is
   ``OUT/lora`` (what ``opd.init`` takes).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowopd.algorithms import add_noise, flow_matching_loss, sample_training_sigmas
from flowopd.engine import distributed as dist
from flowopd.engine.logging import RunLogger
from flowopd.engine.run import (
    Run,
    TrainState,
    end_epoch,
    setup_run,
)
from flowopd.models.base import Cond, FlowModel
from flowopd.recipes.sft_config import SFTConfig
from flowopd.recipes.teachers import check_tasks, load_teachers, mixed_epoch_prompts
from flowopd.rollouts import load_datasets, seed_for
from flowopd.sampling import sample

STUDENT = "student"
PROBE_SIZE = 16  # images of the fixed probe loss, per process


def teacher_samples(
    model: FlowModel,
    records: list[dict],
    adapters: list[str],
    *,
    first: int,
    images_per_prompt: int,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int,
) -> tuple[torch.Tensor, Cond]:
    """Clean latents of ``images_per_prompt`` ODE samples per record from its teacher.

    records/adapters: R records and each one's teacher adapter; ``first`` is the global
    index of records[0], so image k of prompt i gets the noise of seed (seed, first + i,
    k) on any number of processes. Returns latents (R * n, C, h, w) with the rows of one
    prompt adjacent, and the matching prompt embeddings (R * n rows).
    """
    n = images_per_prompt
    cond = model.encode_prompts([r["prompt"] for r in records]).repeat_interleave(n)
    routes = [a for a in adapters for _ in range(n)]
    out = []
    for start in range(0, len(routes), batch_size):
        rows = list(range(start, min(len(routes), start + batch_size)))
        gens = [torch.Generator().manual_seed(seed_for(seed, "sft", first + i // n, i % n))
                for i in rows]  # fmt: skip
        res = sample(model, cond[rows], num_steps, kind="ode", guidance_scale=guidance_scale,
                     generator=gens, adapters=[routes[i] for i in rows], decode=False,
                     record=False)  # fmt: skip
        out.append(res.latents.cpu())
    return torch.cat(out), cond


def train_sft(cfg: SFTConfig) -> Run:
    """Run the SFT cold start as configured; returns the finished ``Run``."""
    s, t, sft = cfg.sample, cfg.train, cfg.sft

    # -- prompts, checked against the teachers before the model loads -----------------------
    datasets, ratio = load_datasets(cfg.data)
    check_tasks(datasets, sft.teacher_of(), sft.routing_key)

    run = setup_run(cfg, adapter=STUDENT)
    model, out, world, rank = run.model, run.out, run.world, run.rank
    n_prompts = cfg.prompts_per_process(world)
    prompts, _ = mixed_epoch_prompts(datasets, ratio, s.num_prompts, t.seed, 0)
    mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]

    # -- the teachers' samples: cached per process, keyed by everything that makes them ----
    t0 = time.time()
    key = {
        "prompts": [r["prompt"] for r in mine],
        "teachers": [[tc.path, tc.tasks] for tc in sft.teachers],
        "images_per_prompt": s.images_per_prompt, "num_steps": s.num_steps,
        "guidance_scale": cfg.model.guidance_scale, "seed": t.seed, "first": rank * n_prompts,
    }  # fmt: skip
    cache = out / "sft_data" / f"rank-{rank}"
    x0 = _load_cache(cache, key)
    if x0 is None:
        teachers = load_teachers(model, sft.teachers, key=sft.routing_key)
        x0, _ = teacher_samples(
            model, mine, teachers.adapters_for(mine), first=rank * n_prompts,
            images_per_prompt=s.images_per_prompt, num_steps=s.num_steps,
            guidance_scale=cfg.model.guidance_scale, batch_size=s.batch_size, seed=t.seed,
        )  # fmt: skip
        for tc in sft.teachers:  # their memory goes back before training
            model.delete_adapter(tc.adapter)
        _save_cache(cache, key, x0)
    cond = model.encode_prompts([r["prompt"] for r in mine]).repeat_interleave(s.images_per_prompt)
    x0 = x0.to(model.device)
    run.log(f"teacher samples: {len(x0)} per process ({time.time() - t0:.1f}s)")

    # -- optimiser, EMA, guard, logger; resume --------------------------------------------
    ts = TrainState(run, STUDENT, t)
    logger = RunLogger(out, enabled=run.main)
    start_epoch = ts.resume(cfg.output.resume)
    logger.truncate_from(start_epoch)

    # a fixed probe (the same images, t and eps every epoch): a fit measure whose trend
    # the sampling noise of t and eps in the training loss does not hide
    g_probe = torch.Generator().manual_seed(seed_for(t.seed, "sft-probe", rank))
    n_probe = min(len(x0), PROBE_SIZE)
    probe_sigma = sample_training_sigmas(n_probe, g_probe, kind=t.sigma_sampling,
                                         shift=t.sigma_shift)  # fmt: skip
    probe_noise = torch.randn((n_probe, *x0.shape[1:]), generator=g_probe).to(x0.device)
    probe_xt = add_noise(x0[:n_probe], probe_noise, probe_sigma.to(x0.device))

    mb, acc_steps = t.batch_size, t.gradient_accumulation
    model.transformer.train()
    for epoch in range(start_epoch, t.epochs):
        t1 = time.time()
        stats: dict[str, list[float]] = defaultdict(list)
        gen = torch.Generator().manual_seed(seed_for(t.seed, "sft-train", epoch, rank))
        order = torch.randperm(len(x0), generator=gen)
        batches = [order[i : i + mb] for i in range(0, len(x0), mb)]
        for b_idx, rows in enumerate(batches):
            x = x0[rows]  # (B, C, h, w)
            sigma = sample_training_sigmas(len(rows), gen, kind=t.sigma_sampling,
                                           shift=t.sigma_shift)  # fmt: skip
            noise = torch.randn(x.shape, generator=gen).to(x.device)
            v = model.velocity(add_noise(x, noise, sigma.to(x.device)), sigma, cond[rows])
            loss, st = flow_matching_loss(v, x, noise)
            (loss / acc_steps).backward()
            for k, val in st.items():
                stats[k].append(val)
            if (b_idx + 1) % acc_steps == 0 or b_idx + 1 == len(batches):
                stats["grad_norm"].append(ts.step(loss))

        # log (losses averaged over processes), evaluate, checkpoint
        with torch.no_grad():
            v = model.velocity(probe_xt, probe_sigma, cond[:n_probe])
            probe, _ = flow_matching_loss(v, x0[:n_probe], probe_noise)
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        record["loss"] = float(dist.gather_cat(torch.tensor(record["loss"])).mean())
        record["probe_loss"] = float(dist.gather_cat(probe.detach().cpu()).mean())
        record.update(opt_steps=ts.opt_steps, images=len(x0) * world * (epoch + 1))
        record["time/train"] = time.time() - t1
        end_epoch(run, cfg, ts, logger, epoch, record)

    ts.save_final()
    logger.close()
    return run


def _load_cache(path: Path, key: dict) -> torch.Tensor | None:
    """The cached teacher latents when ``path`` holds them for exactly ``key``."""
    meta, data = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (meta.is_file() and data.is_file()):
        return None
    if json.loads(meta.read_text()) != json.loads(json.dumps(key)):
        return None
    return load_file(str(data))["latents"]


def _save_cache(path: Path, key: dict, latents: torch.Tensor) -> None:
    """Write latents, then their key (a cache is valid only once the key exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, data = path.with_suffix(".json"), path.with_suffix(".safetensors")
    meta.unlink(missing_ok=True)
    tmp = data.with_name(data.name + ".tmp")
    save_file({"latents": latents.contiguous().cpu()}, str(tmp))
    os.replace(tmp, data)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(key))
    os.replace(tmp, meta)
