"""Full fine-tuning (``model.finetune: full``): the transformer's own weights train, sharded
with FSDP2 (``torch.distributed.fsdp.fully_shard``) over the processes.

Design (a thin engine-level switch; recipes do not change):

- the recipe still asks for its trained "adapter" (GRPO: ``policy``); in full mode
  :func:`prepare_full` makes that name mean *the transformer itself*: every transformer
  parameter trains (float32 master weights; the forward runs under the model dtype's
  autocast exactly like the LoRA path), and :class:`~flowopd.engine.run.TrainState`
  takes its parameters, state dicts and final save from here instead of peft;
- the KL reference is the model's ``adapters_disabled()`` context as before: in full mode
  the backend swaps ``model.transformer`` for ``model.reference``, a frozen copy of the
  base transformer taken before training (in the model dtype, no grads, sharded the same
  way); without a KL term (``grpo.beta_kl: 0``) no copy is made;
- with W > 1 processes each transformer block and then the root are ``fully_shard``-ed
  (FSDP2, works on gloo/CPU and NCCL): parameters, gradients and AdamW moments are
  DTensors holding 1/W of each tensor; the backward reduce-scatters the gradients
  averaged over processes (what ``reduce_gradients`` does for LoRA), so one optimizer
  step equals the single-process step on the concatenated batch. W = 1 runs unsharded.

Memory plan per process (P transformer parameters, b bytes of the model dtype):
``(4 weights + 4 grads + 8 AdamW + 4 EMA if on) P / W + b P / W`` (frozen reference, when
``beta_kl > 0``) plus one block's gathered weights and the activations; see
``flowopd estimate`` (perf/memory.py). Only GRPO supports full fine-tuning so far: the
recipes whose extra networks are adapters on the shared base (Flow-OPD's anchor and
teachers, CRD / NFT / AWM snapshots, SFT) reject it at config validation.

Checkpoints and the final weights are consolidated on rank 0 (a full, FQN-keyed state:
``full/<param>``, the optimizer by parameter name, EMA shadows as full tensors), so a
run resumes on any process count; ``OUT/transformer`` is a diffusers model directory
(``config.json`` + ``diffusion_pytorch_model.safetensors``, written to a temporary
directory and renamed): ``SD3Transformer2DModel.from_pretrained(OUT / "transformer")``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "FULL",
    "prepare_full",
    "full_parameters",
    "to_local",
    "to_full",
    "model_state",
    "load_model_state",
    "optimizer_state",
    "load_optimizer_state",
    "shadow_state",
    "load_shadow",
    "save_transformer",
]

FULL = "full"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' safetensors file name
_BLOCKS = ("transformer_blocks", "single_transformer_blocks")  # SD3 / FLUX block lists
_FULL_OPTS = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(module: nn.Module) -> None:
    """FSDP2 in place: each transformer block is one all-gather unit, then the rest."""
    for name in _BLOCKS:
        for block in getattr(module, name, None) or []:
            fully_shard(block)
    fully_shard(module)


def prepare_full(model, *, reference: bool, world: int) -> None:
    """Make ``model.transformer`` fully trainable (float32 master weights) and, when
    ``reference``, keep a frozen copy of the base as ``model.reference`` (model dtype).
    With ``world > 1`` both are sharded with FSDP2 (same block units)."""
    t = model.transformer
    ref = None
    if reference:
        ref = copy.deepcopy(t).to(dtype=model.dtype).requires_grad_(False).eval()
    t.to(dtype=torch.float32).requires_grad_(True)
    if world > 1:
        shard(t)
        if ref is not None:
            shard(ref)
    model.reference = ref


def full_parameters(model) -> list[nn.Parameter]:
    """The trained parameters: every transformer parameter (DTensor shards when sharded)."""
    return list(model.transformer.parameters())


def to_local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def to_full(t: Tensor) -> Tensor:
    """The whole tensor (all-gather of a DTensor: call on every process); plain as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def model_state(module: nn.Module) -> dict[str, Tensor]:
    """The consolidated, FQN-keyed state on CPU (rank 0; {} elsewhere when sharded).
    Collective: every process calls it."""
    return get_model_state_dict(module, options=_FULL_OPTS)


def load_model_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state (every process passes it) into the (sharded) module."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, consolidated (rank 0). Collective."""
    return get_optimizer_state_dict(module, opt, options=_FULL_OPTS)


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`optimizer_state`'s dict (every process passes it) into ``opt``."""
    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))


def shadow_state(ema) -> dict:
    """An EMA's state with each shadow gathered whole (collective)."""
    state = ema.state_dict()
    state["shadow"] = [to_full(s).cpu() for s in state["shadow"]]
    return state


def load_shadow(ema, state: dict) -> None:
    """Load :func:`shadow_state`'s dict, re-sharding each shadow like the live one."""
    shadows = []
    for live, full in zip(ema.shadow, state["shadow"], strict=True):
        if isinstance(live, DTensor):
            full = distribute_tensor(full.to(live.dtype), live.device_mesh, live.placements)
        shadows.append(full)
    ema.load_state_dict({**state, "shadow": shadows})


def base_class(module: nn.Module) -> type:
    """The model class under FSDP2's dynamic ``FSDP<cls>`` subclass."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def save_transformer(module: nn.Module, path: str | Path, *, main: bool) -> None:
    """Write ``path`` as a diffusers model directory (``config.json`` +
    ``diffusion_pytorch_model.safetensors``), consolidated on the main process, atomically
    (temporary directory, then rename). Collective: every process calls it."""
    from flowopd.models.adapters import atomic_dir

    state = model_state(module)
    if not main:
        return
    config = dict(module.config)
    config["_class_name"] = base_class(module).__name__
    with atomic_dir(path) as tmp:
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
