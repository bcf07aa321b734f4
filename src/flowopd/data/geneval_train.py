"""GenEval-style prompt metadata, generated the way GenEval's own generator does.

GenEval (djghosh13/geneval, ``prompts/create_prompts.py``) draws its 553 test prompts from six
templates over the 80 COCO class names (``rewards.geneval.GENEVAL_CLASSES``) and ten colours
(``COLORS``), with a numpy ``default_rng(seed)``:

| tag | prompt | metadata ``include`` (+ ``exclude``) |
|---|---|---|
| single_object | a photo of a(n) A | [A x1] (every class once) |
| two_object | a photo of a(n) A and a(n) B | [A x1, B x1], A != B |
| counting | a photo of N As | [A xN] + exclude [A x(N+1)], N in 2..4 |
| colors | a photo of a(n) C A | [A x1 colour C], A != person |
| position | a photo of a(n) A REL a(n) B | [B x1, A x1 at (REL, 0)], REL in left of / right of / above / below |
| color_attr | a photo of a(n) C A and a(n) D B | [A x1 C, B x1 D], A != B, C != D, neither a person |

"an" before a vowel-initial word, plural by adding "es" after a final "s", else "s" (GenEval's
rules, kept with their quirks: "skises"). ``geneval_suite(seed=43, n=100)`` makes the same
random draws in the same order as GenEval's generator with its defaults, and so rebuilds
GenEval's published 553 prompts exactly (tested against the test metadata).

Training metadata (``geneval_train``): the suite drawn with another seed and many draws per
tag, minus every prompt that matches a GenEval test prompt up to the order of its objects --
Flow-GRPO builds its GenEval training set this way ("a photo of A and B" and "a photo of B
and A" count as the same prompt). The match is ``prompt_key``: unordered object pairs for
two_object, position and color_attr (colour bound to its object), the class for
single_object, (class, colour) for colors, (class, count) for counting. All 80 single-object
prompts are GenEval test prompts, so a test-disjoint training file has no single_object
lines; the other five tags are all there.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from flowopd.rewards.geneval import COLORS, GENEVAL_CLASSES, RELATIONS, TAGS

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_COUNT = 4  # counting prompts ask for 2..4 objects
GENEVAL_SEED, GENEVAL_DRAWS = 43, 100  # create_prompts.py's defaults: the published test suite


def with_article(word: str) -> str:
    """GenEval's article rule: ``an`` before a vowel-initial word.

    >>> with_article("apple"), with_article("red")
    ('an apple', 'a red')
    """
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    """GenEval's plural rule: add "es" after a final "s", else "s".

    >>> plural("wine glass"), plural("dog")
    ('wine glasses', 'dogs')
    """
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _colourable(rng: np.random.Generator, size: int | None = None):
    """Class indices drawn without 'person' (GenEval: no '[colour] person' prompts)."""
    person = GENEVAL_CLASSES.index("person")
    k = len(GENEVAL_CLASSES)
    if size is None:
        return (int(rng.choice(k - 1)) + 1 + person) % k
    return [(int(i) + 1 + person) % k for i in rng.choice(k - 1, size=size, replace=False)]


def single_objects(rng: np.random.Generator) -> list[dict]:
    """One single_object record per class, in a random order."""
    idx = rng.choice(len(GENEVAL_CLASSES), size=len(GENEVAL_CLASSES), replace=False)
    return [
        {"tag": "single_object", "include": [{"class": GENEVAL_CLASSES[i], "count": 1}],
         "prompt": f"a photo of {with_article(GENEVAL_CLASSES[i])}"}
        for i in idx
    ]  # fmt: skip


def two_object(rng: np.random.Generator) -> dict:
    a, b = (GENEVAL_CLASSES[i] for i in rng.choice(len(GENEVAL_CLASSES), size=2, replace=False))
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}  # fmt: skip


def counting(rng: np.random.Generator) -> dict:
    a = GENEVAL_CLASSES[int(rng.choice(len(GENEVAL_CLASSES)))]
    n = int(rng.integers(2, MAX_COUNT, endpoint=True))
    return {"tag": "counting", "include": [{"class": a, "count": n}],
            "exclude": [{"class": a, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(a)}"}  # fmt: skip


def colors(rng: np.random.Generator) -> dict:
    a = GENEVAL_CLASSES[_colourable(rng)]
    c = COLORS[int(rng.choice(len(COLORS)))]
    return {"tag": "colors", "include": [{"class": a, "count": 1, "color": c}],
            "prompt": f"a photo of {with_article(c)} {a}"}  # fmt: skip


def position(rng: np.random.Generator) -> dict:
    a, b = (GENEVAL_CLASSES[i] for i in rng.choice(len(GENEVAL_CLASSES), size=2, replace=False))
    rel = RELATIONS[int(rng.choice(len(RELATIONS)))]
    # the anchor B is clause 0; A must stand REL of it
    return {"tag": "position",
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"}  # fmt: skip


def color_attr(rng: np.random.Generator) -> dict:
    a, b = (GENEVAL_CLASSES[i] for i in _colourable(rng, size=2))
    c, d = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": c}, {"class": b, "count": 1, "color": d}],
            "prompt": f"a photo of {with_article(c)} {a} and {with_article(d)} {b}"}  # fmt: skip


# GenEval's draw order after the single objects (the order the rng is consumed in)
DRAWN = {"two_object": two_object, "counting": counting, "colors": colors,
         "position": position, "color_attr": color_attr}  # fmt: skip


def _draws(seed: int, n: int) -> Iterator[dict]:
    """GenEval's draws in its order: every single object, then n of each other tag."""
    rng = np.random.default_rng(seed)
    yield from single_objects(rng)
    for make in DRAWN.values():
        for _ in range(n):
            yield make(rng)


def geneval_suite(seed: int = GENEVAL_SEED, n: int = GENEVAL_DRAWS) -> list[dict]:
    """GenEval's generator: every single object, then ``n`` draws of each other tag in
    GenEval's order, exact repeats dropped (first kept). ``(43, 100)``: the 553 test prompts."""
    seen: set[str] = set()
    out = []
    for rec in _draws(seed, n):
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def prompt_key(rec: dict) -> tuple:
    """What a prompt asks for, up to the order of its objects (see the module docstring).

    >>> a = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    >>> b = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    >>> prompt_key(a) == prompt_key(b)
    True
    """
    clauses = [(c["class"], c.get("count", 1), c.get("color")) for c in rec["include"]]
    if rec["tag"] == "position":  # any relation between the same two objects
        return ("position", frozenset(c[0] for c in clauses))
    return (rec["tag"], frozenset(clauses))


def geneval_train(n: int = 10_000, seed: int = 0, exclude: Iterable[dict] = ()) -> list[dict]:
    """GenEval-style training metadata: ``geneval_suite(seed, n)`` without the prompts whose
    ``prompt_key`` matches a GenEval test prompt (rebuilt with ``geneval_suite()``) or a record
    of ``exclude``, nor repeats of each other up to object order. Records in draw order."""
    banned = {prompt_key(r) for r in geneval_suite()} | {prompt_key(r) for r in exclude}
    out = []
    for rec in _draws(seed, n):  # streamed: memory grows with the prompts kept, not drawn
        key = prompt_key(rec)
        if key not in banned:
            banned.add(key)
            out.append(rec)
    return out


def tag_counts(records: Iterable[dict]) -> dict[str, int]:
    """Records per tag, in GenEval's tag order (0 for an absent tag)."""
    c = Counter(r["tag"] for r in records)
    return {t: c.get(t, 0) for t in TAGS}
