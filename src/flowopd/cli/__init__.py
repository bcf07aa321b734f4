"""The ``flowopd`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``handler=fn(args) -> int``.
Handlers import heavy libraries (torch, diffusers) lazily so ``flowopd --help`` is fast.
User errors (``UserError``) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Sub-command modules, in the order they appear in --help. Add one line per new module.
COMMAND_MODULES = [
    "flowopd.cli.sample",
    "flowopd.cli.pretrain",
    "flowopd.cli.eval",
    "flowopd.cli.train",
    "flowopd.cli.check",
    "flowopd.cli.estimate",
    "flowopd.cli.merge",
    "flowopd.cli.pipeline",
    "flowopd.cli.demo",
    "flowopd.cli.presets",
    "flowopd.cli.serve_reward",
    "flowopd.cli.world",
    "flowopd.cli.data",
]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (``error: ...; see flowopd CMD --help``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="flowopd",
        description="Post-train flow-matching text-to-image models: Flow-GRPO, Flow-OPD, CRD, "
        "DiffusionNFT, AWM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flowopd.errors import UserError

    parser = build_parser()
    # key=value overrides may follow options (argparse cannot interleave positionals)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is not None and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if os.environ.get("FLOWOPD_DEBUG_EXIT"):
            sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
