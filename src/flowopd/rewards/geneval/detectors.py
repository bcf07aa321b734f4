"""The detector backend: any transformers object detector (DETR family) or universal
segmentation model (Mask2Former, as GenEval uses) behind the ``Detector`` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowopd.errors import UserError
from flowopd.rewards.geneval.rules import GENEVAL_CLASSES, Detection, geneval_label


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
