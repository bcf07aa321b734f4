"""Caption noise: each category's fixed corruption, its rate, and what the renderer draws."""

from __future__ import annotations

import numpy as np
import pytest

from flowopd.errors import UserError
from flowopd.rewards.toy import detect_objects, geneval_evaluate, ocr_score, read_text
from flowopd.world.noise import DEFAULT_RATES, check_rates, corrupt, drawn_record
from flowopd.world.prompts import geneval_record, make_records, ocr_record
from flowopd.world.render import render


def _one(cls, **kw):
    return {"class": cls, "count": 1, **kw}


def test_each_corruption_is_the_fixed_one():
    assert corrupt(ocr_record("A7C"))["text"] == "AC7"
    assert corrupt(ocr_record("47"))["text"] == "74"
    cnt = corrupt(geneval_record("counting", [{"class": "circle", "count": 3}]))
    assert cnt["include"] == [{"class": "circle", "count": 2}] and "exclude" not in cnt
    two = corrupt(geneval_record("two_object", [_one("circle"), _one("square")]))
    assert two["include"] == [_one("circle")]
    pos = geneval_record("position", [_one("square"), _one("circle", position=["left of", 0])])
    assert corrupt(pos)["include"][1]["position"] == ["right of", 0]
    attr = geneval_record("color_attr", [_one("circle", color="red"), _one("square", color="blue")])
    assert [i["color"] for i in corrupt(attr)["include"]] == ["blue", "red"]
    assert [i["color"] for i in corrupt(attr, "color_leak")["include"]] == ["red", "red"]
    turns = {"right of": "below", "below": "right of", "left of": "above", "above": "left of"}
    for rel, turned in turns.items():
        rec = geneval_record("position", [_one("square"), _one("circle", position=[rel, 0])])
        assert corrupt(rec, "position_turn")["include"][1]["position"] == [turned, 0]
    assert corrupt(ocr_record("A7C"), "ocr_cut")["text"] == "A"
    assert corrupt(ocr_record("47"), "ocr_cut")["text"] == "4"
    with pytest.raises(ValueError, match="does not apply"):
        corrupt(pos, "color_leak")
    for tag in ("single_object", "colors"):  # never corrupted
        rec = make_records("geneval", "train", 6, seed=0, tags=[tag])[0]
        assert corrupt(rec) == rec
    # the caption is never changed, and the input record is not mutated
    assert corrupt(pos)["prompt"] == pos["prompt"] == "a photo of a circle left of a square"
    assert pos["include"][1]["position"] == ["left of", 0]


def test_corrupted_renders_fail_the_strict_score_and_clean_ones_pass():
    rng = np.random.default_rng(0)
    for tag in ("counting", "two_object", "position", "color_attr"):
        for rec in make_records("geneval", "train", 12, seed=1, tags=[tag]):
            clean = geneval_evaluate(detect_objects(render(rec, rng)), rec)
            bad = geneval_evaluate(detect_objects(render(corrupt(rec), rng)), rec)
            assert clean.strict and not bad.strict, (tag, rec["prompt"], bad.reason)
    for rec in make_records("geneval", "train", 12, seed=1, tags=["color_attr"]):
        bad = geneval_evaluate(detect_objects(render(corrupt(rec, "color_leak"), rng)), rec)
        assert not bad.strict and bad.reason.startswith(f"expected {rec['include'][1]['color']}")
    for rec in make_records("ocr", "train", 20, seed=1):
        bad = ocr_score(read_text(render(corrupt(rec), rng)), rec["text"])
        if len(set(rec["text"][-2:])) == 2:  # "AA" swapped is "AA"
            assert bad <= 1 / 3 + 1e-9  # two edits: 0 for 2 characters, 1/3 for 3


def test_the_v5_kinds_move_one_place_only():
    """The turn keeps the reference object's box (only the placed object moves) and fails
    the strict score; the cut changes only columns right of the first glyph and reads as
    that glyph."""
    rng = np.random.default_rng(0)
    for rec in make_records("geneval", "train", 24, seed=1, tags=["position"]):
        clean, bad = (detect_objects(render(r, rng)) for r in (rec, corrupt(rec, "position_turn")))
        ref = rec["include"][0]["class"]
        assert [d.box for d in clean if d.shape == ref] == [d.box for d in bad if d.shape == ref]
        assert not geneval_evaluate(bad, rec).strict
    for text in ("A7C", "47"):
        clean, cut = (
            render(r, rng) for r in (ocr_record(text), corrupt(ocr_record(text), "ocr_cut"))
        )
        cols = np.nonzero((clean != cut).any(axis=(0, 1)))[0]
        assert cols.min() >= 4 + 6 and read_text(cut) == text[0]  # glyphs are 6 px wide
        assert ocr_score(read_text(cut), text) == pytest.approx(1 / len(text))


def test_dropped_object_leaves_the_reference_alone_in_its_corner_cell():
    """``position_drop``: B is left out; A keeps the box it has in the clean render (a
    corner cell, not the centred single-object place), so only B's cell changes."""
    rng = np.random.default_rng(0)
    for rec in make_records("geneval", "all", 24, seed=1, tags=["position"]):
        clean, bad = (detect_objects(render(r, rng)) for r in (rec, corrupt(rec, "position_drop")))
        ref = rec["include"][0]["class"]
        assert [(d.shape, d.box) for d in bad] == [
            (d.shape, d.box) for d in clean if d.shape == ref
        ]
        assert bad[0].box[2] - bad[0].box[0] == 12 and bad[0].box[0] in (2, 18)
        assert not geneval_evaluate(bad, rec).strict
        assert "hide_last" not in rec  # the input is not mutated


def test_count_one_short_keeps_the_others_in_the_layout_of_n():
    """``counting_last``: n - 1 objects in the first n - 1 slots of the n-object layout (the
    wrong "three" is two on the top row, not the two-object row), failing the strict score."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 4):
        rec = geneval_record("counting", [{"class": "circle", "count": n}])
        clean, bad = (
            sorted(d.box for d in detect_objects(render(r, rng)))
            for r in (rec, corrupt(rec, "counting_last"))
        )
        assert len(bad) == n - 1 and set(bad) < set(clean)
        short = geneval_record("counting", [{"class": "circle", "count": n - 1}])
        assert bad != sorted(d.box for d in detect_objects(render(short, rng)))
        assert not geneval_evaluate(
            detect_objects(render(corrupt(rec, "counting_last"), rng)), rec
        ).strict


def test_rates_are_the_share_of_corrupted_draws():
    rng = np.random.default_rng(0)
    rec = geneval_record("position", [_one("square"), _one("circle", position=["above", 0])])
    draws = [drawn_record(rec, {"position": 0.3}, rng) for _ in range(4000)]
    share = np.mean([d["include"][1]["position"][0] == "below" for d in draws])
    assert abs(share - 0.3) < 0.03  # binomial sd 0.007
    assert all(drawn_record(rec, {}, rng) == rec for _ in range(50))
    assert all(drawn_record(rec, {"position": 1.0}, rng) != rec for _ in range(50))


def test_kinds_of_one_category_are_exclusive():
    rng = np.random.default_rng(0)
    rec = geneval_record("color_attr", [_one("circle", color="red"), _one("square", color="blue")])
    rates = {"color_attr": 0.2, "color_leak": 0.5, "position": 0.9}  # position: another tag
    got = [tuple(i["color"] for i in drawn_record(rec, rates, rng)["include"]) for _ in range(4000)]
    share = {k: np.mean([g == k for g in got]) for k in [("blue", "red"), ("red", "red")]}
    assert abs(share[("blue", "red")] - 0.2) < 0.03 and abs(share[("red", "red")] - 0.5) < 0.03
    assert abs(np.mean([g == ("red", "blue") for g in got]) - 0.3) < 0.03


def test_rates_are_validated():
    assert check_rates(DEFAULT_RATES) == DEFAULT_RATES
    with pytest.raises(UserError, match="unknown caption-noise kind 'colour'"):
        check_rates({"colour": 0.5})
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="must be in"):
            check_rates({"ocr": bad})
    with pytest.raises(UserError, match=r"color_attr \(color_attr\+color_leak\) sum to 1.2"):
        check_rates({"color_attr": 0.5, "color_leak": 0.7})
    with pytest.raises(UserError, match=r"ocr \(ocr\+ocr_cut\) sum to 1.1"):
        check_rates({"ocr": 0.5, "ocr_cut": 0.6})
