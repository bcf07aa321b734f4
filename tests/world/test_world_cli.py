"""``flowopd world prompts`` / ``flowopd world render``."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from flowopd.cli import COMMAND_MODULES
from flowopd.cli import world as world_cli
from flowopd.errors import UserError
from flowopd.world.prompts import make_records, read_jsonl


def _run(argv: list[str]) -> int:
    # only this module's parser: the full CLI also loads the model sub-commands
    parser = argparse.ArgumentParser(prog="flowopd")
    world_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_registered_in_the_cli():
    assert "flowopd.cli.world" in COMMAND_MODULES


def test_prompts_to_stdout_and_file(tmp_path, capsys):
    assert (
        _run(
            ["world", "prompts", "--task", "geneval", "--split", "test", "--n", "7", "--seed", "2"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in lines] == make_records("geneval", "test", 7, seed=2)
    out = tmp_path / "p.jsonl"
    assert _run(["world", "prompts", "--task", "ocr", "--n", "5", "--out", str(out)]) == 0
    assert read_jsonl(out) == make_records("ocr", "train", 5, seed=0)
    _run(
        ["world", "prompts", "--task", "geneval", "--n", "4", "--tags", "colors", "--out", str(out)]
    )
    assert {r["tag"] for r in read_jsonl(out)} == {"colors"}


def test_render_writes_pngs_and_grid(tmp_path):
    prompts = tmp_path / "p.jsonl"
    _run(["world", "prompts", "--task", "geneval", "--n", "10", "--out", str(prompts)])
    out = tmp_path / "r"
    assert _run(["world", "render", "--prompts", str(prompts), "--out", str(out), "--n", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(5)] + [
        "grid.png"
    ]
    img = np.asarray(Image.open(out / "00000.png"))
    assert img.shape == (32, 32, 3) and (img == 255).all(-1).mean() > 0.7
    # 5 images -> 3 columns x 2 rows of 33 px + 1, x4
    assert Image.open(out / "grid.png").size == ((3 * 33 + 1) * 4, (2 * 33 + 1) * 4)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["world", "prompts", "--task", "genevl", "--n", "3"], "did you mean 'geneval'"),
        (["world", "prompts", "--task", "ocr", "--split", "val", "--n", "3"], "unknown split"),
        (["world", "prompts", "--task", "ocr", "--n", "3", "--tags", "colors"], "--tags"),
        (["world", "prompts", "--task", "ocr", "--n", "-1"], ">= 0"),
        (["world", "render", "--prompts", "missing.jsonl", "--out", "x"], "not found"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(argv, match):
    with pytest.raises(UserError, match=match) as e:
        _run(argv)
    assert "\n" not in str(e.value)


def test_render_rejects_unrenderable_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a photo of a cat"}) + "\n")
    with pytest.raises(UserError, match="neither 'include' nor 'text'"):
        _run(["world", "render", "--prompts", str(bad), "--out", str(tmp_path / "r")])
    bad.write_text(json.dumps({"prompt": "x", "include": [{"class": "cat", "count": 1}]}) + "\n")
    with pytest.raises(UserError, match="cannot render"):
        _run(["world", "render", "--prompts", str(bad), "--out", str(tmp_path / "r")])
