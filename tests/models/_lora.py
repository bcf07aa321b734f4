"""Shared checks of the diffusers backends' LoRA adapters (SD3, FLUX)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from flowopd.sampling import sample


def randomize_adapter(model, name: str, seed: int, std: float = 0.3) -> None:
    """Fill adapter ``name``'s LoRA weights with N(0, std^2) (a fresh B is zero: no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def check_saved_lora_matches_stock(
    model,
    pipe,
    stock: Callable[[object], torch.Tensor],
    fresh_model: Callable[[object], object],
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    tmp: Path,
) -> None:
    """``model``'s adapter 'student', saved, loads with the stock ``pipe.load_lora_weights``
    and reproduces our ODE latents (``stock(pipe)``: the stock pipeline's latents, same
    seed), acts (differs from the stock base) and loads back into ``fresh_model(pipe)``."""
    model.save_adapter("student", tmp / "lora")
    assert (tmp / "lora" / "pytorch_lora_weights.safetensors").is_file()

    def ours(m):
        gen = torch.Generator().manual_seed(0)
        return sample(m, prompts, steps, kind="ode", guidance_scale=guidance_scale,
                      generator=gen).latents  # fmt: skip

    trained = ours(model)
    loaded = copy.deepcopy(pipe)
    loaded.load_lora_weights(str(tmp / "lora"))
    assert (trained - stock(loaded)).abs().max().item() < 1e-5
    assert (trained - stock(pipe)).abs().max().item() > 1e-3  # the adapter really acts
    fresh = fresh_model(copy.deepcopy(pipe))  # back into a flowopd model, alpha restored
    fresh.load_adapter(str(tmp / "lora"), "loaded")
    fresh.set_adapter("loaded")
    assert (ours(fresh) - trained).abs().max().item() < 1e-5
