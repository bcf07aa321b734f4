"""``flowopd data``: prepare prompt data in the published formats.

flowopd data geneval-train --out data/geneval/train.jsonl [--n 10000 --seed 0]
"""

from __future__ import annotations

import argparse
import sys

MAX_DRAWS = 1_000_000  # draws per tag: beyond this nearly every draw repeats a kept prompt


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="prepare training prompt files")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    p.set_defaults(handler=lambda args: _usage(p))

    g = sub.add_parser(
        "geneval-train",
        help="GenEval-style training metadata (JSONL), disjoint from the GenEval test prompts",
        description="Draws prompts with GenEval's own generator (80 COCO classes, 10 colours, "
        "counts 2-4, 4 relations) and drops every prompt that matches a GenEval test prompt "
        "up to object order. All 80 single-object prompts are test prompts, so none is written.",
    )
    g.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
    g.add_argument("--n", type=int, default=10_000,
                   help="draws per tag, as GenEval's --num-prompts, before repeats and test "
                        "prompts are removed (default 10000: ~16,500 prompts)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    g.add_argument("--exclude", action="append", default=[],
                   help="GenEval metadata JSONL whose prompts must also be left out (repeatable)")  # fmt: skip
    g.set_defaults(handler=_geneval_train)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _geneval_train(args: argparse.Namespace) -> int:
    from flowopd.data.geneval_train import geneval_train, tag_counts
    from flowopd.data.prompts import read_prompt_file
    from flowopd.data.text import write_jsonl
    from flowopd.errors import UserError

    if not 1 <= args.n <= MAX_DRAWS:
        raise UserError(
            f"--n must be in [1, {MAX_DRAWS}], got {args.n} (draws per tag; GenEval's whole "
            "prompt space is ~285,000 prompts up to object order)"
        )
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    exclude = [r for path in args.exclude for r in read_prompt_file(path, format="geneval")]
    records = geneval_train(args.n, args.seed, exclude)
    if not records:
        raise UserError("no prompt left after removing the test prompts; raise --n")
    write_jsonl(args.out, records)
    counts = ", ".join(f"{t} {k}" for t, k in tag_counts(records).items())
    print(f"wrote {len(records)} GenEval training prompts to {args.out} ({counts})")
    return 0
