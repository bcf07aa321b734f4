"""GenEval's rules: classes, the data types and protocols, object selection, the official
judgement and Flow-GRPO's partial-credit score, metadata files and the metric.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flowopd.errors import UserError
from flowopd.world.spec import relative_position  # GenEval's rule, one implementation

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

# GenEval's 80 class names: COCO's, in COCO order, with GenEval's spellings of mouse/remote/keyboard.
GENEVAL_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

# Detector label spellings (COCO/HF id2label, Pascal VOC) -> GenEval class names.
LABEL_ALIASES = {
    "mouse": "computer mouse",
    "keyboard": "computer keyboard",
    "remote": "tv remote",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
    "doughnut": "donut",
}


def geneval_label(label: str) -> str | None:
    """A detector's label as a GenEval class name, or None when GenEval has no such class.

    >>> geneval_label("mouse"), geneval_label("dining_table"), geneval_label("N/A")
    ('computer mouse', 'dining table', None)
    """
    name = " ".join(label.replace("_", " ").replace("-", " ").lower().split())
    name = LABEL_ALIASES.get(name, name)
    return name if name in GENEVAL_CLASSES else None


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------
@dataclass
class Detection:
    """Detections in one image.

    boxes: (N, 4) float xyxy in pixels; labels: N GenEval class names; scores: (N,) in [0, 1];
    masks: (N, H, W) bool instance masks, or None for box-only detectors.
    """

    boxes: np.ndarray
    labels: list[str]
    scores: np.ndarray
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = len(self.boxes)
        if len(self.labels) != n or len(self.scores) != n:
            raise ValueError(
                f"Detection: {n} boxes, {len(self.labels)} labels, {len(self.scores)} scores"
            )
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=bool)
            if self.masks.ndim != 3 or len(self.masks) != n:
                raise ValueError(f"Detection: masks of shape {self.masks.shape} for {n} boxes")


class Detector(Protocol):
    def detect(self, images: np.ndarray) -> list[Detection]:
        """(B, H, W, 3) uint8 RGB -> B detections (labels already GenEval class names)."""
        ...


class ColorClassifier(Protocol):
    def classify(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, classname: str
    ) -> list[str]:
        """Colour (one of ``COLORS``) of each of the N objects: image (H, W, 3) uint8,
        boxes (N, 4) xyxy, masks (N, H, W) bool or None."""
        ...


@dataclass
class GenEvalConfig:
    """GenEval's evaluator options, with its defaults."""

    threshold: float = 0.3  # detection confidence kept (strictly above)
    counting_threshold: float = 0.9  # same, for prompts tagged "counting"
    max_objects: int = 16  # per class, most confident first
    nms_threshold: float = 1.0  # greedy per-class NMS IoU; 1 disables it (GenEval default)
    position_threshold: float = 0.1  # margin, as a fraction of the two boxes' summed sizes


@dataclass
class DetectedObject:
    box: np.ndarray  # (4,) xyxy
    score: float
    mask: np.ndarray | None = None  # (H, W) bool


@dataclass
class GenEvalResult:
    tag: str
    prompt: str
    correct: bool  # official GenEval judgement
    exact: bool  # Flow-GRPO "strict": exact counts, excludes ignored
    score: float  # Flow-GRPO partial-credit reward
    reason: str = ""
    detected: dict[str, list[list[float]]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``."""

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area(
        [max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]),
         min(box_a[3], box_b[3])]
    )  # fmt: skip
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_objects(
    detection: Detection, tag: str, config: GenEvalConfig | None = None
) -> dict[str, list[DetectedObject]]:
    """Per class: scores > threshold (``counting_threshold`` for counting prompts), most
    confident first, at most ``max_objects``, then greedy NMS at ``nms_threshold`` (1 = off)."""
    cfg = config or GenEvalConfig()
    thr = cfg.counting_threshold if tag == "counting" else cfg.threshold
    out: dict[str, list[DetectedObject]] = {}
    for cls in dict.fromkeys(detection.labels):
        idx = [i for i, lab in enumerate(detection.labels) if lab == cls]
        idx = sorted(idx, key=lambda i: -detection.scores[i])  # stable: ties keep input order
        idx = [i for i in idx if detection.scores[i] > thr][: cfg.max_objects]
        kept: list[int] = []
        while idx:
            best = idx.pop(0)
            kept.append(best)
            if cfg.nms_threshold < 1:
                idx = [
                    i
                    for i in idx
                    if compute_iou(detection.boxes[best], detection.boxes[i]) < cfg.nms_threshold
                ]
        if kept:
            out[cls] = [
                DetectedObject(
                    box=detection.boxes[i],
                    score=float(detection.scores[i]),
                    mask=None if detection.masks is None else detection.masks[i],
                )
                for i in kept
            ]
    return out


# ---------------------------------------------------------------------------------------------
# The two judgements
# ---------------------------------------------------------------------------------------------
ColorsFn = Callable[[str, list[DetectedObject]], list[str]]


def _position_fails(
    found: list[DetectedObject], targets: list[DetectedObject], rel: str, cfg: GenEvalConfig
) -> set[str] | None:
    """None when every found object is ``rel`` of every target, else the first failing pair's
    true relations."""
    for obj in found:
        for tgt in targets:
            true_rels = relative_position(obj.box, tgt.box, cfg.position_threshold)
            if rel not in true_rels:
                return true_rels
    return None


def evaluate_official(
    objects: Mapping[str, list[DetectedObject]],
    metadata: Mapping[str, Any],
    colors_of: ColorsFn,
    config: GenEvalConfig | None = None,
) -> tuple[bool, str]:
    """GenEval's per-image judgement ``(correct, reason)``; see the module docstring."""
    cfg = config or GenEvalConfig()
    correct, reason = True, []
    groups: list[list[DetectedObject] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], int(req["count"])
        matched = True
        found = list(objects.get(cls, []))[:n]  # over-counting quirk: only the top n are looked at
        if len(found) < n:
            correct = matched = False
            reason.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                colors = colors_of(cls, found)
                if colors.count(req["color"]) < n:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {cls}>={n}, found "
                        f"{colors.count(req['color'])} {req['color']}"
                    )
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reason.append(f"no target for {cls} to be {rel}")
                else:
                    bad = _position_fails(found, groups[target], rel, cfg)
                    if bad is not None:
                        correct = matched = False
                        reason.append(f"expected {cls} {rel} target, found {' and '.join(bad)}")
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls = req["class"]
        if len(objects.get(cls, [])) >= int(req["count"]):
            correct = False
            reason.append(f"expected {cls}<{req['count']}, found {len(objects[cls])}")
    return correct, "\n".join(reason)


def evaluate_partial(
    objects: Mapping[str, list[DetectedObject]],
    metadata: Mapping[str, Any],
    colors_of: ColorsFn,
    config: GenEvalConfig | None = None,
) -> tuple[bool, float, str]:
    """Flow-GRPO's training judgement ``(exact, score, reason)``; see the module docstring.

    Terms per include clause (n = required count, k = objects found of the class)::

        count:     1 - |n - k| / n
        colour:    1 - |n - #objects classified as the colour| / n     (only when k == n)
        position:  1 if all pairs stand in the relation, else 0 then 1 (published quirk)
        mismatch:  k != n on a clause with a colour or position adds a 0
    """
    cfg = config or GenEvalConfig()
    exact, reason, terms = True, [], []
    groups: list[list[DetectedObject] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], int(req["count"])
        matched = True
        found = list(objects.get(cls, []))
        terms.append(1 - abs(n - len(found)) / n)
        if len(found) != n:
            exact = matched = False
            reason.append(f"expected {cls}=={n}, found {len(found)}")
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                hits = colors_of(cls, found).count(req["color"])
                terms.append(1 - abs(n - hits) / n)
                if hits != n:
                    exact = matched = False
                    reason.append(f"expected {req['color']} {cls}=={n}, found {hits}")
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    exact = matched = False
                    reason.append(f"no target for {cls} to be {rel}")
                    terms.append(0.0)
                else:
                    bad = _position_fails(found, groups[target], rel, cfg)
                    if bad is not None:
                        exact = matched = False
                        reason.append(f"expected {cls} {rel} target, found {' and '.join(bad)}")
                        terms.append(0.0)
                    terms.append(1.0)  # appended even after a failure, as published
        groups.append(found if matched else None)
    score = sum(terms) / len(terms) if terms else 0.0
    return exact, float(score), "\n".join(reason)


def evaluate_detection(
    image: np.ndarray | None,
    detection: Detection,
    metadata: Mapping[str, Any],
    colors: ColorClassifier | None = None,
    config: GenEvalConfig | None = None,
) -> GenEvalResult:
    """All three judgements of one image (H, W, 3) uint8 from its detections.

    Colours are classified once per (class, objects) and shared by both judgements; a prompt
    with a colour clause needs ``colors`` (and ``image``).
    """
    cfg = config or GenEvalConfig()
    tag = metadata.get("tag", "")
    objects = select_objects(detection, tag, cfg)
    cache: dict[tuple, list[str]] = {}

    def colors_of(cls: str, found: list[DetectedObject]) -> list[str]:
        key = (cls, tuple(id(o) for o in found))
        if key not in cache:
            if colors is None or image is None:
                raise UserError(
                    f"GenEval prompt {metadata.get('prompt', '')!r} has a colour clause but no "
                    "colour classifier was given (colors='clip' or 'hsv')"
                )
            boxes = np.stack([o.box for o in found])
            masks = (
                None if any(o.mask is None for o in found) else np.stack([o.mask for o in found])
            )
            cache[key] = list(colors.classify(image, boxes, masks, cls))
        return cache[key]

    correct, reason = evaluate_official(objects, metadata, colors_of, cfg)
    exact, score, _ = evaluate_partial(objects, metadata, colors_of, cfg)
    return GenEvalResult(
        tag=tag,
        prompt=str(metadata.get("prompt", "")),
        correct=correct,
        exact=exact,
        score=score,
        reason=reason,
        detected={k: [o.box.tolist() for o in v] for k, v in objects.items()},
    )


# ---------------------------------------------------------------------------------------------
# Data and metric
# ---------------------------------------------------------------------------------------------
def _check_metadata(meta: Any, where: str) -> dict:
    if not isinstance(meta, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    for key, typ in (("tag", str), ("prompt", str), ("include", list)):
        if not isinstance(meta.get(key), typ):
            raise UserError(f"{where}: '{key}' missing or not a {typ.__name__}")
    for kind in ("include", "exclude"):
        clauses = meta.get(kind, [])
        if not isinstance(clauses, list):
            raise UserError(f"{where}: '{kind}' must be a list")
        for j, req in enumerate(clauses):
            if not isinstance(req, dict) or not isinstance(req.get("class"), str):
                raise UserError(f"{where}: {kind}[{j}] needs a 'class' name")
            if not isinstance(req.get("count"), int) or req["count"] < 1:
                raise UserError(f"{where}: {kind}[{j}] needs an integer 'count' >= 1")
            if "color" in req and req["color"] not in COLORS:
                raise UserError(f"{where}: {kind}[{j}] colour {req['color']!r} not in {COLORS}")
            if "position" in req:
                pos = req["position"]
                ok = (
                    isinstance(pos, list)
                    and len(pos) == 2
                    and pos[0] in RELATIONS
                    and isinstance(pos[1], int)
                    and 0 <= pos[1] < j
                )
                if not ok:
                    raise UserError(
                        f"{where}: {kind}[{j}] position must be [relation, earlier clause index]"
                        f" with relation in {RELATIONS}, got {pos!r}"
                    )
    return meta


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """Read GenEval metadata JSONL (one ``{tag, include, exclude?, prompt}`` a line), validated.

    Each record also gets ``"task": "geneval"`` (for ``route_by_task``) unless it has a task.
    """
    from flowopd.data.text import read_text_lines

    path = Path(path)
    out = []
    for lineno, line in enumerate(read_text_lines(path, "GenEval metadata file"), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        meta = _check_metadata(meta, f"{path}:{lineno}")
        meta.setdefault("task", "geneval")
        out.append(meta)
    return out


def geneval_metric(results: Iterable[GenEvalResult | Mapping[str, Any]]) -> dict[str, float]:
    """GenEval's summary: per-tag accuracy ``mean(correct)``, and ``overall`` = the mean of the
    per-tag accuracies (each tag weighs the same, whatever its number of images).

    results: ``GenEvalResult`` or dicts with ``tag`` and ``correct``. Returns
    ``{"overall": float, tag: float, ...}`` with tags in order of first appearance.
    """
    per_tag: dict[str, list[bool]] = {}
    for r in results:
        tag, ok = (r.tag, r.correct) if isinstance(r, GenEvalResult) else (r["tag"], r["correct"])
        per_tag.setdefault(tag, []).append(bool(ok))
    if not per_tag:
        raise UserError("geneval_metric: no results")
    acc = {tag: float(np.mean(v)) for tag, v in per_tag.items()}
    return {"overall": float(np.mean(list(acc.values()))), **acc}
