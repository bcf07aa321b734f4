"""Deterministic prompt records for the synthetic world, in GenEval's metadata schema.

GenEval-like records (one of the six GenEval tags)::

    {"tag": "position",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a circle left of a square", "task": "geneval"}

``position: [rel, i]`` places the object relative to ``include[i]``; counting records carry
GenEval's ``exclude: [{"class": c, "count": n + 1}]``, which makes their count exact.
OCR records::

    {"tag": "ocr", "task": "ocr", "text": "47", "prompt": "a sign that says \"47\""}

Splits: each tag's prompt space is enumerated, shuffled with a fixed seed, and a quarter is
held out for ``test``; spaces too small to split (single_object: 3 prompts, two_object: 6,
counting: 9) are shared by both splits. So ``train`` and ``test`` share no prompt of the
colors, position, color_attr and ocr tags, and every class and colour still occurs in train.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import cache

import numpy as np

from flowopd.errors import UserError, unknown
from flowopd.world.font import CHARSET
from flowopd.world.spec import (
    COLORS,
    COUNT_RANGE,
    GENEVAL_TAGS,
    NUMBERS,
    PLURALS,
    RELATIONS,
    SHAPES,
)

TASKS: tuple[str, ...] = ("geneval", "ocr")
SPLITS: tuple[str, ...] = ("train", "test")
# pretraining's captions may span the whole space: web data shows a real base every
# composition, while post-training and evaluation keep to their own split
ALL = "all"
OCR_LENGTHS = (2, 3)
OCR_TEMPLATE = 'a sign that says "{text}"'

_SPLIT_SEED = 20250101  # fixed: the split must not depend on the sampling seed
_TEST_FRACTION = 0.25
_MIN_SPLIT_POOL = 10  # smaller prompt spaces are shared by both splits


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _phrase(item: dict) -> str:
    """'a red circle' / 'three circles' for one ``include`` item."""
    cls = item["class"]
    noun = cls if item["count"] == 1 else PLURALS.get(cls, cls + "s")
    if "color" in item:
        noun = f"{item['color']} {noun}"
    return _a(noun) if item["count"] == 1 else f"{NUMBERS[item['count']]} {noun}"


def geneval_prompt(tag: str, include: Sequence[dict]) -> str:
    """The prompt GenEval writes for ``include`` (see its test_metadata.jsonl).

    >>> geneval_prompt("position", [{"class": "square", "count": 1},
    ...     {"class": "circle", "count": 1, "position": ["left of", 0]}])
    'a photo of a circle left of a square'
    """
    if tag == "position":
        target, obj = include
        return f"a photo of {_phrase(obj)} {obj['position'][0]} {_phrase(target)}"
    return "a photo of " + " and ".join(_phrase(item) for item in include)


def geneval_record(tag: str, include: Sequence[dict]) -> dict:
    """A full GenEval-style record: tag, include, exclude (counting only), prompt, task."""
    if tag not in GENEVAL_TAGS:
        raise unknown("GenEval tag", tag, GENEVAL_TAGS)
    include = [dict(item) for item in include]
    rec: dict = {"tag": tag, "include": include}
    if tag == "counting":
        item = include[0]
        rec["exclude"] = [{"class": item["class"], "count": item["count"] + 1}]
    rec["prompt"] = geneval_prompt(tag, include)
    rec["task"] = "geneval"
    return rec


def ocr_record(text: str) -> dict:
    """``{"tag": "ocr", "task": "ocr", "text": text, "prompt": 'a sign that says "text"'}``."""
    bad = sorted(set(text) - set(CHARSET))
    if bad:
        raise UserError(f"text {text!r} has characters outside the world's font: {''.join(bad)}")
    return {"tag": "ocr", "task": "ocr", "text": text, "prompt": OCR_TEMPLATE.format(text=text)}


def _one(cls: str, **extra) -> dict:
    return {"class": cls, "count": 1, **extra}


def geneval_space(tag: str) -> list[dict]:
    """Every distinct record of a GenEval tag, in a fixed order.

    Sizes: single_object 3, two_object 6, counting 9, colors 12, position 24, color_attr 72.
    """
    pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        incs = [[_one(s)] for s in SHAPES]
    elif tag == "two_object":
        incs = [[_one(a), _one(b)] for a, b in pairs]
    elif tag == "counting":
        lo, hi = COUNT_RANGE
        incs = [[{"class": s, "count": n}] for s in SHAPES for n in range(lo, hi + 1)]
    elif tag == "colors":
        incs = [[_one(s, color=c)] for s in SHAPES for c in COLORS]
    elif tag == "position":
        # include[0] is the reference object, include[1] sits `rel` of it (GenEval's order)
        incs = [[_one(a), _one(b, position=[r, 0])] for a, b in pairs for r in RELATIONS]
    elif tag == "color_attr":
        incs = [
            [_one(a, color=ca), _one(b, color=cb)]
            for a, b in pairs
            for ca, cb in itertools.permutations(COLORS, 2)
        ]
    else:
        raise unknown("GenEval tag", tag, GENEVAL_TAGS)
    return [geneval_record(tag, inc) for inc in incs]


@cache
def ocr_space() -> tuple[str, ...]:
    """Every target string: ``CHARSET`` words of length 2-3 (18^2 + 18^3 = 6156)."""
    return tuple(
        "".join(chars) for n in OCR_LENGTHS for chars in itertools.product(CHARSET, repeat=n)
    )


@cache
def _geneval_prompts() -> frozenset[str]:
    return frozenset(r["prompt"] for tag in GENEVAL_TAGS for r in geneval_space(tag))


def in_grammar(prompt: str) -> bool:
    """Whether ``prompt`` is one the world's captions use: a GenEval-like prompt of its
    shapes and colours (``a photo of a red circle and a blue square``) or an OCR prompt of
    2-3 ``CHARSET`` characters (``a sign that says "47"``). A model pretrained on the world
    has seen no other; outside them its images are noise to the scorers."""
    prefix, suffix = OCR_TEMPLATE.split("{text}")
    if prompt.startswith(prefix) and prompt.endswith(suffix):
        text = prompt[len(prefix) : len(prompt) - len(suffix)]
        return len(text) in OCR_LENGTHS and set(text) <= set(CHARSET)
    return prompt in _geneval_prompts()


def split_space(items: Sequence, split: str) -> list:
    """The part of a prompt space belonging to ``split`` (fixed, seed-independent).

    Spaces with fewer than 10 items are returned whole for both splits; ``"all"`` returns
    every item.
    """
    if split not in (*SPLITS, ALL):
        raise unknown("split", split, (*SPLITS, ALL))
    if split == ALL or len(items) < _MIN_SPLIT_POOL:
        return list(items)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(items))
    n_test = round(_TEST_FRACTION * len(items))
    keep = order[:n_test] if split == "test" else order[n_test:]
    return [items[i] for i in sorted(keep)]


@cache
def _split_of(task_or_tag: str, split: str) -> tuple:
    """Cached ``split_space`` of the OCR space ("ocr") or of a GenEval tag's space."""
    space = ocr_space() if task_or_tag == "ocr" else geneval_space(task_or_tag)
    return tuple(split_space(space, split))


def _cycle(pool: Sequence, rng: np.random.Generator) -> Iterator:
    """Endless draws without replacement: a fresh permutation of ``pool`` each pass."""
    while True:
        for i in rng.permutation(len(pool)):
            yield pool[i]


def make_records(
    task: str, split: str, n: int, seed: int = 0, tags: Sequence[str] | None = None
) -> list[dict]:
    """``n`` records of ``task`` ("geneval" | "ocr") from ``split`` ("train" | "test" |
    "all"), deterministic in ``seed``.

    GenEval tags are balanced: records come in rounds of one per tag (in a random order
    per round); within a tag, prompts are drawn without replacement until its split is
    exhausted, then reshuffled. ``tags`` restricts the GenEval categories.
    """
    if task not in TASKS:
        raise unknown("task", task, TASKS)
    if n < 0:
        raise UserError(f"--n must be >= 0, got {n}")
    if split not in (*SPLITS, ALL):
        raise unknown("split", split, (*SPLITS, ALL))
    rng = np.random.default_rng(seed)
    if task == "ocr":
        words = _cycle(_split_of("ocr", split), rng)
        return [ocr_record(next(words)) for _ in range(n)]
    tags = list(tags) if tags else list(GENEVAL_TAGS)
    for t in tags:
        if t not in GENEVAL_TAGS:
            raise unknown("GenEval tag", t, GENEVAL_TAGS)
    pools = {t: _cycle(_split_of(t, split), rng) for t in tags}
    out: list[dict] = []
    while len(out) < n:
        for i in rng.permutation(len(tags))[: n - len(out)]:
            rec = next(pools[tags[i]])
            out.append(json.loads(json.dumps(rec)))  # a deep copy: the pools are cached
    return out


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically (``flowopd.data.text.write_jsonl``)."""
    from flowopd.data.text import write_jsonl as _write

    _write(path, records)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL prompt file (``flowopd.data.prompts.read_prompt_file`` in its ``jsonl``
    format); a missing, empty or non-UTF-8 file or a bad line is a one-line ``UserError``."""
    from flowopd.data.prompts import read_prompt_file

    return read_prompt_file(path, "jsonl")
