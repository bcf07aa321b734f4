"""GenEval's colour classification: CLIP zero-shot on the masked crop, and a model-free HSV
fallback (``ColorClassifier`` protocol in ``rules``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowopd.rewards.geneval.rules import COLORS


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
