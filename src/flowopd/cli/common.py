"""Helpers shared by CLI sub-commands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path


def number(
    kind: type = int,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number in [lo, hi] ((lo, hi] with ``lo_open``).

    ``number(int, 1)`` accepts 1, 2, ...; ``number(float, 0, 1, lo_open=True)`` accepts
    (0, 1]. NaN and +-inf are refused, as are values outside the range: argparse then
    reports ``argument --steps: must be an integer >= 1, got '0'`` in one line.
    """
    import math

    noun = "an integer" if kind is int else "a number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        bounds.append(f"<= {hi:g}")
    want = f"{noun} {' and '.join(bounds)}".strip()

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got '{text}'") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and value > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, got '{text}'")
        return value

    parse.__name__ = want  # argparse names the type in its own messages
    return parse


def run_script(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s code; a ``UserError`` (bad path or option) exits with its one
    line, no traceback, as the ``flowopd`` command does."""
    from flowopd.errors import UserError

    try:
        raise SystemExit(main())
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="diffusers pipeline dir or hub id (default: the embedded model)",
    )
    p.add_argument("--backend", default="sd3", help="model backend (default: sd3)")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    p.add_argument("--dtype", default="float32", help="network dtype: float32, bfloat16, float16")


def load_model_from_args(args: argparse.Namespace):
    import torch

    from flowopd.engine.logging import quiet_libraries
    from flowopd.models import load_model
    from flowopd.paths import resolve_model_path

    quiet_libraries()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(
        resolve_model_path(args.model), backend=args.backend, device=device, dtype=args.dtype
    )


def save_png(image, path: Path) -> None:
    """(3, H, W) tensor in [0, 1] -> PNG, written atomically."""
    import numpy as np
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)
