"""The GenEval reward: detector + colour classifier + rules, registered as ``geneval``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowopd.errors import UserError
from flowopd.rewards.base import register_reward
from flowopd.rewards.geneval.colors import ClipColorClassifier, HsvColorClassifier
from flowopd.rewards.geneval.detectors import TransformersDetector
from flowopd.rewards.geneval.rules import (
    ColorClassifier,
    Detector,
    GenEvalConfig,
    GenEvalResult,
    evaluate_detection,
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
