"""Throughput of Flow-GRPO at SD3.5-Medium size, random weights, nothing downloaded.

Builds the SD3.5-Medium transformer from its published config (``perf.SD35_MEDIUM``,
2.24B parameters) with random weights, random text embeddings in place of the text
encoders (77 CLIP + 256 T5 tokens, as SD3 feeds them) and no VAE, and measures through
flowopd's own code paths (``SD3Model.velocity``, ``sampling.sample``,
``rollouts.rescore_step``, ``algorithms.grpo_loss``):

- sampling: one 10-step SDE collection of ``--batch`` images with CFG 4.5 (2 rows per
  image per step), LoRA adapter active, trajectories recorded -> images/s;
- training: one GRPO step on the collected batch: re-score one denoising step with grad
  (CFG), clipped loss, backward into the float32 LoRA (r=32 on the Flow-GRPO targets),
  AdamW step;
- peak memory of each phase (``torch.cuda.max_memory_allocated``; on CPU the process's
  peak RSS, which only grows);
- achieved TFLOP/s and MFU from ``perf``'s analytic FLOP count (model FLOPs: checkpoint
  recomputation excluded) over the datasheet peak of the GPU (H100 SXM bf16 989 TFLOP/s,
  A100 312, ...; n/a on CPU, where the run instead reports the time ``perf`` predicts
  from a GEMM measured now and the assumed MFU, and the relative error).

    python bench/full_size.py --size full --device cuda --dtype bfloat16 --batch 8 --json out.json
    python bench/full_size.py --size tiny            # same code on CPU in seconds

``--size medium`` is a 4-block, width-256 MMDiT at 256 px for CPU timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowopd import perf  # noqa: E402
from flowopd.perf import MMDiTArch  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    # SD3.5-Medium at 512 px: 64x64 latents -> 1024 image tokens; 77 + 256 text tokens
    "full": dict(arch=perf.SD35_MEDIUM, resolution=512, clip=77, t5=256, batch=8, iters=3),
    "medium": dict(
        arch=MMDiTArch(
            num_layers=4, num_attention_heads=4, attention_head_dim=64, sample_size=32,
            caption_projection_dim=256, pos_embed_max_size=32, dual_attention_layers=(0, 1),
            qk_norm="rms_norm",
        ),
        resolution=256, clip=77, t5=64, batch=2, iters=1,
    ),
    "tiny": dict(
        arch=MMDiTArch(
            num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8,
            joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
        ),
        resolution=64, clip=8, t5=8, batch=2, iters=1,
    ),
}  # fmt: skip
VAE_SCALE = 8  # SD3's VAE; the bench runs the transformer on latents of that size directly


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def build_model(arch: MMDiTArch, device: torch.device, dtype: str, args: argparse.Namespace):
    """An ``SD3Model`` around a randomly initialised transformer (no VAE, no encoders)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from flowopd.models.sd3 import SD3Model

    torch.manual_seed(0)
    with torch.device(device):  # allocate on the device: 9 GB of fp32 init never hits the host
        transformer = SD3Transformer2DModel(**arch.to_config())
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    return SD3Model(
        pipe, device=device, dtype=dtype,
        gradient_checkpointing=args.checkpointing, compile=args.compile,
        cfg_forward=args.cfg_forward,
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from flowopd.algorithms import grpo_loss
    from flowopd.config.sections import SD3_LORA_TARGETS
    from flowopd.engine.optim import make_optimizer
    from flowopd.models.base import Cond
    from flowopd.rollouts import rescore_step
    from flowopd.sampling import SamplerSpec, sample

    size = SIZES[args.size]
    arch: MMDiTArch = size["arch"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    batch = args.batch or size["batch"]
    iters = args.iters or size["iters"]
    res = resolution_of(args, size["resolution"])
    n_img = perf.image_tokens(arch, res, VAE_SCALE)
    n_txt = size["clip"] + size["t5"]
    side = res // VAE_SCALE
    rank, targets = args.lora_rank, list(SD3_LORA_TARGETS)

    t_build = time.perf_counter()
    model = build_model(arch, device, dtype, args)
    model.add_adapter("policy", rank=rank, alpha=2 * rank, target_modules=targets)
    model.set_adapter("policy", trainable=True)
    params = model.adapter_parameters("policy")
    opt = make_optimizer(params, 3e-4, (0.9, 0.999), 1e-4, eight_bit=args.adamw_8bit)
    t_build = time.perf_counter() - t_build

    g = torch.Generator().manual_seed(0)
    cond = Cond(
        torch.randn(batch, n_txt, arch.joint_attention_dim, generator=g),
        torch.randn(batch, arch.pooled_projection_dim, generator=g),
    ).to(device)
    # the empty-prompt embedding would come from the text encoders; a fixed random one here
    model._neg = Cond(
        torch.randn(1, n_txt, arch.joint_attention_dim, generator=g),
        torch.randn(1, arch.pooled_projection_dim, generator=g),
    ).to(device)
    latents = torch.randn(batch, arch.in_channels, side, side, generator=g)

    def collect():
        return sample(
            model, cond, args.steps, kind="sde", noise_level=0.7, guidance_scale=4.5,
            generator=torch.Generator().manual_seed(1), latents=latents, decode=False,
        )  # fmt: skip

    def train_step(traj) -> tuple[float, float]:
        model.transformer.train()
        spec = SamplerSpec(args.steps, kind="sde", noise_level=0.7, guidance_scale=4.5)
        step, _ = rescore_step(model, traj, 0, cond, spec, cfg_grad="cond")  # train's default
        adv = torch.linspace(-1, 1, batch, device=step.log_prob.device)
        loss, st = grpo_loss(step.log_prob, traj.log_probs[:, 0].to(step.log_prob.device), adv,
                             clip_range=1e-4)  # fmt: skip
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.transformer.eval()
        ratio = torch.exp(step.log_prob.detach() - traj.log_probs[:, 0].to(step.log_prob.device))
        return float(loss.detach()), float((ratio - 1).abs().mean())

    # warm-up (compilation, allocator, kernel selection): not timed. The first train step
    # is also the one that checks the ratio: before any update it must be 1.
    out = None
    ratio_err = float("nan")
    for _ in range(args.warmup):
        out = collect()
        _, ratio_err = train_step(out.trajectory)

    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = collect()
    _sync(device)
    t_sample = (time.perf_counter() - t0) / iters
    mem_sample = _peak_bytes(device)

    _reset_peak(device)
    t0 = time.perf_counter()
    losses = []
    for i in range(iters):
        loss, err = train_step(out.trajectory)
        losses.append(loss)
        if i == 0 and args.warmup == 0:
            ratio_err = err
    _sync(device)
    t_train = (time.perf_counter() - t0) / iters
    mem_train = _peak_bytes(device)

    # -- FLOPs, rates, MFU ---------------------------------------------------------------
    f_row = perf.forward_flops(arch, n_img, n_txt, lora_rank=rank, lora_targets=targets)
    tf = perf.train_step_flops(arch, n_img, n_txt, lora_rank=rank, lora_targets=targets,
                               checkpointing=args.checkpointing)  # fmt: skip
    rows = 2 * batch  # CFG: negative + positive rows per image
    # rows with a backward: all of them when the pair runs batched; with split the
    # (detached) negative rows run one forward without autograd
    grad_rows = batch if args.cfg_forward == "split" else rows
    f_sample = args.steps * rows * f_row
    f_train = grad_rows * tf.model + (rows - grad_rows) * f_row
    tflops_sample = f_sample / t_sample / 1e12
    tflops_train = f_train / t_train / 1e12
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak = perf.gpu_peak_for_name(device_name, dtype)
        predicted = None
    else:
        device_name = (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
        peak = None  # no datasheet peak for a shared CPU: MFU n/a
        gemm = perf.cpu_matmul_tflops(dtype)
        rate = gemm * 1e12 * perf.DEFAULT_MFU
        predicted = {
            "cpu_gemm_tflops": gemm,
            "assumed_mfu": perf.DEFAULT_MFU,
            "sample_s": f_sample / rate,
            "train_step_s": (grad_rows * tf.hardware + (rows - grad_rows) * f_row) / rate,
        }
        predicted["rel_error_sample"] = predicted["sample_s"] / t_sample - 1
        predicted["rel_error_train"] = predicted["train_step_s"] / t_train - 1

    return {
        "size": args.size,
        "device": device.type,
        "device_name": device_name,
        "dtype": dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "steps": args.steps,
        "iters": iters,
        "compile": args.compile,
        "gradient_checkpointing": args.checkpointing,
        "cfg_forward": args.cfg_forward,
        "arch": arch.to_config(),
        "resolution": res,
        "image_tokens": n_img,
        "text_tokens": n_txt,
        "params": perf.transformer_params(arch),
        "lora_rank": rank,
        "lora_params": perf.lora_params(arch, rank, targets),
        "flops": {
            "forward_per_row": f_row,
            "sample": f_sample,
            "train_step": f_train,
            "train_step_recompute": grad_rows * tf.recompute,
        },
        "time_s": {"build": t_build, "sample": t_sample, "train_step": t_train},
        "images_per_s": batch / t_sample,
        "tflops": {"sample": tflops_sample, "train_step": tflops_train},
        "peak_tflops": peak,
        "mfu": {
            "sample": tflops_sample / peak if peak else None,
            "train_step": tflops_train / peak if peak else None,
        },
        "peak_memory_bytes": {"sample": mem_sample, "train_step": mem_train},
        "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_max_rss",
        "loss": losses[-1],
        "ratio_mean_abs_err": ratio_err,
        "predicted": predicted,
    }


def resolution_of(args: argparse.Namespace, default: int) -> int:
    """Image side: --resolution, else the --config's model.resolution, else the size's.

    Latents are resolution / 8 per side (SD3's VAE), in whole patches of the size's arch.
    """
    from flowopd.errors import UserError

    res = args.resolution
    if res is None and args.config:
        from flowopd.cli.train import ALGOS, _load
        from flowopd.config import load_config

        cfg = load_config(_load(ALGOS[args.algo][0]), args.config, validate=False)
        res = cfg.model.resolution
    res = res or default
    mult = VAE_SCALE * SIZES[args.size]["arch"].patch_size
    if res < mult or res % mult:
        raise UserError(f"resolution {res} must be a positive multiple of {mult}")
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument(
        "--dtype", default=None, help="network dtype (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--batch", type=int, default=None, help="images per sampling/training batch")
    p.add_argument("--steps", type=int, default=10, help="SDE steps of the collection")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument(
        "--resolution", type=int, default=None,
        help="image side in px (default: --config's model.resolution, else the size's: "
        "512 full, 256 medium, 64 tiny)",
    )  # fmt: skip
    p.add_argument("--config", default=None, help="training YAML whose model.resolution to use")
    p.add_argument("--algo", default="grpo", help="recipe of --config (default: grpo)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--adamw-8bit", action="store_true", help="bitsandbytes AdamW8bit if present")
    p.add_argument("--cfg-forward", choices=["batched", "split"], default="batched",
                   help="model.cfg_forward: the CFG pair as one forward or two (split: the "
                   "detached negative half runs without autograd in the train step)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from flowopd.engine.logging import quiet_libraries

    quiet_libraries()
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    r = result
    mfu = r["mfu"]["train_step"]
    print(
        f"{r['size']} on {r['device_name']} ({r['dtype']}, batch {r['batch']}): "
        f"sampling {r['images_per_s']:.3g} img/s ({r['tflops']['sample']:.3g} TFLOP/s), "
        f"train step {r['time_s']['train_step']:.3g} s ({r['tflops']['train_step']:.3g} TFLOP/s"
        + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a")
        + f"), peak memory {r['peak_memory_bytes']['train_step'] / 2**30:.2f} GiB"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
