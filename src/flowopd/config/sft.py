"""The SFT cold-start config: teachers' samples, then flow-matching fine-tuning.

Flow-OPD's second cold start (METHODS.md §3.2): each training prompt is sent to its
task's teacher (hard routing, as in OPD), the teachers sample images with the ODE and
CFG, and a fresh student LoRA is fine-tuned on them with the supervised flow-matching
loss. The result (``OUT/lora``) is what ``opd.init`` expects.

Reuses GRPO's model / data / eval / output sections and OPD's teacher entries.

How the data is laid out: ``sample.num_prompts`` prompts are drawn once (mixed over
``data.datasets`` in ``data.mix_ratio`` proportions), each of the W processes takes
``num_prompts / W`` of them and samples ``images_per_prompt`` images for each; an epoch
is one pass over a process's images in minibatches of ``train.batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flowopd.config.layout import divisors as _divisors
from flowopd.config.opd import TeacherConfig, teacher_table
from flowopd.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
)
from flowopd.config.sections import (
    help_field as _help,
)
from flowopd.errors import UserError

__all__ = ["SFTSection", "SFTSampleConfig", "SFTTrainConfig", "SFTOutputConfig", "SFTConfig"]


@dataclass
class SFTSection:
    """The teachers whose samples the student imitates."""

    teachers: list[TeacherConfig] = _help(
        "Teachers, one LoRA per task: [{path: DIR, tasks: [TASK, ...], name: ''}, ...].",
        factory=list,
    )
    routing_key: str = _help("Record key whose value routes a prompt to its teacher.", "task")

    def teacher_of(self) -> dict[str, str]:
        """``{task: teacher adapter name}``."""
        return teacher_table(self.teachers, "sft.teachers")

    def validate(self) -> None:
        self.teacher_of()
        if not self.routing_key:
            raise UserError("sft.routing_key is empty; records are routed by it (e.g. task)")


@dataclass
class SFTSampleConfig:
    """The teachers' samples (drawn once, with the deterministic ODE and CFG)."""

    num_prompts: int = _help("Training prompts, over all processes.", 256)
    images_per_prompt: int = _help("Teacher images per prompt.", 4)
    num_steps: int = _help("ODE steps of the teachers' sampling.", 40)
    eval_num_steps: int = _help("ODE steps for evaluation.", 40)
    batch_size: int = _help("Sampling micro-batch (images) per process.", 16)

    def validate(self) -> None:
        for name in ("num_prompts", "images_per_prompt", "num_steps", "eval_num_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise UserError(f"sample.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SFTTrainConfig:
    """Optimisation: AdamW on the student LoRA with the flow-matching loss."""

    lr: float = _help("AdamW learning rate.", 1e-4)
    betas: tuple[float, float] = _help("AdamW betas.", (0.9, 0.999))
    weight_decay: float = _help("AdamW weight decay.", 1e-4)
    max_grad_norm: float = _help("Gradient-norm clip (0 = off).", 1.0)
    epochs: int = _help("Passes over the teachers' samples.", 20)
    batch_size: int = _help("Training minibatch (images) per process.", 16)
    gradient_accumulation: int = _help("Minibatches per optimizer step.", 1)
    sigma_sampling: Literal["logit_normal", "uniform"] = _help(
        "Training-time distribution of t (before the shift): SD3's logit-normal or uniform.",
        "logit_normal",
    )
    sigma_shift: float = _help("SD3 time shift of the training t (3.0 = SD3.5; 1 = none).", 3.0)
    ema: bool = _help("Keep an EMA of the LoRA weights; evaluate and save it.", True)
    ema_decay: float = _help("EMA decay cap: decay = min((1 + s) / (10 + s), ema_decay).", 0.9)
    ema_every: int = _help("Update the EMA every this many optimizer steps.", 1)
    max_nonfinite: int = _help(
        "Abort after this many consecutive optimizer steps with a non-finite loss or grad.", 3
    )
    seed: int = _help("Random seed (prompts, teacher noise, training noise, shuffling).", 42)
    adamw_8bit: bool = _help(
        "AdamW with 8-bit states (bitsandbytes, CUDA only); falls back to torch AdamW "
        "with a warning when unavailable.",
        False,
    )

    def validate(self) -> None:
        if self.lr <= 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "gradient_accumulation", "ema_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise UserError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.sigma_shift <= 0:
            raise UserError(f"train.sigma_shift must be > 0, got {self.sigma_shift}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"train.betas must lie in [0, 1), got {list(self.betas)}")
        if self.seed < 0:
            raise UserError(f"train.seed must be >= 0, got {self.seed}")


@dataclass
class SFTOutputConfig(OutputConfig):
    """Where the run writes config.yaml, log.jsonl, sft_data/, checkpoints/, lora/."""

    dir: str = _help("Output directory of the run.", "runs/sft")


@dataclass
class SFTConfig:
    """An SFT cold start: flow-matching fine-tuning on the routed teachers' samples."""

    model: ModelConfig = _help("Base model and the student LoRA.", factory=ModelConfig)
    data: DataConfig = _help("Prompt datasets (records carry their task).", factory=DataConfig)
    sft: SFTSection = _help("Teachers.", factory=SFTSection)
    sample: SFTSampleConfig = _help("Teachers' samples.", factory=SFTSampleConfig)
    train: SFTTrainConfig = _help("Optimisation.", factory=SFTTrainConfig)
    eval: EvalConfig = _help("Evaluation.", factory=EvalConfig)
    output: SFTOutputConfig = _help("Outputs.", factory=SFTOutputConfig)

    def prompts_per_process(self, world_size: int = 1) -> int:
        return self.sample.num_prompts // world_size

    def images_per_process(self, world_size: int = 1) -> int:
        return self.prompts_per_process(world_size) * self.sample.images_per_prompt

    def validate(self) -> None:
        self.eval.resolved_benchmarks(self.data.test)
        self.check_distributed(1)

    def check_distributed(self, world_size: int) -> None:
        """UserError unless W divides sample.num_prompts and train.batch_size divides the
        images per process (so every process makes the same number of optimizer steps)."""
        P, W = self.sample.num_prompts, world_size
        if P % W:
            raise UserError(
                f"sample.num_prompts={P} must be divisible by the number of processes ({W})"
            )
        n = self.images_per_process(W)
        if n % self.train.batch_size:
            raise UserError(
                f"train.batch_size={self.train.batch_size} must divide the images each process "
                f"trains on, num_prompts / processes x images_per_prompt = {n}; choose one of "
                f"{_divisors(n)}"
            )
