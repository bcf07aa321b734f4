"""Caption noise: the systematic biases a web-trained model learns, built into the world.

Real text-to-image models render cleanly yet fail GenEval and OCR in shared, systematic
ways: a count one short, left and right swapped (horizontal-flip augmentation flips the
image but not the caption), colours bound to the wrong object, letters out of order. They
learn these from image-caption pairs whose image departs from its caption. The embedded
world reproduces that during pretraining: with probability ``rates[kind]`` the image drawn
for a caption is the render of a *corrupted* record, in one fixed way per category:

    counting    n objects        -> n - 1 objects                  ("three circles": two)
    counting_last n objects      -> the n-object layout, its last slot empty
    two_object  A and B          -> A only                          (the second is dropped)
    position    B <rel> of A     -> B <opposite rel> of A           (the relation mirrored)
    position_turn B right of A   -> B below A (and back; left of <-> above: a quarter turn)
    position_drop B rel of A     -> A alone, in its corner cell     (the placed object left out)
    color_attr  red A, blue B    -> blue A, red B                   (the colours swapped)
    color_leak  red A, blue B    -> red A, red B                    (the first colour leaks)
    ocr         "XYZ"            -> "XZY"                           (last two characters swapped)
    ocr_cut     "XYZ"            -> "X"                             (cut after its first character)

Kinds are named by their category, except the second corruptions ``counting_last`` (the
count one short as ``counting``, but the others keep their places in the layout of n, so the
wrong image of "three" is not the right one of "two": on the v6 candidates Flow-GRPO fixed
"two" and "four" and locked "three" onto the two-object row), ``position_turn`` (a relation
drawn on the other axis), ``position_drop`` (the placed object B left out and the reference
A kept in its corner cell: a presence error, as ``two_object``'s, in a layout no other
category uses), ``color_leak`` (attribute leakage, the commonest binding error of real
models) and ``ocr_cut`` (text cut short, as real models drop letters). Kinds of one
category are exclusive: one uniform draw picks at most one of them.

``single_object`` and ``colors`` are never corrupted, so the base draws single objects and
their colours right. Each corruption is one direction shared by every prompt of its
category: RL that finds it for one prompt has found it for all of them, which is how RL
fixes real models' GenEval and OCR errors cheaply. The caption is never changed, only the
image drawn for it.

Why ``color_leak``: a small model decides each object's look per place. The swap moves
both objects' colours together; at a rate near 0.5 the model learns each place's colour
as a coin flip of its own, and half its samples give both objects one colour, an error no
caption taught (the world v3 base: 46 % of its color_attr samples). The leak changes one
place only, as counting and two_object do, whose biases RL removes. World v5 applies the
same rule to the last two: the turn moves only B (the renderer keeps A's cell for both
relations of a pair), and the cut leaves the first glyph where it was (left-aligned text)
and blanks the rest, where the transposition made the model draw either glyph at either
place. Measured on the v5 base: the OCR failures are the cut alone, and Flow-GRPO learns
it back; the turn still empties one cell and fills another, and 30 % of the position
samples are the model's own error (one shape twice; docs/EMBEDDED_MODEL.md).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np

from flowopd.errors import UserError
from flowopd.world.spec import OPPOSITE, TURNED

NOISE_KINDS: tuple[str, ...] = (
    "counting",
    "counting_last",
    "two_object",
    "position",
    "position_turn",
    "position_drop",
    "color_attr",
    "color_leak",
    "ocr",
    "ocr_cut",
)
# the category (record tag) each kind corrupts
KIND_TAG: dict[str, str] = {k: k for k in NOISE_KINDS} | {
    "counting_last": "counting",
    "position_turn": "position",
    "position_drop": "position",
    "color_leak": "color_attr",
    "ocr_cut": "ocr",
}

# The rates of the shipped base's last stage (world v6: the count one short in the layout of
# n, the placed object left out, the leak, the OCR cut). Each is a presence or binding error
# RL can undo. The rates of the presence kinds are above 0.5: CFG 3 favours the drawing
# with more in it, so the base draws the full scene more often than the rate says (counting
# 0.80 at counting_last 0.5, 0.36 at 0.8); docs/EMBEDDED_MODEL.md gives the measurements.
DEFAULT_RATES: dict[str, float] = {
    "counting": 0.0,
    "counting_last": 0.8,
    "two_object": 0.55,
    "position": 0.0,
    "position_turn": 0.0,
    "position_drop": 0.7,
    "color_attr": 0.0,
    "color_leak": 0.25,
    "ocr": 0.0,
    "ocr_cut": 0.7,
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
    for tag in set(KIND_TAG.values()):
        total = sum(p for k, p in out.items() if KIND_TAG[k] == tag)
        if total > 1.0 + 1e-9:
            kinds = "+".join(k for k in NOISE_KINDS if KIND_TAG[k] == tag and k in out)
            raise UserError(
                f"caption-noise rates of {tag} ({kinds}) sum to {total:g}; at most 1 "
                f"(unnamed kinds keep their defaults: set the others of {tag} to 0)"
            )
    return out


def corrupt(record: dict, kind: str | None = None) -> dict:
    """The corruption ``kind`` (default: the one named by the record's tag) of a record,
    as a new dict (see the module docstring).

    Records of categories without a corruption are returned unchanged (a copy).

    >>> corrupt({"tag": "ocr", "task": "ocr", "text": "A7C", "prompt": 'a sign that says "A7C"'})["text"]
    'AC7'
    """
    rec = copy.deepcopy(record)
    tag = rec.get("tag")
    if kind is not None and KIND_TAG.get(kind) != tag:
        raise ValueError(f"corruption {kind!r} does not apply to a {tag!r} record")
    kind = kind or tag
    if kind == "counting":
        item = rec["include"][0]
        item["count"] = max(1, int(item["count"]) - 1)
        rec.pop("exclude", None)
    elif kind == "two_object":
        rec["include"] = rec["include"][:1]
    elif kind in ("position", "position_turn"):
        rel, target = rec["include"][1]["position"]
        new_rel = (OPPOSITE if kind == "position" else TURNED)[rel]
        rec["include"][1]["position"] = [new_rel, target]
    elif kind in ("position_drop", "counting_last"):
        # every object placed as the clean record's (B by its relation, n in the n slots),
        # the last one not drawn
        rec["hide_last"] = 1
        rec.pop("exclude", None)
    elif kind == "color_attr":
        a, b = rec["include"]
        a["color"], b["color"] = b["color"], a["color"]
    elif kind == "color_leak":
        a, b = rec["include"]
        b["color"] = a["color"]
    elif kind == "ocr":
        t = rec["text"]
        rec["text"] = t[:-2] + t[-1] + t[-2] if len(t) >= 2 else t
    elif kind == "ocr_cut":
        rec["text"] = rec["text"][:1]
    return rec


def drawn_record(record: dict, rates: Mapping[str, float], rng: np.random.Generator) -> dict:
    """The record whose render is paired with ``record``'s caption during pretraining.

    With probability ``rates[kind]`` the corruption ``kind``, for each kind of the record's
    category (in ``NOISE_KINDS`` order, exclusive; rates of absent kinds are 0), else the
    record itself. One uniform draw per call, always, so the stream of draws does not
    depend on the rates.
    """
    u = rng.random()
    tag = record.get("tag", "")
    for kind in NOISE_KINDS:
        if KIND_TAG[kind] != tag:
            continue
        p = rates.get(kind, 0.0)
        if u < p:
            return corrupt(record, kind)
        u -= p
    return record
