"""``flowopd presets [NAME]``: the YAML presets shipped in the package, with their purpose.

Any ``--config`` takes a preset's name (``toy/grpo_geneval``) as well as a file; with a
NAME, this prints the preset's YAML, to copy and edit.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("presets", help="list the packaged configs (--config NAME takes them)")
    p.add_argument("name", nargs="?", default=None, help="print this preset's YAML instead")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from flowopd.errors import unknown
    from flowopd.presets import list_presets, preset_path, preset_text

    presets = list_presets()
    if args.name is not None:
        path = preset_path(args.name)
        if path is None:
            raise unknown("preset", args.name, [p.name for p in presets])
        print(preset_text(path), end="")
        return 0
    width = max(len(p.name) for p in presets)
    for p in presets:
        print(f"{p.name:<{width}}  {p.purpose}")
    return 0
