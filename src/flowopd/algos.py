"""The training algorithms by name: each one's config class and recipe, as import paths.

Lazy ``module:name`` strings, so naming an algorithm (the CLI's choices, a pipeline
config's ``teachers[].algo``) imports no torch. ``load`` resolves one.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ALGOS", "TEACHER_ALGOS", "algo_of_sections", "load", "config_class", "recipe"]

ALGOS: dict[str, tuple[str, str]] = {
    "grpo": ("flowopd.config.grpo:GRPOConfig", "flowopd.recipes.grpo:train_grpo"),
    "opd": ("flowopd.config.opd:OPDConfig", "flowopd.recipes.opd:train_opd"),
    "sft": ("flowopd.config.sft:SFTConfig", "flowopd.recipes.sft:train_sft"),
    "crd": ("flowopd.config.crd:CRDConfig", "flowopd.recipes.crd:train_crd"),
    "nft": ("flowopd.config.nft:NFTConfig", "flowopd.recipes.nft:train_nft"),
    "awm": ("flowopd.config.awm:AWMConfig", "flowopd.recipes.awm:train_awm"),
}

# Single-reward RL methods that can train a Flow-OPD teacher (a LoRA on one task's reward).
TEACHER_ALGOS: tuple[str, ...] = ("grpo", "crd", "nft", "awm")


def load(spec: str) -> Any:
    """The object a ``module:name`` string names."""
    mod, name = spec.split(":")
    return getattr(importlib.import_module(mod), name)


def config_class(algo: str) -> type:
    """The config class of ``algo`` (a key of ``ALGOS``)."""
    return load(ALGOS[algo][0])


def recipe(algo: str) -> Any:
    """The training function of ``algo``: ``recipe(algo)(cfg) -> Run``."""
    return load(ALGOS[algo][1])


def algo_of_sections(sections: Any) -> str:
    """The algorithm a config is for, from its top-level section names: the one named
    after an algorithm (``opd:``, ``crd:``, ``nft:``, ``awm:``, ``sft:``, ``grpo:``),
    else ``grpo`` (a GRPO config may leave its ``grpo:`` section at the defaults)."""
    named = [a for a in ALGOS if a in set(sections)]
    return named[0] if len(named) == 1 else "grpo"
