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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowopd.algorithms import add_noise, flow_matching_loss, sample_training_sigmas
from flowopd.config.sft import SFTConfig
from flowopd.engine import distributed as dist
from flowopd.engine.batches import minibatches
from flowopd.engine.run import Run, TrainState, end_epoch, setup_run
from flowopd.eval.periodic import evaluate_when_due
from flowopd.models.base import Cond, FlowModel
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
        gens = [
            torch.Generator().manual_seed(seed_for(seed, "sft", first + i // n, i % n))
            for i in rows
        ]
        res = sample(
            model,
            cond[rows],
            num_steps,
            kind="ode",
            guidance_scale=guidance_scale,
            generator=gens,
            adapters=[routes[i] for i in rows],
            decode=False,
            record=False,
        )
        out.append(res.latents.cpu())
    return torch.cat(out), cond


def train_sft(cfg: SFTConfig) -> Run:
    """Run the SFT cold start as configured; returns the finished ``Run``."""
    s, t, sft = cfg.sample, cfg.train, cfg.sft

    # 1. set-up: prompts, checked against the teachers before the model loads; the model
    #    with the student LoRA; this process's share of the prompts
    datasets, ratio = load_datasets(cfg.data)
    check_tasks(datasets, sft.teacher_of(), sft.routing_key)
    run = setup_run(cfg, adapter=STUDENT)
    model, world, rank = run.model, run.world, run.rank
    n_prompts = cfg.prompts_per_process(world)
    prompts, _ = mixed_epoch_prompts(datasets, ratio, s.num_prompts, t.seed, 0)
    mine = prompts[rank * n_prompts : (rank + 1) * n_prompts]

    # 2. sample: the teachers' clean latents (cached per process)
    t0 = time.time()
    x0 = _teacher_latents(cfg, run, mine, first=rank * n_prompts)
    cond = model.encode_prompts([r["prompt"] for r in mine]).repeat_interleave(s.images_per_prompt)
    x0 = x0.to(model.device)
    run.log(f"teacher samples: {len(x0)} per process ({time.time() - t0:.1f}s)")

    # 3. train state: optimiser, EMA, guard, logger; resume; a fixed probe (the same
    #    images, t and eps every epoch): a fit measure whose trend the sampling noise of t
    #    and eps in the training loss does not hide
    ts = TrainState(run, STUDENT, t)
    logger, start_epoch = ts.start(cfg.output.resume)
    probe = _Probe.make(x0, cfg, rank)

    model.transformer.train()
    for epoch in range(start_epoch, t.epochs):
        # 4. train: flow matching on the teachers' samples
        t1 = time.time()
        stats = _train_epoch(cfg, ts, x0, cond, epoch, rank)

        # 5. log (losses averaged over processes), evaluate, checkpoint
        record = {k: float(np.mean(v)) for k, v in stats.items()}
        record["loss"] = float(dist.gather_cat(torch.tensor(record["loss"])).mean())
        record["probe_loss"] = float(dist.gather_cat(probe.loss(model, x0, cond)).mean())
        record.update(opt_steps=ts.opt_steps, images=len(x0) * world * (epoch + 1))
        record["time/train"] = time.time() - t1
        end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)

    ts.finish(logger)
    return run


def _teacher_latents(cfg: SFTConfig, run: Run, mine: list[dict], first: int) -> torch.Tensor:
    """The routed teachers' clean latents of this process's prompts (R * n, C, h, w):
    read from ``OUT/sft_data/rank-R`` when cached for exactly these settings, else sampled
    (the teachers are unloaded after) and cached."""
    s, t, sft, model = cfg.sample, cfg.train, cfg.sft, run.model
    key = {
        "prompts": [r["prompt"] for r in mine],
        "teachers": [[tc.path, tc.tasks] for tc in sft.teachers],
        "images_per_prompt": s.images_per_prompt,
        "num_steps": s.num_steps,
        "guidance_scale": cfg.model.guidance_scale,
        "seed": t.seed,
        "first": first,
    }
    cache = run.out / "sft_data" / f"rank-{run.rank}"
    x0 = _load_cache(cache, key)
    if x0 is None:
        teachers = load_teachers(model, sft.teachers, key=sft.routing_key)
        x0, _ = teacher_samples(
            model,
            mine,
            teachers.adapters_for(mine),
            first=first,
            images_per_prompt=s.images_per_prompt,
            num_steps=s.num_steps,
            guidance_scale=cfg.model.guidance_scale,
            batch_size=s.batch_size,
            seed=t.seed,
        )
        for tc in sft.teachers:  # their memory goes back before training
            model.delete_adapter(tc.adapter)
        _save_cache(cache, key, x0)
    return x0


@dataclass
class _Probe:
    """A fixed probe: the first n images with fixed t and eps (drawn once per process)."""

    sigma: torch.Tensor  # (n,)
    noise: torch.Tensor  # (n, C, h, w)
    x_t: torch.Tensor  # (n, C, h, w)

    @classmethod
    def make(cls, x0: torch.Tensor, cfg: SFTConfig, rank: int) -> _Probe:
        t = cfg.train
        g = torch.Generator().manual_seed(seed_for(t.seed, "sft-probe", rank))
        n = min(len(x0), PROBE_SIZE)
        sigma = sample_training_sigmas(n, g, kind=t.sigma_sampling, shift=t.sigma_shift)
        noise = torch.randn((n, *x0.shape[1:]), generator=g).to(x0.device)
        return cls(sigma, noise, add_noise(x0[:n], noise, sigma.to(x0.device)))

    @torch.no_grad()
    def loss(self, model: FlowModel, x0: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The flow-matching loss on the probe (a 0-d tensor on the CPU)."""
        n = len(self.sigma)
        v = model.velocity(self.x_t, self.sigma, cond[:n])
        loss, _ = flow_matching_loss(v, x0[:n], self.noise)
        return loss.detach().cpu()


def _train_epoch(
    cfg: SFTConfig, ts: TrainState, x0: torch.Tensor, cond: Cond, epoch: int, rank: int
) -> dict[str, list[float]]:
    """One pass of minibatches: t ~ logit-normal (shifted), eps ~ N(0, I), both from the
    epoch's shuffle generator; flow-matching loss, backward; the optimizer steps at the
    accumulation boundaries. Returns the stats."""
    t, model = cfg.train, ts.run.model
    stats: dict[str, list[float]] = defaultdict(list)
    gen = torch.Generator().manual_seed(seed_for(t.seed, "sft-train", epoch, rank))
    for mb in minibatches(len(x0), t.batch_size, gen, accumulation=t.gradient_accumulation):
        x = x0[mb.rows]  # (B, C, h, w)
        sigma = sample_training_sigmas(
            len(mb.rows), gen, kind=t.sigma_sampling, shift=t.sigma_shift
        )
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        v = model.velocity(add_noise(x, noise, sigma.to(x.device)), sigma, cond[mb.rows])
        loss, st = flow_matching_loss(v, x, noise)
        (loss / t.gradient_accumulation).backward()
        for k, val in st.items():
            stats[k].append(val)
        if mb.step:
            stats["grad_norm"].append(ts.step(loss))
    return stats


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
