"""``flowopd demo [--out DIR]``: the Flow-OPD pipeline on the embedded model in minutes.

The same run as ``make demo``: ``flowopd pipeline toy/demo --out runs/demo`` (DiffusionNFT
teachers -> merged cold start -> Flow-OPD -> eval -> report), on CPU from an installed
wheel. Idempotent: finished stages are skipped when rerun with the same DIR.
"""

from __future__ import annotations

import argparse

DEMO_PRESET = "toy/demo"
DEMO_OUT = "runs/demo"


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the Flow-OPD demo on the embedded model (what `make demo` runs)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--out", default=DEMO_OUT, help=f"output directory (default: {DEMO_OUT})")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline config")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from flowopd.cli import pipeline

    ns = argparse.Namespace(
        config=DEMO_PRESET, out=args.out, budget="full", overrides=list(args.overrides)
    )
    return pipeline.run(ns)
