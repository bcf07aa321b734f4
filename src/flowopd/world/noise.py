"""Caption noise: the systematic biases a web-trained model learns, built into the world.

Real text-to-image models render cleanly yet fail GenEval and OCR in shared, systematic
ways: a count one short, left and right swapped (horizontal-flip augmentation flips the
image but not the caption), colours bound to the wrong object, letters out of order. They
learn these from image-caption pairs whose image departs from its caption. The embedded
world reproduces that during pretraining: with probability ``rates[kind]`` the image drawn
for a caption is the render of a *corrupted* record, in one fixed way per category:

    counting    n objects        -> n - 1 objects                  ("three circles": two)
    two_object  A and B          -> A only                          (the second is dropped)
    position    B <rel> of A     -> B <opposite rel> of A           (the relation mirrored)
    color_attr  red A, blue B    -> blue A, red B                   (the colours swapped)
    ocr         "XYZ"            -> "XZY"                           (last two characters swapped)

``single_object`` and ``colors`` are never corrupted, so the base draws single objects and
their colours right. Each corruption is one direction shared by every prompt of its
category: RL that finds it for one prompt has found it for all of them, which is how RL
fixes real models' GenEval and OCR errors cheaply. The caption is never changed, only the
image drawn for it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np

from flowopd.errors import UserError
from flowopd.world.spec import OPPOSITE

NOISE_KINDS: tuple[str, ...] = ("counting", "two_object", "position", "color_attr", "ocr")

# The rates of the shipped base's last stage (world v3, fixed places). Near 0.5 each
# caption's images show the right answer about as often as the corruption, so the base
# samples both and RL has a shared direction to shift; with CFG 3 the base still lands
# near the noise-free share (docs/EMBEDDED_MODEL.md gives the measurements).
DEFAULT_RATES: dict[str, float] = {
    "counting": 0.5,
    "two_object": 0.45,
    "position": 0.45,
    "color_attr": 0.45,
    "ocr": 0.5,
}


def check_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """Validate ``{kind: probability}``; unknown kinds and values outside [0, 1] are errors."""
    out = {}
    for kind, p in rates.items():
        if kind not in NOISE_KINDS:
            raise UserError(f"unknown caption-noise kind {kind!r}; choose from {NOISE_KINDS}")
        p = float(p)
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise UserError(f"caption-noise rate for {kind} must be in [0, 1], got {p}")
        out[kind] = p
    return out


def corrupt(record: dict) -> dict:
    """The fixed corruption of a record (a new dict; see the module docstring).

    Records of categories without a corruption are returned unchanged (a copy).

    >>> corrupt({"tag": "ocr", "task": "ocr", "text": "A7C", "prompt": 'a sign that says "A7C"'})["text"]
    'AC7'
    """
    rec = copy.deepcopy(record)
    tag = rec.get("tag")
    if tag == "ocr":
        t = rec["text"]
        rec["text"] = t[:-2] + t[-1] + t[-2] if len(t) >= 2 else t
    elif tag == "counting":
        item = rec["include"][0]
        item["count"] = max(1, int(item["count"]) - 1)
        rec.pop("exclude", None)
    elif tag == "two_object":
        rec["include"] = rec["include"][:1]
    elif tag == "position":
        rel, target = rec["include"][1]["position"]
        rec["include"][1]["position"] = [OPPOSITE[rel], target]
    elif tag == "color_attr":
        a, b = rec["include"]
        a["color"], b["color"] = b["color"], a["color"]
    return rec


def drawn_record(record: dict, rates: Mapping[str, float], rng: np.random.Generator) -> dict:
    """The record whose render is paired with ``record``'s caption during pretraining.

    With probability ``rates[record["tag"]]`` (0 for categories not in ``rates``) the
    corruption, else the record itself. One uniform draw per call, always, so the stream
    of draws does not depend on the rates.
    """
    u = rng.random()
    return corrupt(record) if u < rates.get(record.get("tag", ""), 0.0) else record
