"""The exact scorers of the synthetic world: accuracy on ground truth, rejection of
mismatched pairs, tolerance to mild degradation, and hand-computed scoring rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from flowopd.errors import UserError
from flowopd.rewards.base import get_reward
from flowopd.rewards.toy import (
    Detection,
    geneval_evaluate,
    geneval_metric,
    ocr_score,
    ocr_target,
    quality_score,
    read_text,
    toy_geneval_reward,
    toy_geneval_strict,
    toy_ocr_reward,
)
from flowopd.world.font import CHARSET
from flowopd.world.prompts import geneval_record, make_records, ocr_record
from flowopd.world.render import render_batch
from flowopd.world.spec import COLORS, GENEVAL_TAGS, OPPOSITE, SHAPES, relative_position


def _prompts(recs):
    return [r["prompt"] for r in recs]


def _degrade(x: torch.Tensor, noise: float = 0.0, blur: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Gaussian blur (std ``blur`` px) then additive Gaussian noise (std ``noise``), clamped."""
    y = x.numpy()
    if blur:
        y = ndimage.gaussian_filter(y, (0, 0, blur, blur))
    y = torch.from_numpy(np.ascontiguousarray(y))
    if noise:
        y = y + noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return y.clamp(0, 1)


@pytest.fixture(scope="module")
def geneval_set():
    # 300 records, 50 per category, both splits
    recs = make_records("geneval", "train", 150, seed=11) + make_records(
        "geneval", "test", 150, seed=12
    )
    return recs, render_batch(recs, seed=0)


@pytest.fixture(scope="module")
def ocr_set():
    recs = make_records("ocr", "train", 150, seed=11) + make_records("ocr", "test", 150, seed=12)
    return recs, render_batch(recs, seed=0)


# ------------------------------------------------------------------ ground truth


def test_geneval_scorers_are_exact_on_ground_truth(geneval_set):
    recs, x = geneval_set
    strict = toy_geneval_strict(x, _prompts(recs), recs)
    reward = toy_geneval_reward(x, _prompts(recs), recs)
    assert strict.shape == reward.shape == (300,) and strict.dtype == torch.float32
    metric = geneval_metric(strict, [r["tag"] for r in recs])
    print("toy_geneval_strict on ground truth:", metric)
    assert set(metric) == {*GENEVAL_TAGS, "overall"}
    assert all(v >= 0.99 for v in metric.values()), metric
    assert reward.mean() >= 0.99


def test_ocr_is_exact_on_ground_truth(ocr_set):
    recs, x = ocr_set
    reward = toy_ocr_reward(x, _prompts(recs), recs)
    acc = (reward == 1).float().mean().item()
    print(f"toy_ocr exact-read accuracy on ground truth: {acc:.3f}")
    assert acc >= 0.99


def test_every_glyph_is_read():
    words = [CHARSET[i : i + 3] for i in range(0, len(CHARSET), 3)]
    x = render_batch([ocr_record(w) for w in words], seed=1)
    assert [read_text(img) for img in x.numpy()] == words


# ------------------------------------------------------------------ mismatched pairs


def _mismatch(kind: str, rec: dict, rng: np.random.Generator) -> dict:
    """A record whose render must fail ``rec``: same prompt structure, one attribute changed."""
    inc = [dict(it) for it in rec["include"]]
    if kind == "count":
        n = inc[0]["count"]
        inc[0]["count"] = int(rng.choice([m for m in (1, 2, 3, 4) if m != n]))
    elif kind == "color":
        inc[0]["color"] = str(rng.choice([c for c in COLORS if c != inc[0]["color"]]))
    elif kind == "color_swap":
        inc[0]["color"], inc[1]["color"] = inc[1]["color"], inc[0]["color"]
    elif kind == "position":
        inc[1]["position"] = [OPPOSITE[inc[1]["position"][0]], 0]
    elif kind == "class":
        present = {it["class"] for it in inc}
        inc[-1]["class"] = str(rng.choice([s for s in SHAPES if s not in present]))
    return geneval_record(rec["tag"], inc)


@pytest.mark.parametrize(
    ("kind", "tag"),
    [
        ("count", "counting"),
        ("color", "colors"),
        ("color_swap", "color_attr"),
        ("position", "position"),
        ("class", "single_object"),
        ("class", "two_object"),
    ],
)
def test_geneval_rejects_mismatched_pairs(kind, tag):
    rng = np.random.default_rng(0)
    asked = make_records("geneval", "train", 60, seed=3, tags=[tag])
    shown = [_mismatch(kind, r, rng) for r in asked]
    x = render_batch(shown, seed=1)
    strict = toy_geneval_strict(x, _prompts(asked), asked)
    reward = toy_geneval_reward(x, _prompts(asked), asked)
    print(f"{kind}/{tag}: strict {strict.mean():.3f}, partial reward {reward.mean():.3f}")
    assert strict.mean() <= 0.05
    assert reward.mean() <= 0.75  # partial credit, never full
    # the same images are right for the prompts they were drawn from
    assert toy_geneval_strict(x, _prompts(shown), shown).mean() >= 0.99


def test_ocr_rejects_wrong_text():
    rng = np.random.default_rng(0)
    asked = make_records("ocr", "test", 60, seed=3)
    shown = []
    for r in asked:  # change exactly one character: the hardest mismatch
        t = list(r["text"])
        i = int(rng.integers(len(t)))
        t[i] = str(rng.choice([c for c in CHARSET if c != t[i]]))
        shown.append(ocr_record("".join(t)))
    reward = toy_ocr_reward(render_batch(shown, seed=1), _prompts(asked), asked)
    print(f"wrong text: exact {(reward == 1).float().mean():.3f}, reward {reward.mean():.3f}")
    assert (reward == 1).float().mean() <= 0.05
    # one wrong character out of 2-3: reward 1 - 1/len in [0.5, 0.67]
    assert 0.45 <= reward.mean() <= 0.7


# ------------------------------------------------------------------ degradation


def test_scorers_tolerate_mild_degradation(geneval_set, ocr_set):
    (grecs, gx), (orecs, ox) = geneval_set, ocr_set
    g = toy_geneval_strict(_degrade(gx, noise=0.05, blur=0.6), _prompts(grecs), grecs).mean()
    o = (
        (toy_ocr_reward(_degrade(ox, noise=0.05, blur=0.6), _prompts(orecs), orecs) == 1)
        .float()
        .mean()
    )
    print(f"noise 0.05 + blur 0.6: geneval strict {g:.3f}, ocr exact {o:.3f}")
    assert g >= 0.9 and o >= 0.9


@pytest.fixture(scope="module")
def mixed_renders(geneval_set, ocr_set):
    return torch.cat([geneval_set[1][:48], ocr_set[1][:48]])


def test_quality_is_high_on_ground_truth(geneval_set, ocr_set):
    assert quality_score(geneval_set[1]).min() >= 0.9
    assert quality_score(ocr_set[1]).min() >= 0.9


@pytest.mark.parametrize(
    ("knob", "levels"),
    [("noise", [0.0, 0.02, 0.05, 0.1, 0.2]), ("blur", [0.0, 0.4, 0.7, 1.0, 1.5, 2.5])],
)
def test_quality_drops_monotonically(mixed_renders, knob, levels):
    q = [quality_score(_degrade(mixed_renders, **{knob: v})).mean().item() for v in levels]
    print(f"toy_quality vs {knob} {levels}: {[round(v, 3) for v in q]}")
    assert all(a > b for a, b in zip(q[:-1], q[1:], strict=True)), q


def test_quality_of_degenerate_images():
    white, grey = torch.ones(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.5)
    assert quality_score(white).max() == 0  # no content
    assert quality_score(grey).max() < 0.01  # far from every allowed colour
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert quality_score(noise).max() < 0.3


# ------------------------------------------------------------------ hand-computed rules


def _det(shape, color="red", box=(0, 0, 8, 8), area=50):
    return Detection(shape, color, box, area)


def test_relative_position_hand_computed():
    # centres (5,5) and (25,5): offset (-20, 0); revised |dx| = 20 - 0.1 * (10 + 10) = 18
    # -> (dx, dy) = (-18, 0) / 20 = (-0.9, 0): left of
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    # diagonal: offset (-20, -20), revised (-18, -18) / 28.3 = -0.64 each: left of and above
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}
    # y grows downwards: a larger y is "below"
    assert relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    # overlapping within the threshold: offset 1 < 0.1 * 20 -> no relation
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_geneval_counting_rules():
    meta = geneval_record("counting", [{"class": "circle", "count": 2}])
    three = [_det("circle")] * 3
    res = geneval_evaluate(three, meta)
    # strict: include circle >= 2 holds, exclude circle < 3 fails
    # partial: 1 - |2 - 3| / 2 = 0.5
    assert not res.strict and res.reward == pytest.approx(0.5)
    res = geneval_evaluate([_det("circle")] * 2, meta)
    assert res.strict and res.reward == 1.0
    # six found for two asked: 1 - 4/2 = -1, clipped at 0
    assert geneval_evaluate([_det("circle")] * 6, meta).reward == 0.0


def test_geneval_two_object_rules():
    meta = geneval_record(
        "two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]
    )
    # GenEval asks >= count outside counting: an extra circle is still correct;
    # the partial reward wants exact counts: terms [1 - |1 - 2| / 1, 1] -> 0.5
    res = geneval_evaluate([_det("circle"), _det("circle"), _det("square")], meta)
    assert res.strict and res.reward == pytest.approx(0.5)
    res = geneval_evaluate([_det("circle"), _det("triangle")], meta)
    assert not res.strict and res.reward == pytest.approx(0.5)  # terms [1, 0]


def test_geneval_colour_rules():
    meta = geneval_record(
        "color_attr",
        [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue"},
        ],
    )
    ok = [_det("circle", "red"), _det("square", "blue")]
    assert geneval_evaluate(ok, meta).strict and geneval_evaluate(ok, meta).reward == 1.0
    # square has the wrong colour: terms [1 (count), 1 (colour), 1 (count), 0 (colour)] -> 0.75
    res = geneval_evaluate([_det("circle", "red"), _det("square", "green")], meta)
    assert not res.strict and res.reward == pytest.approx(0.75)
    # no square at all: terms [1, 1, 0, 0] -> 0.5
    res = geneval_evaluate([_det("circle", "red")], meta)
    assert not res.strict and res.reward == pytest.approx(0.5)
    # GenEval checks the first `count` detections (ours: largest first) for the colour
    single = geneval_record("colors", [{"class": "circle", "count": 1, "color": "red"}])
    big_blue_small_red = [_det("circle", "blue", area=80), _det("circle", "red", area=40)]
    assert not geneval_evaluate(big_blue_small_red, single).strict


def test_geneval_position_rules():
    meta = geneval_record(
        "position",
        [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
    )
    left, right = (2, 10, 10, 18), (20, 10, 28, 18)
    res = geneval_evaluate([_det("circle", box=left), _det("square", box=right)], meta)
    assert res.strict and res.reward == 1.0
    # swapped: terms [1 (square), 1 (circle), 0 (position)] -> 2/3
    res = geneval_evaluate([_det("circle", box=right), _det("square", box=left)], meta)
    assert not res.strict and res.reward == pytest.approx(2 / 3)
    # no reference object: terms [0, 1, 0] -> 1/3
    res = geneval_evaluate([_det("circle", box=left)], meta)
    assert not res.strict and res.reward == pytest.approx(1 / 3)


def test_geneval_metric_hand_computed():
    tags = ["counting", "counting", "counting", "counting", "colors", "colors", "position"]
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    # per tag: counting 2/4, colors 2/2, position 0/1; overall = mean(0.5, 1, 0) = 0.5
    # (the mean over categories, not over prompts, which would be 4/7)
    assert geneval_metric(scores, tags) == {
        "colors": 1.0,
        "counting": 0.5,
        "position": 0.0,
        "overall": 0.5,
    }
    with pytest.raises(ValueError):
        geneval_metric([1.0], tags)


def test_ocr_score_and_target():
    assert ocr_score("47", "47") == 1.0
    assert ocr_score("A7", "a7") == 1.0  # lowercased
    assert ocr_score("x 47 y", "47") == 1.0  # contained after removing spaces
    assert ocr_score("4", "47") == pytest.approx(0.5)  # 1 - 1/2
    assert ocr_score("48", "473") == pytest.approx(1 - 2 / 3)  # 1 substitution + 1 insertion
    assert ocr_score("", "47") == 0.0
    assert ocr_score("99999", "47") == 0.0  # clipped at 0
    assert ocr_target('a sign that says "P4" and "X"') == "P4"
    assert ocr_target("anything", {"text": "HY"}) == "HY"
    with pytest.raises(UserError, match="no quoted text"):
        ocr_target("a sign")
    assert read_text(np.ones((3, 32, 32), np.float32)) == ""


def test_registry_and_metadata_errors(geneval_set):
    recs, x = geneval_set
    for name in ("toy_geneval", "toy_geneval_strict", "toy_ocr", "toy_quality"):
        fn = get_reward(name)
        meta = recs[:4] if "ocr" not in name else [ocr_record("47")] * 4
        out = fn(x[:4], _prompts(meta), meta)
        assert out.shape == (4,) and out.dtype == torch.float32
        assert ((out >= 0) & (out <= 1)).all()
    with pytest.raises(UserError, match="'include'"):
        toy_geneval_reward(x[:1], ["a photo"], [{"prompt": "a photo"}])
