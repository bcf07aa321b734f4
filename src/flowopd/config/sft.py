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
    OptimConfig,
    OutputConfig,
    check_full_finetune,
    check_min,
)
from flowopd.config.sections import help_field as _help
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
        names = ("num_prompts", "images_per_prompt", "num_steps", "eval_num_steps")
        check_min(self, "sample", names, 1)
        if self.batch_size < 1:
            raise UserError(f"sample.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SFTTrainConfig(OptimConfig):
    """Optimisation: AdamW on the student LoRA with the flow-matching loss; the shared
    settings plus the minibatch and the training-time distribution."""

    lr: float = _help("AdamW learning rate.", 1e-4)
    epochs: int = _help("Passes over the teachers' samples.", 20)
    ema_every: int = _help("Update the EMA every this many optimizer steps.", 1)
    batch_size: int = _help("Training minibatch (images) per process.", 16)
    gradient_accumulation: int = _help("Minibatches per optimizer step.", 1)
    sigma_sampling: Literal["logit_normal", "uniform"] = _help(
        "Training-time distribution of t (before the shift): SD3's logit-normal or uniform.",
        "logit_normal",
    )
    sigma_shift: float = _help("SD3 time shift of the training t (3.0 = SD3.5; 1 = none).", 3.0)

    def validate(self) -> None:
        super().validate()
        check_min(self, "train", ("batch_size", "gradient_accumulation"), 1)
        if self.sigma_shift <= 0:
            raise UserError(f"train.sigma_shift must be > 0, got {self.sigma_shift}")


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
        check_full_finetune(self.model, "SFT")
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
