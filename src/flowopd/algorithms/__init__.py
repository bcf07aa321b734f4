"""The algorithms as pure loss functions on tensors, each returning ``(loss, stats)``.

advantages: group-relative advantages (Flow-GRPO) and CRD's [0, 1] targets
grpo:       Flow-GRPO clipped surrogate and KL to the reference
opd:        Flow-OPD per-step reverse KL, its three loss modes, MAR
crd:        Centered Reward Distillation, its adaptive KL anchor and EMA schedules
sft:        supervised flow matching (SFT cold start) and training-time sampling
"""

from flowopd.algorithms.advantages import (
    advantage_stats,
    crd_targets,
    group_advantages,
    group_mean,
    nonzero_group_mask,
)
from flowopd.algorithms.crd import EmaDecays, crd_kl, crd_loss, ema_decays, implicit_reward
from flowopd.algorithms.grpo import clipped_surrogate, grpo_loss, reference_kl
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
]
