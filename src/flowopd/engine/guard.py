"""Skip optimizer steps with a non-finite loss or gradient; abort after N in a row.

One bad minibatch (an overflow in fp16, a reward returning NaN) should not poison the
LoRA weights and the Adam moments: the step is skipped and the gradients dropped. A run
that keeps producing non-finite values has diverged, and continuing only burns compute.

    guard = NonFiniteGuard(cfg.train.max_nonfinite)
    loss.backward()
    if guard.check(loss, params):
        clip_grad_norm_(params, 1.0); optimizer.step()
    optimizer.zero_grad()
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from flowopd.errors import UserError

__all__ = ["NonFiniteGuard", "TrainingDiverged"]

log = logging.getLogger("flowopd")


class TrainingDiverged(UserError):
    """Raised after too many consecutive non-finite optimizer steps."""


class NonFiniteGuard:
    """Counts consecutive non-finite steps; raises :class:`TrainingDiverged` at ``max_consecutive``.

    In a distributed run every process must take the same decision (or their weights
    drift apart), so the verdict is all-reduced when ``torch.distributed`` is initialised:
    a step is skipped everywhere when it is bad anywhere.
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0  # bad steps in a row right now
        self.total_skipped = 0

    @torch.no_grad()
    def check(self, loss: Tensor | float, params: Iterable[Tensor]) -> bool:
        """True when ``loss`` and every ``param.grad`` are finite: take the step.

        False: skip the optimizer step; the gradients of ``params`` have been set to None
        so they do not leak into the next accumulation. Raises TrainingDiverged on the
        ``max_consecutive``-th bad step in a row.
        """
        params = list(params)
        # sharded (FSDP) grads: this process's shard; the all-reduce below covers the rest
        grads = [_local(p.grad) for p in params if p.grad is not None]
        # the verdict lives where the grads are: NCCL all-reduces only device tensors
        device = grads[0].device if grads else torch.device("cpu")
        loss_t = torch.as_tensor(loss).detach().to(device)
        loss_ok = torch.isfinite(loss_t).all()
        grads_ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else loss_ok
        ok_t = (loss_ok & grads_ok).to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(ok_t, op=torch.distributed.ReduceOp.MIN)
        ok = bool(ok_t.item())
        if ok:
            self.consecutive = 0
            return True
        for p in params:
            p.grad = None
        self.consecutive += 1
        self.total_skipped += 1
        if not loss_ok:
            what = "loss"
        elif not grads_ok:
            what = "gradient"
        else:
            what = "loss or gradient on another process"
        log.warning(
            "non-finite %s: skipping the optimizer step (%d in a row, abort at %d)",
            what,
            self.consecutive,
            self.max_consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} optimizer steps in a row had a "
                "non-finite loss or gradient; lower train.lr, check that the rewards are "
                "finite, or use model.dtype=bfloat16/float32 instead of float16"
            )
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP gradients); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
