"""``flowopd train ALGO --config FILE.yaml [key=value ...]``: the training recipes."""

from __future__ import annotations

import argparse

from flowopd.algos import ALGOS
from flowopd.algos import load as _load


def register(sub) -> None:
    p = sub.add_parser("train", help="train with a recipe: " + ", ".join(ALGOS))
    add_run_args(p)
    p.set_defaults(handler=run)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The arguments of a training run (shared by ``train`` and ``check``)."""
    p.add_argument("algo", help="algorithm: " + ", ".join(ALGOS))
    p.add_argument(
        "--config", default=None, help="YAML file or packaged preset, e.g. toy/grpo_geneval"
    )
    p.add_argument("--out", default=None, help="output directory (same as output.dir=DIR)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the output dir",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")


def load_run_config(args: argparse.Namespace):
    """The validated config of ``train`` / ``check`` arguments (file, --out, --resume, overrides)."""
    from flowopd.config import load_config
    from flowopd.errors import UserError, unknown
    from flowopd.presets import resolve_config

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
    cls = _load(ALGOS[args.algo][0])
    return load_config(cls, resolve_config(args.config), overrides)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from flowopd.config import dump_config
    from flowopd.preflight import check_run

    cfg = load_run_config(args)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    # `flowopd check`'s validation, before any model loads (torchrun sets WORLD_SIZE)
    plan = check_run(args.algo, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if int(os.environ.get("RANK", "0")) == 0:
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
    from flowopd.engine.distributed import shutdown

    fn = ALGOS[args.algo][1]

    try:
        _load(fn)(cfg)
    finally:
        shutdown()  # destroy the process group before exit (else gloo aborts at teardown)
    return 0
