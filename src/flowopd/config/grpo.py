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

from flowopd.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    RewardConfig,
    SampleConfig,
    TrainConfig,
    divisors,
)
from flowopd.config.sections import help_field as _help
from flowopd.errors import UserError, unknown

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
    def images_per_epoch(self) -> int:
        """prompts_per_epoch x group_size, over all processes (48 x 24 = 1152)."""
        return self.sample.prompts_per_epoch * self.sample.group_size

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
        return self.train.batch_size or self.sample.batch_size

    def prompts_per_process(self, world_size: int = 1) -> int:
        return self.sample.prompts_per_epoch // world_size

    def images_per_process(self, world_size: int = 1) -> int:
        """Images one process samples per epoch: prompts_per_epoch / W x group_size."""
        return self.prompts_per_process(world_size) * self.sample.group_size

    def sampling_batches(self, world_size: int = 1) -> int:
        """Sampling micro-batches per process per epoch."""
        return self.images_per_process(world_size) // self.sample.batch_size

    def minibatches_per_pass(self, world_size: int = 1) -> int:
        """Training minibatches per process in one pass over the epoch's samples."""
        return self.images_per_process(world_size) // self.train_batch_size

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Minibatches per optimizer step (train.gradient_accumulation, else derived so
        that one pass makes train.optimizer_steps_per_epoch steps)."""
        if self.train.gradient_accumulation is not None:
            return self.train.gradient_accumulation
        return max(1, self.minibatches_per_pass(world_size) // self.train.optimizer_steps_per_epoch)

    def optimizer_steps_per_epoch(self, world_size: int = 1) -> int:
        """Optimizer steps per epoch, inner epochs included (the paper: 2)."""
        per_pass = self.minibatches_per_pass(world_size) // self.gradient_accumulation_steps(
            world_size
        )
        return per_pass * self.train.inner_epochs

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
        from flowopd.rewards.base import available_rewards  # lazy: keeps config import light

        available = available_rewards()
        names = [(f"reward.{k}", n) for k, n in self._reward_items()]
        names += [
            (f"data.datasets.{i}.reward", d.reward)
            for i, d in enumerate(self.data.datasets)
            if d.reward
        ]
        for key, name in names:
            if name not in available:
                raise UserError(f"{key}: {unknown('reward', name, available)}")
        for name, w in self.reward.weights.items():
            if w != w or w in (float("inf"), float("-inf")):
                raise UserError(f"reward.weights.{name} must be a finite number, got {w}")
        if self.reward.weights and not any(self.reward.weights.values()):
            raise UserError("reward.weights are all 0; give at least one reward a weight")
        if self.reward.mode == "none":
            missing = [i for i, d in enumerate(self.data.datasets) if not d.reward]
            if not self.data.datasets or missing:
                where = f" (data.datasets {missing} have no reward)" if self.data.datasets else ""
                raise UserError(
                    "missing reward: set reward=NAME, reward.weights={NAME: W, ...} or "
                    f"reward.routing={{TASK: NAME, ...}}{where}"
                )
        unknown_opts = set(self.reward.options) - {n for _, n in names}
        if unknown_opts:
            raise UserError(
                f"reward.options names reward(s) {sorted(unknown_opts)} that the run does "
                "not use; remove them or fix the name"
            )

    def _reward_items(self) -> list[tuple[str, str]]:
        r = self.reward
        items = [("name", r.name)] if r.name else []
        items += [(f"weights.{n}", n) for n in r.weights]
        items += [(f"routing.{t}", n) for t, n in r.routing.items()]
        return items

    def check_distributed(self, world_size: int) -> None:
        """Raise UserError unless the epoch splits evenly over ``world_size`` processes.

        Rules (P prompts per epoch, G group size, W processes, per-process images
        N = P / W x G):
        1. W divides P (each process samples whole prompt groups);
        2. sample.batch_size divides N;  3. the training minibatch divides N;
        4. the gradient accumulation divides the minibatches per pass N / minibatch.
        """
        s, W = self.sample, world_size
        if W < 1:
            raise UserError(f"world size must be >= 1, got {W}")
        P, G = s.prompts_per_epoch, s.group_size
        if P % W:
            lo, hi = P - P % W, P + W - P % W
            raise UserError(
                f"sample.prompts_per_epoch={P} must be divisible by the number of processes "
                f"({W}) so each process samples whole prompt groups; use {lo or hi} or {hi}"
            )
        n = self.images_per_process(W)
        rule = f"prompts_per_epoch / processes x group_size = {P} / {W} x {G} = {n}"
        if n % s.batch_size:
            raise UserError(
                f"sample.batch_size={s.batch_size} must divide the images each process "
                f"samples per epoch, {rule}; choose one of {divisors(n)}"
            )
        mb = self.train_batch_size
        if n % mb:
            raise UserError(
                f"the training minibatch (train.batch_size={mb}) must divide the images each "
                f"process trains on per epoch, {rule}; choose one of {divisors(n)}"
            )
        passes = n // mb
        acc = self.gradient_accumulation_steps(W)
        if self.train.gradient_accumulation is None:
            k = self.train.optimizer_steps_per_epoch
            if passes % k:
                raise UserError(
                    f"train.optimizer_steps_per_epoch={k} must divide the minibatches per "
                    f"process and epoch ({n} / {mb} = {passes}); choose one of "
                    f"{divisors(passes)} or set train.gradient_accumulation"
                )
        elif passes % acc:
            raise UserError(
                f"train.gradient_accumulation={acc} must divide the minibatches per process "
                f"and epoch ({n} / {mb} = {passes}); choose one of {divisors(passes)}"
            )
