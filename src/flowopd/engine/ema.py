"""Exponential moving average of a list of parameters (the LoRA weights), for evaluation.

After the s-th optimizer step (s = 1, 2, ...), when ``s % every == 0``::

    d = decay(s)
    ema <- ema + (1 - d) * (param - ema)        # == d * ema + (1 - d) * param

Flow-GRPO's schedule is ``decay(s) = min((1 + s) / (10 + s), 0.9)`` every 8 steps
(:func:`flowgrpo_decay`): a short memory early, when the weights move fast, and a 0.9
decay from s = 80 on. The shadow copies start equal to the parameters (for a fresh LoRA,
B = 0: the base model) and are kept in float32 so small updates are not rounded away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["EMA", "flowgrpo_decay"]


def flowgrpo_decay(max_decay: float = 0.9) -> Callable[[int], float]:
    """``s -> min((1 + s) / (10 + s), max_decay)``: s = 1 -> 0.1818, s = 8 -> 0.5."""

    def decay(step: int) -> float:
        return min((1.0 + step) / (10.0 + step), max_decay)

    return decay


class EMA:
    """EMA shadow of ``params`` with a decay schedule and an update interval.

    params: the tensors to average (kept by reference; :meth:`step` reads them).
    decay:  a constant in [0, 1) or a schedule ``s -> d`` of the optimizer step count s.
    every:  update only after every ``every``-th optimizer step.

    Call :meth:`step` once after each optimizer step. Use :meth:`swapped` to evaluate with
    the averaged weights; save :meth:`state_dict` with checkpoints.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        decay: float | Callable[[int], float] | None = None,
        every: int = 1,
    ) -> None:
        self.params = list(params)
        if decay is None:
            decay = flowgrpo_decay()
        self.decay_fn: Callable[[int], float] = (
            decay if callable(decay) else (lambda _s, d=float(decay): d)
        )
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.every = every
        self.num_steps = 0  # optimizer steps seen
        self.shadow = [self._to_shadow(p) for p in self.params]

    @staticmethod
    def _to_shadow(p: Tensor) -> Tensor:
        t = p.detach().clone()
        return t.float() if t.is_floating_point() else t

    @torch.no_grad()
    def step(self) -> float | None:
        """Count one optimizer step; update the shadow when it falls on the interval.

        Returns the decay used, or None when this step was not an update step.
        """
        self.num_steps += 1
        if self.num_steps % self.every:
            return None
        d = float(self.decay_fn(self.num_steps))
        for ema, p in zip(self.shadow, self.params, strict=True):
            ema.lerp_(p.detach().to(ema.dtype), 1.0 - d)  # ema + (1 - d) (p - ema)
        return d

    @torch.no_grad()
    def copy_to(self, params: Iterable[Tensor] | None = None) -> None:
        """Write the averaged weights into ``params`` (default: the tracked ones)."""
        for ema, p in zip(self.shadow, self._targets(params), strict=True):
            p.copy_(ema.to(p.dtype))

    @contextmanager
    def swapped(self, params: Iterable[Tensor] | None = None) -> Iterator[None]:
        """Temporarily load the averaged weights into ``params``; restore them exactly after.

        ``with ema.swapped(): evaluate(model)``
        """
        targets = self._targets(params)
        with torch.no_grad():
            backup = [p.detach().clone() for p in targets]
        self.copy_to(targets)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(targets, backup, strict=True):
                    p.copy_(b)

    def _targets(self, params: Iterable[Tensor] | None) -> list[Tensor]:
        targets = self.params if params is None else list(params)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(targets)}")
        return targets

    def state_dict(self) -> dict:
        """``{"shadow": [Tensor, ...], "num_steps": int, "every": int}`` (checkpoint-safe)."""
        return {
            "shadow": [t.detach().clone() for t in self.shadow],
            "num_steps": self.num_steps,
            "every": self.every,
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(
                f"EMA state holds {len(shadow)} tensors, this EMA tracks {len(self.shadow)}"
            )
        for dst, src in zip(self.shadow, shadow, strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"EMA state shape {tuple(src.shape)} != {tuple(dst.shape)}")
            dst.copy_(src)
        self.num_steps = int(state["num_steps"])
        self.every = int(state.get("every", self.every))
