"""The algorithms as pure loss functions on tensors, each returning ``(loss, stats)``.

advantages: group-relative advantages (Flow-GRPO) and CRD's [0, 1] targets
grpo:       Flow-GRPO clipped surrogate and KL to the reference
opd:        Flow-OPD per-step reverse KL, its three loss modes, MAR
crd:        Centered Reward Distillation, its adaptive KL anchor and EMA schedules
sft:        supervised flow matching (SFT cold start) and training-time sampling
nft:        DiffusionNFT's implicit positive/negative flow matching and old-snapshot decay
awm:        Advantage Weighted Matching: advantage-weighted FM log-likelihood, velocity KL
"""

from flowopd.algorithms.advantages import (
    advantage_stats,
    crd_targets,
    group_advantages,
    group_mean,
    nonzero_group_mask,
)
from flowopd.algorithms.awm import (
    AWM_WEIGHTINGS,
    awm_log_prob,
    awm_loss,
    ema_kl_decay,
    velocity_kl,
)
from flowopd.algorithms.crd import EmaDecays, crd_kl, crd_loss, ema_decays, implicit_reward
from flowopd.algorithms.grpo import clipped_surrogate, grpo_loss, reference_kl
from flowopd.algorithms.nft import (
    implicit_velocities,
    nft_loss,
    old_decay,
    optimality_probability,
)
from flowopd.algorithms.opd import OPD_MODES, mar_loss, opd_loss, step_kl
from flowopd.algorithms.sft import add_noise, flow_matching_loss, sample_training_sigmas

__all__ = [
    "advantage_stats",
    "crd_targets",
    "group_advantages",
    "group_mean",
    "nonzero_group_mask",
    "EmaDecays",
    "crd_kl",
    "crd_loss",
    "ema_decays",
    "implicit_reward",
    "clipped_surrogate",
    "grpo_loss",
    "reference_kl",
    "OPD_MODES",
    "mar_loss",
    "opd_loss",
    "step_kl",
    "add_noise",
    "flow_matching_loss",
    "sample_training_sigmas",
    "optimality_probability",
    "implicit_velocities",
    "nft_loss",
    "old_decay",
    "AWM_WEIGHTINGS",
    "awm_log_prob",
    "awm_loss",
    "velocity_kl",
    "ema_kl_decay",
]
