"""Ground-truth renders: determinism, exact layouts, the font and the palette."""

from __future__ import annotations

import itertools
import time
from collections import Counter

import numpy as np
import pytest
import torch

from flowopd.world.font import CHARSET, GLYPHS, text_mask, text_size
from flowopd.world.prompts import make_records, ocr_record
from flowopd.world.render import GAP, SIZES, draw, draw_text, layout, render_batch, shape_mask
from flowopd.world.spec import BACKGROUND, INK, OPPOSITE, PALETTE, relative_position


def test_palette_is_well_separated():
    cols = {**PALETTE, "white": BACKGROUND, "black": INK}
    for (a, ca), (b, cb) in itertools.combinations(cols.items(), 2):
        d = float(np.linalg.norm(np.subtract(ca, cb)))
        assert d >= 0.8, (a, b, d)


def test_font_glyphs_fill_their_cell_and_letters_are_distinct():
    for ch, g in GLYPHS.items():
        assert g.shape == (5, 3)
        # touches all four sides: a glyph's ink box is its whole cell (the reader relies on it)
        assert g[0].any() and g[-1].any() and g[:, 0].any() and g[:, -1].any(), ch
    for a, b in itertools.combinations(CHARSET, 2):
        diff = int((GLYPHS[a] != GLYPHS[b]).sum())
        assert diff >= (1 if a.isdigit() and b.isdigit() else 2), (a, b)
    m = text_mask("4A7")
    # 3 glyphs of 3 cells + 2 one-cell gaps = 11 cells wide, x2
    assert m.shape == text_size("4A7") == (10, 22)
    assert not m[:, 6:8].any()  # the gap after the first glyph is blank


def test_render_batch_shape_range_and_determinism():
    recs = make_records("geneval", "train", 24, seed=0) + make_records("ocr", "train", 8, seed=0)
    x = render_batch(recs, seed=5)
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, render_batch(recs, seed=5))
    assert not torch.equal(x, render_batch(recs, seed=6))  # free colours vary
    # a render depends on (seed, index, record) only, not on the rest of the batch
    y = render_batch([recs[3], recs[1]], seed=5)
    assert torch.equal(y[1], x[1])
    # every pixel is exactly white, black ink or a palette colour
    allowed = torch.tensor([BACKGROUND, INK, *PALETTE.values()])  # (K, 3)
    pix = x.permute(0, 2, 3, 1).reshape(-1, 3)
    assert ((pix[:, None] - allowed).abs().amax(-1) < 1e-6).any(1).all()
    assert (pix == 1).all(1).float().mean() > 0.7  # white background


def test_layouts_respect_counts_colours_relations_and_spacing():
    rng = np.random.default_rng(0)
    for rec in make_records("geneval", "train", 600, seed=1):
        objs = layout(rec, rng)
        want = Counter()
        for it in rec["include"]:
            want[it["class"]] += it["count"]
            if "color" in it:
                assert (
                    sum(o.color == it["color"] and o.shape == it["class"] for o in objs)
                    == it["count"]
                )
        assert Counter(o.shape for o in objs) == want
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert min(x0, y0) >= 0 and max(x1, y1) <= 32
            assert x1 - x0 == y1 - y0 == (16 if len(objs) == 1 else 12) and x1 - x0 in SIZES
        for a, b in itertools.combinations(objs, 2):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
            assert ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0
        if rec["tag"] == "position":
            rel = rec["include"][1]["position"][0]
            ref, obj = objs
            assert relative_position(obj.box, ref.box) == {rel}
            assert relative_position(ref.box, obj.box) == {OPPOSITE[rel]}


def test_places_are_fixed_and_follow_the_order_the_prompt_names_objects():
    # "a red circle and a blue triangle": the circle left, the triangle right, middle row
    rec = next(r for r in make_records("geneval", "train", 60, seed=0, tags=["color_attr"]))
    a, b = rec["include"]
    for seed in range(5):
        left, right = layout(rec, np.random.default_rng(seed))
        assert (left.shape, left.color, right.shape, right.color) == (
            a["class"], a["color"], b["class"], b["color"])  # fmt: skip
        assert left.box == (2, 10, 14, 22) and right.box == (18, 10, 30, 22)
    # only the colours the prompt leaves open vary with the draw
    for rec in make_records("geneval", "train", 120, seed=2):
        boxes = {tuple(o.box for o in layout(rec, np.random.default_rng(s))) for s in range(4)}
        assert len(boxes) == 1, rec["prompt"]
    centres = {n: [((x0 + x1) // 2, (y0 + y1) // 2) for x0, y0, x1, y1 in
                   (o.box for o in layout(_count_record(n), np.random.default_rng(0)))]
               for n in (2, 3, 4)}  # fmt: skip
    assert centres == {
        2: [(8, 16), (24, 16)],
        3: [(8, 8), (24, 8), (16, 24)],
        4: [(8, 8), (24, 8), (8, 24), (24, 24)],
    }


def test_position_pairs_keep_the_reference_in_its_corner():
    """World v5: A (the reference) in the top-left cell for "right of" / "below", in the
    bottom-right one for "left of" / "above"; B in the neighbouring cell the relation names."""
    want = {"right of": ((8, 8), (24, 8)), "below": ((8, 8), (8, 24)),
            "left of": ((24, 24), (8, 24)), "above": ((24, 24), (24, 8))}  # fmt: skip
    for rec in make_records("geneval", "train", 48, seed=0, tags=["position"]):
        ref, obj = layout(rec, np.random.default_rng(0))
        centres = tuple(((x0 + x1) // 2, (y0 + y1) // 2) for x0, y0, x1, y1 in (ref.box, obj.box))
        assert centres == want[rec["include"][1]["position"][0]], rec["prompt"]


def test_text_is_left_aligned():
    for text in ("A7C", "47", "A"):
        cols = np.nonzero((draw_text(text) < 0.5).any(axis=(0, 1)))[0]
        assert cols.min() == 4 and cols.max() == 4 + 8 * len(text) - 3


def _count_record(n: int) -> dict:
    return next(
        r
        for r in make_records("geneval", "train", 200, seed=0, tags=["counting"])
        if r["include"][0]["count"] == n
    )


def test_drawn_pixels_match_the_layout():
    rec = make_records("geneval", "train", 6, seed=0, tags=["color_attr"])[0]
    objs = layout(rec, np.random.default_rng(0))
    img = draw(objs)  # (3, 32, 32)
    for o in objs:
        x0, y0, x1, y1 = o.box
        m = shape_mask(o.shape, x1 - x0)
        patch = img[:, y0:y1, x0:x1]
        assert np.allclose(patch[:, m].T, PALETTE[o.color])
        assert np.allclose(patch[:, ~m], 1.0)
    n_obj = sum(int(shape_mask(o.shape, o.box[2] - o.box[0]).sum()) for o in objs)
    assert int((img != 1).any(0).sum()) == n_obj


def test_text_render_is_the_font_mask():
    img = render_batch([ocr_record("4A7")], seed=0)[0].numpy()
    ink = (img == 0).all(0)
    ys, xs = np.nonzero(ink)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert np.array_equal(crop, text_mask("4A7"))


def test_shape_masks():
    assert shape_mask("square", 8).all()
    circle, tri = shape_mask("circle", 8), shape_mask("triangle", 8)
    assert not circle[0, 0] and circle[4, 4] and 0.7 < circle.mean() < 0.85
    assert tri[-1].all() and tri[0].sum() <= 2 and 0.5 < tri.mean() < 0.7
    with pytest.raises(KeyError):
        shape_mask("hexagon", 8)


def test_render_is_fast():
    recs = make_records("geneval", "train", 1000, seed=0)
    t = time.perf_counter()
    render_batch(recs, seed=0)
    assert time.perf_counter() - t < 3.0  # ~6,000 / s on one core; generous for a shared CPU
