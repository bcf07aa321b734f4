"""The one model protocol every algorithm talks to.

A ``FlowModel`` hides everything backend-specific (diffusers SD3 and FLUX today; SANA,
... later, one file each): prompt encoding, the velocity with guidance (SD3: classifier-free
guidance in one batched forward; FLUX.1-dev: the distilled guidance embedding in a single
forward), the sampling schedule, decoding latents to images, and named LoRA adapters
through peft, including per-sample adapter routing in one forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

BASE = "__base__"  # per-sample adapter name meaning "no adapter" (peft's convention)


@dataclass
class Cond:
    """Encoded prompts. embeds: (B, L, D) token embeddings; pooled: (B, P) pooled embeddings."""

    embeds: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx: int | slice | Tensor | Sequence[int]) -> Cond:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        elif isinstance(idx, Sequence):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Cond(self.embeds[idx], self.pooled[idx])

    def repeat_interleave(self, n: int) -> Cond:
        """Each prompt repeated n times in a row: (B, ...) -> (B * n, ...)."""
        return Cond(self.embeds.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def expand(self, n: int) -> Cond:
        """A single prompt (B = 1) broadcast to n rows."""
        return Cond(self.embeds.expand(n, -1, -1), self.pooled.expand(n, -1))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Cond:
        return Cond(self.embeds.to(device, dtype), self.pooled.to(device, dtype))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        return Cond(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]))


@runtime_checkable
class FlowModel(Protocol):
    """What recipes, samplers and evaluators need from a flow-matching text-to-image model.

    Latents are float tensors ``(B, C, h, w)``; images are float ``(B, 3, H, W)`` in [0, 1].
    ``sigma`` is the flow time in [0, 1] (1 = noise), a float or a (B,) tensor.
    """

    device: torch.device
    dtype: torch.dtype  # the network's compute dtype (the SDE math stays float32)
    transformer: nn.Module  # the trainable network (LoRA adapters live on it)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for a square image of ``resolution`` pixels."""
        ...

    @property
    def default_resolution(self) -> int:
        """The image side sampling uses when none is given (a run's ``model.resolution``)."""
        ...

    def set_resolution(self, resolution: int | None) -> None:
        """Make ``resolution`` px the default of sampling; None = the model's native side."""
        ...

    def schedule(self, num_steps: int, resolution: int | None = None) -> Tensor:
        """(num_steps + 1,) float32 sigmas from 1 down to 0: the model's stock pipeline's
        inference schedule at ``resolution`` px (None: ``default_resolution``)."""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Text embeddings for a list of prompts (no grad)."""
        ...

    def negative_cond(self, n: int) -> Cond:
        """The cached empty-prompt embedding broadcast to n rows."""
        ...

    def velocity(
        self,
        x: Tensor,
        sigma: float | Tensor,
        cond: Cond,
        *,
        guidance_scale: float = 1.0,
        adapters: Sequence[str] | None = None,
        cfg_grad: str = "both",
    ) -> Tensor:
        """Velocity v(x, sigma | cond) at guidance ``w``: CFG-combined ``v_u + w (v_c - v_u)``
        in one forward (SD3), or one forward with ``w`` as the guidance embedding of a
        guidance-distilled model (FLUX.1-dev; ``cfg_grad`` has no effect there).

        x: (B, C, h, w); returns (B, C, h, w) float32. ``adapters`` routes each sample
        through its own LoRA adapter (``BASE`` for none) in the same forward.
        ``cfg_grad`` ("both" | "cond"): under autograd, "cond" detaches ``v_u`` so the
        gradient is ``w dv_c`` (Flow-GRPO's training forward); the value is unchanged.
        """
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1]."""
        ...

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, C, h, w) latents (the flow's data x_0)."""
        ...

    # -- adapters -------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        *,
        rank: int,
        alpha: float,
        target_modules: Sequence[str] | None = None,
        init: str = "gaussian",
    ) -> None: ...

    def load_adapter(self, path: str, name: str) -> None: ...

    def save_adapter(self, name: str, path: str) -> None: ...

    def delete_adapter(self, name: str) -> None: ...

    @property
    def adapter_names(self) -> list[str]: ...

    def set_adapter(self, name: str | None, *, trainable: bool = False) -> None:
        """Make ``name`` the active adapter (None: no adapter); optionally the trainable one."""
        ...

    def adapters_disabled(self) -> AbstractContextManager[None]:
        """Context in which the model runs as its base (all adapters off)."""
        ...

    def adapter_parameters(self, name: str) -> list[nn.Parameter]: ...

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]: ...

    def load_adapter_state_dict(self, name: str, state: dict[str, Tensor]) -> None: ...
