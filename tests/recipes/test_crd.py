"""CRD recipe end to end on a tiny pixel-space SD3 model (seconds per run).

One CLI run checks the outputs; the rest run ``train_crd`` in-process (no interpreter
start-up per run) and check the snapshot math, resume and a learning signal.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd.config import load_config
from flowopd.config.crd import CRDConfig
from flowopd.engine.checkpoint import load_checkpoint
from flowopd.errors import UserError
from flowopd.recipes.crd import OLD, POLICY, SAMPLER, group_batches, train_crd
from tests.recipes.conftest import (
    check_resume_is_bitwise,
    check_two_processes_equal_one,
    forward_run_yaml,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp: Path, model: Path) -> Path:
    """A small CRD run (``forward_run_yaml``): minibatches of 2 groups, 3 of 6 training
    times per minibatch."""
    return forward_run_yaml(tmp, model, "crd", "crd: {num_times: 6, times_per_batch: 3}")


def _train(tmp: Path, model: Path, **overrides: str):
    """``train_crd`` in this process, quietly; returns the ``Run``."""
    cfg = load_config(CRDConfig, _yaml(tmp, model), [f"{k}={v}" for k, v in overrides.items()])
    with contextlib.redirect_stdout(io.StringIO()):
        return train_crd(cfg)


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_crd_cli_runs_and_writes_outputs(tmp_path, tiny_pixel_dir):
    overrides = {"eval.every": "2", "eval.benchmarks": "[toy-geneval,toy-quality]",
                 "eval.num_prompts": "6"}  # fmt: skip
    cfg = _yaml(tmp_path, tiny_pixel_dir)
    run_cli("train", "crd", "--config", str(cfg), *[f"{k}={v}" for k, v in overrides.items()])
    run = tmp_path / "run"
    log = _log(run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert [r["images"] for r in log] == [16, 32]  # what bench/grpo_vs_crd.py plots against
    for key in ("reward_mean", "reward_std", "loss", "kl", "implicit_reward_mean",
                "implicit_reward_centered_std", "decay/sampler", "decay/old", "grad_norm"):  # fmt: skip
        assert key in log[-1], key
    assert all(r["reward_std"] > 0 for r in log)
    assert log[0]["implicit_reward_mean"] == 0.0  # policy == old snapshot at the first update
    assert log[1]["implicit_reward_centered_std"] > 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"toy-geneval", "toy-quality"}
    resolved = load_config(CRDConfig, run / "config.yaml")  # the dump reloads as a CRD config
    assert resolved.model.guidance_scale == 1.0 and resolved.sample.kind == "ode"
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_minibatch_must_hold_whole_groups(tmp_path, tiny_pixel_dir):
    cfg = _yaml(tmp_path, tiny_pixel_dir)
    with pytest.raises(UserError, match=r"train.batch_size=6 must be a multiple of sample."):
        load_config(CRDConfig, cfg, ["train.batch_size=6"])
    # null minibatch = sample.batch_size, which must then hold whole groups too
    with pytest.raises(UserError, match="sample.batch_size=2"):
        load_config(CRDConfig, cfg, ["train.batch_size=null", "sample.batch_size=2"])
    with pytest.raises(UserError, match="crd.beta_kl"):  # GRPO's KL knob is not CRD's
        load_config(CRDConfig, cfg, ["train.beta_kl=0.1"])
    proc = run_cli("train", "crd", "--config", str(cfg), "train.batch_size=6", check=False)
    assert proc.returncode == 2 and "whole prompt groups" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_time_range_spaces_the_training_times_evenly(tmp_path, tiny_pixel_dir):
    cfg = _yaml(tmp_path, tiny_pixel_dir)
    c = load_config(CRDConfig, cfg, ["crd.time_range=[0.5, 0.8]", "crd.num_times=4"]).crd
    assert c.time_grid(3.0).tolist() == pytest.approx([0.8, 0.7, 0.6, 0.5])
    default = load_config(CRDConfig, cfg, ["crd.num_times=4"]).crd.time_grid(3.0)
    assert float(default[0]) == 1.0 and len(default) == 4  # the shifted schedule, from 1
    for bad in ("[0.8, 0.5]", "[0.5]", "[0.2, 1.5]"):
        with pytest.raises(UserError, match="crd.time_range must be"):
            load_config(CRDConfig, cfg, [f"crd.time_range={bad}"])


def test_group_batches_shuffle_whole_groups():
    batches = group_batches(6, 4, 2, torch.Generator().manual_seed(0))
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(24))  # every image exactly once
    for b in batches:
        groups = b // 4
        assert all((groups == g).sum() == 4 for g in groups.unique())  # whole groups only
    assert not torch.equal(rows, torch.arange(24))  # groups are shuffled


def test_snapshot_updates_follow_their_schedules(tmp_path, tiny_pixel_dir):
    # one optimizer step per epoch: the update after epoch e uses step = e + 1.
    # sampler: warm-up 1, rate 0.3 -> decay 0 after epoch 0 (a copy), 0.3 after epoch 1;
    # old: 0.25 + 0.1 step -> 0.35 after epoch 0, 0.45 after epoch 1.
    _train(tmp_path, tiny_pixel_dir, **{
        "crd.sampler_warmup": "1", "crd.sampler_rate": "0.3", "crd.old_rate": "0.1"})  # fmt: skip
    run = tmp_path / "run"
    s1 = load_checkpoint(run / "checkpoints" / "step-1")
    s2 = load_checkpoint(run / "checkpoints" / "step-2")
    log = _log(run)
    assert [r["decay/sampler"] for r in log] == pytest.approx([0.0, 0.3])
    assert [r["decay/old"] for r in log] == pytest.approx([0.35, 0.45])
    p1, p2 = s1["lora"], s2["lora"]
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)  # the policy moved
    for k in p1:
        assert torch.equal(s1[SAMPLER][k], p1[k]), k  # decay 0: the sampler is the policy
        torch.testing.assert_close(s2[SAMPLER][k], 0.3 * p1[k] + 0.7 * p2[k])
        torch.testing.assert_close(s2[OLD][k], 0.45 * s1[OLD][k] + 0.55 * p2[k])
        if "lora_B" in k:  # B starts at 0, so old_1 = 0.35 * 0 + 0.65 * policy_1
            torch.testing.assert_close(s1[OLD][k], 0.65 * p1[k])


def test_cfg_grad_applies_only_when_the_student_uses_cfg(tmp_path, tiny_pixel_dir):
    # CRD's student runs without CFG by default: train.cfg_grad changes nothing; with a
    # guided student it chooses the gradient as in GRPO
    def policy(name: str, **extra: str) -> dict:
        (tmp_path / name).mkdir()
        run = _train(tmp_path / name, tiny_pixel_dir, **{"train.epochs": "1", **extra})
        return run.model.adapter_state_dict(POLICY)

    plain = {m: policy(f"plain-{m}", **{"train.cfg_grad": m}) for m in ("cond", "both")}
    assert all(torch.equal(plain["cond"][k], plain["both"][k]) for k in plain["cond"])
    guided = {
        m: policy(f"cfg-{m}", **{"train.cfg_grad": m, "model.guidance_scale": "4.5"})
        for m in ("cond", "both")
    }
    assert any(not torch.equal(guided["cond"][k], guided["both"][k]) for k in guided["cond"])


def test_resume_equals_uninterrupted_run(tmp_path, tiny_pixel_dir):
    adapters = (POLICY, SAMPLER, OLD)
    check_resume_is_bitwise(_train, tmp_path, tiny_pixel_dir, adapters, 3, "reward_mean")


def test_policy_learns_the_reward(tmp_path, tiny_pixel_dir):
    # A high learning rate, whole-group minibatches of G = 8, 6 epochs. The KL anchor is
    # off: on this random tiny model the base's CFG velocity is noise, and the reward
    # differences within a group are small (std ~0.01), so the anchor would win.
    run = _train(tmp_path, tiny_pixel_dir, **{
        "train.lr": "3e-2", "train.epochs": "6", "train.optimizer_steps_per_epoch": "2",
        "sample.group_size": "8", "sample.batch_size": "16", "train.batch_size": "16",
        "crd.kl_anchor": "false", "output.checkpoint_every": "0"})  # fmt: skip
    from flowopd.rewards.toy import quality_score
    from flowopd.rollouts import load_prompts
    from flowopd.sampling import sample

    model = run.model
    cond = model.encode_prompts([r["prompt"] for r in load_prompts("world:geneval")[:16]])

    def quality() -> float:  # fixed prompts and noise: the same images up to the weights
        out = sample(model, cond, 4, kind="ode", guidance_scale=1.0, record=False,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
        return float(quality_score(out.images).mean())

    with model.adapters_disabled():
        base = quality()
    trained = quality()
    # measured: base 0.185 -> policy 0.214; a sign error in the loss lowers it instead
    assert trained > base + 0.01, (base, trained)
    rewards = [r["reward_mean"] for r in run.history]
    assert rewards[-1] > rewards[0] + 0.01, rewards


def test_presets_load():
    for name in ("toy/crd_geneval", "toy/crd_ocr", "sd35m/crd_ocr"):
        # validate=False: the embedded model / SD3.5 data need not be on this machine
        cfg = load_config(CRDConfig, REPO / "configs" / f"{name}.yaml", validate=False)
        cfg.crd.validate()
        cfg.check_distributed(1)
        assert cfg.model.guidance_scale == 1.0 and cfg.sample.kind == "ode"
        # the anchor's CFG is the base model's own: 3.0 for the embedded model, 4.5 for SD3.5
        anchor_cfg = 4.5 if name.startswith("sd35m") else 3.0
        assert cfg.crd.anchor_guidance_scale == anchor_cfg and cfg.crd.beta_kl == 0.1
    sd = load_config(CRDConfig, REPO / "configs" / "sd35m" / "crd_ocr.yaml", validate=False)
    assert sd.crd.times_used == 20 and sd.sample.group_size == 24 and sd.train.lr == 3e-4
    assert sd.optimizer_steps_per_epoch(8) == 2


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tiny_pixel_dir):
    # all training times (no per-minibatch subset), one minibatch (2 groups) per process
    common = {"train.epochs": "1", "train.ema": "false", "crd.times_per_batch": "null"}
    check_two_processes_equal_one(_train, _yaml, tmp_path, tiny_pixel_dir, "crd", common)
