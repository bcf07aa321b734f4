"""LoRA adapters through peft on any torch module (add, route per sample, export), and
the LoRA file format: diffusers-format adapter directories (``read_lora`` /
``write_lora``, safetensors headers) written through one ``atomic_dir`` helper.

Backends call the module functions on their trainable network; only ``write_lora``
imports diffusers (for its file writer).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from flowopd.errors import UserError

# re-exported: the default targets of ``add_adapter`` (Flow-GRPO's; see lora_targets.py)
from flowopd.lora_targets import SD3_ATTN2_TARGETS as SD3_ATTN2_TARGETS
from flowopd.lora_targets import SD3_TARGETS as SD3_TARGETS

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the diffusers LoRA file in an adapter dir
_META_KEY = "lora_adapter_metadata"
_PREFIX = "transformer."


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


# --------------------------------------------------------------------------------------
# atomic directories


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yield a fresh temporary directory beside ``path``;
    when the block ends without error, the old ``path`` (if any) is removed and the
    temporary one renamed to it (``os.replace``, atomic on POSIX), so ``path`` is
    always either the old or the complete new directory. On error the temporary
    directory is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# LoRA directories (the diffusers file format)


@dataclass
class LoraFile:
    """A LoRA read from a diffusers-format directory.

    modules: ``{module path: (A (r, in), B (out, r))}`` (peft names, no ``transformer.``);
    config: the peft ``LoraConfig`` fields (r, lora_alpha, target_modules, ...).
    """

    modules: dict[str, tuple[Tensor, Tensor]]
    config: dict = field(default_factory=dict)

    def scale(self, module: str) -> float:
        """alpha / r of a module (alpha / sqrt(r) with rsLoRA; r read from A's shape)."""
        r = self.modules[module][0].shape[0]
        alpha = float(self.config.get("lora_alpha", r))
        return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)


def _weights_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    f = p if p.is_file() else p / LORA_WEIGHTS
    if not f.is_file():
        raise UserError(f"LoRA '{path}' not found: expected a directory containing {LORA_WEIGHTS}")
    return f


def read_lora(path: str | Path) -> LoraFile:
    """Read a diffusers-format LoRA directory (or its safetensors file)."""
    from safetensors import safe_open

    f = _weights_file(path)
    read_safetensors_header(f)  # a one-line error for a file that is not safetensors
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    config = {}
    if _META_KEY in meta:
        raw = json.loads(meta[_META_KEY])
        config = {k.removeprefix(_PREFIX): v for k, v in raw.items()}
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise UserError(f"LoRA '{path}' uses per-layer rank/alpha patterns; merging needs one r")
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(_PREFIX)
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[part] = t.float()
    bad = [m for m, ab in modules.items() if set(ab) != {"A", "B"}]
    if not modules or bad:
        raise UserError(f"LoRA '{path}' holds no complete lora_A/lora_B pairs ({bad[:1]})")
    if not config:  # no metadata: diffusers loads such a file with alpha = r
        r = next(iter(modules.values()))["A"].shape[0]
        config = {"r": r, "lora_alpha": r}
    return LoraFile({m: (ab["A"], ab["B"]) for m, ab in modules.items()}, config)


def write_lora(path: str | Path, lora: LoraFile, extra: dict[str, str] | None = None) -> None:
    """Write ``lora`` as a diffusers-format directory, atomically (``atomic_dir``), with
    the text files ``extra`` ({file name: text}, e.g. a merge's ``merge.json``) beside
    the weights."""
    from diffusers import StableDiffusion3Pipeline

    state = {}
    for m, (a, b) in lora.modules.items():
        state[f"{m}.lora_A.weight"] = a.float().contiguous()
        state[f"{m}.lora_B.weight"] = b.float().contiguous()
    with atomic_dir(path) as tmp:
        StableDiffusion3Pipeline.save_lora_weights(
            str(tmp),
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=lora.config,
            safe_serialization=True,
        )
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
