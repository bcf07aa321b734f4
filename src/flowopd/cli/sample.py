"""``flowopd sample``: images from a model (optionally with LoRA adapters) to PNG files."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from flowopd.cli.common import add_model_args, load_model_from_args, save_png


def register(sub) -> None:
    from flowopd.cli.common import number

    p = sub.add_parser("sample", help="sample images to PNG files")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        help="LoRA dir (diffusers format); repeatable, weights summed",
    )
    p.add_argument("--steps", type=number(int, 1), default=40, help="sampling steps (default 40)")
    p.add_argument("--guidance", type=number(float, 0), default=None,
                   help="CFG scale (default: the model's own, from its flowopd.json; else 4.5)")  # fmt: skip
    p.add_argument("--kind", default="ode", choices=["ode", "sde", "cps"])
    p.add_argument("--noise-level", type=number(float, 0), default=0.7)
    p.add_argument("--n", type=number(int, 1), default=1, help="images per prompt")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--resolution", type=number(int, 8), default=None)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:60] or "prompt"


def warn_outside_world(model: str | None, prompts: list[str]) -> None:
    """One line on stderr per prompt a world-pretrained model (the embedded one, or any
    ``flowopd pretrain`` output) never saw a caption like: its image there is noise."""
    import json
    import sys

    from flowopd.models.backend import FLOWOPD_META
    from flowopd.paths import resolve_model_path
    from flowopd.world.prompts import in_grammar

    meta = Path(resolve_model_path(model)) / FLOWOPD_META
    if not meta.is_file() or json.loads(meta.read_text()).get("kind") != "flowopd-embedded":
        return
    for prompt in dict.fromkeys(prompts):
        if not in_grammar(prompt):
            print(
                f"warning: {prompt!r} is outside the synthetic world this model was trained "
                "on (e.g. 'a photo of a red circle and a blue square', 'a photo of a circle "
                "left of a square', 'a sign that says \"47\"'); expect an arbitrary image",
                file=sys.stderr,
            )


def run(args: argparse.Namespace) -> int:
    import torch

    from flowopd.errors import UserError
    from flowopd.sampling import sample

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    for pr in args.prompt:
        if not pr.strip():
            raise UserError("empty --prompt; give the text to render, e.g. --prompt 'a red circle'")
    warn_outside_world(args.model, args.prompt)
    model = load_model_from_args(args)
    names = []
    for i, path in enumerate(args.lora):
        model.load_adapter(path, f"lora{i}")
        names.append(f"lora{i}")
    if len(names) == 1:
        model.set_adapter(names[0])
    elif names:
        model.transformer.set_adapters(names)  # several LoRAs: their deltas add up
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    gen = torch.Generator().manual_seed(args.seed)
    res = sample(model, prompts, args.steps, kind=args.kind, noise_level=args.noise_level,
                 guidance_scale=model.default_guidance_scale if args.guidance is None else args.guidance, generator=gen, resolution=args.resolution, record=False, progress=True)  # fmt: skip
    for i, (prompt, image) in enumerate(zip(prompts, res.images, strict=True)):
        path = out / f"{i:04d}_{_slug(prompt)}.png"
        save_png(image, path)
        print(path)
    return 0
