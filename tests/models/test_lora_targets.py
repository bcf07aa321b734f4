"""Flow-GRPO's LoRA targets on SD3.5-Medium's architecture, counted on the meta device."""

from __future__ import annotations

import pytest
import torch

from flowopd import perf
from flowopd.config.grpo import GRPOConfig
from flowopd.models import adapters as ad

# SD3.5-M: 24 MMDiT blocks of width d = 24 heads x 64 = 1536; the caption projection is
# 1536 wide too, so every adapted linear is d -> d and costs r (d + d) = 32 * 3072 = 98,304
# LoRA parameters at rank 32 (A: r x d, B: d x r).
PER_LINEAR = 32 * (1536 + 1536)
# attn of blocks 0..22: to_q, to_k, to_v, to_out.0, add_q/k/v_proj, to_add_out = 8 linears;
# block 23 (context_pre_only) has no to_add_out: 7. 23 * 8 + 7 = 191 linears.
FLOW_GRPO = (23 * 8 + 7) * PER_LINEAR
# attn2 of the 13 dual-attention blocks 0..12: to_q, to_k, to_v, to_out.0 = 52 linears more.
WITH_ATTN2 = FLOW_GRPO + 13 * 4 * PER_LINEAR


def test_hand_counts():
    assert FLOW_GRPO == 18_776_064  # Flow-GRPO's "18.8 M"
    assert WITH_ATTN2 == 23_887_872  # bare suffixes: "23.9 M"


def _sd35m_on_meta():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # shapes only: no weights are allocated or loaded
        return SD3Transformer2DModel(**perf.SD35_MEDIUM.to_config())


def _lora_count(targets: list[str], rank: int, alpha: float) -> tuple[int, list[str]]:
    from peft import LoraConfig

    transformer = _sd35m_on_meta()
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), adapter_name="policy"
    )
    n = sum(p.numel() for p in ad.adapter_parameters(transformer, "policy"))
    adapted = [name for name, m in transformer.named_modules() if hasattr(m, "lora_A")]
    return n, adapted


def test_default_targets_give_flow_grpo_parameter_count_on_sd35m():
    lora = GRPOConfig().model.lora
    assert (lora.rank, lora.alpha) == (32, 64.0)
    n, adapted = _lora_count(list(lora.target_modules), lora.rank, lora.alpha)
    assert n == FLOW_GRPO
    assert len(adapted) == 23 * 8 + 7
    assert not [a for a in adapted if ".attn2." in a]
    # the estimate (flowopd estimate / check) counts the same from the architecture alone
    assert perf.lora_params(perf.SD35_MEDIUM, lora.rank, lora.target_modules) == FLOW_GRPO


@pytest.mark.parametrize(
    "targets",
    [
        [*ad.SD3_TARGETS, *ad.SD3_ATTN2_TARGETS],  # the documented option
        [t.removeprefix("attn.") for t in ad.SD3_TARGETS],  # bare suffixes (the old default)
    ],
    ids=["attn2-option", "bare-suffixes"],
)
def test_adapting_attn2_stays_possible(targets):
    n, adapted = _lora_count(targets, 32, 64.0)
    assert n == WITH_ATTN2
    assert len([a for a in adapted if ".attn2." in a]) == 13 * 4
    assert perf.lora_params(perf.SD35_MEDIUM, 32, targets) == WITH_ATTN2
