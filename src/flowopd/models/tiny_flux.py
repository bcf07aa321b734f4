"""A tiny FLUX.1 pipeline built in memory from configs, fully offline (tests).

The FLUX twin of ``tiny.build_tiny_sd3_pipeline``: a ``FluxTransformer2DModel`` with one
double-stream and one single-stream block, CLIP (pooled) + T5 (sequence) text encoders
over the same deterministic tokenizers, a tiny 16-channel-style VAE with FLUX.1's scaling
and shift factors, and FLUX.1-dev's dynamically shifted scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flowopd.models.tiny import (
    DEFAULT_WORDS,
    clip_text_config,
    clip_tokenizer,
    t5_encoder,
    t5_tokenizer,
)


@dataclass
class TinyFluxConfig:
    """Sizes of an in-memory FLUX pipeline. Defaults: a 16 px test pipeline (8 x 8 latents
    with 4 channels, 16 packed tokens), guidance-distilled like FLUX.1-dev."""

    num_layers: int = 1  # double-stream blocks
    num_single_layers: int = 1
    attention_head_dim: int = 8
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (2, 2, 4)  # sums to attention_head_dim
    latent_channels: int = 4  # transformer in_channels = 4 x this (2x2 packing)
    guidance_embeds: bool = True  # FLUX.1-dev; False = schnell
    clip_hidden: int = 16  # CLIP width = pooled_projection_dim
    clip_max_length: int = 16
    t5_width: int = 32  # T5 d_model = joint_attention_dim
    vae_blocks: int = 2  # 2^(vae_blocks - 1) x down-sampling (FLUX.1: 4 blocks, x8)
    resolution: int = 16  # the native image side written to flowopd.json
    words: tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)


def _transformer(cfg: TinyFluxConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * cfg.latent_channels,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.t5_width,
        pooled_projection_dim=cfg.clip_hidden,
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    ).eval()


def _clip(cfg: TinyFluxConfig, tok, seed: int):
    from transformers import CLIPTextModel

    torch.manual_seed(seed + 1)
    return CLIPTextModel(clip_text_config(tok, cfg.clip_hidden, 1, cfg.clip_max_length)).eval()


def _vae(cfg: TinyFluxConfig, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * cfg.vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * cfg.vae_blocks,
        block_out_channels=(8,) * cfg.vae_blocks, latent_channels=cfg.latent_channels,
        layers_per_block=1, norm_num_groups=4, sample_size=cfg.resolution,
        scaling_factor=0.3611, shift_factor=0.1159,  # FLUX.1's VAE factors
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip


def build_tiny_flux_pipeline(cfg: TinyFluxConfig | None = None, seed: int = 0):
    """A complete ``FluxPipeline`` with random weights, built offline.

    Scheduler: FLUX.1-dev's (dynamic shifting, base/max shift 0.5/1.15 over 256..4096
    tokens). Each part draws its weights from its own torch seed (``seed`` .. ``seed + 3``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    cfg = cfg or TinyFluxConfig()
    torch.manual_seed(seed)
    transformer = _transformer(cfg)
    tok = clip_tokenizer(cfg.words, cfg.clip_max_length)
    tok_2 = t5_tokenizer(cfg.words)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(cfg, seed),
        text_encoder=_clip(cfg, tok, seed),
        tokenizer=tok,
        text_encoder_2=t5_encoder(tok_2, cfg.t5_width, seed + 2),
        tokenizer_2=tok_2,
        transformer=transformer,
    )
