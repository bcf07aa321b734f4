"""GRPO with ``model.finetune: full`` (engine/full.py): the transformer's own weights train,
FSDP2-sharded over torchrun processes (gloo on CPU), saved as a diffusers model directory.

Runs on the tiny pixel-space SD3 model (tests/recipes/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd.config import load_config
from flowopd.errors import UserError
from tests.recipes.conftest import forward_run_yaml, read_log, run_cli, torchrun_cli

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _yaml(tmp: Path, model: Path) -> Path:
    """4 prompts x 4 images, 4 SDE steps, full fine-tuning with the KL reference on."""
    cfg = tmp / "grpo.yaml"
    cfg.write_text(
        f"""
model: {{path: {model}, dtype: float32, resolution: null, guidance_scale: 4.5,
        finetune: full}}
data: {{train: "world:geneval"}}
reward: toy_quality
sample: {{num_steps: 4, group_size: 4, prompts_per_epoch: 4, batch_size: 8}}
train: {{epochs: 1, optimizer_steps_per_epoch: 1, lr: 1.0e-3, seed: 3, ema_every: 1}}
grpo: {{beta_kl: 0.04}}
eval: {{every: 0}}
output: {{dir: {tmp / "run"}, checkpoint_every: 1}}
"""
    )
    return cfg


def _train(tmp: Path, model: Path, **extra: str) -> Path:
    run_cli("train", "grpo", "--config", str(_yaml(tmp, model)), *[f"{k}={v}" for k, v in extra.items()])  # fmt: skip
    return tmp / "run"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "transformer" / WEIGHTS)


def test_full_run_trains_every_weight_and_saves_a_diffusers_transformer(tmp_path, tiny_pixel_dir):
    from diffusers import SD3Transformer2DModel

    run = _train(tmp_path, tiny_pixel_dir, **{"train.batch_size": "16"})
    assert not (run / "lora").exists()
    rec = read_log(run)[0]
    assert rec["grad_norm"] > 0 and abs(rec["ratio_mean"] - 1.0) < 1e-6
    base = SD3Transformer2DModel.from_pretrained(tiny_pixel_dir / "transformer")
    trained = SD3Transformer2DModel.from_pretrained(run / "transformer")  # a stock load
    sb, st = base.state_dict(), trained.state_dict()
    assert sb.keys() == st.keys()
    changed = [k for k in sb if not torch.equal(sb[k].float(), st[k].float())]
    assert len(changed) > len(sb) // 2  # the whole network trains, not adapters
    ckpt = run / "checkpoints" / "step-1"
    assert (ckpt / "tensors.safetensors").is_file()


def test_full_resume_is_bitwise(tmp_path, tiny_pixel_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _train(a, tiny_pixel_dir, **{"train.epochs": "2"})  # EMA on: its shadow is checkpointed
    _train(b, tiny_pixel_dir)  # "interrupted" after epoch 0
    _train(b, tiny_pixel_dir, **{"train.epochs": "2", "output.resume": "true"})
    assert [r["epoch"] for r in read_log(b / "run")] == [0, 1]
    wa, wb = _weights(a / "run"), _weights(b / "run")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_log(a / "run")[-1]["grad_norm"] == read_log(b / "run")[-1]["grad_norm"]


@pytest.mark.slow
def test_full_two_processes_equal_one_process(tmp_path, tiny_pixel_dir):
    # FSDP2 on gloo: 2 x 8 images, sharded weights / grads / AdamW states, equal the
    # unsharded update on 16 images in one process (up to float summation order)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = {"train.ema": "false"}
    _train(one, tiny_pixel_dir, **common, **{"train.batch_size": "16"})
    torchrun_cli("train", "grpo", "--config", str(_yaml(two, tiny_pixel_dir)),
                 "train.ema=false", "train.batch_size=8")  # fmt: skip
    r1, r2 = read_log(one / "run")[0], read_log(two / "run")[0]
    assert r1["reward_mean"] == pytest.approx(r2["reward_mean"], abs=1e-6)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    assert r1["kl"] == pytest.approx(r2["kl"], abs=1e-7)
    w1, w2 = _weights(one / "run"), _weights(two / "run")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)


def test_full_is_rejected_where_unsupported(tmp_path, tiny_pixel_dir):
    from flowopd.config.crd import CRDConfig
    from flowopd.config.grpo import GRPOConfig

    yaml = forward_run_yaml(tmp_path, tiny_pixel_dir, "crd", "crd: {}")
    with pytest.raises(UserError, match="GRPO only so far.*CRD"):
        load_config(CRDConfig, yaml, ["model.finetune=full"])
    cfg = _yaml(tmp_path, tiny_pixel_dir)
    with pytest.raises(UserError, match="adamw_8bit"):
        load_config(GRPOConfig, cfg, ["train.adamw_8bit=true"])
    assert load_config(GRPOConfig, cfg).uses_reference
    assert not load_config(GRPOConfig, cfg, ["grpo.beta_kl=0"]).uses_reference
