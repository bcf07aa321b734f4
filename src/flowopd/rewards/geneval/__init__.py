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

The package: ``rules`` (classes, types, the judgements, metadata, metric), ``detectors``
(``TransformersDetector``), ``colors`` (the colour classifiers), ``scorer`` (the reward).
"""

from __future__ import annotations

from flowopd.rewards.geneval.colors import (
    ClipColorClassifier,
    HsvColorClassifier,
    masked_crops,
)
from flowopd.rewards.geneval.detectors import (
    TransformersDetector,
    boxes_from_masks,
)
from flowopd.rewards.geneval.rules import (
    COLORS,
    GENEVAL_CLASSES,
    LABEL_ALIASES,
    RELATIONS,
    TAGS,
    ColorClassifier,
    ColorsFn,
    DetectedObject,
    Detection,
    Detector,
    GenEvalConfig,
    GenEvalResult,
    _check_metadata,  # noqa: F401  (data.prompts and preflight validate metadata lines)
    compute_iou,
    evaluate_detection,
    evaluate_official,
    evaluate_partial,
    geneval_label,
    geneval_metric,
    read_geneval_metadata,
    select_objects,
)
from flowopd.rewards.geneval.scorer import GenEvalScorer, make_geneval
from flowopd.world.spec import relative_position  # GenEval's rule, one implementation

__all__ = [
    "COLORS",
    "ClipColorClassifier",
    "ColorClassifier",
    "ColorsFn",
    "DetectedObject",
    "Detection",
    "Detector",
    "GENEVAL_CLASSES",
    "GenEvalConfig",
    "GenEvalResult",
    "GenEvalScorer",
    "HsvColorClassifier",
    "LABEL_ALIASES",
    "RELATIONS",
    "TAGS",
    "TransformersDetector",
    "boxes_from_masks",
    "compute_iou",
    "evaluate_detection",
    "evaluate_official",
    "evaluate_partial",
    "geneval_label",
    "geneval_metric",
    "make_geneval",
    "masked_crops",
    "read_geneval_metadata",
    "relative_position",
    "select_objects",
]
