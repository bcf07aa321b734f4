"""Cost of one Flow-OPD iteration relative to one Flow-GRPO iteration (target <= 1.25x).

Both recipes run in this process on the same model, the same mixed GenEval/OCR prompts,
the same sampler (SDE, steps, CFG), group size and minibatches; an iteration is one
epoch: rollouts + scoring + training on every trained step. What differs is the
per-step work of training:

    GRPO: student forward (grad) + reference forward (adapters off, no grad) + backward;
          rewards on the images, group advantages
    OPD:  student forward (grad) + routed teachers' and anchor's forward (no grad; one
          fused forward of 2B rows, or two of B) + backward; no reward

Per-epoch times are read from each run's history (``time/sample + time/score +
time/train``); the first epoch of every run is a warm-up and dropped, runs are
interleaved over ``--repeats`` so machine load drifts hit all variants alike, and the
median is reported. Prints the machine (platform, CPU/GPU, torch threads) and writes
``OUT/opd_vs_grpo.json``.

    python bench/opd_vs_grpo.py [--model DIR] [--epochs 4] [--repeats 2] [--threads 1]

The recipes run on the GPU when there is one (accelerate's choice), else the CPU.

Without ``--model`` a tiny pixel-space SD3 (1 MMDiT layer of width 32, 32x32 RGB) is
built in a temporary directory; teachers are two randomised LoRAs saved next to it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_tiny(root: Path) -> Path:
    """The tests' tiny pixel-space SD3 pipeline, saved to ``root/model``."""
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import TinySD3Config, build_tiny_sd3_pipeline

    cfg = TinySD3Config(
        sample_size=32, patch_size=4, in_channels=3, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, clip_hidden=16, clip_layers=1, clip_max_length=16, t5=False,
        vae=False,
    )  # fmt: skip
    path = root / "model"
    SD3Model(build_tiny_sd3_pipeline(cfg), max_sequence_length=1).save_pretrained(path)
    return path


def make_teachers(model_dir: Path, root: Path, device: str, rank: int) -> dict[str, Path]:
    """One randomised LoRA per task (A, B ~ N(0, 0.05^2)), saved in the diffusers format."""
    from flowopd.config.sections import SD3_LORA_TARGETS
    from flowopd.models.sd3 import SD3Model

    model = SD3Model.from_pretrained(str(model_dir), device=device)
    out = {}
    for i, task in enumerate(("geneval", "ocr")):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(task, rank=rank, alpha=2 * rank, target_modules=SD3_LORA_TARGETS)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.adapter_parameters(task):
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.05)
        out[task] = root / "teachers" / task
        model.save_adapter(task, out[task])
    return out


def epoch_seconds(history: list[dict]) -> dict[str, list[float]]:
    """Per-epoch seconds (warm-up epoch dropped): total and each part."""
    rows = history[1:]
    parts = {k: [r.get(f"time/{k}", 0.0) for r in rows] for k in ("sample", "score", "train")}
    parts["total"] = [sum(p) for p in zip(*parts.values(), strict=True)]
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers pipeline dir (default: tiny)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant")
    p.add_argument("--steps", type=int, default=10, help="SDE steps (9 trained)")
    p.add_argument("--window", type=int, default=0,
                   help="Flow-GRPO-Fast: K stochastic (trained) steps in [0, 6), as the toy "
                        "presets; 0 (default): every step stochastic, 9 of 10 trained")  # fmt: skip
    p.add_argument("--prompts", type=int, default=8, help="prompts per epoch")
    p.add_argument("--group", type=int, default=4, help="images per prompt")
    p.add_argument("--batch", type=int, default=16, help="sampling and training minibatch")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of student and teachers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="runs/bench/opd_vs_grpo")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    # the recipes run where accelerate puts them: the GPU when there is one
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("FLOWOPD_NO_PROGRESS", "1")
    from flowopd.config import load_config
    from flowopd.config.grpo import GRPOConfig
    from flowopd.config.opd import OPDConfig
    from flowopd.engine.logging import quiet_libraries
    from flowopd.perf import machine_info
    from flowopd.recipes.grpo import train_grpo
    from flowopd.recipes.opd import train_opd
    from flowopd.world.prompts import make_records, write_jsonl

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp(prefix="opd_vs_grpo-"))
    model_dir = Path(args.model) if args.model else build_tiny(tmp)
    teachers = make_teachers(model_dir, tmp, args.device, args.rank)
    prompts = tmp / "prompts.jsonl"
    n = max(args.prompts, 8)
    write_jsonl(prompts, make_records("geneval", "train", n, seed=0)
                + make_records("ocr", "train", n, seed=0))  # fmt: skip

    common = [
        f"model.path={model_dir}", f"model.dtype={args.dtype}", "model.resolution=null",
        f"model.lora.rank={args.rank}", f"model.lora.alpha={2 * args.rank}",
        f"data.train={prompts}", f"sample.num_steps={args.steps}",
        f"sample.group_size={args.group}", f"sample.prompts_per_epoch={args.prompts}",
        f"sample.batch_size={args.batch}", f"train.batch_size={args.batch}",
        "train.optimizer_steps_per_epoch=1", f"train.epochs={args.epochs}", "train.ema=false",
        "eval.every=0", "output.checkpoint_every=0", "output.keep_last=1",
        f"sample.sde_window_size={args.window}",
        *([f"sample.sde_window_range=[0, {min(6, args.steps)}]"] if args.window else []),
    ]  # fmt: skip
    opd_common = [
        *common,
        f"opd.teachers=[{{path: '{teachers['geneval']}', tasks: [geneval]}}, "
        f"{{path: '{teachers['ocr']}', tasks: [ocr]}}]",
    ]
    variants = {
        "grpo": (GRPOConfig, train_grpo,
                 [*common, "reward={routing: {geneval: toy_geneval, ocr: toy_ocr}}",
                  "grpo.beta_kl=0.04"]),
        "opd": (OPDConfig, train_opd, [*opd_common, "opd.fused_forward=true"]),
        "opd_unfused": (OPDConfig, train_opd, [*opd_common, "opd.fused_forward=false"]),
        "opd_no_mar": (OPDConfig, train_opd, [*opd_common, "opd.mar_lambda=0"]),
    }  # fmt: skip
    times: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    for rep in range(args.repeats):
        for name, (cls, fn, over) in variants.items():
            out = tmp / "runs" / f"{name}-{rep}"
            cfg = load_config(cls, None, [*over, f"output.dir={out}"])
            t0 = time.time()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                run = fn(cfg)
            for k, v in epoch_seconds(run.history).items():
                times[name].setdefault(k, []).extend(v)
            print(f"[{rep}] {name}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

    shutil.rmtree(tmp, ignore_errors=True)  # the tiny model, teachers and runs
    med = {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}
    info = machine_info(args.device)
    g = med["grpo"]
    result = {
        "machine": info,
        "settings": {k: getattr(args, k) for k in ("model", "epochs", "repeats", "steps",
                                                    "prompts", "group", "batch", "rank",
                                                    "window")},
        "median_epoch_seconds": med,
        "ratio_vs_grpo": {v: med[v]["total"] / g["total"] for v in med if v != "grpo"},
        "train_ratio_vs_grpo": {v: med[v]["train"] / g["train"] for v in med if v != "grpo"},
    }  # fmt: skip
    from flowopd.eval.report import write_json

    write_json(Path(args.out) / "opd_vs_grpo.json", result)

    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"model: {args.model or 'tiny pixel SD3 (1 layer, width 32, 32x32)'}; "
          f"{args.prompts} prompts x {args.group} images, {args.steps} steps "
          f"({f'window of {args.window}' if args.window else 'all SDE'}), "
          f"minibatch {args.batch}, LoRA r={args.rank}")  # fmt: skip
    print(f"{'variant':<12} {'epoch s':>8} {'sample':>8} {'score':>8} {'train':>8} "
          f"{'x GRPO':>7} {'train x':>8}")  # fmt: skip
    for v, m in med.items():
        r = m["total"] / g["total"]
        rt = m["train"] / g["train"]
        print(f"{v:<12} {m['total']:8.3f} {m['sample']:8.3f} {m['score']:8.3f} "
              f"{m['train']:8.3f} {r:7.2f} {rt:8.2f}")  # fmt: skip
    ratio = result["ratio_vs_grpo"]["opd"]
    print(f"OPD / GRPO per iteration: {ratio:.2f}x (target <= 1.25x: "
          f"{'met' if ratio <= 1.25 else 'NOT met'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
