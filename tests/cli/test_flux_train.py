"""GRPO, Flow-OPD and CRD epochs through ``flowopd train`` on a tiny saved FLUX pipeline
(``model.backend: flux``; 16 px, one epoch each, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd.cli import main
from tests.recipes._teachers import make_teacher_loras, write_mixed_prompts

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    """A tiny guidance-distilled FLUX pipeline saved like a real one (native 16 px)."""
    from flowopd.models.flux import FluxModel
    from flowopd.models.tiny_flux import build_tiny_flux_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny_flux"
    model = FluxModel(build_tiny_flux_pipeline(), max_sequence_length=4, native_resolution=16)
    model.save_pretrained(path)
    return path


def _train(algo: str, tmp: Path, body: str, *overrides: str) -> list[dict]:
    cfg = tmp / f"{algo}.yaml"
    cfg.write_text(body)
    assert main(["train", algo, "--config", str(cfg), *overrides]) == 0
    return [json.loads(x) for x in (tmp / "run" / "log.jsonl").read_text().splitlines()]


def _model(path: Path, guidance: float = 3.5) -> str:
    return (f"model: {{path: {path}, backend: flux, dtype: float32, resolution: null, "
            f"guidance_scale: {guidance}, lora: {{rank: 4, alpha: 8}}}}\n")  # fmt: skip


def test_grpo_epoch_on_flux(tmp_path, flux_dir):
    """One update on all 16 trajectories: ratio 1 (re-scoring = sampling, one forward with
    the guidance embedding), a finite loss and KL, and a LoRA that moved on Flow-GRPO's
    FLUX targets and loads into the stock FluxPipeline."""
    from diffusers import FluxPipeline

    log = _train("grpo", tmp_path, _model(flux_dir) + f"""
data: {{train: "world:geneval"}}
reward: toy_quality
sample: {{num_steps: 3, group_size: 4, prompts_per_epoch: 4, batch_size: 8}}
train: {{epochs: 1, batch_size: 16, optimizer_steps_per_epoch: 1, lr: 1.0e-2, seed: 3, ema: false}}
eval: {{every: 0}}
output: {{dir: {tmp_path / "run"}}}
""")  # fmt: skip
    rec = log[0]
    assert rec["images"] == 16 and rec["reward_std"] > 0
    assert abs(rec["ratio_mean"] - 1.0) < 1e-6 and rec["clip_fraction"] == 0.0
    assert rec["grad_norm"] > 0 and math.isfinite(rec["policy_loss"]) and math.isfinite(rec["kl"])
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "backend: flux" in resolved and "ff_context.net.2" in resolved
    lora = load_file(tmp_path / "run" / "lora" / LORA)
    assert any("single_transformer_blocks" in k for k in lora)
    assert any(k.endswith("ff.net.2.lora_B.weight") for k in lora)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    pipe = FluxPipeline.from_pretrained(flux_dir)

    def stock():
        return pipe(["a red circle"], num_inference_steps=2, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="latent",
                    max_sequence_length=4).images  # fmt: skip

    base = stock()
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))  # the stock loader reads it
    assert (stock() - base).abs().max() > 0


def test_opd_epoch_on_flux_with_flux_lora_teachers(tmp_path, flux_dir):
    """Routed FLUX LoRA teachers (one forward, per-sample adapters, same guidance embedding
    as the student): a positive per-task KL to the teachers, the MAR anchor (the base) near
    the student, and a student LoRA that moved."""
    teachers = make_teacher_loras(flux_dir, tmp_path / "teachers", backend="flux")
    prompts = write_mixed_prompts(tmp_path / "mixed.jsonl", 2)
    log = _train("opd", tmp_path, _model(flux_dir) + f"""
data: {{train: {prompts}}}
sample: {{num_steps: 3, group_size: 2, prompts_per_epoch: 4, batch_size: 8}}
train: {{epochs: 1, batch_size: 4, optimizer_steps_per_epoch: 2, lr: 1.0e-3, seed: 3, ema: false}}
eval: {{every: 0}}
output: {{dir: {tmp_path / "run"}}}
opd:
  teachers:
    - {{path: {teachers["geneval"]}, tasks: [geneval]}}
    - {{path: {teachers["ocr"]}, tasks: [ocr]}}
""", "reward={routing: {geneval: toy_geneval, ocr: toy_ocr}}")  # fmt: skip
    rec = log[0]
    assert rec["images"] == 8 and rec["opt_steps"] == 2
    assert rec["kl"] > 0 and rec["kl/geneval"] > 0 and rec["kl/ocr"] > 0
    assert 0 <= rec["mar_kl"] < 1e-2 * rec["kl"]  # the student starts at the anchor
    lora = load_file(tmp_path / "run" / "lora" / LORA)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_crd_epoch_on_flux(tmp_path, flux_dir):
    """CRD's ODE collection and forward-noised training on FLUX: finite loss, zero
    implicit reward at the first update (policy = old snapshot), a LoRA that moved."""
    log = _train("crd", tmp_path, _model(flux_dir, guidance=1.0) + f"""
data: {{train: "world:geneval"}}
reward: toy_quality
sample: {{num_steps: 3, group_size: 4, prompts_per_epoch: 2, batch_size: 8}}
train: {{epochs: 1, batch_size: 8, optimizer_steps_per_epoch: 1, lr: 1.0e-3, seed: 3, ema: false}}
crd: {{num_times: 4, times_per_batch: 2}}
eval: {{every: 0}}
output: {{dir: {tmp_path / "run"}, keep_last: 0}}
""")  # fmt: skip
    rec = log[0]
    assert rec["images"] == 8 and rec["reward_std"] > 0
    assert math.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    assert rec["implicit_reward_mean"] == 0.0
    lora = load_file(tmp_path / "run" / "lora" / LORA)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
