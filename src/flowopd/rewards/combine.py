"""Combining rewards: a weighted sum, and routing each prompt to its task's reward.

Both take rewards by registry name (built with :func:`flowopd.rewards.get_reward`) or as
ready callables, and return an ordinary ``RewardFn``::

    r = weighted_sum({"ocr": 1.0, "pickscore": 0.5})       # r_i = 1.0 ocr_i + 0.5 pickscore_i
    r = route_by_task({"geneval": "geneval", "ocr": "ocr"})  # r_i = reward[metadata_i["task"]]_i
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flowopd.errors import UserError, closest
from flowopd.rewards.base import RewardFn, get_reward

RewardSpec = str | RewardFn


def _build(spec: RewardSpec, options: Mapping[str, Any] | None) -> RewardFn:
    if isinstance(spec, str):
        return get_reward(spec, **dict(options or {}))
    if not callable(spec):
        raise UserError(f"a reward must be a registered name or a callable, got {spec!r}")
    return spec


def _check(scores: Tensor, n: int, what: str) -> Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float32).cpu()
    if scores.shape != (n,):
        raise ValueError(f"reward {what} returned shape {tuple(scores.shape)}, expected ({n},)")
    return scores


def weighted_sum(
    weights: Mapping[str, float],
    rewards: Mapping[str, RewardFn] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> RewardFn:
    """``r_i = sum_k w_k * r_k(images, prompts, metadata)_i``, a (B,) float32 tensor.

    weights: ``{name: weight}``; a name is looked up in ``rewards`` first, then in the registry
    (built with ``options[name]`` as its factory options). Every component sees the full batch.
    The returned callable keeps the last batch's unweighted components in ``.last_components``
    (``{name: Tensor[B]}``) for logging.
    """
    if not weights:
        raise UserError("weighted_sum needs at least one {reward: weight} entry")
    rewards = dict(rewards or {})
    options = dict(options or {})
    fns = {
        name: rewards[name] if name in rewards else _build(name, options.get(name))
        for name in weights
    }
    w = {name: float(v) for name, v in weights.items()}

    def reward(images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        total = torch.zeros(len(prompts), dtype=torch.float32)
        parts = {}
        for name, fn in fns.items():
            parts[name] = _check(fn(images, prompts, metadata), len(prompts), name)
            total += w[name] * parts[name]
        reward.last_components = parts  # type: ignore[attr-defined]
        return total

    reward.last_components = {}  # type: ignore[attr-defined]
    return reward


def route_by_task(
    routes: Mapping[str, RewardSpec],
    key: str = "task",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> RewardFn:
    """``r_i = routes[metadata_i[key]](images_i, prompts_i, metadata_i)``, a (B,) float32 tensor.

    Each reward is called once per batch on the sub-batch of its task (order kept), so batched
    rewards stay batched. A prompt whose task is missing or not in ``routes`` raises a
    ``UserError`` naming it. Names are built with ``options[name]`` as factory options; a
    name used by several tasks is built once.
    """
    if not routes:
        raise UserError("route_by_task needs at least one {task: reward} entry")
    options = dict(options or {})
    built: dict[str, RewardFn] = {}
    fns: dict[str, RewardFn] = {}
    for task, spec in routes.items():
        if isinstance(spec, str):
            if spec not in built:
                built[spec] = _build(spec, options.get(spec))
            fns[task] = built[spec]
        else:
            fns[task] = _build(spec, None)

    def reward(images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        groups: dict[str, list[int]] = {}
        for i, meta in enumerate(metadata):
            task = meta.get(key) if isinstance(meta, Mapping) else None
            if task is None:
                raise UserError(
                    f"prompt {i} ({prompts[i][:60]!r}) has no metadata['{key}'] to route its "
                    f"reward; tasks: {', '.join(sorted(fns))}"
                )
            if task not in fns:
                raise UserError(
                    f"no reward for task '{task}'{closest(str(task), fns)} (prompt {i}: "
                    f"{prompts[i][:60]!r}); tasks: {', '.join(sorted(fns))}"
                )
            groups.setdefault(task, []).append(i)
        out = torch.zeros(len(prompts), dtype=torch.float32)
        for task, idx in groups.items():
            sub = fns[task](images[idx], [prompts[i] for i in idx], [metadata[i] for i in idx])
            out[idx] = _check(sub, len(idx), f"for task '{task}'")
        return out

    return reward


def build_reward(section: Any, name: str = "") -> RewardFn:
    """The reward of a config's ``reward`` section (``RewardConfig``: one name, weights or
    task routing, with ``options`` per reward name), or a dataset's own reward ``name``."""
    opts = section.options
    if name:
        return get_reward(name, **opts.get(name, {}))
    if section.mode == "single":
        return get_reward(section.name, **opts.get(section.name, {}))
    if section.mode == "weighted":
        return weighted_sum(section.weights, options=opts)
    if section.mode == "routed":
        return route_by_task(section.routing, options=opts)
    raise ValueError("no reward configured")
