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

from flowopd.config.layout import EpochLayout
from flowopd.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    RewardConfig,
    SampleConfig,
    TrainConfig,
    check_rewards,
)
from flowopd.config.sections import help_field as _help
from flowopd.errors import UserError

__all__ = ["GRPOConfig"]


# --------------------------------------------------------------------------------------
# the run


@dataclass
class GRPOConfig:
    """A Flow-GRPO run (SD3.5-M defaults of METHODS.md §2)."""

    model: ModelConfig = _help("Base model and LoRA.", factory=ModelConfig)
    data: DataConfig = _help("Prompt datasets.", factory=DataConfig)
    reward: RewardConfig = _help("Reward.", factory=RewardConfig)
    sample: SampleConfig = _help("Rollouts.", factory=SampleConfig)
    train: TrainConfig = _help("Optimisation.", factory=TrainConfig)
    eval: EvalConfig = _help("Evaluation.", factory=EvalConfig)
    output: OutputConfig = _help("Outputs.", factory=OutputConfig)

    # -- derived values -----------------------------------------------------------------

    @property
    def layout(self) -> EpochLayout:
        """The epoch layout of ``sample:`` and ``train:`` (batch sizes, accumulation)."""
        return EpochLayout.of(self.sample, self.train)

    @property
    def images_per_epoch(self) -> int:
        """prompts_per_epoch x group_size, over all processes (48 x 24 = 1152)."""
        return self.layout.images_per_epoch

    @property
    def trained_steps(self) -> int:
        """Denoising steps trained per trajectory: the window size in Fast mode, else
        int(num_steps x timestep_fraction) (10 x 0.99 -> 9)."""
        if self.sample.sde_window_size:
            return self.sample.sde_window_size
        return int(self.sample.num_steps * self.train.timestep_fraction)

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

    # -- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        """Cross-section checks (each section checked itself already; see validate_config)."""
        self._check_rewards()
        self.eval.resolved_benchmarks(self.data.test)
        if self.sample.kind == "cps" and self.train.kl_form == "exact" and self.train.beta_kl:
            raise UserError(
                "train.kl_form=exact is the KL of the Flow-GRPO SDE step (transition std "
                "sigma_t sqrt(-dt)); a CPS step's std carries no dt, so its KL is the 'public' "
                "form: set train.kl_form=public with sample.kind=cps"
            )
        if not self.sample.sde_window_size and self.trained_steps < 1:
            raise UserError(
                f"train.timestep_fraction={self.train.timestep_fraction} trains "
                f"int({self.sample.num_steps} x {self.train.timestep_fraction}) = 0 steps; "
                "raise it so at least one step is trained"
            )
        # Every divisibility rule that holds for W processes also holds for W = 1, so the
        # single-process check here catches what no process count can fix.
        self.check_distributed(1)

    def _check_rewards(self) -> None:
        check_rewards(self.reward, self.data)

    def check_distributed(self, world_size: int) -> None:
        """Raise UserError unless the epoch splits evenly over ``world_size`` processes
        (the rules of :meth:`EpochLayout.check`)."""
        self.layout.check(world_size)
