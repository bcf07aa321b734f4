"""``flowopd pretrain``: train the embedded default model on the synthetic world."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain the embedded SD3-architecture model on the synthetic world"
    )
    p.add_argument("--out", required=True, help="output pipeline directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 6000)")
    p.add_argument(
        "--minutes", type=float, default=None, help="wall-time cap in minutes (default 60)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--save-every", type=int, default=None, help="also save snapshots OUT-stepN every N steps"
    )
    p.add_argument(
        "--init", default=None, help="continue from a saved embedded model (curriculum stage)"
    )
    p.add_argument(
        "--ocr-fraction",
        type=float,
        default=None,
        help="share of OCR prompts per batch (default 0.3)",
    )
    p.add_argument("--warmup", type=int, default=None, help="lr warm-up steps (default 200)")
    p.add_argument("--guidance", dest="guidance_scale", type=float, default=None,
                   help="CFG scale saved as the model's default for sampling (default 3.0)")  # fmt: skip
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from flowopd.cli.common import quiet_libraries
    from flowopd.errors import UserError
    from flowopd.recipes.pretrain import PretrainConfig, pretrain

    quiet_libraries()
    cfg = PretrainConfig(out=args.out, seed=args.seed)
    if args.init:
        from pathlib import Path

        if not (Path(args.init) / "model_index.json").is_file():
            raise UserError(
                f"--init '{args.init}' is not a saved model directory (no model_index.json)"
            )
        cfg.init = args.init
    for key in (
        "steps",
        "minutes",
        "batch_size",
        "lr",
        "save_every",
        "ocr_fraction",
        "warmup",
        "guidance_scale",
    ):
        val = getattr(args, key)
        if val is not None:
            if val <= 0:
                raise UserError(f"--{key.replace('_', '-')} must be > 0, got {val}")
            setattr(cfg, key, val)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pretrain(cfg)
    return 0
