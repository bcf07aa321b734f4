"""Parameter counts and bytes: transformer, LoRA, activations, dtypes, runtime overhead.

The FLOP convention is in the docstring of :mod:`flowopd.perf`.
"""

from __future__ import annotations

from collections.abc import Sequence

from flowopd.perf.flops import Arch, FluxArch, Linear, is_lora_target, mmdit_ops

GiB = 1024**3

# parameters and memory


def transformer_params(arch: Arch) -> int:
    """Trainable-parameter count of the transformer (weights + biases + q/k RMSNorm gains);
    SD3.5-Medium: 2,243,171,520, FLUX.1-dev: 11,901,408,320. The positional-embedding
    buffer is ``pos_embed_elements`` (none for FLUX's RoPE)."""
    n = 0
    for op in mmdit_ops(arch, 1, 1):
        if isinstance(op, Linear):
            n += op.k * op.n + (op.n if op.bias else 0)
    if isinstance(arch, FluxArch):  # q/k and added q/k norms per double, q/k per single block
        return n + arch.attention_head_dim * (4 * arch.num_layers + 2 * arch.num_single_layers)
    if arch.qk_norm == "rms_norm":  # norm_q, norm_k, norm_added_q, norm_added_k (+ attn2's 2)
        n += arch.attention_head_dim * (4 * arch.num_layers + 2 * len(arch.dual_attention_layers))
    return n


def pos_embed_elements(arch: Arch) -> int:
    """The fixed sin-cos positional-embedding buffer: pos_embed_max_size^2 x d."""
    return arch.pos_embed_max_size**2 * arch.dim


def lora_params(arch: Arch, rank: int, targets: Sequence[str]) -> int:
    """LoRA parameters: r (k + n) per adapted linear (A: r x k, B: n x r)."""
    return sum(
        rank * (op.k + op.n)
        for op in mmdit_ops(arch, 1, 1)
        if isinstance(op, Linear) and is_lora_target(op.name, targets)
    )


# Saved-for-backward activations per token per block, in units of d elements of the
# autocast dtype (bf16: 2 bytes). Derived from what autograd keeps for one image token in
# a block: LayerNorm input x, the normalised x (q/k/v/LoRA input), q and k before their
# RMSNorm, q/k/v after it (concatenated, kept by SDPA) and SDPA's output, the out-projection
# input, norm2's input, the MLP input, the 4d GELU input and the 4d GELU output:
# 1 + 1 + 2 + 3 + 1 + 1 + 1 + 1 + 4 + 4 = 20. A text token in the last block keeps only its
# attention inputs (~9); attn2 in a dual block adds ~8 per image token (normalised input,
# q/k pre-norm, q/k, output, out-projection input). Measured on CPU with
# saved_tensors_hooks (tests/test_perf.py): 20.2 / 18.5 (4-block average) / 7.5.
# Memory-efficient attention is assumed: no N^2 score matrix is stored.
ACT_PER_TOKEN = 20
ACT_PER_TOKEN_LAST_TEXT = 9
ACT_PER_TOKEN_DUAL = 8
# A FLUX single-stream block, per token (image and text alike), derived the same way but
# not measured: x, normalised x, q/k before and q/k/v after their RMSNorm, the attention
# output, the 4d GELU input and output, and proj_out's 5d input [attention, GELU(MLP)]:
# 1 + 1 + 2 + 3 + 1 + 4 + 4 + 5 = 21.
ACT_PER_TOKEN_SINGLE = 21


def activation_bytes(
    arch: Arch,
    n_img: int,
    n_txt: int,
    rows: int,
    *,
    dtype_bytes: int = 2,
    checkpointing: bool = False,
) -> int:
    """Activations kept for the backward of one micro-batch of ``rows`` rows.

    Without checkpointing: d x dtype_bytes x rows x sum over blocks of
    (20 n_img + 20 n_txt [9 in the last block] + 8 n_img in dual blocks); FLUX: 20 (n_img +
    n_txt) per double-stream block (no text-free last block) and 21 (n_img + n_txt) per
    single-stream block.
    With checkpointing: each block keeps only its two input streams (n_img + n_txt) d,
    plus one block's full activations while it is recomputed.
    """
    d, L = arch.dim, arch.num_layers
    flux = isinstance(arch, FluxArch)
    per_block = []
    for i in range(L):
        t = ACT_PER_TOKEN_LAST_TEXT if i == L - 1 and not flux else ACT_PER_TOKEN
        e = ACT_PER_TOKEN * n_img + t * n_txt
        if i in arch.dual_attention_layers:
            e += ACT_PER_TOKEN_DUAL * n_img
        per_block.append(e)
    if flux:  # FLUX: the single-stream blocks after the double-stream ones
        per_block += [ACT_PER_TOKEN_SINGLE * (n_img + n_txt)] * arch.num_single_layers
    if checkpointing:
        elems = len(per_block) * (n_img + n_txt) + max(per_block)
    else:
        elems = sum(per_block)
    return elems * d * dtype_bytes * rows


# --------------------------------------------------------------------------------------
RUNTIME_OVERHEAD_BYTES = int(1.5 * GiB)


def _dtype_key(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)


def dtype_bytes(dtype: str) -> int:
    return 4 if _dtype_key(dtype) == "float32" else 2
