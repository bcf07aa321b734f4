"""Config of the Flow-OPD pipeline: teachers -> GRPO-Mix -> cold start -> OPD -> eval -> report."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from flowopd.algos import TEACHER_ALGOS
from flowopd.config.sections import check_benchmarks, check_min
from flowopd.config.sections import help_field as _help
from flowopd.errors import UserError


@dataclass
class StageConfig:
    """One training stage: a recipe config file plus key=value overrides."""

    config: str = _help("YAML config of the stage's recipe.", "")
    overrides: list[str] = _help("key=value overrides applied after the file.", factory=list)


@dataclass
class TeacherStage(StageConfig):
    """A single-reward teacher for one task, trained by any single-reward method."""

    task: str = _help("Task label this teacher serves (the prompts' 'task').", "")
    algo: str = _help(
        "Method that trains this teacher: " + ", ".join(TEACHER_ALGOS) + " (config: its "
        "recipe's YAML).",
        "grpo",
    )


@dataclass
class ColdStartConfig:
    method: Literal["merge", "sft", "none"] = _help(
        "Student initialisation: merge the teachers' LoRAs, SFT on teacher samples, or none.",
        "merge",
    )
    merge_method: Literal["ab_mean", "delta", "sum"] = _help(
        "ab_mean averages lora_A and lora_B separately (published code); delta averages B·A "
        "and re-factorises it (exact up to the rank); sum adds every teacher's whole B·A "
        "(task arithmetic, at the sum of their ranks).",
        "ab_mean",
    )
    sft: StageConfig = _help("The SFT stage (when method is sft).", factory=StageConfig)


@dataclass
class PipelineEval:
    benchmarks: list[str] = _help(
        "Benchmarks of the report's columns.",
        factory=lambda: ["toy-geneval", "toy-ocr", "toy-quality"],
    )
    n: int | None = _help("Prompts per benchmark (null: each benchmark's default).", None)
    steps: int = _help("ODE steps (40 as in the papers).", 40)
    guidance_scale: float | None = _help(
        "CFG scale at evaluation; null = the model's own (its flowopd.json, else 4.5).", None
    )
    batch_size: int = _help("Evaluation batch.", 60)
    seed: int = _help("Noise seed of the evaluation.", 0)

    def validate(self) -> None:
        check_min(self, "eval", ("steps", "batch_size"), 1)
        if self.seed < 0:
            raise UserError(f"eval.seed must be >= 0, got {self.seed}")
        if self.n is not None and self.n < 1:
            raise UserError(f"eval.n must be >= 1 (or null), got {self.n}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise UserError(
                f"eval.guidance_scale must be >= 0 (or null), got {self.guidance_scale}"
            )
        check_benchmarks(self.benchmarks, key="eval.benchmarks")


@dataclass
class PipelineClaims:
    """The bars of the report's claims (``flowopd.eval.claims``; defaults: the paper's)."""

    gain: float = _help("Seesaw: each teacher's least gain over the base on its task.", 0.2)
    leak: float = _help("Seesaw: each teacher's largest gain on the other tasks.", 0.05)
    tolerance: float = _help("The student's largest shortfall from each teacher.", 0.02)
    quality_margin: float = _help("MAR: the least toy-quality gain that is not a tie.", 0.005)
    z: float = _help("Standard errors an ordering claim must clear.", 2.0)

    def validate(self) -> None:
        check_min(self, "claims", ("leak", "tolerance", "quality_margin", "z"), 0)


@dataclass
class PipelineConfig:
    """The whole Flow-OPD experiment of METHODS.md §3 as one idempotent command."""

    out: str = _help("Output directory; finished stages found there are skipped.", "runs/flow_opd")
    model: str = _help("Base model for every stage ('embedded' = the shipped model).", "embedded")
    seed: int = _help("Training seed of every stage (train.seed).", 0)
    seeds: list[int] = _help(
        "Run the whole pipeline once per seed (in out/seed_<s>/) and report mean +- std over "
        "them in out/report/; empty: one run with `seed`, in out/ itself.",
        factory=list,
    )
    teachers: list[TeacherStage] = _help(
        "One teacher per task: {task, algo (grpo, crd, nft, awm), config}.", factory=list
    )
    teacher_jobs: int = _help(
        "Teachers trained at once, each in its own process with an equal share of the "
        "threads (one machine, no torchrun); the base's and finished teachers' evaluations "
        "take the slot of a teacher that ends first; 1 = one after another.",
        1,
    )
    processes: int = _help(
        "Processes on this machine that run every stage and evaluation together, "
        "data-parallel, each with an equal share of the cores (`flowopd pipeline` starts "
        "them; at most one per core); ignored under torchrun, which starts its own.",
        1,
    )
    mix: StageConfig = _help("The GRPO-Mix baseline (empty config: skipped).", factory=StageConfig)
    cold_start: ColdStartConfig = _help("Student initialisation.", factory=ColdStartConfig)
    opd: StageConfig = _help("The Flow-OPD distillation stage.", factory=StageConfig)
    mar_ablation: bool = _help("Also distil without MAR (opd.mar_lambda=0) for comparison.", False)
    demo_overrides: list[str] = _help(
        "Overrides added to every training stage with --budget demo (e.g. train.epochs=4).",
        factory=list,
    )
    demo_eval_n: int = _help("Prompts per benchmark at evaluation with --budget demo.", 30)
    eval: PipelineEval = _help("Evaluation of every model.", factory=PipelineEval)
    claims: PipelineClaims = _help("Bars of the report's claims.", factory=PipelineClaims)

    def validate(self) -> None:
        if self.seed < 0 or any(s < 0 for s in self.seeds):
            raise UserError(f"seed and seeds must be >= 0, got {self.seed} and {self.seeds}")
        if self.teacher_jobs < 1:
            raise UserError(f"teacher_jobs must be >= 1, got {self.teacher_jobs}")
        if self.processes < 1:
            raise UserError(f"processes must be >= 1, got {self.processes}")
        if self.processes > 1 and self.teacher_jobs > 1:
            raise UserError(
                f"processes={self.processes} trains every stage on all processes; "
                "set teacher_jobs=1 (or processes=1 to train teachers side by side)"
            )
        if self.teacher_jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "teacher_jobs > 1 trains teachers in their own processes on one machine; "
                "under torchrun set teacher_jobs=1 (every process trains each teacher)"
            )
        if self.demo_eval_n < 1:
            raise UserError(f"demo_eval_n must be >= 1, got {self.demo_eval_n}")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds repeat a value: {self.seeds}; give each seed once")
        if not self.teachers:
            raise UserError(
                "pipeline needs at least one teacher: teachers: [{task: ..., config: ...}]"
            )
        tasks = [t.task for t in self.teachers]
        if any(not t for t in tasks) or len(set(tasks)) != len(tasks):
            raise UserError(f"each teacher needs a distinct task label, got {tasks}")
        for i, t in enumerate(self.teachers):
            if t.algo not in TEACHER_ALGOS:
                raise UserError(
                    f"teachers.{i}.algo={t.algo!r} cannot train a teacher; choose from "
                    f"{', '.join(TEACHER_ALGOS)}"
                )
            if not t.config:
                raise UserError(
                    f"teachers.{i}.config is empty: give the {t.algo} config of the "
                    f"'{t.task}' teacher"
                )
        if not self.opd.config:
            raise UserError("opd.config is empty: give the OPD config of the distillation stage")
        if self.cold_start.method == "sft" and not self.cold_start.sft.config:
            raise UserError("cold_start.method=sft needs cold_start.sft.config")
