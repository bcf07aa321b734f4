"""Exact scorers for the synthetic world (``flowopd.world``): stand-ins for GenEval and OCR,
plus a task-agnostic image-quality score standing in for an aesthetic model.

All rewards have the protocol signature ``(images, prompts, metadata) -> Tensor[B]``
with images (B, 3, H, W) in [0, 1] (H = W = 32 for the world; other sizes work, the
area thresholds scale with H * W).

Detection (``detect_objects``), for images that may be blurred, noisy or off-colour:
1. each pixel takes the nearest of {white, black, palette colours} in RGB; it is an
   object pixel of colour k when that is palette colour k at distance < 0.45 (palette
   colours are >= 0.8 apart, so this tolerates noise and half-blurred edges);
2. 4-connected components per colour, kept when area >= 10 px (per 32x32);
3. shape from two features of a component (holes filled, spurs dropped) with box
   (h, w): fill = area / (h w) and the normalised height of its centre of mass
   cy = (mean_y - y0) / (h - 1): triangle if cy > 0.555 or fill < 0.68 (upright
   triangles: fill ~0.6, cy ~0.62), square if fill > 0.885, circle otherwise (fill
   ~0.8); elongated components (aspect > 1.8) are "unknown" and count for no class.

Scoring follows GenEval's ``evaluate_images.py`` and Flow-GRPO's reward server, with
detections of a class ordered by area (largest first) where GenEval orders by detector
confidence. See ``geneval_evaluate`` for both rules.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein
from scipy import ndimage
from torch import Tensor

from flowopd.errors import UserError
from flowopd.rewards.base import RewardFn, register_reward
from flowopd.world.font import CHARSET, GLYPH_H, GLYPH_W, SPACING, TEMPLATES
from flowopd.world.spec import BACKGROUND, INK, PALETTE, relative_position

COLOR_TOL = 0.45  # max RGB distance of an object pixel to its palette colour
MIN_AREA = 10  # px per 32x32 image; smallest rendered object (7 px triangle) has ~30
MAX_ASPECT = 1.8

_COLOR_NAMES = tuple(PALETTE)
# (K, 3): palette colours first, then white and black (which are never objects)
_REFS = np.array([*PALETTE.values(), BACKGROUND, INK], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """A detected object: class, colour, box ``(x0, y0, x1, y1)`` (exclusive ends), area in px."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    area: int


def images_to_numpy(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) tensor of any dtype/device -> float32 numpy in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return images.detach().to("cpu", torch.float32).clamp(0, 1).numpy()


_CROSS = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])


def classify_shape(mask: np.ndarray) -> str:
    """'circle' | 'square' | 'triangle' | 'unknown' for a component's (h, w) bool mask.

    Holes are filled and spur pixels (< 2 of 4 neighbours inside) dropped first, so
    ragged blurred-and-noisy edges do not stretch the box. Then, with the box (h, w),
    fill = area / (h w) and cy = (mean_y - y0) / (h - 1):
    triangle if cy > 0.555 or fill < 0.68, square if fill > 0.885, else circle;
    "unknown" when the box's aspect ratio exceeds 1.8.
    """
    m = ndimage.binary_fill_holes(mask)
    m &= ndimage.convolve(m.astype(np.int8), _CROSS, mode="constant") >= 2
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return "unknown"
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "unknown"
    fill = len(ys) / (h * w)
    cy = (ys.mean() - ys.min()) / (h - 1) if h > 1 else 0.5
    if cy > 0.555 or fill < 0.68:
        return "triangle"
    return "square" if fill > 0.885 else "circle"


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Objects in one (3, H, W) image in [0, 1], largest first (see the module docstring)."""
    pix = image.transpose(1, 2, 0)  # (H, W, 3)
    d2 = ((pix[:, :, None, :] - _REFS) ** 2).sum(-1)  # (H, W, K)
    nearest = d2.argmin(-1)
    ok = np.take_along_axis(d2, nearest[..., None], -1)[..., 0] < COLOR_TOL**2
    min_area = MIN_AREA * image.shape[1] * image.shape[2] / 1024
    found: list[Detection] = []
    for k, color in enumerate(_COLOR_NAMES):
        labels, n = ndimage.label((nearest == k) & ok)
        if n == 0:
            continue
        for j, sl in enumerate(ndimage.find_objects(labels), 1):
            mask = labels[sl] == j
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = sl
            box = (xs.start, ys.start, xs.stop, ys.stop)
            found.append(Detection(classify_shape(mask), color, box, area))
    found.sort(key=lambda d: -d.area)
    return found


@dataclass(frozen=True)
class GenevalResult:
    """``strict``: GenEval's correctness; ``reward``: Flow-GRPO's partial credit in [0, 1]."""

    strict: bool
    reward: float
    reason: str


def _check_geneval_metadata(meta: dict) -> None:
    if not isinstance(meta, dict) or "include" not in meta:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"toy_geneval needs GenEval metadata with an 'include' list, got {keys}")


def geneval_evaluate(detections: Sequence[Detection], meta: dict) -> GenevalResult:
    """Score detections against a GenEval record.

    Strict (GenEval ``evaluate``, the metric): for each ``include`` item take the first
    ``count`` detections of its class; fail if fewer than ``count``; if coloured, fail
    unless all ``count`` have the colour; if positioned, fail unless every one of them has
    the relation to every object matched by the referenced item (``relative_position``).
    Each ``exclude`` item fails if >= ``count`` detections of its class exist (this makes
    counting exact: GenEval's counting records exclude ``n + 1``).

    Partial reward (Flow-GRPO's ``evaluate_reward``): a list of terms, averaged:
      counts   ``max(1 - |n_req - n_found| / n_req, 0)`` per item (all detections of the class);
      if the count is not exact, a 0 for the item's colour/position (when it has one);
      else colour ``max(1 - |n_req - n_colour| / n_req, 0)`` with n_colour those of the
      right colour, and position 1 if every pair has the relation, 0 otherwise (and 0
      when the referenced item did not match). Flow-GRPO leaves the count term unclipped
      (negative for n_found > 2 n_req) and appends 1.0 after a failed position check; we
      clip at 0 and append 1.0 only on success, so the reward stays in [0, 1].
    """
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in detections:  # already largest first
        by_class[d.shape].append(d)

    strict, reasons = True, []
    groups: list[list[Detection] | None] = []
    for req in meta["include"]:
        cls, n = req["class"], int(req["count"])
        found = by_class[cls][:n]
        ok = len(found) >= n
        if not ok:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if ok and "color" in req:
            n_col = sum(d.color == req["color"] for d in found)
            if n_col < n:
                ok = False
                reasons.append(f"expected {req['color']} {cls}>={n}, found {n_col}")
        if ok and "position" in req:
            ok = _position_ok(found, groups, req["position"])
            if not ok:
                reasons.append(f"expected {cls} {req['position'][0]} target")
        strict &= ok
        groups.append(found if ok else None)
    for req in meta.get("exclude", []):
        n_found = len(by_class[req["class"]])
        if n_found >= req["count"]:
            strict = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n_found}")

    terms: list[float] = []
    groups = []
    for req in meta["include"]:
        cls, n = req["class"], int(req["count"])
        found = by_class[cls]
        terms.append(max(1 - abs(n - len(found)) / n, 0.0))
        ok = len(found) == n
        if not ok:
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                n_col = sum(d.color == req["color"] for d in found)
                terms.append(max(1 - abs(n - n_col) / n, 0.0))
                ok = n_col == n
            if "position" in req and ok:
                ok = _position_ok(found, groups, req["position"])
                terms.append(1.0 if ok else 0.0)
        groups.append(found if ok else None)
    reward = sum(terms) / len(terms) if terms else 0.0
    return GenevalResult(bool(strict), float(reward), "; ".join(reasons))


def _position_ok(
    found: Sequence[Detection], groups: list[list[Detection] | None], position: Sequence
) -> bool:
    rel, target = position[0], int(position[1])
    ref = groups[target] if target < len(groups) else None
    if ref is None:
        return False
    return all(rel in relative_position(o.box, t.box) for o in found for t in ref)


def _geneval_batch(images: Tensor, metadata: list[dict]) -> list[GenevalResult]:
    arr = images_to_numpy(images)
    if len(metadata) != len(arr):
        raise ValueError(f"{len(arr)} images but {len(metadata)} metadata records")
    for m in metadata:
        _check_geneval_metadata(m)
    return [geneval_evaluate(detect_objects(img), m) for img, m in zip(arr, metadata, strict=True)]


def toy_geneval_reward(images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
    """Partial-credit GenEval training reward in [0, 1] (``geneval_evaluate``), shape (B,)."""
    res = _geneval_batch(images, metadata)
    return torch.tensor([r.reward for r in res], dtype=torch.float32)


def toy_geneval_strict(images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
    """GenEval's strict per-prompt correctness, 0.0 or 1.0, shape (B,)."""
    res = _geneval_batch(images, metadata)
    return torch.tensor([float(r.strict) for r in res], dtype=torch.float32)


def geneval_metric(
    strict_scores: Tensor | Sequence[float], tags: Sequence[str]
) -> dict[str, float]:
    """GenEval's metric: per-tag accuracy and ``overall`` = unweighted mean over the tags present.

    >>> geneval_metric([1, 0, 1, 1], ["counting", "counting", "colors", "colors"])
    {'colors': 1.0, 'counting': 0.5, 'overall': 0.75}
    """
    scores = [
        float(s)
        for s in (strict_scores.tolist() if isinstance(strict_scores, Tensor) else strict_scores)
    ]
    if len(scores) != len(tags):
        raise ValueError(f"{len(scores)} scores but {len(tags)} tags")
    per: dict[str, list[float]] = defaultdict(list)
    for s, t in zip(scores, tags, strict=True):
        per[t].append(s)
    out = {t: float(np.mean(v)) for t, v in sorted(per.items())}
    out["overall"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


# ---------------------------------------------------------------- OCR

_QUOTED = re.compile(r'"([^"]*)"')


def ocr_target(prompt: str, meta: dict | None = None) -> str:
    """The text a prompt asks for: ``meta["text"]`` if present, else the first "quoted" span."""
    if meta and "text" in meta:
        return str(meta["text"])
    m = _QUOTED.search(prompt)
    if m is None:
        raise UserError(f"toy_ocr: no quoted text in prompt {prompt!r}")
    return m.group(1)


def _resample_matrix(lo: float, hi: float, n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) area-averaging weights of pixels [j, j+1) into n_out equal cells of [lo, hi)."""
    edges = np.linspace(lo, hi, n_out + 1)
    j = np.arange(n_in)
    overlap = np.clip(np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j), 0, None)
    return overlap / overlap.sum(1, keepdims=True).clip(1e-6)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D bool array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    d = np.diff(padded)
    return list(zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0], strict=True))


def read_text(image: np.ndarray, reject: float = 0.15) -> str:
    """Read a single line of the world's bitmap font from a (3, H, W) image in [0, 1].

    Ink darkness ``k = 1 - max_rgb`` (black ink -> 1, white and saturated colours -> ~0);
    ink pixels ``k > 0.5`` minus specks (< 3 px per 32x32). The text line is the run of
    inked rows with the most ink; it splits into glyphs at blank columns, and a run
    wider than one glyph is cut into ``round((w + gap) / pitch)`` equal parts (glyphs
    merged by blur). Each glyph box is area-averaged to the 5x3 font grid and read as
    the nearest template (L2); a glyph whose mean squared distance exceeds ``reject``
    reads as '?'.
    """
    dark = 1.0 - image.max(axis=0)  # (H, W)
    ink = dark > 0.5
    labels, n = ndimage.label(ink, structure=np.ones((3, 3)))
    if n == 0:
        return ""
    sizes = ndimage.sum_labels(ink, labels, np.arange(1, n + 1))
    min_px = 3 * image.shape[1] * image.shape[2] / 1024
    ink &= np.isin(labels, 1 + np.nonzero(sizes >= min_px)[0])
    rows = _runs(ink.any(axis=1))
    if not rows:
        return ""
    r0, r1 = max(rows, key=lambda r: ink[r[0] : r[1]].sum())
    height = r1 - r0
    if height < 3:
        return ""
    line = ink[r0:r1]
    pitch = height * (GLYPH_W + SPACING) / GLYPH_H  # expected px per glyph + gap
    gap = height * SPACING / GLYPH_H
    boxes: list[tuple[float, float]] = []
    for c0, c1 in _runs(line.any(axis=0)):
        w = c1 - c0
        if w < 0.3 * height * GLYPH_W / GLYPH_H:
            continue  # a sliver: noise, not a glyph
        k = max(1, round((w + gap) / pitch))
        step = (w + gap) / k
        boxes += [(c0 + i * step, c0 + i * step + step - gap) for i in range(k)]
    ay = _resample_matrix(r0, r1, GLYPH_H, image.shape[1])  # (5, H)
    out = []
    for b0, b1 in boxes:
        ax = _resample_matrix(b0, b1, GLYPH_W, image.shape[2])  # (3, W)
        cells = ay @ dark @ ax.T  # (5, 3)
        err = ((TEMPLATES - cells) ** 2).mean(axis=(1, 2))  # (K,)
        best = int(err.argmin())
        out.append(CHARSET[best] if err[best] <= reject else "?")
    return "".join(out)


def ocr_score(read: str, target: str) -> float:
    """METHODS.md §6: lowercase, no spaces; 1 if target in read, else max(1 - lev / len, 0)."""
    read = read.lower().replace(" ", "")
    target = target.lower().replace(" ", "")
    if not target:
        return 0.0
    if target in read:
        return 1.0
    return max(1.0 - Levenshtein.distance(read, target) / len(target), 0.0)


def toy_ocr_reward(images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
    """OCR reward in [0, 1] for each image vs its prompt's quoted text, shape (B,)."""
    arr = images_to_numpy(images)
    if len(prompts) != len(arr):
        raise ValueError(f"{len(arr)} images but {len(prompts)} prompts")
    metas = metadata if metadata is not None else [{}] * len(arr)
    scores = [
        ocr_score(read_text(img), ocr_target(p, m))
        for img, p, m in zip(arr, prompts, metas, strict=True)
    ]
    return torch.tensor(scores, dtype=torch.float32)


# ---------------------------------------------------------------- quality

QUALITY_TAU = 0.15  # RGB distance at which a pixel's adherence falls to exp(-1/2)
QUALITY_MIN_CONTENT = 0.02  # fraction of non-background pixels needed for full credit

_ALLOWED = _REFS  # palette colours, white, black


def quality_score(images: Tensor) -> Tensor:
    """Task-agnostic image quality in [0, 1], shape (B,), highest for clean flat renders.

    ``q = adherence * content``:
      adherence = mean over pixels of ``exp(-d^2 / (2 tau^2))``, d the RGB distance to
        the nearest allowed colour (palette, white background, black ink), tau = 0.15:
        noise, speckle, washed-out or off-palette colours and blurred edges (which mix
        colours) all lower it, monotonically in their strength;
      content = ``min(f / 0.02, 1)``, f the fraction of pixels farther than 0.3 from
        white, so a blank canvas cannot score well.
    Ground-truth renders score exactly 1.
    """
    x = images.detach().to("cpu", torch.float32).clamp(0, 1)  # (B, 3, H, W)
    ref = torch.from_numpy(_ALLOWED)  # (K, 3)
    d2 = ((x[:, None] - ref[None, :, :, None, None]) ** 2).sum(2)  # (B, K, H, W)
    adherence = torch.exp(-d2.min(1).values / (2 * QUALITY_TAU**2)).mean((1, 2))
    off_white = ((x - 1.0) ** 2).sum(1) > 0.3**2  # (B, H, W)
    content = (off_white.float().mean((1, 2)) / QUALITY_MIN_CONTENT).clamp(max=1.0)
    return adherence * content


def toy_quality_reward(images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
    """``quality_score`` as a reward (ignores prompts and metadata), shape (B,)."""
    return quality_score(images)


# ---------------------------------------------------------------- registry


@register_reward("toy_geneval")
def _make_toy_geneval() -> RewardFn:
    """Partial-credit GenEval reward on the synthetic world."""
    return toy_geneval_reward


@register_reward("toy_geneval_strict")
def _make_toy_geneval_strict() -> RewardFn:
    """Strict 0/1 GenEval correctness on the synthetic world."""
    return toy_geneval_strict


@register_reward("toy_ocr")
def _make_toy_ocr() -> RewardFn:
    """OCR reward on the world's bitmap font."""
    return toy_ocr_reward


@register_reward("toy_quality")
def _make_toy_quality() -> RewardFn:
    """Task-agnostic image quality (stand-in for an aesthetic score)."""
    return toy_quality_reward
