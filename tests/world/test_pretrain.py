"""`flowopd pretrain`: batches depend only on (seed, step), caption noise is recorded, and
the saved model loads through the sd3 backend."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from flowopd.cli.pretrain import parse_caption_noise
from flowopd.errors import UserError
from flowopd.recipes.pretrain import EMBEDDED_ARCH, PretrainConfig, pretrain, world_batch
from flowopd.world.noise import DEFAULT_RATES

SMALL = dataclasses.replace(EMBEDDED_ARCH, num_layers=1)


def _cfg(tmp_path, name, **kw) -> PretrainConfig:
    base = dict(out=str(tmp_path / name), steps=3, batch_size=8, warmup=1, log_every=1, arch=SMALL)
    return PretrainConfig(**{**base, **kw})


def test_batches_depend_on_seed_and_step_and_noise_changes_only_images():
    cfg = PretrainConfig(batch_size=10, ocr_fraction=0.5)
    p1, x1 = world_batch(cfg, 4)
    p2, x2 = world_batch(cfg, 4)
    assert p1 == p2 and torch.equal(x1, x2) and x1.shape == (10, 3, 32, 32)
    assert x1.min() >= -1 and x1.max() <= 1
    assert world_batch(cfg, 5)[0] != p1
    clean = dataclasses.replace(cfg, caption_noise={})
    always = dataclasses.replace(cfg, caption_noise=dict.fromkeys(DEFAULT_RATES, 1.0))
    pc, xc = world_batch(clean, 4)
    pa, xa = world_batch(always, 4)
    assert pc == pa == p1  # captions never change
    assert not torch.equal(xc, xa)


def test_pretrain_saves_a_loadable_model_with_its_provenance(tmp_path):
    from flowopd.models.sd3 import SD3Model

    logs: list[str] = []
    pretrain(_cfg(tmp_path, "a", caption_noise={"ocr": 0.25}), log=logs.append)
    meta = json.loads((tmp_path / "a" / "flowopd.json").read_text())
    assert meta["steps"] == 3 and meta["config"]["caption_noise"] == {"ocr": 0.25}
    assert meta["kind"] == "flowopd-embedded" and meta["arch"]["num_layers"] == 1
    assert any("step 3/3" in m for m in logs)
    model = SD3Model.from_pretrained(str(tmp_path / "a"))
    assert model.default_guidance_scale == 3.0
    # the same seed and steps give the same weights, also with a data worker process
    pretrain(_cfg(tmp_path, "b", caption_noise={"ocr": 0.25}, workers=1), log=logs.append)
    wa = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_caption_noise_option():
    assert parse_caption_noise("none") == {}
    assert parse_caption_noise("ocr=0.2") == {**DEFAULT_RATES, "ocr": 0.2}
    with pytest.raises(UserError, match="not KIND=P"):
        parse_caption_noise("ocr=high")
    with pytest.raises(UserError, match="must be in"):
        parse_caption_noise("ocr")
    with pytest.raises(UserError, match="unknown caption-noise kind"):
        parse_caption_noise("counts=0.5")


def test_tag_weights_change_each_categorys_share_of_a_batch():
    from collections import Counter

    from flowopd.cli.pretrain import parse_tag_weights
    from flowopd.recipes.pretrain import weighted_tags
    from flowopd.world.prompts import GENEVAL_TAGS, make_records

    weights = parse_tag_weights("position=2,color_attr=2,colors=0")
    assert weights == {"position": 2, "color_attr": 2, "colors": 0}
    assert weighted_tags({}) is None  # the original draw: every tag once per round
    # 3 tags of weight 1 + 2 of weight 2 = 7 draws per round: 63 records are 9 rounds
    recs = make_records("geneval", "train", 63, seed=1, tags=weighted_tags(weights))
    share = Counter(r["tag"] for r in recs)
    assert share["position"] == share["color_attr"] == 18 and "colors" not in share
    assert share["single_object"] == share["counting"] == share["two_object"] == 9
    # world_batch follows the weights, and {} leaves the batch as it was
    cfg = PretrainConfig(batch_size=16, ocr_fraction=0.0)
    weighted = dataclasses.replace(cfg, tag_weights=weights)
    assert world_batch(weighted, 0)[0] != world_batch(cfg, 0)[0]
    assert world_batch(dataclasses.replace(cfg, tag_weights={}), 0)[0] == world_batch(cfg, 0)[0]
    with pytest.raises(UserError, match="unknown tag"):
        parse_tag_weights("positions=2")
    with pytest.raises(UserError, match="integer W"):
        parse_tag_weights("position=1.5")
    with pytest.raises(UserError, match="every tag has weight 0"):
        parse_tag_weights(",".join(f"{t}=0" for t in GENEVAL_TAGS))


def test_captions_all_reach_the_test_split_and_train_never_does():
    from flowopd.world.prompts import make_records

    def prompts(split: str) -> set[str]:
        return {r["prompt"] for t in ("geneval", "ocr") for r in make_records(t, split, 3000)}

    test_prompts = prompts("test") - prompts("train")  # small spaces are in both splits
    seen = {"train": set(), "all": set()}
    for captions in seen:
        cfg = PretrainConfig(batch_size=64, ocr_fraction=0.35, captions=captions)
        for step in range(6):
            seen[captions] |= set(world_batch(cfg, step)[0])
    assert not seen["train"] & test_prompts
    assert len(seen["all"] & test_prompts) > 20
