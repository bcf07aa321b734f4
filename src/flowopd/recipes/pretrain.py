"""Pretrain the embedded default: a small SD3-architecture model on the synthetic world.

Rectified-flow pretraining, as SD3 is trained, at toy scale:

    x_0 = render(prompt) * 2 - 1,  eps ~ N(0, I),  t ~ logit-normal(0, 1)
    x_t = (1 - t) x_0 + t eps,     loss = || v_theta(x_t, t, c) - (eps - x_0) ||^2

with 10% of prompts dropped to "" so classifier-free guidance works. The transformer and
both (tiny) CLIP text encoders are trained together; the result is saved as a normal
diffusers ``StableDiffusion3Pipeline`` directory (pixel space: no VAE) that loads through
the same ``sd3`` backend as SD3.5.

Reproducible from ``--seed`` for a given ``--steps`` (``--minutes`` only caps wall time).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowopd.models.tiny import TinySD3Config

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
    # CFG scale recorded as the model's default for sampling and evaluation (flowopd.json);
    # 3.0 was the best of a sweep over 1-6 for the shipped model (README)
    guidance_scale: float = 3.0
    arch: TinySD3Config = field(default_factory=lambda: EMBEDDED_ARCH)


def _encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 text embeddings with gradients into the CLIP encoders (pipeline code path)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
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


def _save_snapshot(pipe, params, ema, path: str, meta: dict) -> None:
    from flowopd.models.sd3 import SD3Model

    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    guidance = meta.get("guidance_scale", 4.5)
    SD3Model(pipe, max_sequence_length=1, default_guidance_scale=guidance).save_pretrained(
        path, meta={"kind": "flowopd-embedded", **meta}
    )
    with torch.no_grad():
        for b, p in zip(backup, params, strict=True):
            p.copy_(b)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.train()
        m.requires_grad_(True)


def pretrain(cfg: PretrainConfig, log=None):
    """Train the embedded base model and save it to ``cfg.out``; returns the SD3Model."""
    log = log or (lambda msg: print(msg, flush=True))
    from flowopd.algorithms.sft import sample_training_sigmas
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline
    from flowopd.world.prompts import make_records
    from flowopd.world.render import render_batch

    torch.manual_seed(cfg.seed)
    if cfg.init:
        pipe = SD3Model.from_pretrained(cfg.init).pipe  # architecture and weights of stage 1
    else:
        pipe = build_tiny_sd3_pipeline(cfg.arch, seed=cfg.seed)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
        m.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    n_ocr = round(cfg.batch_size * cfg.ocr_fraction)
    start = time.time()
    hist: list[float] = []
    step = 0
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * min(1.0, step / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        recs = make_records(
            "geneval", "train", cfg.batch_size - n_ocr, seed=cfg.seed * 1_000_003 + step
        )
        recs += make_records("ocr", "train", n_ocr, seed=cfg.seed * 1_000_003 + step)
        x0 = render_batch(recs, seed=cfg.seed * 7_919 + step) * 2 - 1  # (B, 3, 32, 32)
        drop = torch.rand(len(recs), generator=gen) < cfg.cond_dropout
        prompts = ["" if d else r["prompt"] for r, d in zip(recs, drop.tolist(), strict=True)]
        eps = torch.randn(x0.shape, generator=gen)
        t = sample_training_sigmas(len(recs), gen, shift=1.0)  # (B,) logit-normal
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        embeds, pooled = _encode(pipe, prompts)
        v = pipe.transformer(
            hidden_states=xt,
            timestep=t * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = ((v - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - d)
        hist.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            el = time.time() - start
            log(
                f"step {step}/{cfg.steps} | loss {sum(hist[-cfg.log_every :]) / len(hist[-cfg.log_every :]):.4f} | lr {lr:.2e} | {el / 60:.1f} min"
            )
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _save_snapshot(
                pipe,
                params,
                ema,
                f"{cfg.out}-step{step}",
                {"steps": step, "seed": cfg.seed, "guidance_scale": cfg.guidance_scale},
            )
        if (time.time() - start) / 60 > cfg.minutes:
            log(f"time cap of {cfg.minutes} min reached at step {step}")
            break
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    for m in modules:
        m.eval()
        m.requires_grad_(False)
    model = SD3Model(pipe, max_sequence_length=1, default_guidance_scale=cfg.guidance_scale)
    meta = {
        "kind": "flowopd-embedded",
        "steps": step,
        "seed": cfg.seed,
        "minutes": round((time.time() - start) / 60, 2),
        "config": {k: v for k, v in asdict(cfg).items() if k != "arch"},
        "stages": _previous_stages(cfg.init)
        + [{k: v for k, v in asdict(cfg).items() if k != "arch"}],
        "arch": asdict(cfg.arch),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, meta=meta)
    log(
        f"saved the embedded model to {out} ({json.dumps({k: meta[k] for k in ('steps', 'minutes')})})"
    )
    return model
