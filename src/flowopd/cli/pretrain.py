"""``flowopd pretrain``: train the embedded default model on the synthetic world."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from flowopd.cli.common import number

    p = sub.add_parser(
        "pretrain", help="pretrain the embedded SD3-architecture model on the synthetic world"
    )
    p.add_argument("--out", required=True, help="output pipeline directory")
    p.add_argument(
        "--steps", type=number(int, 1), default=None, help="optimizer steps (default 6000)"
    )
    p.add_argument(
        "--minutes",
        type=number(float, 0, lo_open=True),
        default=None,
        help="wall-time cap in minutes (default 60)",
    )
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--batch-size", type=number(int, 1), default=None)
    p.add_argument("--lr", type=number(float, 0, lo_open=True), default=None)
    p.add_argument(
        "--save-every",
        type=number(int, 1),
        default=None,
        help="also save snapshots OUT-stepN every N steps",
    )
    p.add_argument(
        "--init", default=None, help="continue from a saved embedded model (curriculum stage)"
    )
    p.add_argument(
        "--ocr-fraction",
        type=number(float, 0, 1),
        default=None,
        help="share of OCR prompts per batch (default 0.3)",
    )
    p.add_argument(
        "--warmup", type=number(int, 0), default=None, help="lr warm-up steps (default 200)"
    )
    p.add_argument("--caption-noise", default=None, metavar="KIND=P,...",
                   help="caption-noise rates, e.g. counting=0.6,ocr=0.5 (unnamed kinds keep their "
                        "default); 'none' for clean captions (flowopd.world.noise)")  # fmt: skip
    p.add_argument("--tag-weights", default=None, metavar="TAG=W,...",
                   help="GenEval categories' integer weights per batch, e.g. position=2,"
                        "color_attr=2 (unnamed tags weigh 1; default: all equal)")  # fmt: skip
    p.add_argument("--captions", choices=["train", "all"], default="train",
                   help="world split the captions come from: train (default) or all (the test "
                        "split's compositions too; evaluation keeps to the test split)")  # fmt: skip
    p.add_argument("--num-layers", type=number(int, 1), default=None,
                   help="MMDiT layers of a new model (default: the embedded architecture's 4)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--workers", type=number(int, 0), default=0,
                   help="data-rendering processes (default 0)")  # fmt: skip
    p.add_argument("--guidance", dest="guidance_scale", type=number(float, 0), default=None,
                   help="CFG scale saved as the model's default for sampling (default 3.0)")  # fmt: skip
    p.set_defaults(handler=run)


def parse_caption_noise(text: str) -> dict[str, float]:
    """``"counting=0.6,ocr=0.5"`` -> the default rates with those two replaced; ``"none"`` -> {}."""
    from flowopd.errors import UserError
    from flowopd.world.noise import DEFAULT_RATES, check_rates

    if text.strip().lower() == "none":
        return {}
    rates = dict(DEFAULT_RATES)
    for part in filter(None, (x.strip() for x in text.split(","))):
        kind, sep, value = part.partition("=")
        try:
            rates[kind.strip()] = float(value) if sep else float("nan")
        except ValueError:
            raise UserError(
                f"--caption-noise: {part!r} is not KIND=P (e.g. counting=0.6)"
            ) from None
    return check_rates(rates)


def parse_tag_weights(text: str) -> dict[str, int]:
    """``"position=2,color_attr=2"`` -> {tag: weight}; a bad tag or weight is a UserError."""
    from flowopd.errors import UserError
    from flowopd.world.prompts import GENEVAL_TAGS

    weights: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        tag, _, value = (x.strip() for x in part.partition("="))
        if tag not in GENEVAL_TAGS:
            raise UserError(f"--tag-weights: unknown tag {tag!r}; tags: {', '.join(GENEVAL_TAGS)}")
        if not value.isdigit():
            raise UserError(f"--tag-weights: {part!r} is not TAG=W with an integer W >= 0")
        weights[tag] = int(value)
    if weights and not any(weights.get(t, 1) for t in GENEVAL_TAGS):
        raise UserError("--tag-weights: every tag has weight 0; give one a weight >= 1")
    return weights


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from flowopd.engine.logging import quiet_libraries
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
    if args.caption_noise is not None:
        cfg.caption_noise = parse_caption_noise(args.caption_noise)
    if args.tag_weights is not None:
        cfg.tag_weights = parse_tag_weights(args.tag_weights)
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    cfg.device, cfg.workers, cfg.captions = args.device, args.workers, args.captions
    if args.num_layers is not None:
        if args.num_layers < 1:
            raise UserError(f"--num-layers must be >= 1, got {args.num_layers}")
        cfg.arch = dataclasses.replace(cfg.arch, num_layers=args.num_layers)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pretrain(cfg)
    return 0
