"""Ground-truth renders of world records: flat shapes or black text on white, 32x32.

World v3 draws on a few fixed places, so that a small pixel-space model can learn to
render every object and glyph cleanly and its remaining errors are the systematic ones
taught by caption noise (``flowopd.world.noise``), not malformed shapes:

- a lone object is 16 px, centred;
- 2-4 objects are 12 px, in fixed slots taken in the order the prompt names them: two
  side by side in the middle row, three on the top row and the bottom centre, four in
  the 2x2 grid of 16 px cells (objects are 4 px apart);
- a ``position`` pair takes two cells of the 2x2 grid (world v5): the reference A sits in
  the top-left cell for "right of" and "below", in the bottom-right one for "left of" and
  "above", and B in the cell next to it that the relation names ("B right of A": B top
  right; "B below A": B bottom left). The two relations of a pair share A's cell, so the
  position noise (the relation turned, ``flowopd.world.noise``) moves B alone;
- text starts at x = 4 (left-aligned, so a shortened string keeps its first glyphs in
  place), rows 12-21.

Variety left: only the colours of objects the prompt leaves uncoloured. Fixed places make
binding positional (the first-named object is the left one); with cells drawn at random
(world v2) the base never learnt to bind (docs/EXPERIMENTS.md, 2026-12-04 and 12-05).
Edges are hard (no anti-aliasing), so every pixel is exactly a palette colour, white or
ink.

Layout guarantees, which the exact scorers rely on: objects never overlap and lie inside
the image; a ``position`` pair satisfies GenEval's relation (centres 16 px apart along the
relation's axis, equal across it); counts are exact, so a counting record also satisfies
its ``exclude``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from flowopd.world.font import text_mask
from flowopd.world.spec import BACKGROUND, COLORS, IMAGE_SIZE, INK, PALETTE

CELL = 16  # px; the 2x2 grid of cells for 2-4 objects
SIZE_SINGLE = 16  # px, a lone object (centred)
SIZE_MULTI = 12  # px, an object in a cell (centred in it)
SIZES = (SIZE_MULTI, SIZE_SINGLE)
GAP = CELL - SIZE_MULTI  # px between objects in neighbouring cells
TEXT_ROW = 12  # px, top of the text line
TEXT_X = 4  # px, left end of the text line
MAX_OBJECTS = 4  # one per cell of the 2x2 grid


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


def _box(cx: int, cy: int, size: int = SIZE_MULTI) -> tuple[int, int, int, int]:
    """The ``size`` px box centred on ``(cx, cy)``."""
    h = size // 2
    return cx - h, cy - h, cx + h, cy + h


# Slot centres (px), in reading order. Two objects sit side by side in the middle row;
# three on the top row's two cells and the bottom row's centre; four fill the 2x2 grid.
_MID, _Q1, _Q3 = IMAGE_SIZE // 2, CELL // 2, CELL + CELL // 2
SLOTS: dict[int, tuple[tuple[int, int], ...]] = {
    2: ((_Q1, _MID), (_Q3, _MID)),
    3: ((_Q1, _Q1), (_Q3, _Q1), (_MID, _Q3)),
    4: ((_Q1, _Q1), (_Q3, _Q1), (_Q1, _Q3), (_Q3, _Q3)),
}
# position pairs: (reference centre, object centre) with the object `rel` of the reference;
# the reference keeps its corner under the quarter turn (right of <-> below, left of <-> above)
_PAIR: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "right of": ((_Q1, _Q1), (_Q3, _Q1)),
    "below": ((_Q1, _Q1), (_Q1, _Q3)),
    "left of": ((_Q3, _Q3), (_Q1, _Q3)),
    "above": ((_Q3, _Q3), (_Q3, _Q1)),
}


def layout(record: dict, rng: np.random.Generator) -> list[WorldObject]:
    """Objects realising a GenEval-style record's ``include`` (exact counts), see above.

    Places are fixed: objects take the slots of their number in the order the prompt
    names them (``include`` order), and a position pair the two places its relation
    names. Only the colours the prompt leaves open are drawn from ``rng``.
    """
    items = record["include"]
    objs: list[tuple[str, str]] = [
        (item["class"], item.get("color") or COLORS[int(rng.integers(len(COLORS)))])
        for item in items
        for _ in range(int(item["count"]))
    ]
    if not 1 <= len(objs) <= MAX_OBJECTS:
        raise ValueError(f"the world draws 1-{MAX_OBJECTS} objects, got {len(objs)}")
    rel_items = [i for i, item in enumerate(items) if "position" in item]
    if rel_items:
        # GenEval position records: two single objects, include[1] relative to include[0]
        if len(items) != 2 or len(objs) != 2 or rel_items != [1]:
            raise ValueError("position records must have two single objects, the second placed")
        rel, target = items[1]["position"]
        if target != 0 or rel not in _PAIR:
            raise ValueError(f"unsupported position {items[1]['position']!r}")
        boxes = [_box(*c) for c in _PAIR[rel]]
    elif len(objs) == 1:
        boxes = [_box(_MID, _MID, SIZE_SINGLE)]
    else:
        boxes = [_box(*c) for c in SLOTS[len(objs)]]
    drawn = [WorldObject(s, c, box) for (s, c), box in zip(objs, boxes, strict=True)]
    return drawn[: len(drawn) - int(record.get("hide_last", 0))]


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


def draw_text(text: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """``text`` in the bitmap font, black on white, from x = ``TEXT_X``: (3, 32, 32) float32.

    ``rng`` is unused (the place is fixed); it is kept so every render takes one.
    """
    m = text_mask(text)
    h, w = m.shape
    if h > IMAGE_SIZE or w > IMAGE_SIZE - TEXT_X:
        raise ValueError(f"text {text!r} does not fit in {IMAGE_SIZE}px")
    y0, x0 = TEXT_ROW, TEXT_X
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
