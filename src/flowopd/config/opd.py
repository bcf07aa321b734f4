"""The Flow-OPD run config: GRPO's sections plus an ``opd`` section (METHODS.md §3).

Teachers are data: each one is a LoRA directory in the diffusers format (what
``flowopd train grpo`` writes to ``OUT/lora``) and the task labels it serves. At run
time every prompt record is routed by its ``opd.routing_key`` (``task``) to the one
teacher that serves that task (hard routing); all teachers are named adapters on the
one base model.

``OPDConfig`` composes the shared sections (model / data / reward / sample / eval /
output, the same epoch layout and divisibility rules as GRPO) with these differences:

- ``opd``: teachers, anchor, loss mode, MAR strength, PPO clip, trained steps, student
  init, routing key;
- ``reward`` may be empty: OPD's learning signal is the teachers' KL; a configured
  reward is computed on the rollouts for logging only, never in the loss;
- ``train`` is the shared optimiser section with the paper's lr 1e-4; the PPO clip and
  the trained steps (``clip_range``, ``timestep_fraction``) are ``opd`` keys, and there
  is no ``beta_kl`` (GRPO's KL to the base is replaced by MAR, whose default anchor is
  the base model);
- ``sample.kind`` must be ``sde``: the closed-form KL weight ``w(t)`` is derived for the
  Flow-GRPO SDE step.

MAR strength: the paper states lambda = 0.02, its public configs use 0.04. The default
here is 0.04, the value the published training runs were configured with; set
``opd.mar_lambda=0.02`` for the paper's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from flowopd.config.rollout import RolloutRunConfig
from flowopd.config.sections import (
    OutputConfig,
    RewardConfig,
    RolloutOptimConfig,
    check_clip_range,
    check_rewards,
    check_timestep_fraction,
    check_trained_steps,
    timestep_fraction_field,
    trained_steps,
)
from flowopd.config.sections import help_field as _help
from flowopd.errors import UserError

__all__ = [
    "TeacherConfig",
    "OPDSection",
    "OPDTrainConfig",
    "OPDOutputConfig",
    "OPDConfig",
    "check_lora_path",
    "teacher_table",
]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # == models.sd3.LORA_WEIGHTS (no torch here)
RESERVED_ADAPTERS = ("student", "anchor", "__base__")  # names the recipes give their adapters
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # peft keeps adapters in ModuleDicts: no dots


def check_lora_path(path: str, key: str) -> None:
    """UserError unless ``path`` is a LoRA directory holding the diffusers weights file
    (or such a ``.safetensors`` file itself)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        return
    if not (p / LORA_WEIGHTS).is_file():
        what = "does not exist" if not p.exists() else f"holds no {LORA_WEIGHTS}"
        raise UserError(
            f"{key}: LoRA '{path}' {what}; pass a LoRA directory in the diffusers format "
            "(e.g. a GRPO run's OUT/lora or `flowopd merge --out DIR`)"
        )


@dataclass
class TeacherConfig:
    """One teacher: a LoRA and the task labels whose prompts it handles."""

    path: str = _help(
        "LoRA directory in the diffusers format (a GRPO run's OUT/lora). Required.", ""
    )
    tasks: list[str] = _help(
        "Task labels this teacher serves (values of the records' routing key, e.g. [ocr]).",
        factory=list,
    )
    name: str = _help("Adapter name; '' = 'teacher_' + the tasks joined by '_'.", "")

    @property
    def adapter(self) -> str:
        """The adapter name this teacher is loaded under."""
        return self.name or "teacher_" + "_".join(self.tasks)

    def validate(self) -> None:
        if not self.path:
            raise UserError("every teacher needs a path (a LoRA directory); set teachers.N.path")
        if not self.tasks:
            raise UserError(f"teacher '{self.path}' serves no task; set its tasks: [TASK, ...]")
        if not _ADAPTER_NAME.match(self.adapter) or self.adapter in RESERVED_ADAPTERS:
            raise UserError(
                f"teacher name '{self.adapter}' is not a valid adapter name: use letters, "
                f"digits, '_' or '-', and none of {', '.join(RESERVED_ADAPTERS)}"
            )
        import torch.nn  # lazy: only names that shadow nn.Module attributes need it

        if hasattr(torch.nn.Module, self.adapter):
            raise UserError(
                f"teacher name '{self.adapter}' shadows a torch.nn.Module attribute (peft "
                "stores adapters as module attributes); choose another name"
            )
        check_lora_path(self.path, f"teacher '{self.adapter}'")


def teacher_table(teachers: list[TeacherConfig], where: str = "opd.teachers") -> dict[str, str]:
    """``{task: adapter name}`` of a teachers list; UserError on duplicates.

    Checks that adapter names are unique and that each task has exactly one teacher.
    """
    if not teachers:
        raise UserError(f"{where} is empty: give at least one teacher {{path: DIR, tasks: [T]}}")
    names = [t.adapter for t in teachers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{where}: adapter name '{dup[0]}' is used twice; give each a name")
    table: dict[str, str] = {}
    for t in teachers:
        for task in t.tasks:
            if task in table:
                raise UserError(
                    f"{where}: task '{task}' is served by both '{table[task]}' and "
                    f"'{t.adapter}'; routing is hard, give each task one teacher"
                )
            table[task] = t.adapter
    return table


@dataclass
class OPDSection:
    """Flow-OPD: routed teachers, anchor (MAR), loss, PPO clip, trained steps, student init."""

    teachers: list[TeacherConfig] = _help(
        "Teachers, one LoRA per task: [{path: DIR, tasks: [TASK, ...], name: ''}, ...].",
        factory=list,
    )
    anchor: str = _help(
        "MAR anchor: a LoRA directory (a task-agnostic quality/preference teacher; may be "
        "one of the teachers' paths) or '' = the base model.",
        "",
    )
    mode: Literal["ppo", "ppo_attached", "gkd"] = _help(
        "Loss: 'ppo' (the paper: detached advantage -KL in the clipped surrogate), "
        "'ppo_attached' (the public code: the advantage keeps its gradient), 'gkd' "
        "(pure per-step reverse-KL regression).",
        "ppo",
    )
    mar_lambda: float = _help(
        "MAR strength lambda (0.04 = the public configs, 0.02 = the paper; 0 = off, no "
        "anchor forward).",
        0.04,
    )
    init: str = _help(
        "Student cold start: a LoRA directory (`flowopd merge` or `flowopd train sft` "
        "output; its own rank/alpha are kept, model.lora is not used) or '' = a fresh "
        "Gaussian LoRA from model.lora (starts at the base).",
        "",
    )
    routing_key: str = _help("Record key whose value routes a prompt to its teacher.", "task")
    mix: Literal["batch", "epoch"] = _help(
        "With data.datasets: 'batch' draws every epoch's prompts from all datasets in "
        "data.mix_ratio proportions (the paper's mixed batches); 'epoch' alternates "
        "datasets by epoch like GRPO-Mix.",
        "batch",
    )
    fused_forward: bool = _help(
        "Compute the routed teachers' and the anchor's velocities in one batched forward "
        "(2B rows) instead of two.",
        True,
    )
    clip_range: float = _help("PPO ratio clip eps of the PPO modes.", 1e-4)
    timestep_fraction: float = timestep_fraction_field()

    def teacher_of(self) -> dict[str, str]:
        """``{task: teacher adapter name}``."""
        return teacher_table(self.teachers)

    def validate(self) -> None:
        self.teacher_of()
        check_timestep_fraction(self.timestep_fraction, "opd.timestep_fraction")
        check_clip_range(self.clip_range, "opd.clip_range")
        if self.mar_lambda < 0:
            raise UserError(f"opd.mar_lambda must be >= 0, got {self.mar_lambda}")
        if self.anchor:
            check_lora_path(self.anchor, "opd.anchor")
        if self.init:
            check_lora_path(self.init, "opd.init")
        if not self.routing_key:
            raise UserError("opd.routing_key is empty; records are routed by it (e.g. task)")


@dataclass
class OPDTrainConfig(RolloutOptimConfig):
    """Optimisation: AdamW on the student LoRA; adv_clip clips the advantage -KL of the
    PPO modes."""

    lr: float = _help("AdamW learning rate (the Flow-OPD paper: 1e-4).", 1e-4)


@dataclass
class OPDOutputConfig(OutputConfig):
    """Where the run writes config.yaml, log.jsonl, tensorboard/, checkpoints/, lora/."""

    dir: str = _help("Output directory of the run.", "runs/opd")


@dataclass
class OPDConfig(RolloutRunConfig):
    """A Flow-OPD run (the paper's SD3.5-M defaults of METHODS.md §3)."""

    _moved: ClassVar[dict[str, str]] = {
        "train.clip_range": "moved to opd.clip_range",
        "train.timestep_fraction": "moved to opd.timestep_fraction",
        "train.beta_kl": "is Flow-GRPO's KL to the base, not an OPD setting: remove it; OPD's "
        "regulariser is opd.mar_lambda (MAR, anchored to the base by default)",
        "train.kl_form": "is a Flow-GRPO setting that OPD does not use; remove it",
        "train.adv_std": "is a Flow-GRPO setting that OPD does not use; remove it",
    }

    reward: RewardConfig = _help("Reward (logged only; may be empty).", factory=RewardConfig)
    train: OPDTrainConfig = _help("Optimisation.", factory=OPDTrainConfig)
    output: OPDOutputConfig = _help("Outputs.", factory=OPDOutputConfig)
    opd: OPDSection = _help("Teachers, anchor, loss (METHODS.md §3).", factory=OPDSection)

    @property
    def trained_steps(self) -> int:
        """Denoising steps trained per trajectory (window size, else 10 x 0.99 -> 9)."""
        return trained_steps(self.sample, self.opd.timestep_fraction)

    @property
    def has_reward(self) -> bool:
        """True when rewards are configured (then computed for logging only)."""
        return self.reward.mode != "none" or any(d.reward for d in self.data.datasets)

    def check_rewards(self) -> None:
        # Rewards only feed the logs in OPD, so none at all is fine; any that is given is
        # checked as GRPO checks it.
        if self.has_reward or self.reward.options:
            check_rewards(self.reward, self.data)

    def check_method(self) -> None:
        check_trained_steps(self.sample, self.opd.timestep_fraction, "opd.timestep_fraction")
        if self.sample.kind != "sde":
            raise UserError(
                f"sample.kind={self.sample.kind}: OPD's closed-form step KL is derived for "
                "the Flow-GRPO SDE; set sample.kind=sde"
            )
