"""Writing evaluation results: metrics.json, a printed table, image grids with prompts."""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """One block per benchmark: overall (+- its standard error) first, then categories."""
    lines = []
    for bench, vals in metrics.items():
        se = vals.get("overall_se")
        lines.append(f"{bench:<14} overall {vals['overall']:.3f}" + (f" +- {se:.3f}" if se else ""))
        for k, v in vals.items():
            if k not in ("overall", "overall_se"):
                lines.append(f"  {k:<20} {v:.3f}")
    return "\n".join(lines)


def image_grid(
    images: Tensor,
    captions: Sequence[str] | None = None,
    *,
    cols: int = 8,
    scale: int = 3,
    caption_width: int = 18,
) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (rows * (H*scale + caption), cols * W*scale, 3) uint8 grid."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    cell_w, cell_h = w * scale + 4, h * scale
    cap_h = 0
    lines_per = []
    if captions is not None:
        lines_per = [textwrap.wrap(c, max(8, cell_w // 6))[:3] for c in captions]
        cap_h = 11 * max((len(x) for x in lines_per), default=1) + 4
    canvas = Image.new("RGB", (cols * cell_w, rows * (cell_h + cap_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = c * cell_w + 2, r * (cell_h + cap_h + 4)
        tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (x, y))
        for j, line in enumerate(lines_per[i] if captions is not None else []):
            draw.text((x, y + cell_h + 2 + 11 * j), line, fill=(0, 0, 0))
    del caption_width
    return np.asarray(canvas)


def save_grid(
    path: str | Path, images: Tensor, captions: Sequence[str] | None = None, **kw
) -> None:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image_grid(images, captions, **kw)).save(tmp, format="PNG")
    os.replace(tmp, path)
