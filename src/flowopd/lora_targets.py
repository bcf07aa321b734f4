"""Which transformer linears get a LoRA adapter by default.

Plain constants without torch, so configs can name them without importing the model
stack; ``models/adapters.py`` applies them through peft.
"""

from __future__ import annotations

# Flow-GRPO's SD3 / SD3.5 LoRA targets: the joint attention ``attn`` of every MMDiT block,
# its image-stream q/k/v/out and its context-stream projections. The ``attn.`` prefix
# matters: peft matches a target as a name suffix after a dot, so a bare ``to_q`` also
# adapts ``attn2`` (the image-only second attention of SD3.5-M's 13 dual-attention blocks),
# 23,887,872 LoRA parameters at rank 32 on SD3.5-M instead of Flow-GRPO's 18,776,064.
SD3_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# Add these to the targets to adapt SD3.5's dual-attention blocks' ``attn2`` too
# (no context projections: attn2 attends over the image tokens only).
SD3_ATTN2_TARGETS: tuple[str, ...] = (
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)

# Flow-GRPO's FLUX.1 LoRA targets (yifan123/flow_grpo, scripts/train_flux.py; r=64,
# alpha=128 there): the joint attention's q/k/v/out and context projections, plus both
# MLPs of the 19 double-stream blocks. Matched as dotted suffixes, ``attn.to_q/k/v`` also
# adapt the 38 single-stream blocks' attention (which has no ``to_out``: its output goes
# through the block's ``proj_out``, which is not adapted); ``ff.*`` exist only in the
# double-stream blocks.
FLUX_TARGETS: tuple[str, ...] = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
