"""The CRD run config: the shared sections plus a ``crd`` section (METHODS.md §4).

CRD (Centered Reward Distillation) samples like GRPO (prompts x G images per epoch, split
by whole prompt groups over processes) but trains on forward-noised clean samples instead
of recorded trajectory steps. So the run reuses the shared section classes (subclassed only
where a default or a help text differs) and the epoch layout (``check_distributed``:
processes, sampling batches, minibatches, accumulation), with these differences:

- ``sample.kind`` may be ``ode`` and is by default: rollouts need only the clean latents;
- ``model.guidance_scale`` is the *student's* guidance, 1.0 (no CFG) by default: the policy
  is sampled, trained and evaluated without CFG, while the KL anchor is the base model at
  ``crd.anchor_guidance_scale`` (4.5);
- a training minibatch must hold whole prompt groups, because ``crd_loss`` centers the
  implicit reward and the targets over the images of each prompt (exactly, not
  approximately): ``train.batch_size`` is a multiple of ``sample.group_size``, and groups
  (not images) are shuffled into minibatches;
- ``train`` is the shared optimiser section: the advantage normaliser is ``crd.adv_std``,
  and none of GRPO's objective knobs (``grpo:`` ``clip_range``, ``beta_kl``, ``kl_form``,
  ``timestep_fraction``) applies: loading one under ``train`` says so, and where CRD's KL
  weight is; ``sample.sde_window_size`` must stay 0.

Per optimizer step the policy sees ``gradient_accumulation`` minibatches, each at
``crd.times_per_batch`` (default: all ``crd.num_times``) training times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from flowopd.algorithms.crd import EmaDecays, ema_decays
from flowopd.config.rollout import RolloutRunConfig
from flowopd.config.sections import (
    EvalConfig,
    ModelConfig,
    OutputConfig,
    RolloutOptimConfig,
    advantage_std_field,
    check_min,
)
from flowopd.config.sections import help_field as _help
from flowopd.config.times import (
    CleanSampleConfig,
    TrainingTimes,
    check_clean_rollouts,
    check_training_times,
)
from flowopd.errors import UserError

__all__ = [
    "CRDModelConfig",
    "CRDSampleConfig",
    "CRDTrainConfig",
    "CRDOutputConfig",
    "CRDMethodConfig",
    "CRDConfig",
]

# The shared sections, with CRD's defaults. Only defaults and help change; fields and
# validation are GRPO's. (A default_factory on CRDConfig would not do: a YAML section
# is built from its class, so a given ``model:`` mapping would get GRPO's CFG 4.5.)


@dataclass
class CRDModelConfig(ModelConfig):
    """The base model and its adapter; the student runs without CFG."""

    guidance_scale: float = _help(
        "The student's classifier-free guidance w, for sampling, training and evaluation "
        "(CRD: 1.0, no CFG; the KL anchor's CFG is crd.anchor_guidance_scale).",
        1.0,
    )


CRDSampleConfig = CleanSampleConfig  # ODE rollouts by default, no Flow-GRPO-Fast window


@dataclass
class CRDTrainConfig(RolloutOptimConfig):
    """Optimisation: AdamW on the policy LoRA with the CRD objective."""

    cfg_grad: Literal["cond", "both"] = _help(
        "Gradient through the student's CFG pair (as in Flow-GRPO: 'cond' detaches the "
        "unconditional prediction). No effect at CRD's default model.guidance_scale=1.0 "
        "(the student runs without CFG); the KL anchor's guided base is never differentiated.",
        "cond",
    )


@dataclass
class CRDOutputConfig(OutputConfig):
    """Where the run writes config.yaml, log.jsonl, tensorboard/, checkpoints/, lora/."""

    dir: str = _help("Output directory of the run.", "runs/crd")


@dataclass
class CRDMethodConfig(TrainingTimes):
    """Centered Reward Distillation: objective, advantages, KL anchor, snapshots, times."""

    beta: float = _help(
        "Implicit-reward temperature beta in L = (1/beta) mean_i [beta l_c,i - a_c,i]^2. "
        "The loss is zero where the policy's centered implicit reward over the old "
        "snapshot is l_c = a_c / beta (|a_c| <= 1): a larger beta holds the policy closer "
        "to the old snapshot each epoch; the first gradient (at l = 0) is the same for any "
        "beta. Default 1.0: l (a per-element mean of normalised flow-matching errors) "
        "moves by ~1e-4 per step, far below a_c, so the trust region rarely binds and drift "
        "is left to the KL anchor and the old snapshot's EMA (on the tiny test model beta "
        "= 1 raised the reward in 10 epochs where beta = 1000 held it flat).",
        1.0,
    )
    normalize: Literal["adaptive", "plain"] = _help(
        "Implicit reward l = -mean[(v_theta - u)^2 / w_theta - (v_old - u)^2 / w_old]: "
        "'adaptive' w = detached mean |v - u| per image (every t on one scale), 'plain' w = 1.",
        "adaptive",
    )
    kl_anchor: bool = _help(
        "Add the KL anchor to the CFG-guided base model, beta_kl * mean_i c_i "
        "||v_theta - v_base^CFG||^2 with c_i = m + a_i (1 - m), m = 1e-4 / beta_kl.",
        True,
    )
    beta_kl: float = _help("Weight of the KL anchor (the paper: 0.1).", 0.1)
    anchor_guidance_scale: float = _help(
        "CFG scale of the base model the KL anchor pulls toward (adapters off; 4.5 for "
        "SD3.5-M). The student itself runs at model.guidance_scale (1.0: no CFG).",
        4.5,
    )
    num_times: int = _help(
        "Training times per sample: the num_times sigmas of the sampling schedule with "
        "crd.time_shift, from 1 (noise) down (the paper: 20 with shift 3).",
        20,
    )
    times_per_batch: int | None = _help(
        "How many of the num_times times each minibatch is trained on, a random subset "
        "drawn per minibatch (null = all of them, as published). Lower it to trade "
        "gradient quality for speed: each time costs a policy forward + backward, an old "
        "forward and, with the anchor on, a CFG base forward.",
        None,
    )
    time_shift: float | None = _help(
        "Shift of the training-time schedule; null = the model's scheduler shift (3.0 for SD3.5).",
        None,
    )
    time_range: list[float] | None = _help(
        "[lo, hi]: train on num_times sigmas evenly spaced from hi down to lo instead of the "
        "shifted schedule, e.g. [0.55, 0.8], where toy-OCR's flow-matching gradient carries "
        "its signal (scripts/grad_snr.py --fm); null = the schedule.",
        None,
    )
    sampler_warmup: int = _help(
        "Sampler snapshot decay (it draws the rollouts): 0 for the first sampler_warmup "
        "optimizer steps (on-policy), then min(sampler_rate (step - warmup), max_decay). "
        "Snapshots are updated after each epoch with step = optimizer steps taken so far.",
        75,
    )
    sampler_rate: float = _help("Growth of the sampler decay per step after the warmup.", 0.0075)
    old_start: float = _help(
        "Old snapshot decay (it defines v_old): min(old_start + old_rate step, max_decay).",
        0.25,
    )
    old_rate: float = _help("Growth of the old snapshot's decay per optimizer step.", 0.005)
    max_decay: float = _help("Cap of both snapshot decays.", 0.999)
    adv_std: Literal["global", "group"] = advantage_std_field()

    def validate(self) -> None:
        check_min(self, "crd", ("beta", "beta_kl"), 0, strict=True)
        if self.anchor_guidance_scale < 0:
            raise UserError(
                f"crd.anchor_guidance_scale must be >= 0, got {self.anchor_guidance_scale}"
            )
        check_training_times(self, "crd")
        if self.sampler_warmup < 0:
            raise UserError(f"crd.sampler_warmup must be >= 0, got {self.sampler_warmup}")
        check_min(self, "crd", ("sampler_rate", "old_rate"), 0)
        for name in ("old_start", "max_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"crd.{name} must be in [0, 1), got {getattr(self, name)}")

    def decays(self, step: int) -> EmaDecays:
        """Snapshot decays after ``step`` optimizer steps (``algorithms.crd.ema_decays``)."""
        return ema_decays(
            step, sampler_warmup=self.sampler_warmup, sampler_rate=self.sampler_rate,
            old_start=self.old_start, old_rate=self.old_rate, max_decay=self.max_decay,
        )  # fmt: skip


@dataclass
class CRDConfig(RolloutRunConfig):
    """A CRD run (SD3.5-M defaults of METHODS.md §4)."""

    _moved: ClassVar[dict[str, str]] = {
        "train.adv_std": "moved to crd.adv_std",
        "train.beta_kl": "is a Flow-GRPO setting that CRD does not use; remove it; CRD's KL "
        "weight is crd.beta_kl (crd.kl_anchor=false turns it off)",
        **{
            f"train.{k}": "is a Flow-GRPO setting that CRD does not use; remove it"
            for k in ("clip_range", "kl_form", "timestep_fraction")
        },
    }

    model: CRDModelConfig = _help(
        "Base model and LoRA; model.guidance_scale is the student's (1.0: no CFG).",
        factory=CRDModelConfig,
    )
    sample: CRDSampleConfig = _help(
        "Rollouts (from the sampler snapshot).", factory=CRDSampleConfig
    )
    train: CRDTrainConfig = _help("Optimisation.", factory=CRDTrainConfig)
    eval: EvalConfig = _help("Evaluation (policy adapter, EMA when train.ema).", factory=EvalConfig)
    output: CRDOutputConfig = _help("Outputs.", factory=CRDOutputConfig)
    crd: CRDMethodConfig = _help(
        "The CRD objective and its drift controls.", factory=CRDMethodConfig
    )

    @property
    def groups_per_batch(self) -> int:
        """Whole prompt groups per training minibatch."""
        return self.train_batch_size // self.sample.group_size

    # -- checks -------------------------------------------------------------------------

    def check_method(self) -> None:
        check_clean_rollouts(self.sample, "CRD")

    def check_distributed(self, world_size: int) -> None:
        """Raise UserError unless the epoch splits over ``world_size`` processes.

        CRD's rule first: the minibatch holds whole prompt groups (a multiple of G), so
        that each image's implicit reward is centered over *all* images of its prompt.
        Then the layout's rules (``EpochLayout.check``): W divides the prompts, the
        sampling batch and the minibatch divide the images per process, the accumulation
        divides the minibatches.
        """
        mb, G = self.train_batch_size, self.sample.group_size
        if mb % G:
            which = (
                f"train.batch_size={mb}"
                if self.train.batch_size
                else f"the training minibatch (train.batch_size=null -> sample.batch_size={mb})"
            )
            multiples = ", ".join(str(G * k) for k in range(1, 4))
            raise UserError(
                f"{which} must be a multiple of sample.group_size={G}: CRD centers the "
                f"implicit reward over all images of a prompt, so a minibatch must hold whole "
                f"prompt groups; use {multiples}, ..."
            )
        self.layout.check(world_size)
