"""``flowopd eval``: sample benchmark prompts, score them, write metrics.json, protocol.json and
a grid.

Real benchmarks follow the papers' protocol unless told otherwise (docs/EVALUATION.md):

    flowopd eval --model DIR --benchmark geneval=test_metadata.jsonl \\
        --geneval-detector MASK2FORMER_DIR --geneval-clip CLIP_DIR --scorer-device cuda --out OUT

Several processes share the work: ``torchrun --nproc_per_node=8 -m flowopd eval ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (and LoRA adapters) on benchmarks")
    from flowopd.cli.common import add_model_args

    add_model_args(p)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        help="LoRA dir to evaluate (repeatable: each evaluated separately)",
    )
    p.add_argument("--benchmark", default="toy-geneval,toy-ocr,toy-quality",
                   help="comma list: toy-geneval, toy-ocr, toy-quality, geneval=PATH (GenEval "
                        "metadata JSONL), ocr=PATH (OCR prompts .txt), pickscore=PATH "
                        "(DrawBench prompts .txt)")  # fmt: skip
    g = p.add_argument_group("sampling (default: each benchmark's published protocol)")
    g.add_argument("--steps", type=int, default=None, help="ODE steps (default 40)")
    g.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default 4.5 for geneval/ocr/pickscore; toy benchmarks: "
                        "the model's own, from its flowopd.json)")  # fmt: skip
    g.add_argument("--resolution", type=int, default=None,
                   help="image side in px (default 512 for geneval/ocr/pickscore, as the "
                        "papers evaluate SD3.5-M; toy benchmarks: the model's)")  # fmt: skip
    g.add_argument("--images-per-prompt", type=int, default=None,
                   help="images per unique prompt (default: GenEval 4, OCR 1, DrawBench 5, toy 1)")  # fmt: skip
    g.add_argument("--num-prompts", "--n", dest="n", type=int, default=None,
                   help="unique prompts per benchmark (default all); under torchrun spell it "
                        "--num-prompts (torchrun reads --n as an abbreviation of its own options)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32, help="sampling batch per process")
    s = p.add_argument_group("scorers (local weights; nothing is downloaded when offline)")
    s.add_argument("--geneval-detector", default=None,
                   help="GenEval detector: transformers Mask2Former/DETR dir or cached hub id "
                        "(default facebook/mask2former-swin-small-coco-instance)")  # fmt: skip
    s.add_argument("--geneval-clip", default=None,
                   help="CLIP dir for GenEval's colour check (default openai/clip-vit-large-patch14)")  # fmt: skip
    s.add_argument("--geneval-colors", default=None, choices=["clip", "hsv"],
                   help="colour classifier: GenEval's CLIP zero-shot (default) or model-free HSV")  # fmt: skip
    s.add_argument("--pickscore-model", default=None, help="PickScore_v1 dir or cached hub id")
    s.add_argument("--pickscore-processor", default=None,
                   help="CLIP-H processor dir or cached hub id for PickScore")  # fmt: skip
    s.add_argument("--scorer-device", default=None,
                   help="device of the detector/CLIP/PickScore models (default: the model's, "
                        "i.e. each process's own GPU)")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def _check_args(args: argparse.Namespace) -> None:
    from flowopd.errors import UserError

    ranges = {"--steps": (args.steps, 1, 1000), "--num-prompts": (args.n, 1, 10**7),
              "--batch-size": (args.batch_size, 1, 4096),
              "--images-per-prompt": (args.images_per_prompt, 1, 1000),
              "--resolution": (args.resolution, 8, 8192), "--seed": (args.seed, 0, 2**31 - 1)}  # fmt: skip
    for flag, (value, lo, hi) in ranges.items():
        if value is not None and not lo <= value <= hi:
            raise UserError(f"{flag} must be in [{lo}, {hi}], got {value}")
    if args.resolution is not None and args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")


def scorer_options(args: argparse.Namespace) -> dict[str, dict]:
    """``EvalSettings.scorer_options`` from the scorer flags (only the flags given)."""
    geneval = {"detector": args.geneval_detector, "clip_model": args.geneval_clip,
               "colors": args.geneval_colors, "device": args.scorer_device}  # fmt: skip
    pick = {"model": args.pickscore_model, "processor": args.pickscore_processor,
            "device": args.scorer_device}  # fmt: skip
    out = {"geneval": geneval, "pickscore": pick}
    return {k: {o: v for o, v in opts.items() if v is not None} for k, opts in out.items()}


def run(args: argparse.Namespace) -> int:
    from flowopd.engine import distributed as dist
    from flowopd.eval.benchmarks import EvalSettings, benchmark_records, parse_benchmarks

    _check_args(args)
    names = parse_benchmarks(args.benchmark)
    for name in names:  # prompt files checked before any weights load
        benchmark_records(name, args.n)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every process takes a share
        acc = dist.setup_accelerator(cpu=None if args.device is None else args.device == "cpu")
        args.device = str(acc.device)
    settings = EvalSettings(steps=args.steps, guidance_scale=args.guidance,
                            resolution=args.resolution, images_per_prompt=args.images_per_prompt,
                            n=args.n, seed=args.seed, batch_size=args.batch_size,
                            scorer_options=scorer_options(args))  # fmt: skip
    try:
        _evaluate_all(args, names, settings)
    finally:
        dist.shutdown()
    return 0


def _evaluate_all(args: argparse.Namespace, names: list[str], settings) -> None:
    from flowopd.cli.common import load_model_from_args
    from flowopd.engine import distributed as dist
    from flowopd.engine.logging import library_log_to
    from flowopd.eval.benchmarks import benchmark_records, evaluate, plan_for, protocol_record
    from flowopd.eval.report import format_table, save_grid, write_json

    main = dist.is_main_process()
    model = load_model_from_args(args)
    if main:
        for name in names:
            plan = plan_for(name, len(benchmark_records(name, args.n)), settings, model)
            print(f"{name}: {plan.describe()} on {dist.world_size()} process(es)", flush=True)
    runs = [("base", None)] if not args.lora else []
    if main and args.lora:
        library_log_to(args.out)  # peft's warning on the second adapter, out of the console
    for i, path in enumerate(args.lora):
        model.load_adapter(path, f"lora{i}")
        runs.append((Path(path).name or f"lora{i}", f"lora{i}"))
    out_root = Path(args.out)
    for label, adapter in runs:
        out = out_root if len(runs) == 1 else out_root / label
        model.set_adapter(adapter)
        t0 = time.time()
        res = evaluate(model, names, settings)
        if not main:
            continue
        write_json(out / "metrics.json", res.metrics)
        write_json(out / "protocol.json", protocol_record(res))
        save_grid(out / "grid.png", *res.grid(64))
        print(f"[{label}] {time.time() - t0:.0f}s -> {out / 'metrics.json'}")
        print(format_table(res.metrics))
