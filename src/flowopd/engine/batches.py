"""The training minibatch loop every recipe shares: shuffle -> minibatches -> gradient
accumulation boundaries -> optimizer step.

    gen = torch.Generator().manual_seed(seed_for(seed, "shuffle", epoch, rank))
    for mb in minibatches(len(ro), batch_size, gen, accumulation=acc, inner_epochs=k):
        loss = ...(ro[mb.rows]) ; (loss / acc).backward()
        if mb.step:
            ts.step(loss)

Each inner epoch draws one permutation from ``generator`` when it starts (after the
previous inner epoch's minibatches ran, so a recipe that also draws from the same
generator inside a minibatch, as SFT does, keeps its order of draws), then cuts it into
consecutive minibatches. The optimizer steps after every ``accumulation`` minibatches
and after the last minibatch of an inner epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flowopd.engine.logging import progress

__all__ = ["Minibatch", "minibatches"]


@dataclass(frozen=True)
class Minibatch:
    """rows: (B,) long indices of the samples in this minibatch; inner: the inner epoch;
    index: the minibatch's index within it; step: whether the optimizer steps after it."""

    rows: Tensor
    inner: int
    index: int
    step: bool


def minibatches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    accumulation: int = 1,
    inner_epochs: int = 1,
    split: Callable[[torch.Generator], list[Tensor]] | None = None,
    desc: str = "train",
) -> Iterator[Minibatch]:
    """Minibatches of ``n`` samples for ``inner_epochs`` passes, shuffled by ``generator``.

    Each pass: ``order = randperm(n)``, minibatches ``order[i : i + batch_size]``. A
    ``split`` replaces that cut (CRD shuffles whole prompt groups: ``split(generator)``
    returns the pass's list of row tensors; ``n`` / ``batch_size`` then count groups, for
    the progress bar only). ``step`` is set on every ``accumulation``-th minibatch and on
    the last of each pass. A progress bar (``engine.logging.progress``) counts minibatches.
    """

    def passes() -> Iterator[Minibatch]:
        for inner in range(inner_epochs):
            if split is not None:
                batches = split(generator)
            else:
                order = torch.randperm(n, generator=generator)
                batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
            for b, rows in enumerate(batches):
                last = (b + 1) % accumulation == 0 or b + 1 == len(batches)
                yield Minibatch(rows=rows, inner=inner, index=b, step=last)

    total = inner_epochs * math.ceil(n / batch_size) if batch_size else None
    yield from progress(passes(), desc=desc, total=total)
