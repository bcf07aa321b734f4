"""``flowopd serve-reward NAME``: serve a registered reward over HTTP (see rewards/server.py).

flowopd serve-reward ocr --port 18085
flowopd serve-reward geneval --option detector=/models/m2f --option colors=hsv --token s3cret
# then, in training: reward "remote:http://127.0.0.1:18085"
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def register(sub) -> None:
    from flowopd.cli.common import number

    p = sub.add_parser(
        "serve-reward",
        help="serve a registered reward over HTTP (JSON + base64 PNG)",
        description="Serve a registered reward: GET /health, POST /score -> {'scores': [...]}.",
    )
    p.add_argument("name", metavar="NAME", help="registered reward name (e.g. ocr, pickscore)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument(
        "--port",
        type=number(int, 0, 65535),
        default=18085,
        help="port (default 18085; 0 = any free)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' (default: $FLOWOPD_REWARD_TOKEN if set)",
    )
    p.add_argument(
        "--max-batch", type=number(int, 1), default=64, help="most images per request (64)"
    )
    p.add_argument(
        "--max-bytes",
        type=number(int, 1),
        default=64 * 2**20,
        help="largest request body in bytes (64 MiB)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=4096 * 4096,
        help="most pixels (width x height, read from the PNG header before decoding) per "
        "image (4096 x 4096)",
    )
    p.add_argument(
        "--max-threads",
        type=int,
        default=8,
        help="most connections handled at once; others wait, then get a 503 (8)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reward factory option, repeatable; VALUE parsed as JSON when it is valid JSON",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (a module that registers your own rewards); repeatable",
    )
    p.set_defaults(handler=run)


def parse_options(items: list[str]) -> dict:
    """``["workers=4", "backend=tesseract"]`` -> ``{"workers": 4, "backend": "tesseract"}``."""
    from flowopd.errors import UserError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option must be KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    from flowopd.errors import UserError
    from flowopd.rewards import get_reward
    from flowopd.rewards.server import make_server

    if args.name.startswith("remote:"):
        raise UserError("serve-reward serves a local reward; 'remote:' names a client")
    for mod in args.imports:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise UserError(f"--import {mod}: {e}") from None
    token = args.token if args.token is not None else os.environ.get("FLOWOPD_REWARD_TOKEN")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(
            f"warning: serving on {args.host} without --token: anyone who reaches it can use it",
            file=sys.stderr,
        )
    reward = get_reward(args.name, **parse_options(args.option))
    server = make_server(
        reward,
        name=args.name,
        host=args.host,
        port=args.port,
        token=token,
        max_batch=args.max_batch,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        max_threads=args.max_threads,
    )
    print(f"serving reward '{args.name}' on {server.url} (Ctrl-C to stop)", file=sys.stderr)
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
