"""``flowopd eval``: sample benchmark prompts, score them, write metrics.json and a grid."""

from __future__ import annotations

import argparse
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
                   help="comma list: toy-geneval, toy-ocr, toy-quality, geneval=PATH, ocr=PATH")  # fmt: skip
    p.add_argument("--steps", type=int, default=40, help="ODE steps (default 40)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: the model's own, from its flowopd.json; else 4.5)")  # fmt: skip
    p.add_argument("--n", type=int, default=None, help="prompts per benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from flowopd.cli.common import load_model_from_args
    from flowopd.errors import UserError
    from flowopd.eval.benchmarks import EvalSettings, evaluate, parse_benchmarks
    from flowopd.eval.report import format_table, save_grid, write_json

    if args.steps < 1 or (args.n is not None and args.n < 1) or args.batch_size < 1:
        raise UserError("--steps, --n and --batch-size must be >= 1")
    names = parse_benchmarks(args.benchmark)
    model = load_model_from_args(args)
    settings = EvalSettings(steps=args.steps, guidance_scale=args.guidance, n=args.n,
                            seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    runs = [("base", None)] if not args.lora else []
    for i, path in enumerate(args.lora):
        model.load_adapter(path, f"lora{i}")
        runs.append((Path(path).name or f"lora{i}", f"lora{i}"))
    out_root = Path(args.out)
    for label, adapter in runs:
        out = out_root if len(runs) == 1 else out_root / label
        model.set_adapter(adapter)
        t0 = time.time()
        res = evaluate(model, names, settings)
        write_json(out / "metrics.json", res.metrics)
        images = [im for im in res.images.values()]
        prompts = sum((res.prompts[k] for k in res.images), [])
        import torch

        grid = torch.cat(images)[:64]
        save_grid(out / "grid.png", grid, prompts[:64])
        print(f"[{label}] {time.time() - t0:.0f}s -> {out / 'metrics.json'}")
        print(format_table(res.metrics))
    return 0
