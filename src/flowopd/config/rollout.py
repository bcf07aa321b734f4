"""What every run config that samples prompt groups and trains on them shares (GRPO, OPD, CRD,
DiffusionNFT, AWM).

``RolloutRunConfig`` declares the shared sections (model / data / reward / sample /
train / eval / output) and the cross-section checks, and carries the epoch layout
(:class:`~flowopd.config.layout.EpochLayoutMixin`). It is no algorithm's config and
cannot run by itself: each algorithm's config subclasses it once, adds its own method
section (``grpo:``, ``opd:``, ``crd:``, ``nft:``, ``awm:``), swaps a section for a subclass
where a default differs, and puts its cross-section rules in
:meth:`RolloutRunConfig.check_method`.
No algorithm's config inherits another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowopd.config.layout import EpochLayoutMixin
from flowopd.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    RewardConfig,
    RolloutOptimConfig,
    SampleConfig,
    check_full_finetune,
    check_rewards,
    help_field,
)

__all__ = ["RolloutRunConfig"]


@dataclass
class RolloutRunConfig(EpochLayoutMixin):
    """The shared sections of a run on sampled prompt groups (no method section)."""

    # whether the recipe runs with model.finetune=full (engine/full.py); GRPO sets True
    FULL_FINETUNE: ClassVar[bool] = False

    model: ModelConfig = help_field("Base model and LoRA.", factory=ModelConfig)
    data: DataConfig = help_field("Prompt datasets.", factory=DataConfig)
    reward: RewardConfig = help_field("Reward.", factory=RewardConfig)
    sample: SampleConfig = help_field("Rollouts.", factory=SampleConfig)
    train: RolloutOptimConfig = help_field("Optimisation.", factory=RolloutOptimConfig)
    eval: EvalConfig = help_field("Evaluation.", factory=EvalConfig)
    output: OutputConfig = help_field("Outputs.", factory=OutputConfig)

    def validate(self) -> None:
        """Cross-section checks (each section checked itself already; see validate_config):
        the rewards, the benchmarks, the method's own rules, then the epoch layout."""
        self.check_rewards()
        if not self.FULL_FINETUNE:
            check_full_finetune(self.model, type(self).__name__.removesuffix("Config"))
        self.eval.resolved_benchmarks(self.data.test)
        self.check_method()
        # Every divisibility rule that holds for W processes also holds for W = 1, so the
        # single-process check here catches what no process count can fix.
        self.check_distributed(1)

    def check_rewards(self) -> None:
        """UserError unless the rewards named are registered and used consistently."""
        check_rewards(self.reward, self.data)

    def check_method(self) -> None:
        """The algorithm's cross-section rules (its method section against the others)."""
