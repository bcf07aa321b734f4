"""LoRA adapters through peft on any torch module: add, route per sample, export, merge.

Backends call these on their trainable network; nothing here knows about diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

# re-exported: the default targets of ``add_adapter`` (Flow-GRPO's; see lora_targets.py)
from flowopd.lora_targets import SD3_ATTN2_TARGETS as SD3_ATTN2_TARGETS
from flowopd.lora_targets import SD3_TARGETS as SD3_TARGETS


def lora_layers(module: nn.Module) -> Iterator[nn.Module]:
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer):
            yield m


def adapter_names(module: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(module):
        for n in layer.lora_A:
            names[n] = None
    return list(names)


def _adapter_pre_hook(_module, args, kwargs, names):
    kwargs["adapter_names"] = names
    return args, kwargs


@contextmanager
def per_sample_adapters(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Route sample i of every forward inside the context through adapter ``names[i]``.

    Uses peft's mixed-adapter batches (each LoRA layer applies each adapter to its own
    sub-batch), so several teachers on one base cost one forward. ``"__base__"`` means
    no adapter. The batch of every LoRA layer's input must have ``len(names)`` rows.
    """
    known = set(adapter_names(module))
    unknown = {n for n in names if n != "__base__"} - known
    if unknown:
        from flowopd.errors import unknown as unknown_err

        raise unknown_err("adapter", sorted(unknown)[0], known | {"__base__"})
    handles = [
        layer.register_forward_pre_hook(
            partial(_adapter_pre_hook, names=list(names)), with_kwargs=True
        )
        for layer in lora_layers(module)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def adapter_parameters(module: nn.Module, name: str) -> list[nn.Parameter]:
    """The LoRA A/B parameters of adapter ``name``, in a stable order."""
    params = []
    for layer in lora_layers(module):
        for table in (layer.lora_A, layer.lora_B):
            if name in table:
                params.extend(table[name].parameters())
    return params


def adapter_state_dict(module: nn.Module, name: str) -> dict[str, Tensor]:
    """peft-format state dict of one adapter (keys without the adapter name), cloned."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(module, adapter_name=name)
    return {k: v.detach().clone() for k, v in sd.items()}


def load_adapter_state_dict(module: nn.Module, name: str, state: dict[str, Tensor]) -> None:
    """Load a peft-format state dict (as from ``adapter_state_dict``) into adapter ``name``."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"unexpected keys loading adapter '{name}': {unexpected[:3]}")


def set_trainable(module: nn.Module, name: str | None) -> None:
    """requires_grad on adapter ``name``'s parameters only; everything else frozen."""
    for p in module.parameters():
        p.requires_grad_(False)
    if name is not None:
        for p in adapter_parameters(module, name):
            p.requires_grad_(True)


@torch.no_grad()
def copy_adapter(module: nn.Module, src: str, dst: str) -> None:
    """Copy adapter ``src``'s weights into existing adapter ``dst`` (same shapes)."""
    for layer in lora_layers(module):
        for table in (layer.lora_A, layer.lora_B):
            if src in table and dst in table:
                table[dst].weight.copy_(table[src].weight)


def read_safetensors_header(file: str | os.PathLike, what: str = "LoRA") -> dict:
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}, plus
    ``__metadata__``), read without loading a tensor: 8 bytes little-endian length, then
    the header. A file that is not safetensors is a one-line ``UserError`` naming it."""
    import json

    from flowopd.errors import UserError

    f = Path(file)
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
    except (OSError, ValueError) as e:
        raise UserError(
            f"{what} '{f}' is not a readable safetensors file ({e}); re-export it "
            "(a GRPO run's OUT/lora, or `flowopd merge --out DIR`)"
        ) from None
    return header
