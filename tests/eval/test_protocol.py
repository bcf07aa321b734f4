"""The papers' evaluation protocol: images per prompt, sampler settings, scorer options."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowopd.errors import UserError
from flowopd.eval.benchmarks import (
    PROTOCOLS,
    EvalSettings,
    evaluate,
    make_scorer,
    protocol_record,
)
from flowopd.rewards.geneval import Detection

# 3 unique GenEval prompts; the first is repeated as Flow-GRPO's test file repeats each prompt
LINES = [
    '{"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"}',
    '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}',
    '{"tag": "two_object", "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1}], '
    '"prompt": "a photo of a cup and a dog"}',
]


class OneCup:
    """A stub detector that finds one confident cup in every image."""

    def detect(self, images: np.ndarray) -> list[Detection]:
        h, w = images.shape[1:3]
        return [Detection([[0, 0, w / 2, h / 2]], ["cup"], [0.95]) for _ in images]


@pytest.fixture
def recorded(monkeypatch):
    """Replace the sampler by a recorder returning grey images: (calls, kwargs per call)."""
    import flowopd.sampling

    calls = []

    def fake_sample(model, prompts, num_steps, **kw):
        calls.append({"prompts": list(prompts), "num_steps": num_steps, **kw})
        return SimpleNamespace(images=torch.full((len(prompts), 3, 16, 16), 0.5))

    monkeypatch.setattr(flowopd.sampling, "sample", fake_sample)
    return calls


def _geneval_file(tmp_path):
    path = tmp_path / "test_metadata.jsonl"
    path.write_text("\n".join([LINES[0], *LINES, LINES[0]]) + "\n")
    return f"geneval={path}"


def test_published_protocols_are_pinned():
    for name, images in (("geneval", 4), ("ocr", 1), ("pickscore", 5)):
        p = PROTOCOLS[name]
        assert (p.images_per_prompt, p.steps, p.guidance_scale, p.resolution) == (
            images,
            40,
            4.5,
            512,
        )


def test_geneval_samples_4_images_per_prompt_at_the_papers_settings(tmp_path, tiny_model, recorded):
    opts = {"geneval": {"detector": OneCup(), "colors": "hsv"}}
    settings = EvalSettings(batch_size=5, keep_images=6, scorer_options=opts)
    res = evaluate(tiny_model, [_geneval_file(tmp_path)], settings)
    name = next(iter(res.metrics))
    # every batch scored as sampled; only the first 6 images kept (for grids), with their prompts
    assert len(res.images[name]) == 6
    assert res.prompts[name] == ["a photo of a cup"] * 4 + ["a photo of a dog"] * 2
    # 3 unique prompts (repeats dropped) x 4 images, in batches of 5
    assert [len(c["prompts"]) for c in recorded] == [5, 5, 2]
    prompts = sum((c["prompts"] for c in recorded), [])
    assert (
        prompts
        == ["a photo of a cup"] * 4 + ["a photo of a dog"] * 4 + ["a photo of a cup and a dog"] * 4
    )
    for c in recorded:  # the settings reach the sampler
        assert c["num_steps"] == 40 and c["guidance_scale"] == 4.5 and c["kind"] == "ode"
        assert c["resolution"] == 512
        assert c["latents"].shape[1:] == tiny_model.latent_shape(512)
    # 4 distinct initial noises per prompt
    x0 = torch.cat([c["latents"] for c in recorded])
    assert len({float(x[0, 0, 0]) for x in x0}) == 12
    # one cup everywhere: "a cup" right, "a dog" and "a cup and a dog" wrong
    assert res.scores[name].tolist() == [1.0] * 4 + [0.0] * 8
    # overall_se: single_object's 8 images at p = 0.5, s^2 = 0.25 * 8 / 7, se_c^2 = s^2 / 8;
    # two_object's are all 0 (se 0): sqrt(1 / 28) / 2 tags
    se = round((1 / 28) ** 0.5 / 2, 6)
    assert res.metrics[name] == {"overall": 0.25, "single_object": 0.5, "two_object": 0.0,
                                 "overall_se": se}  # fmt: skip
    assert protocol_record(res)[name] == {"prompts": 3, "images_per_prompt": 4, "steps": 40,
                                          "guidance_scale": 4.5, "resolution": 512, "images": 12,
                                          "images_per_process": [12]}  # fmt: skip


def test_explicit_settings_override_the_protocol(tmp_path, tiny_model, recorded):
    opts = {"geneval": {"detector": OneCup(), "colors": "hsv"}}
    settings = EvalSettings(steps=7, guidance_scale=2.0, resolution=64, images_per_prompt=2,
                            n=2, scorer_options=opts)  # fmt: skip
    res = evaluate(tiny_model, [_geneval_file(tmp_path)], settings)
    assert len(recorded) == 1 and len(recorded[0]["prompts"]) == 4  # 2 prompts x 2 images
    c = recorded[0]
    assert (c["num_steps"], c["guidance_scale"], c["resolution"]) == (7, 2.0, 64)
    assert next(iter(res.metrics.values()))["overall"] == 0.5  # only single_object: cup 1, dog 0


def test_toy_benchmarks_keep_the_models_own_settings(tiny_model, recorded):
    tiny_model.default_guidance_scale = 3.0  # as the embedded model's flowopd.json says
    evaluate(tiny_model, ["toy-ocr"], EvalSettings(n=2))
    c = recorded[0]
    assert c["resolution"] is None and c["guidance_scale"] == 3.0
    assert len(c["prompts"]) == 2 and c["num_steps"] == 40


def test_scorer_options_reach_the_reward_factories(tmp_path, tiny_model):
    missing = str(tmp_path / "no_pickscore")
    settings = EvalSettings(scorer_options={"pickscore": {"model": missing}})
    with pytest.raises(UserError, match="no such directory") as e:
        make_scorer("pickscore=x.txt", settings, tiny_model)
    assert "\n" not in str(e.value)
    scorer = make_scorer("geneval=x", EvalSettings(scorer_options={"geneval": {
        "detector": OneCup(), "colors": "hsv", "mode": "partial", "threshold": 0.99}}), tiny_model)  # fmt: skip
    assert scorer.mode == "correct"  # the benchmark is always GenEval's 0/1 judgement
    assert scorer.config.threshold == 0.99


def test_cli_scorer_flags_parse():
    from flowopd.cli import build_parser
    from flowopd.cli.eval import scorer_options

    args = build_parser().parse_args(
        ["eval", "--benchmark", "geneval=t.jsonl", "--out", "o", "--geneval-detector", "/w/m2f",
         "--geneval-clip", "/w/clip", "--scorer-device", "cuda:1", "--pickscore-model", "/w/ps"]
    )  # fmt: skip
    assert scorer_options(args) == {
        "geneval": {"detector": "/w/m2f", "clip_model": "/w/clip", "device": "cuda:1"},
        "pickscore": {"model": "/w/ps", "device": "cuda:1"},
    }
    assert args.steps is None and args.images_per_prompt is None and args.resolution is None
    bare = build_parser().parse_args(["eval", "--out", "o"])
    assert scorer_options(bare) == {"geneval": {}, "pickscore": {}}


def test_protocol_json_is_written_by_the_cli(tmp_path, tiny_pixel_dir):
    from tests.recipes.conftest import run_cli

    ocr = tmp_path / "ocr.txt"
    ocr.write_text('a sign that says "47"\n')
    proc = run_cli("eval", "--model", str(tiny_pixel_dir), "--benchmark",
                   f"ocr={ocr},toy-ocr", "--n", "2", "--steps", "2", "--resolution", "32",
                   "--images-per-prompt", "3", "--out", str(tmp_path / "o"))  # fmt: skip
    assert "1 prompts x 3 images, 2 steps, CFG 4.5, 32 px" in proc.stdout
    protocol = json.loads((tmp_path / "o" / "protocol.json").read_text())
    assert protocol[f"ocr={ocr}"]["images"] == 3 and protocol["toy-ocr"]["images"] == 6
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert set(metrics) == {f"ocr={ocr}", "toy-ocr"} and 0 <= metrics[f"ocr={ocr}"]["overall"] <= 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--images-per-prompt", "0"], "--images-per-prompt must be in [1, 1000]"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--resolution", "100"], "--resolution must be a multiple of 8"),
        (["--steps", "0"], "--steps must be in [1, 1000]"),
        (["--benchmark", "pickscore="], "needs its prompt file"),
        (["--benchmark", "geneval=/nonexistent/meta.jsonl"], "not found"),
    ],
)
def test_cli_bad_options_are_one_line(tmp_path, args, needle, capsys):
    from flowopd.cli import main  # in-process: the CLI path without a second interpreter

    assert main(["eval", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().count("\n") == 0, err


def test_a_wrong_detector_path_fails_before_sampling(tmp_path, tiny_pixel_dir, recorded, capsys):
    from flowopd.cli import main

    meta = tmp_path / "m.jsonl"
    meta.write_text(LINES[0] + "\n")
    rc = main(["eval", "--model", str(tiny_pixel_dir), "--benchmark", f"geneval={meta}",
               "--geneval-detector", str(tmp_path / "m2f"), "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no such directory" in err and "m2f" in err and err.count("\n") == 1
    assert recorded == [] and not (tmp_path / "o").exists()  # nothing was sampled
