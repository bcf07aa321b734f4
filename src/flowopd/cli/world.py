"""``flowopd world``: prompts and ground-truth renders of the embedded synthetic world.

flowopd world prompts --task geneval --split test --n 600 --seed 0 --out test.jsonl
flowopd world render --prompts test.jsonl --out renders/ --n 64
"""

from __future__ import annotations

import argparse
import sys

from flowopd.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    from flowopd.cli.common import number

    p = subparsers.add_parser("world", help="prompts and ground-truth renders of the toy world")
    sub = p.add_subparsers(dest="world_command", metavar="ACTION")
    p.set_defaults(handler=lambda args: _usage(p))

    pp = sub.add_parser("prompts", help="write prompt records (JSONL) for a task and split")
    pp.add_argument("--task", required=True, help="geneval | ocr")
    pp.add_argument("--split", default="train", help="train | test (disjoint where possible)")
    pp.add_argument("--n", type=int, required=True, help="number of records")
    pp.add_argument(
        "--seed", type=number(int, 0), default=0, help="sampling seed (the split is fixed)"
    )
    pp.add_argument("--tags", default=None, help="comma-separated GenEval tags (default: all six)")
    pp.add_argument("--out", default=None, help="output .jsonl file (default: stdout)")
    pp.set_defaults(handler=_prompts)

    pr = sub.add_parser("render", help="render ground-truth images of a prompt file to PNGs")
    pr.add_argument("--prompts", required=True, help="JSONL prompt file (from `world prompts`)")
    pr.add_argument("--out", required=True, help="output folder: 00000.png ... and grid.png")
    pr.add_argument(
        "--n", type=number(int, 1), default=None, help="render only the first N records"
    )
    pr.add_argument("--seed", type=number(int, 0), default=0, help="layout seed")
    pr.add_argument(
        "--scale", type=number(int, 1, 64), default=4, help="upscaling of grid.png (nearest)"
    )
    pr.set_defaults(handler=_render)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _prompts(args: argparse.Namespace) -> int:
    import json

    from flowopd.world.prompts import make_records, write_jsonl

    tags = [t.strip() for t in args.tags.split(",") if t.strip()] if args.tags else None
    if args.task != "geneval" and tags:
        raise UserError("--tags applies to --task geneval only")
    records = make_records(args.task, args.split, args.n, seed=args.seed, tags=tags)
    if args.out:
        write_jsonl(args.out, records)
        print(f"wrote {len(records)} records to {args.out}", file=sys.stderr)
    else:
        for rec in records:
            sys.stdout.write(json.dumps(rec) + "\n")
    return 0


def _render(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from flowopd.world.prompts import read_jsonl
    from flowopd.world.render import render_batch

    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.scale < 1:
        raise UserError(f"--scale must be >= 1, got {args.scale}")
    records = read_jsonl(args.prompts)[: args.n]
    if not records:
        raise UserError(f"no records in {args.prompts}")
    for i, rec in enumerate(records, 1):
        if "text" not in rec and "include" not in rec:
            raise UserError(f"{args.prompts}: record {i} has neither 'include' nor 'text'")
    try:
        images = render_batch(records, seed=args.seed)  # (B, 3, 32, 32)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{args.prompts}: cannot render: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, H, W, 3)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(out / f"{i:05d}.png")
    # grid: ceil(sqrt(B)) columns, 1 px grey separators, upscaled for viewing
    b, h, w, _ = arr.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = -(-b // cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 128, dtype=np.uint8)
    for i, a in enumerate(arr):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = a
    grid = grid.repeat(args.scale, 0).repeat(args.scale, 1)
    Image.fromarray(grid).save(out / "grid.png")
    print(f"wrote {b} renders and grid.png to {out}", file=sys.stderr)
    return 0
