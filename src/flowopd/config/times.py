"""Config pieces of the recipes that forward-noise clean rollouts (CRD, DiffusionNFT, AWM).

All sample ODE rollouts by default and keep only the clean samples
(``CleanSampleConfig``, ``check_clean_rollouts``); their method sections carry
``num_times``, ``times_per_batch``, ``time_shift`` and ``time_range`` with the same
meaning (``check_training_times``, the ``TrainingTimes`` mixin). DiffusionNFT and AWM are
CFG-free (``CFGFreeModelConfig``) and name where Flow-GRPO's objective keys went
(``grpo_keys_moved``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from flowopd.config.sections import ModelConfig, SampleConfig, help_field
from flowopd.errors import UserError
from flowopd.sde import timesteps

__all__ = [
    "CFGFreeModelConfig",
    "CleanSampleConfig",
    "grpo_keys_moved",
    "TrainingTimes",
    "check_training_times",
    "check_clean_rollouts",
    "training_time_grid",
    "training_times_of",
]


@dataclass
class CFGFreeModelConfig(ModelConfig):
    """The base model and its adapter, CFG-free by default (DiffusionNFT, AWM)."""

    guidance_scale: float = help_field(
        "CFG scale for sampling, training and evaluation (1.0: CFG-free, as DiffusionNFT "
        "and AWM publish).",
        1.0,
    )


def grpo_keys_moved(section: str, algo: str) -> dict[str, str]:
    """A config's ``_moved`` notes for Flow-GRPO's objective keys under ``train``: the
    advantage normaliser moved to ``{section}.adv_std``, the KL weight is
    ``{section}.kl_beta``, the rest ``algo`` does not use."""
    unused = f"is a Flow-GRPO setting that {algo} does not use; remove it"
    return {
        "train.adv_std": f"moved to {section}.adv_std",
        "train.beta_kl": f"is a Flow-GRPO setting; {algo}'s KL weight is {section}.kl_beta",
        **{f"train.{k}": unused for k in ("clip_range", "kl_form", "timestep_fraction")},
    }


@dataclass
class CleanSampleConfig(SampleConfig):
    """Rollouts: GRPO's sample section, with deterministic ODE rollouts as the default."""

    kind: Literal["ode", "sde", "cps"] = help_field(
        "Rollout sampler: 'ode' (deterministic Euler, the default: training re-noises the "
        "clean samples), or the stochastic 'sde' / 'cps' at sample.noise_level.",
        "ode",
    )
    sde_window_size: int = help_field("Flow-GRPO-Fast only; must stay 0 (clean samples).", 0)


def check_training_times(section: Any, prefix: str) -> None:
    """UserError unless ``section``'s time fields are consistent (``prefix``: 'crd', 'nft', 'awm')."""
    n, per = section.num_times, section.times_per_batch
    if n < 1:
        raise UserError(f"{prefix}.num_times must be >= 1, got {n}")
    if per is not None and not 1 <= per <= n:
        raise UserError(
            f"{prefix}.times_per_batch must lie in [1, {prefix}.num_times={n}] "
            f"(or null = all), got {per}"
        )
    if section.time_shift is not None and section.time_shift <= 0:
        raise UserError(f"{prefix}.time_shift must be > 0 (or null), got {section.time_shift}")
    r = section.time_range
    if r is not None and not (len(r) == 2 and 0 <= r[0] < r[1] <= 1):
        raise UserError(
            f"{prefix}.time_range must be [lo, hi] with 0 <= lo < hi <= 1 (or null), got {r}"
        )


def training_time_grid(section: Any, model_shift: float) -> torch.Tensor:
    """The ``num_times`` training times, (num_times,) float32 from high to low.

    Default: the sampling schedule's sigmas without its final 0, at shift
    ``time_shift or model_shift`` (20 with shift 3: 1.0, 0.99, ..., 0.009);
    with ``time_range`` [lo, hi]: linspace(hi, lo, num_times).
    """
    if section.time_range is not None:
        lo, hi = section.time_range
        return torch.linspace(hi, lo, section.num_times, dtype=torch.float32)
    return timesteps(section.num_times, section.time_shift or model_shift)[:-1]


class TrainingTimes:
    """Mixin of a method section with the four time fields: ``times_used``, ``grid_size``
    and ``time_grid`` (no fields of its own, so the section's field order is its own).

    ``stratified`` False: a minibatch's times are a uniform random subset of the grid;
    a section with a ``stratified`` field may draw one per stratum instead."""

    stratified = False

    @property
    def grid_size(self) -> int:
        """Times in ``time_grid`` (``num_times`` unless a section trims its grid)."""
        return self.num_times

    @property
    def times_used(self) -> int:
        """Training times per minibatch (times_per_batch, else the whole grid)."""
        return self.times_per_batch or self.grid_size

    def time_grid(self, model_shift: float) -> torch.Tensor:
        """The ``num_times`` training times (``training_time_grid``)."""
        return training_time_grid(self, model_shift)


def training_times_of(cfg: Any) -> TrainingTimes | None:
    """The method section of ``cfg`` that trains on a time grid (``crd``, ``nft``, ``awm``),
    or None for a recipe that trains recorded trajectory steps (GRPO, OPD)."""
    sections = vars(cfg).values() if hasattr(cfg, "__dict__") else ()
    return next((v for v in sections if isinstance(v, TrainingTimes)), None)


def check_clean_rollouts(sample: Any, algo: str) -> None:
    """UserError when ``sample.sde_window_size`` is set: ``algo`` keeps only clean samples."""
    if sample.sde_window_size:
        raise UserError(
            f"sample.sde_window_size={sample.sde_window_size} is a Flow-GRPO setting that "
            f"{algo} does not use; remove it"
        )
