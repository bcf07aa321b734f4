"""`flowopd data geneval-train`: GenEval's generator, and training prompts disjoint from its test set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flowopd.data.geneval_train import (
    color_attr,
    counting,
    geneval_suite,
    geneval_train,
    plural,
    position,
    prompt_key,
    tag_counts,
    with_article,
)
from flowopd.data.prompts import read_prompt_file
from flowopd.rewards.geneval import COLORS, GENEVAL_CLASSES, RELATIONS, TAGS
from tests.recipes.conftest import run_cli


def _canon(rec: dict) -> str:
    return json.dumps({k: v for k, v in rec.items() if k != "task"}, sort_keys=True)


def test_generator_rebuilds_the_published_geneval_suite(shared_data):
    # GenEval's defaults (seed 43, 100 draws per tag) give exactly its 553 test prompts
    test = read_prompt_file(shared_data / "geneval" / "test_metadata.jsonl")
    assert {_canon(r) for r in geneval_suite()} == {_canon(r) for r in test}
    assert len(geneval_suite()) == 553


def test_templates_follow_geneval():
    assert with_article("orange") == "an orange" and with_article("dog") == "a dog"
    assert plural("bus") == "buses" and plural("tv remote") == "tv remotes"
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = counting(rng)
        n = c["include"][0]["count"]
        assert 2 <= n <= 4 and c["exclude"] == [{"class": c["include"][0]["class"], "count": n + 1}]
        p = position(rng)
        rel, anchor = p["include"][1]["position"]
        assert rel in RELATIONS and anchor == 0
        assert p["prompt"].endswith(f"{rel} {with_article(p['include'][0]['class'])}")
        ca = color_attr(rng)
        (a, b) = ca["include"]
        assert "person" not in (a["class"], b["class"]) and a["class"] != b["class"]
        assert a["color"] != b["color"] and {a["color"], b["color"]} <= set(COLORS)


def test_training_set_is_disjoint_from_the_test_set(shared_data):
    test = read_prompt_file(shared_data / "geneval" / "test_metadata.jsonl")
    train = geneval_train(n=2000, seed=0)
    test_keys = {prompt_key(r) for r in test}
    assert not test_keys & {prompt_key(r) for r in train}
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    # no repeats, even up to the order of the objects
    assert len({prompt_key(r) for r in train}) == len(train)
    counts = tag_counts(train)
    # every single-object prompt is a test prompt; the other five tags are all drawn
    assert counts["single_object"] == 0 and all(counts[t] > 100 for t in TAGS[1:])
    # counting: 80 classes x 3 counts = 240 prompts, 80 of them in the test set
    assert counts["counting"] == 160
    classes = {c["class"] for r in train for c in r["include"]}
    assert classes == set(GENEVAL_CLASSES)


def test_object_order_counts_as_the_same_prompt():
    a = {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"},
                                          {"class": "dog", "count": 1, "color": "blue"}]}  # fmt: skip
    swapped = {"tag": "color_attr", "include": a["include"][::-1]}
    rebound = {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "blue"},
                                                {"class": "dog", "count": 1, "color": "red"}]}  # fmt: skip
    assert prompt_key(a) == prompt_key(swapped) != prompt_key(rebound)
    left = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}  # fmt: skip
    right = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                            {"class": "cat", "count": 1, "position": ["right of", 0]}]}  # fmt: skip
    assert prompt_key(left) == prompt_key(right)
    # an excluded record's key never comes out, whatever the draw
    assert prompt_key(a) not in {prompt_key(r) for r in geneval_train(n=3000, seed=1, exclude=[a])}


def test_cli_writes_readable_metadata_atomically(tmp_path):
    out = tmp_path / "data" / "train.jsonl"
    proc = run_cli("data", "geneval-train", "--out", str(out), "--n", "300", "--seed", "3")
    recs = read_prompt_file(out)
    assert f"wrote {len(recs)} GenEval training prompts" in proc.stdout
    assert {r["task"] for r in recs} == {"geneval"} and tag_counts(recs)["two_object"] > 200
    assert [p.name for p in out.parent.iterdir()] == ["train.jsonl"]  # no temp file left
    again = tmp_path / "again.jsonl"
    run_cli("data", "geneval-train", "--out", str(again), "--n", "300", "--seed", "3")
    assert again.read_bytes() == out.read_bytes()  # seeded: the same file


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--n", "0"], "--n must be in [1, 1000000]"),
        (["--seed", "-1"], "--seed must be in [0, 2^32)"),
        (["--exclude", "/nonexistent.jsonl"], "not found"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, needle, capsys):
    from flowopd.cli import main  # in-process: the CLI path without a second interpreter

    assert main(["data", "geneval-train", "--out", str(tmp_path / "t.jsonl"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "t.jsonl").exists()


def test_cli_output_that_is_a_directory_is_one_line(tmp_path, capsys):
    from flowopd.cli import main

    assert main(["data", "geneval-train", "--out", str(tmp_path), "--n", "10"]) == 2
    assert "is a directory" in capsys.readouterr().err
