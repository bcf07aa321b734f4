"""Tiny stand-ins for what the SD3.5-M presets load: the pipeline, scorers and LoRAs.

All random weights, built in memory and saved to a directory, so the shipped presets run
end to end through the CLI with nothing downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flowopd.models.tiny import TinySD3Config

# SD3.5-M's shape at toy width: dual-attention (attn2) blocks, QK RMS-norm, three text
# encoders (CLIP-L, CLIP-G stand-ins + T5), patch 2, 16 latent channels, a VAE (x2 here).
TINY_SD35M = TinySD3Config(
    sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, dual_attention_layers=(0,), qk_norm="rms_norm", clip_hidden=16,
    clip_layers=1, clip_max_length=16, t5=True, t5_max_length=8, vae=True,
)  # fmt: skip


def save_tiny_sd35m(path: Path) -> Path:
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline

    SD3Model(build_tiny_sd3_pipeline(TINY_SD35M), max_sequence_length=8).save_pretrained(path)
    return path


def save_tiny_lora(model_dir: Path, path: Path, *, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA in the diffusers format (what a GRPO run writes to OUT/lora), random A and B."""
    from flowopd.config.sections import SD3_LORA_TARGETS
    from flowopd.models.sd3 import SD3Model

    model = SD3Model.from_pretrained(str(model_dir))
    model.add_adapter("t", rank=rank, alpha=2.0 * rank, target_modules=SD3_LORA_TARGETS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters("t"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_adapter("t", path)
    return path


def save_tiny_mask2former(path: Path) -> Path:
    """A 1-layer Mask2Former (Swin width 16) over four COCO labels: a GenEval detector."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        Mask2FormerImageProcessorPil,
    )

    labels = ["dog", "mouse", "dining table", "handbag"]
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    cfg = Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, hidden_dim=32,
        mask_feature_size=32, feature_size=32, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, dim_feedforward=32, encoder_feedforward_dim=32, num_queries=6,
        id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).eval().save_pretrained(path)
    size = {"shortest_edge": 64, "longest_edge": 64}
    Mask2FormerImageProcessorPil(size=size).save_pretrained(path)
    return path


def save_tiny_clip(path: Path) -> Path:
    """A 1-layer CLIP (width 32, 32 px images) with a real BPE tokenizer: PickScore's and
    GenEval's colour classifier's stand-in."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from flowopd.models.tiny import clip_tokenizer

    tok = clip_tokenizer()
    vocab = tok.get_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    layer = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos, **layer),
        vision_config=dict(image_size=32, patch_size=8, **layer),
        projection_dim=16, logit_scale_init_value=math.log(50.0),
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    crop = {"height": 32, "width": 32}
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(path)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line.rstrip("\n") + "\n" for line in lines), encoding="utf-8")
    return path


def geneval_jsonl(path: Path, shared: Path, n: int) -> Path:
    """The first ``n`` lines of GenEval's test metadata (the published JSONL, as is)."""
    src = (shared / "geneval" / "test_metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return write_lines(path, src[:n])
