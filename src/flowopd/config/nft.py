"""The DiffusionNFT run config: the shared sections plus an ``nft`` section (METHODS.md,
DiffusionNFT).

DiffusionNFT samples prompt groups like GRPO but, like CRD, trains on the clean samples
re-noised at a grid of training times, against one frozen ``old`` snapshot that is also
the sampler. The run reuses the shared sections and the epoch layout, with:

- ``sample.kind`` ``ode`` by default (only the clean latents are used) and
  ``sample.sde_window_size`` 0;
- ``model.guidance_scale`` 1.0 by default: the paper samples, trains and evaluates
  CFG-free;
- minibatches of images (``nft_loss`` is per image; no group needs to stay whole);
- the advantage clip ``c`` of the optimality probability is ``train.adv_clip`` (5), the
  advantage normaliser ``nft.adv_std``; GRPO's objective knobs under ``train`` say where
  NFT's counterpart is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from flowopd.algorithms.nft import old_decay
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
)
from flowopd.errors import UserError

__all__ = ["NFTModelConfig", "NFTSampleConfig", "NFTOutputConfig", "NFTMethodConfig", "NFTConfig"]


NFTModelConfig = CFGFreeModelConfig  # model.guidance_scale 1.0 by default
NFTSampleConfig = CleanSampleConfig  # ODE rollouts by default, no Flow-GRPO-Fast window


@dataclass
class NFTMethodConfig(TrainingTimes):
    """DiffusionNFT: implicit positive/negative policies, reference KL, old snapshot, times."""

    beta: float = _help(
        "Mixing coefficient beta of v+ = (1 - beta) v_old + beta v_theta and "
        "v- = (1 + beta) v_old - beta v_theta (published: 1.0; 0.1 for OCR).",
        1.0,
    )
    normalize: Literal["adaptive", "plain"] = _help(
        "Branch error: 'adaptive' (public code) x0-space squared error over its detached "
        "mean absolute error per image; 'plain' (paper) mean (v - u)^2.",
        "adaptive",
    )
    scale: float = _help(
        "Loss factor, divided by beta (public code: 5 / beta; the paper's form is 1 with "
        "normalize=plain).",
        5.0,
    )
    kl_beta: float = _help(
        "Weight of the KL to the base model (adapters off, same CFG): "
        "kl_beta mean (v_theta - v_base)^2; 0 = no base forward (published: 1e-4).",
        1e-4,
    )
    old_warmup: int = _help(
        "Old-snapshot decay eta = 0 for the first old_warmup optimizer steps (on-policy), "
        "then min(old_rate (step - warmup), old_max); the old snapshot draws the rollouts "
        "and defines v_old (published: 0; OCR 75).",
        0,
    )
    old_rate: float = _help("Growth of eta per optimizer step (published 1e-3; OCR 7.5e-3).", 1e-3)
    old_max: float = _help("Cap of eta (published 0.5; OCR 0.999).", 0.5)
    num_times: int = _help(
        "Size of the training-time grid: the sampling schedule's num_times sigmas at "
        "nft.time_shift, from 1 down (published: the sampler's 10).",
        10,
    )
    times_per_batch: int | None = _help(
        "Grid times each minibatch trains on, a random subset per minibatch (null = all).",
        None,
    )
    time_shift: float | None = _help(
        "Shift of the training-time grid; null = the model's scheduler shift.", None
    )
    time_range: list[float] | None = _help(
        "[lo, hi]: num_times times evenly spaced from hi down to lo; null = the schedule.", None
    )
    adv_std: Literal["global", "group"] = advantage_std_field()

    def validate(self) -> None:
        check_min(self, "nft", ("beta", "scale"), 0, strict=True)
        check_min(self, "nft", ("kl_beta", "old_rate"), 0)
        if self.old_warmup < 0:
            raise UserError(f"nft.old_warmup must be >= 0, got {self.old_warmup}")
        if not 0 <= self.old_max < 1:
            raise UserError(f"nft.old_max must be in [0, 1), got {self.old_max}")
        check_training_times(self, "nft")

    def decay(self, step: int) -> float:
        """Old-snapshot decay after ``step`` optimizer steps (``algorithms.nft.old_decay``)."""
        return old_decay(step, warmup=self.old_warmup, rate=self.old_rate, max_decay=self.old_max)


@dataclass
class NFTOutputConfig(OutputConfig):
    """Where the run writes config.yaml, log.jsonl, tensorboard/, checkpoints/, lora/."""

    dir: str = _help("Output directory of the run.", "runs/nft")


@dataclass
class NFTConfig(RolloutRunConfig):
    """A DiffusionNFT run (the public code's GenEval defaults, CFG-free)."""

    _moved: ClassVar[dict[str, str]] = grpo_keys_moved("nft", "DiffusionNFT")

    model: NFTModelConfig = _help(
        "Base model and LoRA (model.guidance_scale 1.0: CFG-free).", factory=NFTModelConfig
    )
    sample: NFTSampleConfig = _help("Rollouts (from the old snapshot).", factory=NFTSampleConfig)
    train: RolloutOptimConfig = _help(
        "Optimisation; train.adv_clip is the optimality probability's clip c.",
        factory=RolloutOptimConfig,
    )
    eval: EvalConfig = _help("Evaluation (policy adapter, EMA when train.ema).", factory=EvalConfig)
    output: NFTOutputConfig = _help("Outputs.", factory=NFTOutputConfig)
    nft: NFTMethodConfig = _help("The DiffusionNFT objective.", factory=NFTMethodConfig)

    def check_method(self) -> None:
        check_clean_rollouts(self.sample, "DiffusionNFT")
