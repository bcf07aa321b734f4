"""scripts/parallel_runs.py: the jobs file and the log summary (the runs themselves are
plain ``flowopd`` commands, tested elsewhere); scripts/failure_modes.py: the outcome of
each kind of render."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.conftest import REPO


def _module(name: str = "parallel_runs"):
    """Import ``scripts/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_jobs_file_and_summary(tmp_path):
    mod = _module()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "# sweep\n\na train grpo --config x.yaml train.lr=2e-3\nb train crd --config y\n"
    )
    assert mod.read_jobs(jobs) == [
        ("a", "train grpo --config x.yaml train.lr=2e-3"),
        ("b", "train crd --config y"),
    ]
    jobs.write_text("a train grpo\na train crd\n")
    with pytest.raises(SystemExit, match="repeat"):
        mod.read_jobs(jobs)

    log = tmp_path / "log.jsonl"
    rows = [
        {"epoch": e, "reward_mean": 0.1 * e, "time/sample": 1.0, "time/train": 2.0}
        for e in range(4)
    ]
    rows[3].update({"eval/toy-geneval": 0.5, "eval/toy-geneval/position": 0.1})
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = mod.summarize("a", "train grpo", log, 0, block=2)
    assert lines[0] == "== a: train grpo  rc=0"
    assert lines[1] == "   reward per 2 epochs: 0.050 0.250"  # (0 + .1) / 2, (.2 + .3) / 2
    assert lines[2] == "   epochs 4, 3.00 s/epoch (sample+score+train)"
    assert lines[3] == "   epoch 4: toy-geneval=0.500"  # categories left out
    assert "no log.jsonl" in mod.summarize("b", "x", tmp_path / "none.jsonl", 2)[1]


def test_failure_modes_sorts_renders_of_each_outcome():
    mod = _module("failure_modes")
    import numpy as np

    from flowopd.rewards.toy import detect_objects
    from flowopd.world.noise import corrupt
    from flowopd.world.prompts import geneval_record
    from flowopd.world.render import render

    def one(cls, **kw):
        return {"class": cls, "count": 1, **kw}

    rng = np.random.default_rng(0)
    pos = geneval_record("position", [one("square"), one("circle", position=["above", 0])])
    attr = geneval_record("color_attr", [one("circle", color="red"), one("square", color="blue")])
    two_squares = geneval_record("position", [one("square"), one("square", position=["above", 0])])
    drawn_as = [
        (pos, pos, "ok"),
        (pos, corrupt(pos), "mirrored"),
        (pos, two_squares, "wrong shapes"),
        (pos, corrupt(pos, "position_turn"), "turned"),
        (pos, geneval_record("two_object", [one("circle"), one("square")]), "side by side"),
        (pos, corrupt(pos, "position_drop"), "placed one left out"),
        (attr, attr, "ok"),
        (attr, corrupt(attr), "swapped"),
        (attr, corrupt(attr, "color_leak"), "leaked"),
        (pos, geneval_record("single_object", [one("circle")]), "n objects = 1"),
    ]
    for rec, drawn, want in drawn_as:
        assert mod.outcome(detect_objects(render(drawn, rng)), rec) == want, want
    three = geneval_record("counting", [{"class": "circle", "count": 3}])
    for drawn, want in [(three, "ok"), (corrupt(three), "one fewer"), (pos, "n objects = 2")]:
        assert mod.outcome(detect_objects(render(drawn, rng)), three) == want, want
    reads = {"A7C": "ok", "A": "cut", "A7": "cut later", "AC7": "transposed", "": "other"}
    for read, want in reads.items():
        assert mod.ocr_outcome(read, "A7C") == want, want


def test_failure_modes_prints_shares_and_each_prompts_outcomes(capsys):
    """End to end on the embedded base (2 prompts x 2 images per category, 2 steps: the
    outcomes are whatever the model draws; the counts must add up)."""
    mod = _module("failure_modes")
    assert mod.main(["--n", "2", "--k", "2", "--steps", "2", "--per-prompt"]) == 0
    images: dict[str, int] = {}
    tag = ""
    for line in capsys.readouterr().out.splitlines()[1:]:
        if line.startswith("  "):  # a prompt of the category above: "  PROMPT outcome n, ..."
            images[tag] += sum(int(n) for n in re.findall(r" (\d+)(?=,|$)", line))
        else:
            tag = line.split()[0]
            shares = [float(x) for x in re.findall(r" (\d\.\d\d)(?=,|$)", line)]
            assert sum(shares) == pytest.approx(1.0, abs=0.03), line
            images[tag] = 0
    assert images == {"counting": 4, "position": 4, "color_attr": 4, "ocr": 0}  # none for OCR
