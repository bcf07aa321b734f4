"""The vocabulary of the synthetic world, shared by the prompt generator, the renderer
and the exact scorers (``flowopd.rewards.toy``).

Images are (3, 32, 32) float arrays in [0, 1] on a white background. Objects are flat
shapes in one of a few well-separated saturated colours; text is black ink.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32

# Shapes, in a fixed order (their index is used nowhere outside this package).
# A fourth shape was tried and left out: at 7-10 px a diamond or a cross is too
# close to a triangle in the features the detector can measure reliably.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

# Saturated colours, pairwise RGB distance >= 0.8 and >= 0.8 from white and black, so
# that nearest-palette segmentation stays correct with noise and blurred edges.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.10),
    "blue": (0.10, 0.20, 0.95),
    "yellow": (0.95, 0.90, 0.10),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND = (1.0, 1.0, 1.0)
INK = (0.0, 0.0, 0.0)

# GenEval's six categories, in the order of its reports.
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
# The relation turned a quarter about the reference object (world v5's position noise):
# with the reference in a corner cell, both relations of a pair put the object in a cell
# next to it, so the turn moves only the object (``flowopd.world.render``).
TURNED: dict[str, str] = {
    "right of": "below",
    "below": "right of",
    "left of": "above",
    "above": "left of",
}
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNT_RANGE = (2, 4)  # counting prompts, as GenEval (2-4 objects)

# GenEval's evaluate_images.py: offsets smaller than 10% of the summed box sizes are ignored.
POSITION_THRESHOLD = 0.1


def relative_position(
    box_a: np.ndarray, box_b: np.ndarray, threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box A to box B, exactly as GenEval's ``relative_position``.

    Boxes are ``(x0, y0, x1, y1)`` in pixels, y pointing down. With centres ``c``, sizes
    ``d`` and ``o = c_a - c_b``::

        r = max(|o| - threshold (d_a + d_b), 0) * sign(o)      # per axis, threshold 0.1
        (dx, dy) = r / ||o||
        "left of" if dx < -0.5, "right of" if dx > 0.5, "above" if dy < -0.5, "below" if dy > 0.5

    An empty set when the boxes are (nearly) concentric. Used by both the world's renderer
    and scorer and by the real GenEval reward (``flowopd.rewards.geneval``).
    """
    boxes = np.array([box_a, box_b], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels
