"""``flowopd merge``: average teacher LoRAs into one (Flow-OPD's merge cold start)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from flowopd.cli.common import number

    p = sub.add_parser(
        "merge", help="merge teacher LoRAs into a student cold start (ab_mean, delta or sum)"
    )
    p.add_argument("--teachers", nargs="+", required=True, help="teacher LoRA dirs")
    p.add_argument(
        "--weights", nargs="+", type=number(float, 0), default=None,
        help="one weight per teacher (ab_mean, delta: normalised to sum 1, default equal; "
        "sum: as given, default 1)",
    )  # fmt: skip
    p.add_argument(
        "--method", default="ab_mean", choices=["ab_mean", "delta", "sum"],
        help="ab_mean: average lora_A and lora_B separately (the published code); delta: "
        "average B@A exactly and re-factorise by truncated SVD; sum: add the teachers' "
        "whole B@A (task arithmetic; --weights as given) (default ab_mean)",
    )  # fmt: skip
    p.add_argument(
        "--rank", type=number(int, 1), default=None,
        help="output rank of --method delta (default: the teachers' rank; exact when >= "
        "the sum of their ranks) or sum (default: the sum of their ranks)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output LoRA dir (diffusers format)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from flowopd.engine.logging import quiet_libraries
    from flowopd.models.merge import merge_loras

    quiet_libraries()
    _, report = merge_loras(
        args.teachers, method=args.method, weights=args.weights, rank=args.rank, out=args.out
    )
    print(f"{report.summary()}; wrote {args.out} (with merge.json)")
    return 0
