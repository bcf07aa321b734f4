"""The analytic FLOP / parameter / activation counts of ``flowopd.perf`` against a hand
count and against what torch measures on the real diffusers transformer."""

from __future__ import annotations

import pytest
import torch

from flowopd import perf
from flowopd.config.sections import SD3_LORA_TARGETS
from flowopd.models.adapters import SD3_TARGETS
from flowopd.perf import MMDiTArch

# the bare suffixes match attn2 too (peft matches dotted name suffixes)
BARE_TARGETS = [t.removeprefix("attn.") for t in SD3_TARGETS]

# 2 blocks of width d = 2 heads x 16 = 32, dual attention in block 0, 4 latent channels,
# patch 2 on a 4 x 4 latent -> n_img = 4 tokens; 12 text tokens of width 32.
HAND = MMDiTArch(
    num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    patch_size=2, sample_size=4, joint_attention_dim=32, caption_projection_dim=32,
    pooled_projection_dim=32, pos_embed_max_size=4, dual_attention_layers=(0,),
    qk_norm="rms_norm",
)  # fmt: skip
N_IMG, N_TXT = 4, 12

# One row, FLOPs = 2 x MACs. d = 32, N = n_img + n_txt = 16.
HAND_FORWARD = (
    2 * 4 * (4 * 2 * 2) * 32  # patch embed: n_img x (C p^2 = 16) x d            =   4,096
    + 2 * (256 * 32 + 32 * 32)  # timestep MLP 256 -> d -> d                       =  18,432
    + 2 * (32 * 32 + 32 * 32)  # pooled-text MLP 32 -> d -> d                      =   4,096
    + 2 * 12 * 32 * 32  # context embedder: n_txt x J x d                          =  24,576
    # block 0 (dual, not last)                                                     = 491,520
    + 2 * 32 * 9 * 32  # image adaLN-X: d -> 9d, one row                          =  18,432
    + 2 * 32 * 6 * 32  # text adaLN: d -> 6d                                      =  12,288
    + 4 * 2 * 4 * 32 * 32  # image q, k, v, out: 4 x (2 n_img d^2)                =  32,768
    + 4 * 2 * 12 * 32 * 32  # text q, k, v, out: 4 x (2 n_txt d^2)                =  98,304
    + 4 * 16 * 16 * 32  # joint attention: 4 N^2 d                                =  32,768
    + 4 * 2 * 4 * 32 * 32  # attn2 (image only) q, k, v, out                      =  32,768
    + 4 * 4 * 4 * 32  # attn2: 4 n_img^2 d                                        =   2,048
    + 2 * 2 * 4 * 32 * 128  # image MLP d -> 4d -> d: 16 n_img d^2                =  65,536
    + 2 * 2 * 12 * 32 * 128  # text MLP: 16 n_txt d^2                             = 196,608
    # block 1 (last: no text out-projection, no text MLP)                          = 221,184
    + 2 * 32 * 6 * 32  # image adaLN: d -> 6d                                     =  12,288
    + 2 * 32 * 2 * 32  # text adaLN-continuous: d -> 2d                           =   4,096
    + 4 * 2 * 4 * 32 * 32  # image q, k, v, out                                   =  32,768
    + 3 * 2 * 12 * 32 * 32  # text q, k, v                                        =  73,728
    + 4 * 16 * 16 * 32  # joint attention                                         =  32,768
    + 2 * 2 * 4 * 32 * 128  # image MLP                                           =  65,536
    # head
    + 2 * 32 * 2 * 32  # final adaLN: d -> 2d                                     =   4,096
    + 2 * 4 * 32 * 16  # unpatchify projection: n_img x d x (p^2 C = 16)          =   4,096
)
assert HAND_FORWARD == 772_096


def test_forward_flops_equal_the_hand_count():
    assert perf.forward_flops(HAND, N_IMG, N_TXT) == HAND_FORWARD


def test_lora_adds_2_m_r_k_plus_n_per_adapted_linear():
    # attn.-prefixed targets: 7 image/text projections of width d in block 0 (to_q, to_k,
    # to_v, to_out, add_q, add_k, add_v, to_add_out = 4 on n_img rows + 4 on n_txt rows)
    # and 7 in block 1 (no to_add_out): sum of m over them = 4*4 + 4*12 + 4*4 + 3*12.
    r, d = 4, 32
    rows = 4 * 4 + 4 * 12 + 4 * 4 + 3 * 12
    extra = rows * 2 * r * (d + d)
    got = perf.forward_flops(HAND, N_IMG, N_TXT, lora_rank=r, lora_targets=SD3_TARGETS)
    assert got - HAND_FORWARD == extra
    # the config default is the same list (Flow-GRPO's: attn only)
    assert list(SD3_LORA_TARGETS) == list(SD3_TARGETS)
    # bare suffixes ('to_q') also adapt attn2 in block 0: 4 more on n_img rows
    short = perf.forward_flops(HAND, N_IMG, N_TXT, lora_rank=r, lora_targets=BARE_TARGETS)
    assert short - got == 4 * 4 * 2 * r * (d + d)


def _transformer(arch: MMDiTArch, device: str = "cpu"):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        return SD3Transformer2DModel(**arch.to_config()).eval()


def _inputs(arch: MMDiTArch, rows: int, n_txt: int, device: str = "cpu"):
    side = int(arch.sample_size)
    with torch.device(device):
        return dict(
            hidden_states=torch.randn(rows, arch.in_channels, side, side),
            encoder_hidden_states=torch.randn(rows, n_txt, arch.joint_attention_dim),
            pooled_projections=torch.randn(rows, arch.pooled_projection_dim),
            timestep=torch.full((rows,), 500.0),
        )


def test_params_match_the_diffusers_model():
    model = _transformer(HAND)
    assert perf.transformer_params(HAND) == sum(p.numel() for p in model.parameters())
    assert perf.pos_embed_elements(HAND) == model.pos_embed.pos_embed.numel()


def test_forward_flops_match_torch_flop_counter():
    """FlopCounterMode counts every mm/addmm/bmm/conv that runs; bias adds, norms and
    softmax are skipped by both, so the counts agree exactly (attention included, via
    perf.measure_flops' mapping of the CPU flash kernel)."""
    model = _transformer(HAND)
    rows = 3
    with torch.no_grad():
        measured = perf.measure_flops(lambda: model(**_inputs(HAND, rows, N_TXT)))
    assert measured == rows * HAND_FORWARD


@pytest.mark.parametrize("targets", [SD3_TARGETS, BARE_TARGETS], ids=["attn.", "short"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
def test_train_step_flops_match_torch_flop_counter(targets, checkpointing):
    """Forward + backward with a frozen base and LoRA: the counter sees the input-gradient
    matmuls only where the input depends on LoRA weights, the LoRA weight gradients, the
    attention backward (2x its forward, +0.5x for the flash kernel's recomputed scores)
    and, under checkpointing, the blocks' re-run."""
    from peft import LoraConfig

    model = _transformer(HAND)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    rows = 2
    x = _inputs(HAND, rows, N_TXT)
    measured = perf.measure_flops(lambda: model(**x).sample.square().mean().backward())
    tf = perf.train_step_flops(HAND, N_IMG, N_TXT, lora_rank=4, lora_targets=targets,
                               checkpointing=checkpointing)  # fmt: skip
    assert measured == rows * tf.hardware
    assert (tf.recompute > 0) == checkpointing
    # frozen base: backward ~1x forward for the linears, not 2x as in full fine-tuning
    assert 0.8 < tf.backward / tf.forward < 1.6


def test_full_size_counts_on_the_meta_device():
    """SD3.5-Medium at 512 px (1024 image + 333 text tokens), counted on the meta device
    (shapes only): the analytic count equals torch's, 2.44 TFLOPs per row."""
    arch = perf.SD35_MEDIUM
    model = _transformer(arch, "meta")
    assert perf.transformer_params(arch) == sum(p.numel() for p in model.parameters())
    assert perf.transformer_params(arch) == 2_243_171_520
    x = _inputs(arch, 1, 333, "meta")
    x["hidden_states"] = torch.empty(1, 16, 64, 64, device="meta")
    measured = perf.measure_flops(lambda: model(**x))
    assert measured == perf.forward_flops(arch, 1024, 333) == 2_442_642_604_032


def test_vae_decode_flops():
    # SD3's VAE decoder: 9.43 MFLOPs per output pixel in convolutions, plus its one
    # mid-block attention over (H/8)^2 tokens of width 512
    f512 = perf.vae_decode_flops(perf.SD3_VAE_CONFIG, 512)
    f256 = perf.vae_decode_flops(perf.SD3_VAE_CONFIG, 256)
    assert f512 == 2_514_971_787_264
    conv = 9_430_016
    attn = lambda t: 4 * 2 * t * 512 * 512 + 4 * t * t * 512  # noqa: E731  (proj + scores)
    assert f256 == conv * 256**2 + attn(32 * 32)
    assert perf.vae_decode_flops(None, 512) == 0


def test_activation_model_against_saved_tensors():
    """Bytes autograd saves for the backward (unique storages, parameters excluded) of a
    small LoRA model vs ``activation_bytes`` (float32, no autocast weight copies)."""
    from peft import LoraConfig

    arch = MMDiTArch(
        num_layers=3, num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, sample_size=16, joint_attention_dim=64, caption_projection_dim=64,
        pooled_projection_dim=32, pos_embed_max_size=16, dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )  # fmt: skip
    n_img, n_txt, rows = 64, 32, 2
    model = _transformer(arch)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=BARE_TARGETS))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    # as SD3Model trains: bf16 base, float32 LoRA, bf16 autocast
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.data = p.data.bfloat16()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in owned and t.numel() > 16 * 64:  # skip LoRA weight casts
            saved[st.data_ptr()] = st.nbytes()
        return t

    x = {k: v.bfloat16() for k, v in _inputs(arch, rows, n_txt).items()}
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        model(**x)
    measured = sum(saved.values())
    predicted = perf.activation_bytes(arch, n_img, n_txt, rows, dtype_bytes=2)
    print(f"activations: predicted {predicted} B, saved {measured} B")
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_gpu_peak_lookup():
    assert perf.gpu_peak_for_name("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert perf.gpu_peak_for_name("NVIDIA H100 PCIe", "bf16") == 756.0
    assert perf.gpu_peak_for_name("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert perf.gpu_peak_for_name("Tesla T4", "bfloat16") is None
