"""Ground-truth renders of world records: flat shapes or black text on white, 32x32.

Variety (the only "augmentation", kept small so a tiny pixel-space model can learn the
world and render it cleanly): every render draws positions and the colours of objects the
prompt leaves uncoloured, and a lone object's size (12 or 16 px); pairs are 12 px and 3-4
objects 8 px; text is placed at a random offset. Edges are hard
(no anti-aliasing) so every pixel is exactly a palette colour, white or ink.

Everything sits on a 4 px grid (``GRID``): box corners, sizes and text offsets are
multiples of 4, the embedded model's patch size. Each image token then covers a whole
cell of one object (a disc quadrant, a triangle edge, two by two font cells) instead of
any of 16 sub-patch phases. Measured at equal steps: pretraining loss 0.049 against 0.089
off the grid at step 1,500; the shipped base scores toy-OCR 0.65 (README).
Positions, counts, relations and colours keep all their variety.

Layout guarantees, which the exact scorers rely on:
- objects never overlap and are separated by >= 4 px (one grid cell) and lie inside the
  image;
- a ``position`` pair satisfies GenEval's relation with margin: along the named axis the
  normalised revised offset is >= 0.8, across it the centres differ by <= 2 px;
- counts are exact, so a counting record also satisfies its ``exclude``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from flowopd.world.font import text_mask
from flowopd.world.spec import BACKGROUND, COLORS, IMAGE_SIZE, INK, PALETTE, relative_position

GRID = 4  # px; box corners, object sizes and text offsets are multiples of it
SIZES_SINGLE = (12, 16)  # object side in px, for a lone object
SIZES_PAIR = (12,)  # for 2 objects (two 12 px boxes and a gap fit side by side)
SIZES_CROWDED = (8,)  # for 3-4 objects
SIZES = (8, 12, 16)  # every size drawn
GAP = GRID  # min blank px between two objects' boxes
MARGIN = 0  # min blank px to the image border
_TRIES = 200


@dataclass(frozen=True)
class WorldObject:
    """One drawn object; ``box = (x0, y0, x1, y1)`` in px, exclusive ends (x1 - x0 = size)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]


@cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape filling its box (sampled at pixel centres).

    circle: disc of diameter ``size``; square: the full box; triangle: apex at the top
    centre, base on the bottom row (always upright, so it is told apart from a circle by
    its low centre of mass as well as its fill ratio ~0.6).
    """
    c = np.arange(size) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    r = size / 2
    if shape == "circle":
        m = (x - r) ** 2 + (y - r) ** 2 <= r * r
    elif shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "triangle":
        m = np.abs(x - r) <= y / 2 + 0.35  # half-width grows from 0 (top) to r (bottom)
    else:
        raise KeyError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


def _separated(box: tuple[int, ...], others: list[tuple[int, ...]]) -> bool:
    x0, y0, x1, y1 = box
    return all(
        x1 + GAP <= a0 or a1 + GAP <= x0 or y1 + GAP <= b0 or b1 + GAP <= y0
        for a0, b0, a1, b1 in others
    )


def _grid_offset(extent: int, rng: np.random.Generator, size: int = 1) -> np.ndarray:
    """Random multiples of GRID in [MARGIN, IMAGE_SIZE - MARGIN - extent]."""
    lo = -(-MARGIN // GRID)
    hi = (IMAGE_SIZE - MARGIN - extent) // GRID
    if hi < lo:
        raise ValueError(f"{extent} px do not fit in a {IMAGE_SIZE}px image")
    return GRID * rng.integers(lo, hi + 1, size=size)


def _random_box(size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    x0, y0 = (int(v) for v in _grid_offset(size, rng, 2))
    return x0, y0, x0 + size, y0 + size


def _scatter(sizes: list[int], rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Non-overlapping boxes by rejection sampling; shrinks the objects if it gets stuck."""
    for _ in range(20):
        boxes: list[tuple[int, int, int, int]] = []
        for s in sizes:
            for _ in range(_TRIES):
                box = _random_box(s, rng)
                if _separated(box, boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
        sizes = [min(SIZES)] * len(sizes)
    raise RuntimeError(f"cannot place {len(sizes)} objects in a {IMAGE_SIZE}px image")


def _place_pair(
    s_ref: int, s_obj: int, rel: str, rng: np.random.Generator
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Grid boxes (reference, object) with the object ``rel`` of the reference, with margin:
    GenEval's relation holds, the normalised offset along its axis is >= 0.8 and across
    it the centres differ by <= 2 px."""
    axis = 0 if rel in ("left of", "right of") else 1
    offsets = range(-(-MARGIN // GRID) * GRID, IMAGE_SIZE - MARGIN - s_obj + 1, GRID)
    for _ in range(_TRIES):
        ref = _random_box(s_ref, rng)
        ok = []
        for x0 in offsets:
            for y0 in offsets:
                obj = (x0, y0, x0 + s_obj, y0 + s_obj)
                # centres (doubled) across the relation's axis differ by <= 2 px
                if abs((ref[1 - axis] + ref[3 - axis]) - (obj[1 - axis] + obj[3 - axis])) > 4:
                    continue
                if (
                    _separated(obj, [ref])
                    and relative_position(obj, ref) == {rel}
                    and _margin_ok(obj, ref, rel)
                ):
                    ok.append(obj)
        if ok:
            return ref, ok[int(rng.integers(len(ok)))]
    raise RuntimeError(f"cannot place a pair {rel!r}")  # pragma: no cover


def _margin_ok(obj: tuple[int, ...], ref: tuple[int, ...], rel: str) -> bool:
    """GenEval's normalised revised offset along the relation's axis is >= 0.8."""
    bo, br = np.array(obj, float), np.array(ref, float)
    off = (bo[:2] + bo[2:]) / 2 - (br[:2] + br[2:]) / 2
    dims = (bo[2:] - bo[:2]) + (br[2:] - br[:2])
    rev = np.maximum(np.abs(off) - 0.1 * dims, 0) / np.linalg.norm(off)
    return rev[0 if rel in ("left of", "right of") else 1] >= 0.8


def layout(record: dict, rng: np.random.Generator) -> list[WorldObject]:
    """Random objects realising a GenEval-style record's ``include`` (exact counts)."""
    items = record["include"]
    colours = list(COLORS)
    objs: list[tuple[str, str]] = [
        (item["class"], item.get("color") or colours[int(rng.integers(len(colours)))])
        for item in items
        for _ in range(int(item["count"]))
    ]
    choices = {1: SIZES_SINGLE, 2: SIZES_PAIR}.get(len(objs), SIZES_CROWDED)
    sizes = [int(choices[i]) for i in rng.integers(len(choices), size=len(objs))]
    rel_items = [i for i, item in enumerate(items) if "position" in item]
    if rel_items:
        # GenEval position records: two single objects, include[1] relative to include[0]
        if len(items) != 2 or len(objs) != 2 or rel_items != [1]:
            raise ValueError("position records must have two single objects, the second placed")
        rel, target = items[1]["position"]
        if target != 0 or rel not in ("left of", "right of", "above", "below"):
            raise ValueError(f"unsupported position {items[1]['position']!r}")
        boxes = list(_place_pair(sizes[0], sizes[1], rel, rng))
    else:
        boxes = _scatter(sizes, rng)
    return [WorldObject(shape, color, box) for (shape, color), box in zip(objs, boxes, strict=True)]


def draw(objects: list[WorldObject]) -> np.ndarray:
    """Draw objects on white: (3, 32, 32) float32 in [0, 1]."""
    img = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    img[:] = np.array(BACKGROUND, dtype=np.float32)[:, None, None]
    for o in objects:
        x0, y0, x1, y1 = o.box
        m = shape_mask(o.shape, x1 - x0)
        for ch, v in enumerate(PALETTE[o.color]):
            img[ch, y0:y1, x0:x1][m] = v
    return img


def draw_text(text: str, rng: np.random.Generator) -> np.ndarray:
    """``text`` in the bitmap font, black on white at a random offset: (3, 32, 32) float32."""
    m = text_mask(text)
    h, w = m.shape
    if h + 2 * MARGIN > IMAGE_SIZE or w + 2 * MARGIN > IMAGE_SIZE:
        raise ValueError(f"text {text!r} does not fit in {IMAGE_SIZE}px")
    y0, x0 = int(_grid_offset(h, rng)[0]), int(_grid_offset(w, rng)[0])
    img = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    img[:] = np.array(BACKGROUND, dtype=np.float32)[:, None, None]
    for ch, v in enumerate(INK):
        img[ch, y0 : y0 + h, x0 : x0 + w][m] = v
    return img


def render(record: dict, rng: np.random.Generator) -> np.ndarray:
    """Ground-truth image of a record: (3, 32, 32) float32 in [0, 1].

    OCR records (``"text"`` key) draw their text; GenEval records their ``include``.
    """
    if "text" in record:
        return draw_text(record["text"], rng)
    if "include" in record:
        return draw(layout(record, rng))
    raise ValueError(f"cannot render a record with keys {sorted(record)}")


def render_batch(records: list[dict], seed: int = 0) -> torch.Tensor:
    """Render records into a (B, 3, 32, 32) float32 tensor in [0, 1].

    Record ``i`` uses ``np.random.default_rng([seed, i])``, so a render depends only on
    ``(seed, i, record)``, not on the rest of the batch.
    """
    if not records:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = np.stack([render(r, np.random.default_rng([seed, i])) for i, r in enumerate(records)])
    return torch.from_numpy(out)
