"""GenEval scoring on hand-made detections, the real metadata file, and tiny transformers detectors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from flowopd.errors import UserError
from flowopd.rewards.geneval import (
    COLORS,
    GENEVAL_CLASSES,
    Detection,
    GenEvalConfig,
    GenEvalResult,
    GenEvalScorer,
    HsvColorClassifier,
    boxes_from_masks,
    evaluate_detection,
    geneval_label,
    geneval_metric,
    masked_crops,
    read_geneval_metadata,
    relative_position,
    select_objects,
)


class BoxColors:
    """Colour classifier stub: the colour registered for a box (by its x0), else 'white'."""

    def __init__(self, by_x0: dict[float, str] | None = None) -> None:
        self.by_x0 = by_x0 or {}
        self.calls = 0

    def classify(self, image, boxes, masks, classname):
        self.calls += 1
        return [self.by_x0.get(float(b[0]), "white") for b in boxes]


def det(*objs: tuple[str, float, list[float]]) -> Detection:
    """det(("dog", 0.9, [x0, y0, x1, y1]), ...)"""
    return Detection(
        boxes=np.array([o[2] for o in objs], dtype=float).reshape(-1, 4),
        labels=[o[0] for o in objs],
        scores=np.array([o[1] for o in objs], dtype=float),
    )


IMG = np.zeros((64, 64, 3), dtype=np.uint8)


def judge(detection, meta, colors=None, **cfg):
    return evaluate_detection(IMG, detection, meta, colors or BoxColors(), GenEvalConfig(**cfg))


SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}


# --- single object, thresholds, over-counting -------------------------------------------------
def test_single_object_found_and_threshold_is_strict():
    r = judge(det(("dog", 0.95, [0, 0, 10, 10])), SINGLE)
    assert (r.correct, r.exact, r.score) == (True, True, 1.0)
    # GenEval keeps scores strictly above 0.3: exactly 0.3 is dropped.
    r = judge(det(("dog", 0.3, [0, 0, 10, 10])), SINGLE)
    assert (r.correct, r.exact, r.score) == (False, False, 0.0)
    r = judge(det(("cat", 0.99, [0, 0, 10, 10])), SINGLE)
    assert not r.correct and r.score == 0.0


def test_over_counting_quirk_official_accepts_partial_penalises():
    three = det(*[("dog", 0.9, [20 * i, 0, 20 * i + 10, 10]) for i in range(3)])
    r = judge(three, SINGLE)
    # Official: only the top-1 dog is looked at, extras never hurt an include clause.
    assert r.correct is True
    # Flow-GRPO: exact count required; partial term 1 - |1 - 3| / 1 = -1 (not clipped).
    assert r.exact is False
    assert r.score == pytest.approx(-1.0)


def test_max_objects_and_nms():
    many = det(*[("dog", 0.9 - 0.01 * i, [3 * i, 0, 3 * i + 10, 10]) for i in range(20)])
    assert len(select_objects(many, "single_object")["dog"]) == 16
    assert len(select_objects(many, "single_object", GenEvalConfig(max_objects=5))["dog"]) == 5
    dup = det(
        ("dog", 0.9, [0, 0, 10, 10]), ("dog", 0.8, [1, 0, 11, 10]), ("dog", 0.7, [40, 0, 50, 10])
    )
    assert len(select_objects(dup, "x")["dog"]) == 3  # NMS off by default (threshold 1)
    kept = select_objects(dup, "x", GenEvalConfig(nms_threshold=0.5))["dog"]
    assert [o.score for o in kept] == [0.9, 0.7]
    # most confident first
    assert [o.score for o in select_objects(dup, "x")["dog"]] == [0.9, 0.8, 0.7]


# --- two objects --------------------------------------------------------------------------------
TWO = {
    "tag": "two_object",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
    "prompt": "a dog and a cat",
}


def test_two_objects():
    r = judge(det(("dog", 0.9, [0, 0, 10, 10]), ("cat", 0.5, [20, 0, 30, 10])), TWO)
    assert (r.correct, r.exact, r.score) == (True, True, 1.0)
    r = judge(det(("dog", 0.9, [0, 0, 10, 10])), TWO)
    # terms: dog 1 - 0/1 = 1, cat 1 - 1/1 = 0 -> 0.5
    assert (r.correct, r.exact, r.score) == (False, False, 0.5)


# --- counting + exclude -------------------------------------------------------------------------
COUNT3 = {
    "tag": "counting",
    "include": [{"class": "apple", "count": 3}],
    "exclude": [{"class": "apple", "count": 4}],
    "prompt": "a photo of three apples",
}


def apples(*scores):
    return det(*[("apple", s, [12 * i, 0, 12 * i + 10, 10]) for i, s in enumerate(scores)])


def test_counting_exact_through_exclude_and_counting_threshold():
    assert judge(apples(0.95, 0.95, 0.95), COUNT3).correct
    # A fourth confident apple: the include clause still passes (top 3), the exclude fails.
    r = judge(apples(0.95, 0.95, 0.95, 0.95), COUNT3)
    assert r.correct is False and "apple<4" in r.reason
    assert r.score == pytest.approx(1 - 1 / 3)  # 1 - |3 - 4| / 3; excludes ignored by Flow-GRPO
    # Counting prompts threshold at 0.9: an apple at 0.85 is not counted ...
    r = judge(apples(0.95, 0.95, 0.95, 0.85), COUNT3)
    assert r.correct and r.exact and r.score == 1.0
    # ... so two confident apples plus one at 0.85 is one short.
    r = judge(apples(0.95, 0.95, 0.85), COUNT3)
    assert not r.correct and r.score == pytest.approx(1 - 1 / 3)
    # Without the exclude clause the official judgement accepts over-counting.
    no_excl = {k: v for k, v in COUNT3.items() if k != "exclude"}
    assert judge(apples(0.95, 0.95, 0.95, 0.95), no_excl).correct


def test_exclude_on_other_tags():
    meta = {**SINGLE, "exclude": [{"class": "cat", "count": 1}]}
    assert judge(det(("dog", 0.9, [0, 0, 10, 10])), meta).correct
    r = judge(det(("dog", 0.9, [0, 0, 10, 10]), ("cat", 0.4, [20, 0, 30, 10])), meta)
    assert not r.correct and r.score == 1.0  # partial reward ignores exclude


# --- colours --------------------------------------------------------------------------------------
RED_CAR = {
    "tag": "colors",
    "include": [{"class": "car", "count": 1, "color": "red"}],
    "prompt": "a red car",
}


def test_colors():
    cars = det(("car", 0.9, [0, 0, 10, 10]))
    r = judge(cars, RED_CAR, BoxColors({0.0: "red"}))
    assert (r.correct, r.exact, r.score) == (True, True, 1.0)
    r = judge(cars, RED_CAR, BoxColors({0.0: "blue"}))
    # terms: count 1, colour 1 - |1 - 0| / 1 = 0 -> 0.5
    assert (r.correct, r.exact, r.score) == (False, False, 0.5)
    # no car: count term 0 and one 0 for the colour clause
    r = judge(det(), RED_CAR, BoxColors())
    assert (r.correct, r.score) == (False, 0.0)


def test_colors_only_top_objects_checked_and_classified_once():
    # Two cars, the most confident red, the other blue: official looks only at the top car.
    cars = det(("car", 0.9, [0, 0, 10, 10]), ("car", 0.6, [20, 0, 30, 10]))
    colors = BoxColors({0.0: "red", 20.0: "blue"})
    r = judge(cars, RED_CAR, colors)
    assert r.correct is True
    assert r.exact is False and r.score == pytest.approx((0.0 + 0.0) / 2)  # 1-|1-2|/1 = 0, +0
    one = det(("car", 0.9, [0, 0, 10, 10]))
    colors = BoxColors({0.0: "red"})
    judge(one, RED_CAR, colors)
    assert colors.calls == 1  # shared between the official and the partial judgement


def test_color_attr():
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "handbag", "count": 1, "color": "pink"},
            {"class": "scissors", "count": 1, "color": "black"},
        ],
        "prompt": "a photo of a pink handbag and a black scissors",
    }
    d = det(("handbag", 0.9, [0, 0, 10, 10]), ("scissors", 0.9, [30, 0, 40, 10]))
    assert judge(d, meta, BoxColors({0.0: "pink", 30.0: "black"})).correct
    r = judge(d, meta, BoxColors({0.0: "black", 30.0: "pink"}))  # attributes swapped
    assert not r.correct and r.score == pytest.approx((1 + 0 + 1 + 0) / 4)


# --- position -----------------------------------------------------------------------------------
COW_RIGHT_OF_LAPTOP = {
    "tag": "position",
    "include": [
        {"class": "laptop", "count": 1},
        {"class": "cow", "count": 1, "position": ["right of", 0]},
    ],
    "prompt": "a photo of a cow right of a laptop",
}


def test_relative_position_margin_and_quirk():
    a = [0, 0, 10, 10]
    assert relative_position([30, 0, 40, 10], a) == {"right of"}
    assert relative_position([-30, 0, -20, 10], a) == {"left of"}
    assert relative_position([0, -30, 10, -20], a) == {"above"}  # y grows downwards
    assert relative_position([0, 30, 10, 40], a) == {"below"}
    # Offset 1.5 px is inside the margin 0.1 * (10 + 10) = 2 px: no relation at all.
    assert relative_position([1.5, 0, 11.5, 10], a) == set()
    # Offset 2.5 > 2: revised (0.5, 0) / |offset| 2.5 = 0.2 < 0.5, still nothing.
    assert relative_position([2.5, 0, 12.5, 10], a) == set()
    # Offset (4, 3): revised (2, 1) divided by the *unrevised* norm 5 -> (0.4, 0.2): no relation,
    # although normalising by the revised norm would have said "right of" (2 / sqrt(5) = 0.89).
    assert relative_position([4, 3, 14, 13], a) == set()
    # Offset (12, 0): revised 10 / 12 = 0.83 > 0.5 -> right of.
    assert relative_position([12, 0, 22, 10], a) == {"right of"}
    # Diagonal far away: both relations.
    assert relative_position([50, 50, 60, 60], a) == {"right of", "below"}
    # A larger threshold removes the relation.
    assert relative_position([12, 0, 22, 10], a, threshold=0.6) == set()


def test_position_judgements():
    ok = det(("laptop", 0.9, [0, 0, 10, 10]), ("cow", 0.9, [30, 0, 40, 10]))
    r = judge(ok, COW_RIGHT_OF_LAPTOP)
    assert (r.correct, r.exact, r.score) == (True, True, 1.0)
    bad = det(("laptop", 0.9, [0, 0, 10, 10]), ("cow", 0.9, [-30, 0, -20, 10]))
    r = judge(bad, COW_RIGHT_OF_LAPTOP)
    assert not r.correct and not r.exact
    # Flow-GRPO quirk: terms [1 (laptop), 1 (cow), 0 (position), 1 (appended anyway)] -> 0.75
    assert r.score == pytest.approx(0.75)
    no_target = det(("cow", 0.9, [30, 0, 40, 10]))
    r = judge(no_target, COW_RIGHT_OF_LAPTOP)
    assert not r.correct and "no target" in r.reason
    assert r.score == pytest.approx((0 + 1 + 0) / 3)
    # position_threshold is honoured: offset 12 px; margin 0.1 * 20 = 2 px passes, 0.6 * 20 = 12 px
    # leaves nothing.
    near = det(("laptop", 0.9, [0, 0, 10, 10]), ("cow", 0.9, [12, 0, 22, 10]))
    assert judge(near, COW_RIGHT_OF_LAPTOP).correct
    assert not judge(near, COW_RIGHT_OF_LAPTOP, position_threshold=0.6).correct


# --- metric and strict vs partial ---------------------------------------------------------------
def test_metric_averages_over_tags_not_images():
    rs = [
        GenEvalResult("single_object", "p", True, True, 1.0),
        GenEvalResult("single_object", "p", True, True, 1.0),
        *[GenEvalResult("counting", "q", i == 0, i == 0, 0.5) for i in range(4)],
    ]
    m = geneval_metric(rs)
    assert m["single_object"] == 1.0 and m["counting"] == 0.25
    assert m["overall"] == pytest.approx((1.0 + 0.25) / 2)  # image mean would be 3/6 = 0.5
    assert geneval_metric([{"tag": "colors", "correct": False}]) == {"overall": 0.0, "colors": 0.0}
    with pytest.raises(UserError):
        geneval_metric([])


def test_scorer_modes_and_bad_metadata():
    class FixedDetector:
        def detect(self, images):
            return [det(*[("dog", 0.9, [20 * i, 0, 20 * i + 10, 10]) for i in range(2)])] * len(
                images
            )

    images = torch.zeros(2, 3, 16, 16)
    meta = [SINGLE, TWO]
    got = {
        mode: GenEvalScorer(FixedDetector(), BoxColors(), mode=mode)(images, ["a", "b"], meta)
        for mode in ("partial", "correct", "exact")
    }
    # image 0: two dogs for "a dog": official correct, not exact, partial 1 - 1 = 0
    # image 1: no cat: official wrong, partial (0 + 0) / 2 (dog 1 - |1 - 2| = 0, cat 0)
    assert got["correct"].tolist() == [1.0, 0.0]
    assert got["exact"].tolist() == [0.0, 0.0]
    assert got["partial"].tolist() == [0.0, 0.0]
    assert all(v.dtype == torch.float32 and v.shape == (2,) for v in got.values())
    with pytest.raises(UserError, match="tag"):
        GenEvalScorer(FixedDetector())(images[:1], ["a"], [{"prompt": "a"}])
    with pytest.raises(UserError, match="mode"):
        GenEvalScorer(FixedDetector(), mode="strictest")


# --- the real metadata file ---------------------------------------------------------------------
def test_read_every_line_of_real_metadata(shared_data):
    rows = read_geneval_metadata(shared_data / "geneval" / "test_metadata.jsonl")
    assert len(rows) == 2212
    assert len({r["prompt"] for r in rows}) == 553
    assert Counter(r["tag"] for r in rows) == {
        "color_attr": 400,
        "position": 400,
        "two_object": 396,
        "colors": 376,
        "counting": 320,
        "single_object": 320,
    }
    assert all(r["task"] == "geneval" for r in rows)
    classes = {c["class"] for r in rows for c in r["include"] + r.get("exclude", [])}
    assert classes == set(GENEVAL_CLASSES)


def _perfect_detection(meta):
    """Detections and colours satisfying ``meta`` exactly (positions laid out on a big canvas)."""
    objs, colors = [], {}
    anchor = {}
    step = {"right of": (120, 0), "left of": (-120, 0), "above": (0, -120), "below": (0, 120)}
    x_next = 1000.0
    for j, req in enumerate(meta["include"]):
        for k in range(req["count"]):
            if "position" in req:
                rel, tgt = req["position"]
                cx, cy = anchor[tgt]
                cx, cy = cx + step[rel][0], cy + step[rel][1]
            else:
                cx, cy = x_next, 500.0 + 30 * k
                x_next += 400
            box = [cx - 10, cy - 10, cx + 10, cy + 10]
            anchor.setdefault(j, (cx, cy))
            objs.append((req["class"], 0.95, box))
            colors[float(box[0])] = req.get("color", "white")
    return det(*objs), BoxColors(colors)


def test_every_real_prompt_scores_one_on_perfect_detections(shared_data):
    rows = read_geneval_metadata(shared_data / "geneval" / "test_metadata.jsonl")
    results = []
    for meta in rows:
        d, colors = _perfect_detection(meta)
        results.append(evaluate_detection(IMG, d, meta, colors))
    assert all(r.correct and r.exact and r.score == 1.0 for r in results), [
        (r.prompt, r.reason) for r in results if not r.correct
    ][:3]
    m = geneval_metric(results)
    assert m["overall"] == 1.0 and len(m) == 7


def test_metadata_reader_errors(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps(SINGLE) + "\n{not json\n")
    with pytest.raises(UserError, match=r"m.jsonl:2: invalid JSON"):
        read_geneval_metadata(bad)
    bad.write_text(json.dumps({**SINGLE, "include": [{"class": "dog", "count": 0}]}) + "\n")
    with pytest.raises(UserError, match="count"):
        read_geneval_metadata(bad)
    with pytest.raises(UserError, match="not found"):
        read_geneval_metadata(tmp_path / "missing.jsonl")


# --- colour classifiers -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rgb,name",
    [
        ((220, 20, 30), "red"),
        ((255, 140, 0), "orange"),
        ((250, 230, 20), "yellow"),
        ((20, 160, 40), "green"),
        ((20, 40, 230), "blue"),
        ((128, 0, 128), "purple"),
        ((255, 105, 180), "pink"),
        ((255, 192, 203), "pink"),
        ((139, 69, 19), "brown"),
        ((10, 10, 10), "black"),
        ((245, 245, 245), "white"),
    ],
)
def test_hsv_colors(rgb, name):
    img = np.full((20, 20, 3), 128, dtype=np.uint8)
    img[5:15, 5:15] = rgb
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 5:15, 5:15] = True
    assert HsvColorClassifier().classify(img, np.array([[5, 5, 15, 15]]), masks, "car") == [name]
    # without mask the crop is exactly the patch too
    assert HsvColorClassifier().classify(img, np.array([[5, 5, 15, 15]]), None, "car") == [name]


def test_masked_crops_and_boxes_from_masks():
    img = np.zeros((10, 12, 3), dtype=np.uint8)
    img[:] = (200, 0, 0)
    masks = np.zeros((1, 10, 12), dtype=bool)
    masks[0, 2:5, 3:7] = True  # rows 2-4, cols 3-6
    box = boxes_from_masks(masks)
    assert box.tolist() == [[3, 2, 7, 5]]  # exclusive max, like mmdet's mask2bbox
    crop = np.asarray(masked_crops(img, np.array([[0, 0, 12, 10]]), masks)[0])
    assert crop.shape == (10, 12, 3)
    assert tuple(crop[0, 0]) == (153, 153, 153)  # GenEval's #999 background
    assert tuple(crop[3, 4]) == (200, 0, 0)
    assert boxes_from_masks(np.zeros((1, 4, 4), dtype=bool)).tolist() == [[0, 0, 0, 0]]


def test_labels():
    assert geneval_label("mouse") == "computer mouse"
    assert geneval_label("Dining_Table") == "dining table"
    assert geneval_label("tvmonitor") == "tv"
    assert geneval_label("N/A") is None and geneval_label("banner") is None
    assert len(GENEVAL_CLASSES) == 80 and len(COLORS) == 10


# --- tiny transformers detectors, random weights ------------------------------------------------
LABELS = ["N/A", "dog", "mouse", "dining table", "banner"]


@pytest.fixture(scope="module")
def tiny_detr(tmp_path_factory):
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    torch.manual_seed(0)
    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        out_features=["stage2"],
    )
    cfg = DetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=12,
        id2label=dict(enumerate(LABELS)),
        label2id={lab: i for i, lab in enumerate(LABELS)},
    )
    path = tmp_path_factory.mktemp("detr")
    DetrForObjectDetection(cfg).eval().save_pretrained(path)
    DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        Mask2FormerImageProcessorPil,
    )

    torch.manual_seed(0)
    labels = LABELS[1:]
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        encoder_feedforward_dim=32,
        num_queries=6,
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
    )
    path = tmp_path_factory.mktemp("m2f")
    Mask2FormerForUniversalSegmentation(cfg).eval().save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(
        path
    )
    return path


def _two_images():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(2, 48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()


def _well_formed(d: Detection, hw):
    n = len(d.labels)
    assert d.boxes.shape == (n, 4) and d.scores.shape == (n,)
    assert set(d.labels) <= set(GENEVAL_CLASSES)
    assert np.all((d.scores >= 0) & (d.scores <= 1))
    assert np.all(d.boxes[:, 2] >= d.boxes[:, 0]) and np.all(d.boxes[:, 3] >= d.boxes[:, 1])
    assert np.all(d.boxes >= -1) and np.all(d.boxes[:, [0, 2]] <= hw[1] + 1)
    assert np.all(d.boxes[:, [1, 3]] <= hw[0] + 1)


def test_transformers_detector_detr(tiny_detr):
    from flowopd.rewards.geneval import TransformersDetector

    detector = TransformersDetector(tiny_detr, min_score=0.0, label_map={"banner": "dog"})
    assert detector.kind == "detection"
    assert detector.labels == {0: None, 1: "dog", 2: "computer mouse", 3: "dining table", 4: "dog"}
    out = detector.detect(_two_images())
    assert len(out) == 2
    for d in out:
        _well_formed(d, (48, 64))
        assert d.masks is None and len(d.labels) > 0


def test_transformers_detector_mask2former_and_reward(tiny_mask2former):
    from flowopd.rewards import get_reward
    from flowopd.rewards.geneval import TransformersDetector

    detector = TransformersDetector(tiny_mask2former, min_score=0.0)
    assert detector.kind == "segmentation"
    out = detector.detect(_two_images())
    assert len(out) == 2
    for d in out:
        _well_formed(d, (48, 64))
        assert d.masks is not None and d.masks.shape == (len(d.labels), 48, 64)
        assert d.masks.dtype == bool
        np.testing.assert_array_equal(d.boxes, boxes_from_masks(d.masks))
    assert sum(len(d.labels) for d in out) > 0
    reward = get_reward(
        "geneval", detector=str(tiny_mask2former), colors="hsv", min_score=0.0, threshold=0.0
    )
    images = torch.from_numpy(_two_images()).permute(0, 3, 1, 2).float() / 255
    meta = [SINGLE, RED_CAR]
    scores = reward(images, ["a dog", "a red car"], meta)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_missing_detector_is_a_user_error(tmp_path):
    from flowopd.rewards.geneval import TransformersDetector

    with pytest.raises(UserError, match="no such directory"):
        TransformersDetector(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="cannot load"):
        TransformersDetector("nonexistent-org-flowopd/nonexistent-detector")
