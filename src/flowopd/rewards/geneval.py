"""GenEval: object-detector scoring of compositional prompts, and the Flow-GRPO training reward.

The scoring follows the official GenEval evaluator (djghosh13/geneval,
``evaluation/evaluate_images.py``) on top of two small protocols, so any detector and any colour
classifier can be plugged in:

- ``Detector.detect(images (B, H, W, 3) uint8) -> list[Detection]``; ``Detection`` holds boxes
  (N, 4) xyxy pixels, COCO class names as GenEval spells them, scores (N,), masks (N, H, W) bool
  or None. ``TransformersDetector`` wraps any transformers object detector (DETR family) or
  universal-segmentation model (Mask2Former, as GenEval uses) from a local path or hub id.
- ``ColorClassifier.classify(image, boxes, masks, classname) -> list[str]`` over ``COLORS``;
  ``ClipColorClassifier`` is GenEval's CLIP zero-shot on the masked crop, ``HsvColorClassifier``
  a model-free fallback.

Per image (``select_objects``): for each class, detections scoring strictly above the threshold
(0.3, or 0.9 for ``counting`` prompts) sorted by score, at most ``max_objects`` (16) kept, with
optional greedy NMS (off by default, ``nms_threshold=1``).

Three per-image outcomes (``GenEvalResult``):

- ``correct`` -- the official GenEval judgement (the benchmark metric). ``include`` clauses are
  ANDed, ``exclude`` clauses ORed. An include clause looks only at the ``count`` most confident
  objects of its class and needs at least ``count`` of them: *the over-counting quirk* -- extra
  objects are never penalised by an include clause, so "a photo of a dog" with three dogs is
  correct; ``counting`` prompts become exact only through their ``exclude`` clause
  (``count + 1`` objects of the class fail). Colour: the ``count`` top objects must all be
  classified as the colour. Position: every one of them must stand in the relation to every
  object of the target clause (``relative_position``).
- ``exact`` -- Flow-GRPO's "strict" variant: include counts must match exactly; excludes ignored.
- ``score`` -- Flow-GRPO's partial-credit training reward: the mean of per-clause terms
  ``1 - |n_req - n_found| / n_req`` (count; negative when over-counted more than twice),
  ``1 - |n_req - n_colour| / n_req`` (colour, on exact counts), ``1``/``0`` (position), with the
  published quirks kept: a count mismatch on a clause with a colour or position adds one 0; a
  failed position check adds a 0 *and* a 1.

``geneval_metric`` averages ``correct`` per tag, then over tags (GenEval's "overall score").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from flowopd.errors import UserError
from flowopd.rewards.base import register_reward
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


# ---------------------------------------------------------------------------------------------
# Colour classifiers
# ---------------------------------------------------------------------------------------------
def masked_crops(
    image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, bgcolor: str = "#999"
) -> list:
    """GenEval's crops: the object's mask pasted on a ``bgcolor`` canvas, cropped to its box.

    image (H, W, 3) uint8; boxes (N, 4) xyxy; masks (N, H, W) bool or None. Returns N PIL images.
    """
    from PIL import Image

    pil = Image.fromarray(image).convert("RGB")
    blank = Image.new("RGB", pil.size, color=bgcolor)
    crops = []
    for i, box in enumerate(boxes):
        im = pil
        if masks is not None:
            im = Image.composite(pil, blank, Image.fromarray(masks[i].astype(np.uint8) * 255))
        crops.append(im.crop(tuple(float(v) for v in box[:4])))
    return crops


class HsvColorClassifier:
    """Model-free fallback: each masked pixel gets a colour by HSV rules; the majority wins.

    Rules (h in degrees, s and v in [0, 1]): v < 0.2 black; s < 0.2 white if v > 0.55 else
    black; otherwise hue bins red [345, 15), orange [15, 45) (brown when v < 0.6), yellow
    [45, 70), green [70, 165), blue [165, 255), purple [255, 315), pink [315, 345), and light
    reds (s < 0.5, v > 0.7) pink. Crude next to CLIP, but deterministic and free.
    """

    def pixel_colors(self, rgb: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 -> (...) indices into ``COLORS``."""
        x = rgb.astype(np.float64) / 255.0
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        v = x.max(-1)
        c = v - x.min(-1)
        s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
        safe = np.maximum(c, 1e-12)
        h = np.where(
            v == r, ((g - b) / safe) % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)
        )
        h = h * 60.0
        idx = COLORS.index
        out = np.full(h.shape, idx("purple"))
        for name, lo, hi in (
            ("orange", 15, 45),
            ("yellow", 45, 70),
            ("green", 70, 165),
            ("blue", 165, 255),
            ("pink", 315, 345),
        ):
            out = np.where((h >= lo) & (h < hi), idx(name), out)
        red = (h >= 345) | (h < 15)
        out = np.where(red, idx("red"), out)
        out = np.where(red & (s < 0.5) & (v > 0.7), idx("pink"), out)
        out = np.where((out == idx("orange")) & (v < 0.6), idx("brown"), out)
        out = np.where(s < 0.2, np.where(v > 0.55, idx("white"), idx("black")), out)
        out = np.where(v < 0.2, idx("black"), out)
        return out

    def classify(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, classname: str
    ) -> list[str]:
        h, w = image.shape[:2]
        labels = self.pixel_colors(image)  # (H, W)
        out = []
        for i, box in enumerate(boxes):
            x0, y0 = max(int(round(box[0])), 0), max(int(round(box[1])), 0)
            x1, y1 = min(int(round(box[2])), w), min(int(round(box[3])), h)
            sel = np.zeros((h, w), dtype=bool)
            sel[y0:y1, x0:x1] = True
            if masks is not None:
                sel &= masks[i]
            votes = np.bincount(labels[sel].ravel(), minlength=len(COLORS))
            out.append(COLORS[int(votes.argmax())] if votes.sum() else "white")
        return out


class ClipColorClassifier:
    """GenEval's colour classifier: CLIP zero-shot over ``COLORS`` on the masked crop.

    Class weights per colour c: the normalised mean of the normalised text embeddings of
    "a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object";
    prediction = argmax over c of cos(image embedding, weight). GenEval uses OpenAI CLIP
    ViT-L/14 (``openai/clip-vit-large-patch14`` in transformers).
    """

    TEMPLATES = (
        "a photo of a {c} {cls}",
        "a photo of a {c}-colored {cls}",
        "a photo of a {c} object",
    )

    def __init__(
        self,
        model: str | Any = "openai/clip-vit-large-patch14",
        device: str = "cpu",
        bgcolor: str = "#999",
        batch_size: int = 16,
    ) -> None:
        from flowopd.rewards.preference import ClipEncoder

        self.encoder = (
            model if isinstance(model, ClipEncoder) else ClipEncoder(model, device=device)
        )
        self.bgcolor = bgcolor
        self.batch_size = batch_size
        self._weights: dict[str, Tensor] = {}

    def class_weights(self, classname: str) -> Tensor:
        """(len(COLORS), D) unit-norm zero-shot weights for ``classname``."""
        if classname not in self._weights:
            texts = [t.format(c=c, cls=classname) for c in COLORS for t in self.TEMPLATES]
            emb = self.encoder.encode_text(texts).view(len(COLORS), len(self.TEMPLATES), -1)
            w = emb.mean(1)
            self._weights[classname] = w / w.norm(dim=-1, keepdim=True)
        return self._weights[classname]

    def classify(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, classname: str
    ) -> list[str]:
        crops = masked_crops(image, boxes, masks, self.bgcolor)
        emb = torch.cat(
            [
                self.encoder.encode_images(crops[i : i + self.batch_size])
                for i in range(0, len(crops), self.batch_size)
            ]
        )  # (N, D), unit norm
        logits = emb @ self.class_weights(classname).T  # (N, len(COLORS))
        return [COLORS[i] for i in logits.argmax(-1).tolist()]


# ---------------------------------------------------------------------------------------------
# transformers detector backend
# ---------------------------------------------------------------------------------------------
def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) xyxy with exclusive max (``x_max + 1``), as mmdet's mask2bbox;
    an empty mask gives zeros."""
    out = np.zeros((len(masks), 4))
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        if len(xs) and len(ys):
            out[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return out


_SEGMENTATION_TYPES = {"mask2former", "maskformer", "oneformer"}


class TransformersDetector:
    """A transformers detector as a GenEval ``Detector``.

    model: local directory or hub id. ``kind="auto"`` picks universal segmentation
    (``AutoModelForUniversalSegmentation`` + ``post_process_instance_segmentation``; masks and
    mask-derived boxes, as GenEval's Mask2Former) for Mask2Former/MaskFormer/OneFormer configs and
    ``AutoModelForObjectDetection`` + ``post_process_object_detection`` (boxes only) otherwise.
    Labels go through ``label_map`` (extra ``{model label: GenEval class}``) then
    ``geneval_label``; labels GenEval does not know (stuff classes, "N/A") are dropped.
    min_score: detections below it are dropped early (GenEval thresholds later, at 0.3/0.9).
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        kind: str = "auto",
        label_map: Mapping[str, str] | None = None,
        min_score: float = 0.05,
        batch_size: int = 8,
        local_files_only: bool | None = None,
    ) -> None:
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForObjectDetection,
            AutoModelForUniversalSegmentation,
        )

        from flowopd.rewards.preference import hf_load

        config = hf_load(AutoConfig.from_pretrained, model, "detector config", local_files_only)
        if kind == "auto":
            kind = "segmentation" if config.model_type in _SEGMENTATION_TYPES else "detection"
        if kind not in ("segmentation", "detection"):
            raise UserError(f"detector kind must be auto, segmentation or detection, got {kind!r}")
        cls = (
            AutoModelForUniversalSegmentation
            if kind == "segmentation"
            else AutoModelForObjectDetection
        )
        self.model = hf_load(cls.from_pretrained, model, "detector", local_files_only).to(device)
        self.model.eval()
        self.processor = hf_load(
            AutoImageProcessor.from_pretrained, model, "detector image processor", local_files_only
        )
        self.kind, self.device = kind, device
        self.min_score, self.batch_size = min_score, batch_size
        extra = {k.lower(): v for k, v in (label_map or {}).items()}
        self.labels: dict[int, str | None] = {}
        for i, lab in self.model.config.id2label.items():
            mapped = extra.get(str(lab).lower())
            self.labels[int(i)] = mapped if mapped in GENEVAL_CLASSES else geneval_label(str(lab))

    @torch.no_grad()
    def detect(self, images: np.ndarray) -> list[Detection]:
        """(B, H, W, 3) uint8 RGB -> B ``Detection`` in input pixel coordinates."""
        out: list[Detection] = []
        for s in range(0, len(images), self.batch_size):
            chunk = list(images[s : s + self.batch_size])
            inputs = self.processor(images=chunk, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            sizes = [im.shape[:2] for im in chunk]
            if self.kind == "segmentation":
                res = self.processor.post_process_instance_segmentation(
                    outputs, threshold=self.min_score, target_sizes=sizes, return_binary_maps=True
                )
                out += [self._from_segments(r, hw) for r, hw in zip(res, sizes, strict=True)]
            else:
                res = self.processor.post_process_object_detection(
                    outputs, threshold=self.min_score, target_sizes=sizes
                )
                out += [self._from_boxes(r) for r in res]
        return out

    def _keep(self, label_ids: Sequence[int]) -> list[int]:
        return [i for i, lab in enumerate(label_ids) if self.labels.get(int(lab)) is not None]

    def _from_boxes(self, r: Mapping[str, Tensor]) -> Detection:
        ids = r["labels"].tolist()
        keep = self._keep(ids)
        return Detection(
            boxes=r["boxes"].float().cpu().numpy()[keep],
            labels=[self.labels[int(ids[i])] for i in keep],
            scores=r["scores"].float().cpu().numpy()[keep],
        )

    def _from_segments(self, r: Mapping[str, Any], hw: tuple[int, int]) -> Detection:
        info = r["segments_info"]
        if not info:
            return Detection(np.zeros((0, 4)), [], np.zeros(0), np.zeros((0, *hw), dtype=bool))
        masks = r["segmentation"].cpu().numpy().astype(bool)  # (N, H, W)
        keep = self._keep([s["label_id"] for s in info])
        masks = masks[keep]
        return Detection(
            boxes=boxes_from_masks(masks),
            labels=[self.labels[int(info[i]["label_id"])] for i in keep],
            scores=np.array([info[i]["score"] for i in keep], dtype=np.float64),
            masks=masks,
        )


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------
def _to_uint8_hwc(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8."""
    x = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class GenEvalScorer:
    """Detector + colour classifier + GenEval rules. ``score`` gives per-image results; calling it
    gives the reward tensor for ``mode``: ``"partial"`` (Flow-GRPO training reward, default),
    ``"correct"`` (official 0/1) or ``"exact"`` (Flow-GRPO strict 0/1)."""

    MODES = ("partial", "correct", "exact")

    def __init__(
        self,
        detector: Detector,
        colors: ColorClassifier | None = None,
        config: GenEvalConfig | None = None,
        mode: str = "partial",
    ) -> None:
        if mode not in self.MODES:
            from flowopd.errors import unknown

            raise unknown("GenEval reward mode", mode, self.MODES)
        self.detector, self.colors = detector, colors
        self.config, self.mode = config or GenEvalConfig(), mode

    def score(
        self, images: Tensor | np.ndarray, metadata: Sequence[Mapping]
    ) -> list[GenEvalResult]:
        """images (B, 3, H, W) float in [0, 1] or (B, H, W, 3) uint8; metadata: B GenEval records."""
        arrays = _to_uint8_hwc(images) if isinstance(images, Tensor) else np.asarray(images)
        if len(arrays) != len(metadata):
            raise ValueError(f"{len(arrays)} images but {len(metadata)} metadata records")
        for i, meta in enumerate(metadata):
            if not isinstance(meta, Mapping) or "include" not in meta or "tag" not in meta:
                raise UserError(
                    f"GenEval reward: metadata {i} needs GenEval 'tag' and 'include' fields "
                    "(read prompts with read_geneval_metadata)"
                )
        detections = self.detector.detect(arrays)
        return [
            evaluate_detection(a, d, m, self.colors, self.config)
            for a, d, m in zip(arrays, detections, metadata, strict=True)
        ]

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        results = self.score(images, metadata)
        if self.mode == "partial":
            vals = [r.score for r in results]
        else:
            vals = [float(r.correct if self.mode == "correct" else r.exact) for r in results]
        return torch.tensor(vals, dtype=torch.float32)


@register_reward("geneval")
def make_geneval(
    detector: str | Path | Detector = "facebook/mask2former-swin-small-coco-instance",
    colors: str | ColorClassifier = "clip",
    clip_model: str = "openai/clip-vit-large-patch14",
    mode: str = "partial",
    device: str = "cpu",
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
    position_threshold: float = 0.1,
    **detector_options: Any,
) -> GenEvalScorer:
    """``geneval`` reward. detector: a ``Detector`` or a transformers model path / hub id
    (``detector_options`` go to ``TransformersDetector``); colors: ``"clip"`` (GenEval's CLIP
    zero-shot with ``clip_model``), ``"hsv"`` (model-free) or a ``ColorClassifier``; mode:
    ``partial`` | ``correct`` | ``exact``; the rest are GenEval's evaluator options."""
    if not hasattr(detector, "detect"):
        detector = TransformersDetector(detector, device=device, **detector_options)
    if colors == "clip":
        colors = ClipColorClassifier(clip_model, device=device)
    elif colors == "hsv":
        colors = HsvColorClassifier()
    elif isinstance(colors, str):
        raise UserError(
            f"GenEval colors must be 'clip', 'hsv' or a ColorClassifier, got {colors!r}"
        )
    cfg = GenEvalConfig(
        threshold, counting_threshold, max_objects, nms_threshold, position_threshold
    )
    return GenEvalScorer(detector, colors, cfg, mode)
