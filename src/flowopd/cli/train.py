"""``flowopd train ALGO --config FILE.yaml [key=value ...]``: the training recipes."""

from __future__ import annotations

import argparse

ALGOS = {
    "grpo": ("flowopd.recipes.grpo_config:GRPOConfig", "flowopd.recipes.grpo:train_grpo"),
    "opd": ("flowopd.recipes.opd_config:OPDConfig", "flowopd.recipes.opd:train_opd"),
    "sft": ("flowopd.recipes.sft_config:SFTConfig", "flowopd.recipes.sft:train_sft"),
    "crd": ("flowopd.recipes.crd_config:CRDConfig", "flowopd.recipes.crd:train_crd"),
}


def register(sub) -> None:
    p = sub.add_parser("train", help="train with a recipe: " + ", ".join(ALGOS))
    p.add_argument("algo", help="algorithm: " + ", ".join(ALGOS))
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("--out", default=None, help="output directory (same as output.dir=DIR)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the output dir",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    p.set_defaults(handler=run)


def _load(spec: str):
    import importlib

    mod, name = spec.split(":")
    return getattr(importlib.import_module(mod), name)


def run(args: argparse.Namespace) -> int:
    from flowopd.config import dump_config, load_config
    from flowopd.errors import UserError, unknown

    if args.algo not in ALGOS:
        raise unknown("algorithm", args.algo, ALGOS)
    for o in args.overrides:
        if "=" not in o:
            raise UserError(f"override '{o}' is not key=value (e.g. train.lr=1e-4)")
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output.dir={args.out}")
    if args.resume:
        overrides.append("output.resume=true")
    cfg_cls, fn = ALGOS[args.algo]
    cfg = load_config(_load(cfg_cls), args.config, overrides)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    from flowopd.engine.distributed import shutdown

    try:
        _load(fn)(cfg)
    finally:
        shutdown()  # destroy the process group before exit (else gloo aborts at teardown)
    return 0
