"""Prompt records of the synthetic world: determinism, splits, GenEval's schema."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from flowopd.errors import UserError
from flowopd.world.font import CHARSET
from flowopd.world.prompts import (
    geneval_prompt,
    geneval_space,
    make_records,
    ocr_space,
    read_jsonl,
    split_space,
    write_jsonl,
)
from flowopd.world.spec import COLORS, GENEVAL_TAGS, RELATIONS, SHAPES

REAL_GENEVAL = (
    Path(__file__).resolve().parents[2].parent / "shared/data/geneval/test_metadata.jsonl"
)


@pytest.fixture(scope="module")
def real_records() -> list[dict]:
    if not REAL_GENEVAL.is_file():
        pytest.skip(f"GenEval metadata not found at {REAL_GENEVAL} (the shared data folder)")
    return [json.loads(line) for line in REAL_GENEVAL.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task", ["geneval", "ocr"])
def test_records_are_deterministic_per_seed(task):
    a = make_records(task, "train", 50, seed=3)
    assert a == make_records(task, "train", 50, seed=3)
    assert a != make_records(task, "train", 50, seed=4)
    # a prefix of a longer draw: n does not change the sequence
    assert make_records(task, "train", 20, seed=3) == a[:20]


def test_space_sizes():
    sizes = {t: len(geneval_space(t)) for t in GENEVAL_TAGS}
    # 3 shapes, 4 colours, 4 relations, counts 2-4:
    assert sizes == {
        "single_object": 3,
        "two_object": 3 * 2,
        "counting": 3 * 3,
        "colors": 3 * 4,
        "position": 3 * 2 * 4,
        "color_attr": 3 * 2 * 4 * 3,
    }
    assert len(ocr_space()) == len(CHARSET) ** 2 + len(CHARSET) ** 3


@pytest.mark.parametrize("tag", GENEVAL_TAGS)
def test_splits_disjoint_where_the_space_allows(tag):
    space = [r["prompt"] for r in geneval_space(tag)]
    train, test = set(split_space(space, "train")), set(split_space(space, "test"))
    if len(space) >= 10:
        assert not train & test
        assert train | test == set(space)
        assert len(test) == round(0.25 * len(space))
    else:  # too small to hold anything out: both splits see everything
        assert train == test == set(space)


def test_the_all_split_spans_train_and_test():
    """``"all"`` (pretraining's captions with ``--captions all``) is the whole space; the
    records drawn from it reach the test split's prompts."""
    space = [r["prompt"] for r in geneval_space("position")]
    assert split_space(space, "all") == space
    drawn = {r["prompt"] for r in make_records("geneval", "all", 400, seed=0, tags=["position"])}
    assert drawn == set(space) and drawn & set(split_space(space, "test"))
    with pytest.raises(UserError, match="all"):
        make_records("geneval", "val", 4)


def test_train_split_covers_every_attribute():
    # held-out combinations are compositional: each part still appears in training
    train = make_records("geneval", "train", 600, seed=0)
    text = " ".join(r["prompt"] for r in train)
    for word in (*SHAPES, *COLORS, *RELATIONS):
        assert word in text
    test_prompts = {r["prompt"] for r in make_records("geneval", "test", 600, seed=0)}
    held_out = {"colors", "position", "color_attr"}
    train_prompts = {r["prompt"] for r in train if r["tag"] in held_out}
    assert train_prompts and not train_prompts & test_prompts


def test_ocr_splits_disjoint_and_sampled_records_respect_them():
    train, test = set(split_space(ocr_space(), "train")), set(split_space(ocr_space(), "test"))
    assert not train & test and len(train | test) == len(ocr_space())
    drawn = {r["text"] for r in make_records("ocr", "test", 300, seed=1)}
    assert drawn <= test


def test_tags_are_balanced_and_filterable():
    recs = make_records("geneval", "train", 60, seed=0)
    assert Counter(r["tag"] for r in recs) == {t: 10 for t in GENEVAL_TAGS}
    only = make_records("geneval", "test", 12, seed=0, tags=["counting", "position"])
    assert {r["tag"] for r in only} == {"counting", "position"}
    with pytest.raises(UserError, match="did you mean 'counting'"):
        make_records("geneval", "train", 5, tags=["countin"])


def test_record_formats():
    rec = make_records("geneval", "train", 60, seed=0)
    for r in rec:
        assert r["task"] == "geneval" and r["tag"] in GENEVAL_TAGS
        assert r["prompt"].startswith("a photo of ")
    by_tag = {r["tag"]: r for r in rec}
    assert re.fullmatch(
        r"a photo of (two|three|four) (circle|square|triangle)s", by_tag["counting"]["prompt"]
    )
    ocr = make_records("ocr", "train", 30, seed=0)
    for r in ocr:
        assert set(r) == {"tag", "task", "text", "prompt"} and r["tag"] == r["task"] == "ocr"
        assert 2 <= len(r["text"]) <= 3 and set(r["text"]) <= set(CHARSET)
        assert re.search(r'"([^"]*)"', r["prompt"]).group(1) == r["text"]  # first quoted span


def test_schema_matches_real_geneval(real_records):
    ours = make_records("geneval", "test", 120, seed=0)
    real_keys = {k for r in real_records for k in r}
    real_item_keys = {k for r in real_records for it in r["include"] for k in it}
    assert {r["tag"] for r in ours} == {r["tag"] for r in real_records} == set(GENEVAL_TAGS)
    assert {k for r in ours for k in r} == real_keys | {"task"}
    assert {k for r in ours for it in r["include"] for k in it} == real_item_keys
    real_rels = {it["position"][0] for r in real_records for it in r["include"] if "position" in it}
    assert set(RELATIONS) == real_rels
    for r in ours + real_records:
        for it in r["include"]:
            assert isinstance(it["count"], int)
            if "position" in it:  # [relation, index of the reference item]
                rel, idx = it["position"]
                assert rel in real_rels and idx == 0 and r["tag"] == "position"
        if r["tag"] == "counting":  # exactly-n via exclude n + 1
            assert r["exclude"] == [
                {"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}
            ]
        else:
            assert "exclude" not in r


def test_prompt_phrasing_reproduces_real_geneval(real_records):
    # our prompt writer, fed GenEval's own records, writes GenEval's own prompts
    checked = 0
    for r in real_records:
        cls = r["include"][0]["class"]
        if r["tag"] == "counting" and not r["prompt"].endswith(cls + "s"):
            continue  # irregular plural ("buses"); our classes have regular ones
        assert geneval_prompt(r["tag"], r["include"]) == r["prompt"]
        checked += 1
    assert checked > 2000


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    recs = make_records("ocr", "train", 5, seed=0)
    path = tmp_path / "sub" / "p.jsonl"
    write_jsonl(path, recs)
    assert read_jsonl(path) == recs
    assert [p.name for p in path.parent.iterdir()] == ["p.jsonl"]  # no temp file left

    def bad():
        yield recs[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, bad())
    assert read_jsonl(path) == recs  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["p.jsonl"]


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(UserError, match="'prompt'"):
        read_jsonl(bad)


def test_bad_arguments():
    with pytest.raises(UserError, match="did you mean 'ocr'"):
        make_records("ocrr", "train", 1)
    with pytest.raises(UserError, match="did you mean 'test'"):
        make_records("ocr", "tset", 1)
    with pytest.raises(UserError, match=">= 0"):
        make_records("ocr", "train", -1)


def test_in_grammar_accepts_exactly_the_worlds_captions():
    from flowopd.world.prompts import geneval_space, in_grammar, ocr_space
    from flowopd.world.spec import GENEVAL_TAGS

    assert all(in_grammar(r["prompt"]) for tag in GENEVAL_TAGS for r in geneval_space(tag))
    assert all(in_grammar(f'a sign that says "{t}"') for t in ocr_space()[::97])
    for outside in [
        "a photo of a red circle left of a blue square",  # colours with a relation: no tag
        "a photo of a dog",
        'a sign that says "4"',  # one glyph: texts are 2-3 long
        'a sign that says "4\\"7"',
        "A photo of a circle",
    ]:
        assert not in_grammar(outside), outside
