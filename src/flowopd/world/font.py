"""A fixed 3x5 bitmap font for the text task, drawn at scale 2 (6x10 px glyphs).

Every glyph touches all four sides of its 3x5 cell, so a rendered string splits into
glyphs at the blank columns between them and each glyph's box is its whole cell; the
reader in ``flowopd.rewards.toy`` relies on that. The letters were chosen to differ from
every other glyph in at least two cells (the digits are the standard 3x5 digits, some of
which differ in one cell, i.e. a 2x2 block once scaled).
"""

from __future__ import annotations

import numpy as np

GLYPH_W, GLYPH_H = 3, 5
SCALE = 2  # pixels per font cell
SPACING = 1  # blank font cells between glyphs

_ROWS: dict[str, str] = {
    "0": "111 101 101 101 111",
    "1": "110 010 010 010 111",
    "2": "111 001 111 100 111",
    "3": "111 001 111 001 111",
    "4": "101 101 111 001 001",
    "5": "111 100 111 001 111",
    "6": "111 100 111 101 111",
    "7": "111 001 001 001 001",
    "8": "111 101 111 101 111",
    "9": "111 101 111 001 111",
    "A": "010 101 111 101 101",
    "C": "111 100 100 100 111",
    "H": "101 101 111 101 101",
    "L": "100 100 100 100 111",
    "P": "111 101 111 100 100",
    "T": "111 010 010 010 010",
    "X": "101 101 010 101 101",
    "Y": "101 101 010 010 010",
}

CHARSET: str = "".join(_ROWS)

# char -> (5, 3) bool array
GLYPHS: dict[str, np.ndarray] = {
    ch: np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool)
    for ch, rows in _ROWS.items()
}

# (K, 5, 3) float templates in CHARSET order, for nearest-template reading.
TEMPLATES: np.ndarray = np.stack([GLYPHS[ch] for ch in CHARSET]).astype(np.float32)


def text_size(text: str, scale: int = SCALE) -> tuple[int, int]:
    """(height, width) in pixels of ``text`` drawn at ``scale``."""
    n = len(text)
    return GLYPH_H * scale, (n * GLYPH_W + max(n - 1, 0) * SPACING) * scale


def text_mask(text: str, scale: int = SCALE) -> np.ndarray:
    """Boolean ink mask of ``text``, shape (5 * scale, (4 n - 1) * scale).

    Raises ``KeyError`` for a character outside ``CHARSET``.
    """
    cells = np.zeros((GLYPH_H, len(text) * (GLYPH_W + SPACING) - SPACING), dtype=bool)
    for i, ch in enumerate(text):
        x = i * (GLYPH_W + SPACING)
        cells[:, x : x + GLYPH_W] = GLYPHS[ch]
    return cells.repeat(scale, axis=0).repeat(scale, axis=1)
