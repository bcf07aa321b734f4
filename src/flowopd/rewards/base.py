"""The reward protocol and registry.

Every reward has one signature::

    reward(images, prompts, metadata) -> Tensor[B]   (float32, on CPU)

images:   (B, 3, H, W) float tensor in [0, 1]
prompts:  list of B strings
metadata: list of B dicts (the prompt's JSONL record: task label, GenEval ``include``, ...)

Rewards are registered by name with ``@register_reward("name")`` on a *factory*
``(**options) -> RewardFn`` so that heavy models load once, when a run asks for them.
Factories are imported lazily from ``_BUILTIN`` so importing flowopd stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

from flowopd.errors import unknown


class RewardFn(Protocol):
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor: ...


RewardFactory = Callable[..., RewardFn]

REWARDS: dict[str, RewardFactory] = {}

# name -> module that registers it on import (lazy, so optional dependencies stay optional)
_BUILTIN: dict[str, str] = {
    "toy_geneval": "flowopd.rewards.toy",
    "toy_geneval_strict": "flowopd.rewards.toy",
    "toy_ocr": "flowopd.rewards.toy",
    "toy_quality": "flowopd.rewards.toy",
    "ocr": "flowopd.rewards.ocr",
    "geneval": "flowopd.rewards.geneval",
    "pickscore": "flowopd.rewards.preference",
    "clip_score": "flowopd.rewards.preference",
    "aesthetic": "flowopd.rewards.preference",
}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering a reward factory under ``name``."""

    def deco(factory: RewardFactory) -> RewardFactory:
        REWARDS[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    return sorted(set(REWARDS) | set(_BUILTIN))


def get_reward(name: str, **options: Any) -> RewardFn:
    """Build the reward registered as ``name`` (unknown names get a did-you-mean error).

    ``remote:URL`` is a client of ``flowopd serve-reward`` at URL (see rewards/remote.py).
    """
    if name.startswith("remote:"):
        from flowopd.rewards.remote import RemoteReward

        return RemoteReward(name.removeprefix("remote:"), **options)
    if name not in REWARDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in REWARDS:
        raise unknown("reward", name, available_rewards())
    return REWARDS[name](**options)
