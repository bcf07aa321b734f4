"""``model.resolution`` reaches sampling, training rollouts and evaluation.

An SD3.5-M-shaped pipeline (VAE x8, patch 2, 16 latent channels, sample_size 128, i.e.
1024 px natively) configured at 512 px must sample 512 / 8 = 64 x 64 latents everywhere,
not the native 128 x 128 (4x the image tokens).
"""

from __future__ import annotations

import pytest
import torch

from flowopd.models.tiny import TinySD3Config

# SD3.5-M's shape at toy width; sample_size 128 as SD3.5-M (native 128 x 8 = 1024 px)
SD35M_SHAPED = TinySD3Config(
    sample_size=128, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
    num_attention_heads=2, dual_attention_layers=(0,), qk_norm="rms_norm", clip_hidden=16,
    clip_layers=1, t5=True, vae=True, vae_blocks=4, pos_embed_max_size=96,
)  # fmt: skip


@pytest.fixture(scope="module")
def sd35m_shaped():
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline

    return SD3Model(build_tiny_sd3_pipeline(SD35M_SHAPED), max_sequence_length=8)


def test_native_and_configured_latent_shapes(sd35m_shaped):
    model = sd35m_shaped
    model.set_resolution(None)
    assert model.vae_scale_factor == 8 and model.native_resolution == 1024
    assert model.latent_shape() == (16, 128, 128)
    model.set_resolution(512)
    assert model.default_resolution == 512
    assert model.latent_shape() == (16, 64, 64)  # 512 / 8
    assert model.latent_shape(256) == (16, 32, 32)  # an explicit size still wins
    from flowopd.errors import UserError

    with pytest.raises(UserError, match="positive multiple of 16"):
        model.set_resolution(520)  # 520 / 8 = 65 latents: not a whole number of patches
    assert model.default_resolution == 512  # a rejected size leaves the setting alone


def test_rollouts_and_evaluation_use_the_run_resolution(sd35m_shaped, tmp_path):
    from flowopd.config import config_from_dict
    from flowopd.config.grpo import GRPOConfig
    from flowopd.engine.run import setup_run
    from flowopd.eval.benchmarks import EvalSettings, evaluate
    from flowopd.rollouts import collect_rollouts
    from flowopd.sampling import SamplerSpec

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a red circle", "task": "x"}\n')
    model = sd35m_shaped
    model.set_resolution(None)
    cfg = config_from_dict(
        GRPOConfig,
        {
            "model": {"path": str(tmp_path), "resolution": 512, "dtype": "float32"},
            "data": {"train": str(train)},
            "reward": "toy_ocr",
            "sample": {"group_size": 2, "prompts_per_epoch": 1, "batch_size": 2},
            "train": {"optimizer_steps_per_epoch": 1},
            "output": {"dir": str(tmp_path / "run")},
        },
    )
    run = setup_run(cfg, adapter=None, model=model)  # what every recipe does first
    assert run.model.default_resolution == 512
    ro = collect_rollouts(
        model, [{"prompt": "a red circle"}], 0, 2, SamplerSpec(num_steps=1), batch_size=2,
        seed=0, epoch=0, same_initial_noise=True,
    )  # fmt: skip
    assert ro.trajectory.latents.shape == (2, 2, 16, 64, 64)  # (B, T + 1, C, h, w)
    assert ro.images.shape == (2, 3, 512, 512)
    res = evaluate(model, ["toy-ocr"], EvalSettings(steps=1, n=1, batch_size=1))
    images = res.images["toy-ocr"]
    assert images.shape == (1, 3, 512, 512)
    assert torch.isfinite(images).all()
