"""The Flow-GRPO run config: the shared sections, derived values and cross-section checks.

How an epoch is laid out (what the divisibility rules below protect):

- each of the ``W`` processes takes ``prompts_per_epoch / W`` whole prompts and samples
  all ``group_size`` images of each of them, so a group never spans processes;
- a process samples its ``prompts_per_epoch / W * group_size`` images in micro-batches of
  ``sample.batch_size`` and trains on them in minibatches of ``train.batch_size``;
- one optimizer step accumulates ``gradient_accumulation`` minibatches, each over all
  ``trained_steps`` denoising steps of its trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flowopd.config.layout import EpochLayoutMixin
from flowopd.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    RewardConfig,
    RolloutOptimConfig,
    SampleConfig,
    check_rewards,
    check_timestep_fraction,
    check_trained_steps,
    trained_steps,
)
from flowopd.config.sections import help_field as _help
from flowopd.errors import UserError

__all__ = ["GRPOTrainConfig", "GRPOConfig"]


@dataclass
class GRPOTrainConfig(RolloutOptimConfig):
    """Optimisation with the clipped GRPO objective: the shared ``train:`` settings plus
    the PPO clip, the KL to the base model, the advantage normaliser and the trained steps."""

    clip_range: float = _help("PPO ratio clip eps (1e-4 for the SDE, 1e-5 for CPS).", 1e-4)
    beta_kl: float = _help(
        "KL weight to the base model (0.04 GenEval/OCR, 0.01 PickScore; 0 = no reference forward).",
        0.04,
    )
    kl_form: Literal["public", "exact"] = _help(
        "KL per step: 'public' = ||dmean||^2 / (2 std^2) as the public code (no dt factor), "
        "'exact' = the Gaussian KL ||dmean||^2 / (2 std^2 (-dt)).",
        "public",
    )
    adv_std: Literal["global", "group"] = _help(
        "Advantage normaliser: std of all rewards of the epoch ('global') or of the group.",
        "global",
    )
    timestep_fraction: float = _help(
        "Train on the first int(num_steps * fraction) steps (0.99 -> 9 of 10).", 0.99
    )

    def validate(self) -> None:
        check_timestep_fraction(self.timestep_fraction)
        if self.clip_range <= 0:
            raise UserError(f"train.clip_range must be > 0, got {self.clip_range}")
        if self.beta_kl < 0:
            raise UserError(f"train.beta_kl must be >= 0, got {self.beta_kl}")
        super().validate()


# --------------------------------------------------------------------------------------
# the run


@dataclass
class GRPOConfig(EpochLayoutMixin):
    """A Flow-GRPO run (SD3.5-M defaults of METHODS.md §2)."""

    model: ModelConfig = _help("Base model and LoRA.", factory=ModelConfig)
    data: DataConfig = _help("Prompt datasets.", factory=DataConfig)
    reward: RewardConfig = _help("Reward.", factory=RewardConfig)
    sample: SampleConfig = _help("Rollouts.", factory=SampleConfig)
    train: GRPOTrainConfig = _help("Optimisation.", factory=GRPOTrainConfig)
    eval: EvalConfig = _help("Evaluation.", factory=EvalConfig)
    output: OutputConfig = _help("Outputs.", factory=OutputConfig)

    @property
    def trained_steps(self) -> int:
        """Denoising steps trained per trajectory (window size, else 10 x 0.99 -> 9)."""
        return trained_steps(self.sample, self.train.timestep_fraction)

    def validate(self) -> None:
        """Cross-section checks (each section checked itself already; see validate_config)."""
        check_rewards(self.reward, self.data)
        self.eval.resolved_benchmarks(self.data.test)
        if self.sample.kind == "cps" and self.train.kl_form == "exact" and self.train.beta_kl:
            raise UserError(
                "train.kl_form=exact is the KL of the Flow-GRPO SDE step (transition std "
                "sigma_t sqrt(-dt)); a CPS step's std carries no dt, so its KL is the 'public' "
                "form: set train.kl_form=public with sample.kind=cps"
            )
        check_trained_steps(self.sample, self.train.timestep_fraction)
        # Every divisibility rule that holds for W processes also holds for W = 1, so the
        # single-process check here catches what no process count can fix.
        self.check_distributed(1)
