"""The epoch layout: batch sizes, gradient accumulation and the distributed checks.

One object for every algorithm that samples prompt groups and trains on them (GRPO, OPD,
CRD). With P prompts per epoch, G images per prompt, W processes, sampling micro-batch
b_s, training minibatch b_t and accumulation a:

    N (images per process)      = P / W x G
    sampling batches            = N / b_s
    minibatches per pass        = N / b_t
    a (unless given)            = max(1, (N / b_t) / optimizer_steps_per_epoch)
    optimizer steps per epoch   = (N / b_t) / a x inner_epochs

e.g. the paper's P=48, G=24, W=8, b_s=b_t=12, 2 steps per epoch: N=144, 12 minibatches,
a=6, 2 steps. ``check(W)`` raises a one-line UserError unless every division is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowopd.errors import UserError

__all__ = ["EpochLayout", "EpochLayoutMixin", "divisors"]


def divisors(n: int, limit: int = 12) -> str:
    """The first ``limit`` divisors of ``n`` as text, for error messages ('1, 2, 3, ...')."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    shown = divs[:limit]
    return ", ".join(map(str, shown)) + (", ..." if len(divs) > limit else "")


@dataclass(frozen=True)
class EpochLayout:
    """How one epoch's prompts, images and minibatches split over processes and steps."""

    prompts_per_epoch: int
    group_size: int
    sample_batch_size: int
    train_batch_size: int  # resolved: train.batch_size, else sample.batch_size
    gradient_accumulation: int | None  # None: derived from optimizer_steps_per_epoch
    steps_per_pass: int  # train.optimizer_steps_per_epoch (one pass over the samples)
    inner_epochs: int = 1

    @classmethod
    def of(cls, sample: object, train: object) -> EpochLayout:
        """From a ``sample:`` and a ``train:`` section (GRPO's, OPD's or CRD's)."""
        return cls(
            prompts_per_epoch=sample.prompts_per_epoch,  # type: ignore[attr-defined]
            group_size=sample.group_size,  # type: ignore[attr-defined]
            sample_batch_size=sample.batch_size,  # type: ignore[attr-defined]
            train_batch_size=train.batch_size or sample.batch_size,  # type: ignore[attr-defined]
            gradient_accumulation=train.gradient_accumulation,  # type: ignore[attr-defined]
            steps_per_pass=train.optimizer_steps_per_epoch,  # type: ignore[attr-defined]
            inner_epochs=train.inner_epochs,  # type: ignore[attr-defined]
        )

    @property
    def images_per_epoch(self) -> int:
        """P x G over all processes (48 x 24 = 1152)."""
        return self.prompts_per_epoch * self.group_size

    def prompts_per_process(self, world_size: int = 1) -> int:
        return self.prompts_per_epoch // world_size

    def images_per_process(self, world_size: int = 1) -> int:
        """N = P / W x G."""
        return self.prompts_per_process(world_size) * self.group_size

    def sampling_batches(self, world_size: int = 1) -> int:
        """Sampling micro-batches per process per epoch, N / b_s."""
        return self.images_per_process(world_size) // self.sample_batch_size

    def minibatches_per_pass(self, world_size: int = 1) -> int:
        """Training minibatches per process in one pass over the epoch's samples, N / b_t."""
        return self.images_per_process(world_size) // self.train_batch_size

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Minibatches per optimizer step: the given one, else max(1, (N / b_t) / steps)."""
        if self.gradient_accumulation is not None:
            return self.gradient_accumulation
        return max(1, self.minibatches_per_pass(world_size) // self.steps_per_pass)

    def optimizer_steps_per_epoch(self, world_size: int = 1) -> int:
        """(N / b_t) / a x inner_epochs (the paper: 2)."""
        per_pass = self.minibatches_per_pass(world_size) // self.gradient_accumulation_steps(
            world_size
        )
        return per_pass * self.inner_epochs

    def check(self, world_size: int) -> None:
        """Raise UserError unless the epoch splits evenly over ``world_size`` processes.

        1. W divides P (each process samples whole prompt groups);
        2. b_s divides N;  3. b_t divides N;
        4. a divides the minibatches per pass N / b_t (or, with a derived, the optimizer
           steps per epoch do).
        """
        W, P, G = world_size, self.prompts_per_epoch, self.group_size
        if W < 1:
            raise UserError(f"world size must be >= 1, got {W}")
        if P % W:
            lo, hi = P - P % W, P + W - P % W
            raise UserError(
                f"sample.prompts_per_epoch={P} must be divisible by the number of processes "
                f"({W}) so each process samples whole prompt groups; use {lo or hi} or {hi}"
            )
        n = self.images_per_process(W)
        rule = f"prompts_per_epoch / processes x group_size = {P} / {W} x {G} = {n}"
        if n % self.sample_batch_size:
            raise UserError(
                f"sample.batch_size={self.sample_batch_size} must divide the images each "
                f"process samples per epoch, {rule}; choose one of {divisors(n)}"
            )
        mb = self.train_batch_size
        if n % mb:
            raise UserError(
                f"the training minibatch (train.batch_size={mb}) must divide the images each "
                f"process trains on per epoch, {rule}; choose one of {divisors(n)}"
            )
        self._check_accumulation(n, mb, W)

    def _check_accumulation(self, n: int, mb: int, world_size: int) -> None:
        passes = n // mb
        if self.gradient_accumulation is None:
            k = self.steps_per_pass
            if passes % k:
                raise UserError(
                    f"train.optimizer_steps_per_epoch={k} must divide the minibatches per "
                    f"process and epoch ({n} / {mb} = {passes}); choose one of "
                    f"{divisors(passes)} or set train.gradient_accumulation"
                )
            return
        acc = self.gradient_accumulation
        if passes % acc:
            raise UserError(
                f"train.gradient_accumulation={acc} must divide the minibatches per process "
                f"and epoch ({n} / {mb} = {passes}); choose one of {divisors(passes)}"
            )


class EpochLayoutMixin:
    """The derived values of a run config with ``sample:`` and ``train:`` sections, read
    from its :class:`EpochLayout` (GRPO, OPD and CRD share it; none inherits another)."""

    sample: Any
    train: Any

    @property
    def layout(self) -> EpochLayout:
        """The epoch layout of ``sample:`` and ``train:`` (batch sizes, accumulation)."""
        return EpochLayout.of(self.sample, self.train)

    @property
    def images_per_epoch(self) -> int:
        """prompts_per_epoch x group_size, over all processes (48 x 24 = 1152)."""
        return self.layout.images_per_epoch

    @property
    def train_batch_size(self) -> int:
        """Training minibatch per process (train.batch_size, else sample.batch_size)."""
        return self.layout.train_batch_size

    def prompts_per_process(self, world_size: int = 1) -> int:
        return self.layout.prompts_per_process(world_size)

    def images_per_process(self, world_size: int = 1) -> int:
        return self.layout.images_per_process(world_size)

    def sampling_batches(self, world_size: int = 1) -> int:
        return self.layout.sampling_batches(world_size)

    def minibatches_per_pass(self, world_size: int = 1) -> int:
        return self.layout.minibatches_per_pass(world_size)

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        return self.layout.gradient_accumulation_steps(world_size)

    def optimizer_steps_per_epoch(self, world_size: int = 1) -> int:
        return self.layout.optimizer_steps_per_epoch(world_size)

    def check_distributed(self, world_size: int) -> None:
        """Raise UserError unless the epoch splits evenly over ``world_size`` processes
        (the rules of :meth:`EpochLayout.check`)."""
        self.layout.check(world_size)
