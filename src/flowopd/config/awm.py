"""The AWM run config: the shared sections plus an ``awm`` section (METHODS.md, AWM:
Advantage Weighted Matching).

AWM samples prompt groups from the policy itself (on-policy) and, like CRD and
DiffusionNFT, trains on the clean samples re-noised at training times: the pretraining
flow-matching error of each image, weighted by its advantage. The run reuses the shared
sections and the epoch layout, with:

- ``sample.kind`` ``ode`` by default (only the clean latents are used) and
  ``sample.sde_window_size`` 0;
- ``model.guidance_scale`` 1.0 by default: the published runs sample and train CFG-free;
- minibatches of images (``awm_loss`` is per image);
- the advantage clip is ``train.adv_clip`` (5), rescaled to [-awm.adv_max, awm.adv_max];
  the advantage normaliser is ``awm.adv_std``; GRPO's objective knobs under ``train`` say
  where AWM's counterpart is.

The training times: the sampling schedule's ``num_times`` sigmas from 1 down, the first
``int(num_times * time_fraction)`` of them, without the first (t = 1) when
``skip_first``; each minibatch trains ``times_per_batch`` of them, one per stratum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from flowopd.algorithms.awm import ema_kl_decay
from flowopd.config.rollout import RolloutRunConfig
from flowopd.config.sections import (
    EvalConfig,
    OutputConfig,
    RolloutOptimConfig,
    advantage_std_field,
    check_min,
)
from flowopd.config.sections import help_field as _help
from flowopd.config.times import (
    CFGFreeModelConfig,
    CleanSampleConfig,
    TrainingTimes,
    check_clean_rollouts,
    check_training_times,
    grpo_keys_moved,
    training_time_grid,
)
from flowopd.errors import UserError

__all__ = ["AWMMethodConfig", "AWMOutputConfig", "AWMConfig"]


@dataclass
class AWMMethodConfig(TrainingTimes):
    """AWM: the matching-error transform, advantage scale, the two KL anchors, the times."""

    weighting: Literal["uniform", "t", "t2", "huber", "ghuber"] = _help(
        "Transform phi of the per-image matching error in log p = -phi(mse, t): 'uniform' "
        "(the abstract's plain FM error), 't', 't2', 'huber', 'ghuber' (published: "
        "t ((mse + d)^p - d^p) / p).",
        "ghuber",
    )
    ghuber_power: float = _help("Power p of 'ghuber' (published 0.25).", 0.25)
    adv_max: float = _help(
        "Advantages clip(A, -c, c) / c * adv_max, c = train.adv_clip (published: 1).", 1.0
    )
    kl_beta: float = _help(
        "Weight of the KL to the base model (adapters off): kl_beta mean KL(v_theta, "
        "v_base); 0 = no base forward (published: 1e-3 GenEval, 3e-3 OCR, 1e-4 PickScore).",
        1e-3,
    )
    ema_kl_beta: float = _help(
        "Weight of the KL to an EMA snapshot of the policy (updated once per epoch, decay "
        "min(ema_rate step, ema_max)); 0 = no snapshot (published: 1).",
        1.0,
    )
    ema_rate: float = _help("Growth of the EMA snapshot's decay per optimizer step.", 1e-3)
    ema_max: float = _help("Cap of the EMA snapshot's decay (published 0.3).", 0.3)
    kl_weighting: Literal["uniform", "elbo"] = _help(
        "Per-time weight of both KLs: 'uniform' (published) mean (v_theta - v)^2, 'elbo' "
        "divides by 2 s_t^2, s_t = 0.7 sqrt(t / (1 - t)).",
        "uniform",
    )
    num_times: int = _help(
        "The schedule's sigmas the grid starts from (num_times of them at awm.time_shift, "
        "from 1 down; published: the sampler's 14).",
        14,
    )
    time_fraction: float = _help(
        "Keep the first int(num_times * time_fraction) of them (published 0.9).", 0.9
    )
    skip_first: bool = _help(
        "Drop the grid's first time (t = 1 on the schedule; published: GenEval and OCR "
        "true, PickScore false).",
        True,
    )
    times_per_batch: int | None = _help(
        "Grid times each minibatch trains on (published 6; null = all).", 6
    )
    stratified: bool = _help(
        "Draw the minibatch's times one per stratum of the grid (published) rather than "
        "a uniform subset.",
        True,
    )
    time_shift: float | None = _help(
        "Shift of the training-time schedule; null = the model's scheduler shift.", None
    )
    time_range: list[float] | None = _help(
        "[lo, hi]: num_times times evenly spaced from hi down to lo; null = the schedule.", None
    )
    adv_std: Literal["global", "group"] = advantage_std_field()

    def validate(self) -> None:
        check_min(self, "awm", ("ghuber_power", "adv_max"), 0, strict=True)
        check_min(self, "awm", ("kl_beta", "ema_kl_beta", "ema_rate"), 0)
        if not 0 <= self.ema_max < 1:
            raise UserError(f"awm.ema_max must be in [0, 1), got {self.ema_max}")
        if not 0 < self.time_fraction <= 1:
            raise UserError(f"awm.time_fraction must be in (0, 1], got {self.time_fraction}")
        check_training_times(self, "awm")
        if self.grid_size < max(1, self.times_per_batch or 1):
            raise UserError(
                f"awm: the grid keeps {self.grid_size} time(s) (awm.num_times x "
                f"awm.time_fraction, less awm.skip_first), fewer than awm.times_per_batch="
                f"{self.times_per_batch}; raise awm.num_times or lower awm.times_per_batch"
            )

    @property
    def grid_size(self) -> int:
        """Times in the grid: int(num_times x time_fraction), less one with skip_first."""
        return int(self.num_times * self.time_fraction) - int(self.skip_first)

    def time_grid(self, model_shift: float) -> torch.Tensor:
        """The training times, (grid_size,) float32 from high to low: the first
        int(num_times x time_fraction) of ``training_time_grid``, less the first with
        ``skip_first`` (14 at shift 3, 0.9, skip: the sampler's times 2 to 12)."""
        keep = int(self.num_times * self.time_fraction)
        return training_time_grid(self, model_shift)[int(self.skip_first) : keep]

    def ema_decay(self, step: int) -> float:
        """EMA snapshot decay after ``step`` optimizer steps (``algorithms.awm.ema_kl_decay``)."""
        return ema_kl_decay(step, rate=self.ema_rate, max_decay=self.ema_max)


@dataclass
class AWMOutputConfig(OutputConfig):
    """Where the run writes config.yaml, log.jsonl, tensorboard/, checkpoints/, lora/."""

    dir: str = _help("Output directory of the run.", "runs/awm")


@dataclass
class AWMConfig(RolloutRunConfig):
    """An AWM run (the public code's GenEval defaults, CFG-free)."""

    _moved: ClassVar[dict[str, str]] = grpo_keys_moved("awm", "AWM")

    model: CFGFreeModelConfig = _help(
        "Base model and LoRA (model.guidance_scale 1.0: CFG-free).", factory=CFGFreeModelConfig
    )
    sample: CleanSampleConfig = _help(
        "Rollouts (from the policy: on-policy).", factory=CleanSampleConfig
    )
    train: RolloutOptimConfig = _help(
        "Optimisation; train.adv_clip is the advantage clip c.", factory=RolloutOptimConfig
    )
    eval: EvalConfig = _help("Evaluation (policy adapter, EMA when train.ema).", factory=EvalConfig)
    output: AWMOutputConfig = _help("Outputs.", factory=AWMOutputConfig)
    awm: AWMMethodConfig = _help("The AWM objective.", factory=AWMMethodConfig)

    def check_method(self) -> None:
        check_clean_rollouts(self.sample, "AWM")
