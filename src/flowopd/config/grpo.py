"""The Flow-GRPO run config: the shared sections plus a ``grpo`` section (METHODS.md §2).

``grpo:`` holds the clipped objective's knobs (``clip_range``, ``beta_kl``, ``kl_form``,
``adv_std``, ``timestep_fraction``); ``train:`` is the shared optimiser section. The keys
lived in ``train:`` before; loading ``train.clip_range`` says where it went.

How an epoch is laid out (what the divisibility rules of ``config.layout`` protect):

- each of the ``W`` processes takes ``prompts_per_epoch / W`` whole prompts and samples
  all ``group_size`` images of each of them, so a group never spans processes;
- a process samples its ``prompts_per_epoch / W * group_size`` images in micro-batches of
  ``sample.batch_size`` and trains on them in minibatches of ``train.batch_size``;
- one optimizer step accumulates ``gradient_accumulation`` minibatches, each over all
  ``trained_steps`` denoising steps of its trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from flowopd.config.rollout import RolloutRunConfig
from flowopd.config.sections import (
    advantage_std_field,
    check_clip_range,
    check_timestep_fraction,
    check_trained_steps,
    timestep_fraction_field,
    trained_steps,
)
from flowopd.config.sections import help_field as _help
from flowopd.errors import UserError

__all__ = ["GRPOSection", "GRPOConfig", "GRPO_KEYS"]


@dataclass
class GRPOSection:
    """Flow-GRPO's objective: PPO clip, KL to the base, advantage normaliser, trained steps."""

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
    adv_std: Literal["global", "group"] = advantage_std_field()
    timestep_fraction: float = timestep_fraction_field()

    def validate(self) -> None:
        check_timestep_fraction(self.timestep_fraction, "grpo.timestep_fraction")
        check_clip_range(self.clip_range, "grpo.clip_range")
        if self.beta_kl < 0:
            raise UserError(f"grpo.beta_kl must be >= 0, got {self.beta_kl}")


# the keys of the grpo: section that train: held before it existed
GRPO_KEYS = ("clip_range", "beta_kl", "kl_form", "adv_std", "timestep_fraction")


# --------------------------------------------------------------------------------------
# the run


@dataclass
class GRPOConfig(RolloutRunConfig):
    """A Flow-GRPO run (SD3.5-M defaults of METHODS.md §2)."""

    _moved: ClassVar[dict[str, str]] = {f"train.{k}": f"moved to grpo.{k}" for k in GRPO_KEYS}

    FULL_FINETUNE: ClassVar[bool] = True  # model.finetune=full: engine/full.py

    grpo: GRPOSection = _help("The clipped GRPO objective.", factory=GRPOSection)

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs the frozen base (the KL term): full fine-tuning then
        keeps a frozen copy of the transformer."""
        return self.grpo.beta_kl > 0

    @property
    def trained_steps(self) -> int:
        """Denoising steps trained per trajectory (window size, else 10 x 0.99 -> 9)."""
        return trained_steps(self.sample, self.grpo.timestep_fraction)

    def check_method(self) -> None:
        g = self.grpo
        if self.sample.kind == "cps" and g.kl_form == "exact" and g.beta_kl:
            raise UserError(
                "grpo.kl_form=exact is the KL of the Flow-GRPO SDE step (transition std "
                "sigma_t sqrt(-dt)); a CPS step's std carries no dt, so its KL is the 'public' "
                "form: set grpo.kl_form=public with sample.kind=cps"
            )
        check_trained_steps(self.sample, g.timestep_fraction, "grpo.timestep_fraction")
        if self.model.finetune == "full" and self.train.adamw_8bit:
            raise UserError(
                "train.adamw_8bit cannot update FSDP-sharded full weights yet; with "
                "model.finetune=full set train.adamw_8bit=false"
            )
