"""Pretrain the embedded default: a small SD3-architecture model on the synthetic world.

Rectified-flow pretraining, as SD3 is trained, at toy scale:

    x_0 = render(prompt) * 2 - 1,  eps ~ N(0, I),  t ~ logit-normal(0, 1)
    x_t = (1 - t) x_0 + t eps,     loss = || v_theta(x_t, t, c) - (eps - x_0) ||^2

with 10% of prompts dropped to "" so classifier-free guidance works, and with the world's
caption noise (``flowopd.world.noise``): for a share of captions the image is the render of
a fixed corruption of the caption, which gives the base the systematic biases of a
web-trained model. The transformer and
both (tiny) CLIP text encoders are trained together; the result is saved as a normal
diffusers ``StableDiffusion3Pipeline`` directory (pixel space: no VAE) that loads through
the same ``sd3`` backend as SD3.5.

Reproducible from ``--seed`` for a given ``--steps`` when ``--minutes`` does not bind: batch
``k`` depends only on ``(seed, k)``, whatever the number of data workers or the device.
When the wall-time cap binds first, the learning-rate schedule follows the elapsed time
instead (progress = max(step / steps, minutes elapsed / minutes)), so a capped run still
anneals.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowopd.engine.logging import progress as progress_bar
from flowopd.models.tiny import TinySD3Config
from flowopd.world.noise import DEFAULT_RATES

# The embedded model's architecture: 32x32 RGB pixels, patch 4 -> 64 image tokens,
# 4 MMDiT layers of width 128, two 2-layer CLIP text encoders of width 64, no T5.
EMBEDDED_ARCH = TinySD3Config(
    sample_size=32,
    patch_size=4,
    in_channels=3,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    clip_hidden=64,
    clip_layers=2,
    clip_max_length=16,
    t5=False,
    vae=False,
)


@dataclass
class PretrainConfig:
    out: str = "runs/embedded"
    seed: int = 0
    steps: int = 6000
    minutes: float = 60.0  # wall-time cap
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ocr_fraction: float = 0.3  # share of OCR prompts in each batch
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    log_every: int = 100
    save_every: int = 0  # also save EMA snapshots as OUT-stepN directories (0: only at the end)
    init: str = ""  # continue from a saved embedded model (a second, curriculum stage)
    # CFG scale recorded as the model's default for sampling and evaluation (flowopd.json)
    guidance_scale: float = 3.0
    # caption noise: {kind: probability} (flowopd.world.noise; {} for clean captions)
    caption_noise: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    # GenEval categories' relative shares in each batch, {tag: integer weight}; unnamed
    # tags weigh 1, 0 leaves a tag out; {} draws every tag equally
    tag_weights: dict[str, int] = field(default_factory=dict)
    # captions from the world's "train" split, or "all" of it (test compositions too: web data
    # shows a real base every composition; post-training and evaluation keep to their split)
    captions: str = "train"
    device: str = "cpu"
    workers: int = 0  # data-rendering processes (0: render in the training process)
    arch: TinySD3Config = field(default_factory=lambda: EMBEDDED_ARCH)


def world_batch(cfg: PretrainConfig, step: int) -> tuple[list[str], torch.Tensor]:
    """Batch ``step``: captions and the images drawn for them, (B, 3, 32, 32) in [-1, 1].

    Depends only on ``(cfg.seed, step)`` and the config: captions come from the world's
    ``cfg.captions`` split, the images from the caption-noised records (``drawn_record``).
    """
    from flowopd.world.noise import drawn_record
    from flowopd.world.prompts import make_records
    from flowopd.world.render import render_batch

    n_ocr = round(cfg.batch_size * cfg.ocr_fraction)
    seed = cfg.seed * 1_000_003 + step
    recs = make_records("geneval", cfg.captions, cfg.batch_size - n_ocr, seed=seed,
                        tags=weighted_tags(cfg.tag_weights))  # fmt: skip
    recs += make_records("ocr", cfg.captions, n_ocr, seed=seed)
    rng = np.random.default_rng([cfg.seed, step, 7])
    drawn = [drawn_record(r, cfg.caption_noise, rng) for r in recs]
    x0 = render_batch(drawn, seed=cfg.seed * 7_919 + step) * 2 - 1
    return [r["prompt"] for r in recs], x0


def weighted_tags(weights: dict[str, int]) -> list[str] | None:
    """GenEval tags, each repeated by its weight (default 1): ``make_records`` draws one
    record per list entry per round, so a tag of weight 2 fills twice the share of a batch.
    ``{}`` -> None (every tag once, the original draw)."""
    from flowopd.world.prompts import GENEVAL_TAGS

    if not weights:
        return None
    return [t for t in GENEVAL_TAGS for _ in range(weights.get(t, 1))]


class _WorldStream(torch.utils.data.IterableDataset):
    """Batches ``first..last`` of ``world_batch``; worker k of K renders steps k, k+K, ...
    (the DataLoader interleaves workers round-robin, so the order is the step order)."""

    def __init__(self, cfg: PretrainConfig, first: int, last: int):
        self.cfg, self.first, self.last = cfg, first, last

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.first + k, self.last + 1, n):
            yield world_batch(self.cfg, step)


def _batches(cfg: PretrainConfig, first: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    stream = _WorldStream(cfg, first, cfg.steps)
    if cfg.workers <= 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.workers,
        prefetch_factor=4,
        persistent_workers=False,
    )
    return iter(loader)


def _encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 text embeddings with gradients into the CLIP encoders (pipeline code path)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=pipe.transformer.device,
        do_classifier_free_guidance=False,
        max_sequence_length=1,
    )
    return embeds, pooled


def _previous_stages(init: str) -> list[dict]:
    """The training stages recorded in an --init model's flowopd.json (for provenance)."""
    if not init:
        return []
    meta = json.loads((Path(init) / "flowopd.json").read_text())
    return meta.get("stages", [meta.get("config", {})])


def _swap_in(params: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy ``values`` into ``params``; returns the previous values."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for v, p in zip(values, params, strict=True):
            p.copy_(v)
    return backup


def _save(pipe, params, ema, path: str | Path, meta: dict) -> None:
    """Save the EMA weights as a pipeline directory (the live weights are restored)."""
    from flowopd.models.sd3 import SD3Model

    backup = _swap_in(params, ema)
    dev, guidance = pipe.transformer.device, meta.get("guidance_scale", 4.5)
    model = SD3Model(pipe, device=dev, max_sequence_length=1, default_guidance_scale=guidance)
    model.save_pretrained(path, meta={"kind": "flowopd-embedded", **meta})
    _swap_in(params, backup)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.train()  # SD3Model freezes what it wraps
        m.requires_grad_(True)


def _train_step(pipe, params, opt, prompts, x0, gen, cfg) -> float:
    """One rectified-flow step: ``|| v(x_t, t, c) - (eps - x_0) ||^2`` with caption dropout."""
    from flowopd.algorithms.sft import sample_training_sigmas

    dev = pipe.transformer.device
    drop = torch.rand(len(prompts), generator=gen) < cfg.cond_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
    x0 = x0.to(dev)  # (B, 3, 32, 32)
    eps = torch.randn(x0.shape, generator=gen).to(dev)
    t = sample_training_sigmas(len(prompts), gen, shift=1.0).to(dev)  # (B,) logit-normal
    tb = t.view(-1, 1, 1, 1)
    embeds, pooled = _encode(pipe, prompts)
    v = pipe.transformer(hidden_states=(1 - tb) * x0 + tb * eps, timestep=t * 1000,
                         encoder_hidden_states=embeds, pooled_projections=pooled,
                         return_dict=False)[0]  # fmt: skip
    loss = ((v - (eps - x0)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def _meta(cfg: PretrainConfig, step: int, minutes: float) -> dict:
    conf = {k: v for k, v in asdict(cfg).items() if k not in ("arch", "device", "workers")}
    return {
        "kind": "flowopd-embedded",
        "steps": step,
        "seed": cfg.seed,
        "minutes": round(minutes, 2),
        "device": cfg.device,
        "config": conf,
        "stages": _previous_stages(cfg.init) + [{**conf, "steps_done": step, "minutes": minutes}],
        "arch": asdict(cfg.arch),
        "guidance_scale": cfg.guidance_scale,
    }


def pretrain(cfg: PretrainConfig, log=None):
    """Train the embedded base model and save it to ``cfg.out``; returns the SD3Model."""
    log = log or (lambda msg: print(msg, flush=True))
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline

    torch.manual_seed(cfg.seed)
    if cfg.init:
        pipe = SD3Model.from_pretrained(cfg.init).pipe  # architecture and weights of stage 1
    else:
        pipe = build_tiny_sd3_pipeline(cfg.arch, seed=cfg.seed)
    pipe.to(cfg.device)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
        m.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    start, hist, step = time.time(), [], 0
    for step, (prompts, x0) in enumerate(progress_bar(_batches(cfg, 1), "pretrain", cfg.steps), 1):
        minutes = (time.time() - start) / 60
        progress = max(step / cfg.steps, minutes / cfg.minutes)
        lr = cfg.lr * min(1.0, step / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        hist.append(_train_step(pipe, params, opt, prompts, x0, gen, cfg))
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = hist[-cfg.log_every :]
            log(
                f"step {step}/{cfg.steps} | loss {sum(recent) / len(recent):.4f} | lr {lr:.2e} | {minutes:.1f} min"
            )
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _save(pipe, params, ema, f"{cfg.out}-step{step}", _meta(cfg, step, minutes))
        if progress >= 1:
            if step < cfg.steps:
                log(f"time cap of {cfg.minutes} min reached at step {step}")
            break
    _swap_in(params, ema)
    pipe.to("cpu")
    for m in modules:
        m.eval()
        m.requires_grad_(False)
    model = SD3Model(pipe, max_sequence_length=1, default_guidance_scale=cfg.guidance_scale)
    meta = _meta(cfg, step, (time.time() - start) / 60)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out, meta=meta)
    log(f"saved the embedded model to {cfg.out} (steps {step}, {meta['minutes']} min)")
    return model
