"""The config sections the algorithms' configs share, with the paper's SD3.5-M defaults.

Defaults follow METHODS.md §2 (SD3.5-M): LoRA r=32/alpha=64 on attention and context
projections, 10 SDE steps at noise level 0.7 with 9 trained, 40-step ODE evaluation,
48 prompts x 24 images per epoch, AdamW 3e-4, clip 1e-4, KL beta 0.04, EMA for eval.
Each algorithm's config (``flowopd.config.grpo`` / ``opd`` / ``crd`` / ``sft``) composes
these sections with its own method section.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from flowopd.errors import UserError, unknown
from flowopd.lora_targets import FLUX_TARGETS, SD3_ATTN2_TARGETS, SD3_TARGETS

__all__ = [
    "LoRAConfig",
    "ModelConfig",
    "DatasetConfig",
    "DataConfig",
    "RewardConfig",
    "SampleConfig",
    "OptimConfig",
    "RolloutOptimConfig",
    "trained_steps",
    "check_trained_steps",
    "check_timestep_fraction",
    "check_clip_range",
    "advantage_std_field",
    "timestep_fraction_field",
    "EvalConfig",
    "OutputConfig",
    "SD3_LORA_TARGETS",
    "check_benchmarks",
    "check_rewards",
    "check_min",
    "check_full_finetune",
    "help_field",
]

# Flow-GRPO's targets: the joint attention's image-stream q/k/v/out and text (context)
# stream projections, ``attn`` only (models/adapters.py says why the prefix matters).
SD3_LORA_TARGETS = list(SD3_TARGETS)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def help_field(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def check_full_finetune(model: ModelConfig, algo: str) -> None:
    """UserError when ``model.finetune=full`` is set for an algorithm that keeps its extra
    networks (anchor, teachers, snapshots, students) as LoRA adapters on one base."""
    if model.finetune == "full":
        raise UserError(
            f"model.finetune=full is supported for GRPO only so far ({algo} keeps its extra "
            "networks as LoRA adapters on the shared base); use model.finetune=lora"
        )


def check_min(
    section: Any, prefix: str, names: Sequence[str], lo: float, *, strict: bool = False
) -> None:
    """UserError unless each named field of ``section`` is >= ``lo`` (> ``lo`` when
    ``strict``): ``check_min(t, "train", ["ema_every"], 1)`` -> ``train.ema_every must be
    >= 1, got 0``."""
    for name in names:
        value = getattr(section, name)
        if value <= lo if strict else value < lo:
            raise UserError(f"{prefix}.{name} must be {'>' if strict else '>='} {lo}, got {value}")


# --------------------------------------------------------------------------------------
# sections


@dataclass
class LoRAConfig:
    """LoRA adapter trained on the transformer."""

    rank: int = help_field("LoRA rank r.", 32)
    alpha: float = help_field("LoRA alpha; the update is scaled by alpha / rank.", 64.0)
    target_modules: list[str] = help_field(
        "Module names (matched as dotted suffixes) that get an adapter. Default: "
        "Flow-GRPO's, the joint attention's q/k/v/out and context projections "
        f"({', '.join(SD3_TARGETS)}), not attn2 of SD3.5-M's dual-attention blocks "
        "(18.8 M parameters at rank 32 on SD3.5-M). To adapt attn2 too, add "
        f"{', '.join(SD3_ATTN2_TARGETS)} (23.9 M). With model.backend=flux this default "
        "becomes Flow-GRPO's FLUX list: the same attention names plus both MLPs of the "
        "double-stream blocks (" + ", ".join(FLUX_TARGETS[8:]) + ").",
        factory=lambda: list(SD3_LORA_TARGETS),
    )
    init: Literal["gaussian", "default"] = help_field(
        "Initialisation of A ('gaussian' as in Flow-GRPO, 'default' = peft's Kaiming "
        "uniform); B starts at 0 either way, so the policy starts exactly at the base.",
        "gaussian",
    )

    def validate(self) -> None:
        if self.rank < 1:
            raise UserError(f"model.lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise UserError("model.lora.target_modules is empty: name at least one module")


@dataclass
class ModelConfig:
    """The base model and its adapter."""

    path: str = help_field(
        "Base model: a local diffusers pipeline directory, a hub id 'org/name', or "
        "'embedded' (the shipped model). Required.",
        "",
    )
    backend: str = help_field(
        "Model backend (one file in flowopd/models): 'sd3' (SD3 / SD3.5) or 'flux' (FLUX.1 "
        "dev / schnell; the guidance scale is FLUX.1-dev's distilled guidance embedding, one "
        "forward per step, no CFG pair).",
        "sd3",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = help_field(
        "Dtype of the frozen base weights and of autocast; LoRA weights and the SDE math "
        "stay float32.",
        "bfloat16",
    )
    resolution: int | None = help_field(
        "Image side in pixels; null = the model's default (the paper trains SD3.5-M at 512).",
        None,
    )
    guidance_scale: float = help_field(
        "Classifier-free guidance w in v_u + w (v_c - v_u), for sampling and training.", 4.5
    )
    max_sequence_length: int | None = help_field(
        "T5 tokens per prompt; null = the backend's default (SD3 256, FLUX 512, as "
        "diffusers' pipelines). Flow-GRPO encodes with 128: fewer tokens, faster steps.",
        None,
    )
    lora: LoRAConfig = help_field("LoRA adapter.", factory=LoRAConfig)
    finetune: Literal["lora", "full"] = help_field(
        "What trains: 'lora' = a LoRA adapter on the frozen base (model.lora; processes "
        "average gradients like DDP); 'full' = the transformer's own weights (float32 "
        "master weights, sharded with FSDP2 over the torchrun processes; the KL reference is "
        "a frozen sharded copy of the base; saves OUT/transformer). GRPO only so far.",
        "lora",
    )
    gradient_checkpointing: bool = help_field(
        "Recompute each transformer block in the backward instead of keeping its "
        "activations (~20 d values per token per block): activations shrink ~10x for ~1 "
        "extra forward per training step. Not combinable with per-sample adapter routing "
        "under gradients; the active adapter must not change between a forward with "
        "gradients and its backward (the re-run uses the state at backward time).",
        False,
    )
    compile: bool = help_field(
        "torch.compile the transformer (in place). Compiles on the first steps and again "
        "on new shapes or adapters; gains depend on GPU and torch version.",
        False,
    )
    cfg_forward: Literal["batched", "split"] = help_field(
        "How the CFG pair [negative, positive] runs, the same in sampling, training and "
        "evaluation (so the first ratio is still 1): 'batched' = one forward of 2B rows, as "
        "diffusers and Flow-GRPO; 'split' = two forwards of B rows, and with "
        "train.cfg_grad=cond the unconditional one runs without autograd: the backward "
        "covers B rows instead of 2B and keeps half the activations, for the same gradient "
        "(bench/cfg_train_time.py: training phase 0.76-0.80x on the embedded model, CPU).",
        "batched",
    )
    offload_text_encoders: bool = help_field(
        "Keep the text encoders (SD3: CLIP-L, CLIP-G, T5-XXL, ~22 GB in float32) on the "
        "CPU and move them to the device only while encoding prompts.",
        False,
    )

    def validate(self) -> None:
        if self.max_sequence_length is not None:
            check_min(self, "model", ["max_sequence_length"], 1)
        if not self.path:
            raise UserError(
                "missing model path: set model.path=DIR (a diffusers pipeline directory) "
                "or a hub id like model.path=stabilityai/stable-diffusion-3.5-medium"
            )
        local = Path(self.path).expanduser()
        if self.path == "embedded":  # the shipped base model
            from flowopd.paths import default_model

            default_model()  # a clear error when this install lacks it
        elif local.exists():
            if not local.is_dir():
                raise UserError(
                    f"model.path '{self.path}' is a file; pass the pipeline directory "
                    "(the one holding model_index.json)"
                )
        elif not _HUB_ID.match(self.path):
            raise UserError(
                f"model.path '{self.path}' does not exist and is not a hub id 'org/name'; "
                "fix the path"
            )
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(
                f"model.resolution must be a positive multiple of 8, got {self.resolution}"
            )
        if self.guidance_scale < 0:
            raise UserError(f"model.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.backend == "flux" and list(self.lora.target_modules) == SD3_LORA_TARGETS:
            # the field's default is SD3's list; FLUX's default is Flow-GRPO's FLUX list
            self.lora.target_modules = list(FLUX_TARGETS)


@dataclass
class DatasetConfig:
    """One prompt dataset of a GRPO-Mix run."""

    path: str = help_field(
        "Prompt file: GenEval metadata JSONL, OCR or plain prompt .txt, or JSONL of prompt "
        "records ({prompt, task, ...}); records without a task get this entry's reward name.",
        "",
    )
    reward: str = help_field("Reward scoring this dataset's prompts; '' = the reward section.", "")
    name: str = help_field("Label in logs; '' = the file name without extension.", "")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem

    def validate(self) -> None:
        if not self.path:
            raise UserError("every entry of data.datasets needs a path (JSONL of prompts)")


@dataclass
class DataConfig:
    """Prompt datasets, in the published formats (``flowopd.data.prompts``): GenEval metadata
    JSONL, OCR prompt .txt (target in double quotes), plain prompt .txt, prompt-record JSONL."""

    train: str = help_field(
        "Training prompts (GenEval metadata JSONL, OCR or plain prompt .txt, prompt-record "
        "JSONL). Leave empty when data.datasets is used.",
        "",
    )
    datasets: list[DatasetConfig] = help_field(
        "GRPO-Mix: several prompt datasets, each with its own reward; epochs alternate "
        "between them in data.mix_ratio.",
        factory=list,
    )
    mix_ratio: list[int] = help_field(
        "Epochs per dataset in one cycle of data.datasets, e.g. [3, 1, 1] "
        "(empty = one epoch each).",
        factory=list,
    )
    test: str = help_field("Evaluation prompts (JSONL); '' = no evaluation set.", "")

    def validate(self) -> None:
        if self.train and self.datasets:
            raise UserError(
                "set either data.train (one dataset) or data.datasets (GRPO-Mix), not both"
            )
        if not self.train and not self.datasets:
            raise UserError(
                "missing training prompts: set data.train=PATH.jsonl "
                "(or data.datasets for GRPO-Mix)"
            )
        if self.mix_ratio:
            if not self.datasets:
                raise UserError("data.mix_ratio needs data.datasets (GRPO-Mix); remove it")
            if len(self.mix_ratio) != len(self.datasets):
                raise UserError(
                    f"data.mix_ratio has {len(self.mix_ratio)} entries for "
                    f"{len(self.datasets)} datasets; give one positive integer per dataset"
                )
            if any(r < 1 for r in self.mix_ratio):
                raise UserError(f"data.mix_ratio entries must be >= 1, got {self.mix_ratio}")
        for p in [self.train, self.test, *(d.path for d in self.datasets)]:
            if p.startswith("world:"):  # the embedded world's prompts, generated in memory
                from flowopd.world.prompts import TASKS

                if p[len("world:") :] not in TASKS:
                    raise unknown("world task", p[len("world:") :], TASKS)
                continue
            if p and not Path(p).expanduser().is_file():
                raise UserError(f"prompt file '{p}' not found; fix the data.* path")

    def epoch_schedule(self) -> list[int]:
        """Dataset index of each epoch in one cycle: ratio [3, 1] -> [0, 0, 0, 1]."""
        if not self.datasets:
            return [0]
        ratio = self.mix_ratio or [1] * len(self.datasets)
        return [i for i, r in enumerate(ratio) for _ in range(r)]

    def dataset_for_epoch(self, epoch: int) -> int:
        """Index into ``datasets`` trained in ``epoch`` (0 for a single dataset)."""
        cycle = self.epoch_schedule()
        return cycle[epoch % len(cycle)]


@dataclass
class RewardConfig:
    """The reward: one name, a weighted sum {name: weight}, or task routing {task: name}.

    ``reward: ocr`` in YAML is short for ``reward: {name: ocr}``.
    """

    _shorthand: ClassVar[str] = "name"

    name: str = help_field("A single registered reward.", "")
    weights: dict[str, float] = help_field(
        "Weighted sum of rewards {name: weight} (GRPO-Mix by reward mixing).", factory=dict
    )
    routing: dict[str, str] = help_field(
        "Per-task reward {task: name}: each prompt is scored by its record's task's reward.",
        factory=dict,
    )
    options: dict[str, dict[str, Any]] = help_field(
        "Factory options per reward name, e.g. {pickscore: {model_path: DIR}}.", factory=dict
    )

    @property
    def mode(self) -> Literal["single", "weighted", "routed", "none"]:
        if self.name:
            return "single"
        if self.weights:
            return "weighted"
        if self.routing:
            return "routed"
        return "none"

    def names(self) -> list[str]:
        """Every reward name this section uses, in order of appearance."""
        out = [self.name] if self.name else []
        out += list(self.weights) + list(self.routing.values())
        return list(dict.fromkeys(out))

    def validate(self) -> None:
        given = [k for k in ("name", "weights", "routing") if getattr(self, k)]
        if len(given) > 1:
            raise UserError(
                f"reward: set only one of reward.name, reward.weights, reward.routing "
                f"(got {', '.join('reward.' + k for k in given)})"
            )
        # Registry names are checked in GRPOConfig.validate, together with data.datasets.


@dataclass
class SampleConfig:
    """Rollouts: the stochastic sampler and the epoch's size."""

    num_steps: int = help_field("Denoising steps of training rollouts.", 10)
    eval_num_steps: int = help_field("ODE steps for evaluation (noise level 0).", 40)
    noise_level: float = help_field("SDE noise level a (sigma_t = a sqrt(t / (1 - t))).", 0.7)
    kind: Literal["sde", "cps"] = help_field(
        "Stochastic step: Flow-GRPO SDE, or coefficients-preserving sampling (use "
        "grpo.clip_range=1e-5 with cps).",
        "sde",
    )
    sde_window_size: int = help_field(
        "Flow-GRPO-Fast: only this many consecutive steps are stochastic and trained "
        "(0 = off: every step is stochastic).",
        0,
    )
    sde_window_range: tuple[int, int] = help_field(
        "Flow-GRPO-Fast: the window's steps lie in [start, end) of this range; its start "
        "is drawn per sampling call.",
        (0, 5),
    )
    group_size: int = help_field("Images per prompt G (the paper: 24; <= 12 was unstable).", 24)
    same_initial_noise: bool = help_field(
        "All images of a prompt start from the same initial noise x_T (DanceGRPO), so the "
        "reward differences within a group come only from the SDE steps, the actions the "
        "policy gradient credits. Off: Flow-GRPO (one x_T per image).",
        False,
    )
    antithetic: bool = help_field(
        "Images 2k and 2k + 1 of a group are an antithetic pair: one x_T and mirrored SDE "
        "noise (eps, -eps), which cancels the even-order noise terms in the policy "
        "gradient (as in evolution strategies). Needs an even group_size.",
        False,
    )
    prompts_per_epoch: int = help_field("Distinct prompts per epoch, over all processes.", 48)
    batch_size: int = help_field("Sampling micro-batch (images) per process.", 24)

    def _ode_allowed(self) -> bool:
        """True when this section's kind accepts 'ode' (CRD's; GRPO needs a stochastic step)."""
        import typing

        return "ode" in typing.get_args(typing.get_type_hints(type(self))["kind"])

    def validate(self) -> None:
        if self.num_steps < 1 or self.eval_num_steps < 1:
            raise UserError("sample.num_steps and sample.eval_num_steps must be >= 1")
        if self.noise_level < 0:
            raise UserError(f"sample.noise_level must be >= 0, got {self.noise_level}")
        if self.group_size < 2:
            raise UserError(
                f"sample.group_size must be >= 2 (advantages compare images of one prompt), "
                f"got {self.group_size}; the paper uses 24"
            )
        if self.prompts_per_epoch < 1:
            raise UserError(f"sample.prompts_per_epoch must be >= 1, got {self.prompts_per_epoch}")
        if self.batch_size < 1:
            raise UserError(f"sample.batch_size must be >= 1, got {self.batch_size}")
        deterministic = self.kind == "ode" or self.noise_level == 0
        for name in ("same_initial_noise", "antithetic"):
            if getattr(self, name) and deterministic:
                raise UserError(
                    f"sample.{name}=true needs stochastic steps (kind sde or cps, noise_level "
                    "> 0): with a shared x_T a deterministic sampler gives identical images "
                    "per group"
                )
        if self.kind != "ode" and self.noise_level == 0:
            raise UserError(
                f"sample.noise_level=0 makes the '{self.kind}' sampler deterministic: its steps "
                "have std 0 and no log-probability to train on; set sample.noise_level > 0 "
                "(the paper: 0.7)" + (" or sample.kind=ode" if self._ode_allowed() else "")
            )
        if self.kind == "cps" and self.noise_level > 1:
            raise UserError(
                f"sample.noise_level={self.noise_level} with sample.kind=cps: CPS's std is "
                "sigma_next sin(a pi / 2), so a must lie in (0, 1]; lower it"
            )
        if self.antithetic and self.group_size % 2:
            raise UserError(
                f"sample.antithetic=true pairs the images of a group: sample.group_size must "
                f"be even, got {self.group_size}"
            )
        if self.sde_window_size < 0:
            raise UserError("sample.sde_window_size must be >= 0 (0 = off)")
        lo, hi = self.sde_window_range
        if not 0 <= lo < hi:
            raise UserError(
                f"sample.sde_window_range {list(self.sde_window_range)} must satisfy "
                "0 <= start < end"
            )
        if self.sde_window_size:
            lo, hi = self.sde_window_range
            if not 0 <= lo < hi <= self.num_steps:
                raise UserError(
                    f"sample.sde_window_range {list(self.sde_window_range)} must satisfy "
                    f"0 <= start < end <= sample.num_steps ({self.num_steps})"
                )
            if self.sde_window_size > hi - lo:
                raise UserError(
                    f"sample.sde_window_size={self.sde_window_size} does not fit in "
                    f"sample.sde_window_range {list(self.sde_window_range)} "
                    f"({hi - lo} steps); widen the range or shrink the window"
                )


@dataclass
class OptimConfig:
    """Optimisation: AdamW on the LoRA weights, the epochs, EMA, the guard and the seed.

    Every algorithm's ``train:`` section is this one or a subclass that adds how it batches
    its data (``RolloutOptimConfig``, SFT's ``SFTTrainConfig``)."""

    lr: float = help_field("AdamW learning rate.", 3e-4)
    betas: tuple[float, float] = help_field("AdamW betas.", (0.9, 0.999))
    weight_decay: float = help_field("AdamW weight decay.", 1e-4)
    max_grad_norm: float = help_field("Gradient-norm clip (0 = off).", 1.0)
    epochs: int = help_field("Training epochs (sample + train rounds).", 1000)
    ema: bool = help_field(
        "Keep an EMA of the LoRA weights; evaluate with it and save it as the final LoRA.", True
    )
    ema_decay: float = help_field("EMA decay cap: decay = min((1 + s) / (10 + s), ema_decay).", 0.9)
    ema_every: int = help_field("Update the EMA every this many optimizer steps.", 8)
    max_nonfinite: int = help_field(
        "Abort after this many consecutive optimizer steps with a non-finite loss or grad.", 3
    )
    seed: int = help_field("Random seed (prompts, noise, shuffling).", 42)
    adamw_8bit: bool = help_field(
        "AdamW with 8-bit states (bitsandbytes, CUDA only); falls back to torch AdamW "
        "with a warning when unavailable.",
        False,
    )

    def validate(self) -> None:
        if self.lr <= 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        check_min(self, "train", ("weight_decay", "max_grad_norm"), 0)
        if not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"train.betas must lie in [0, 1), got {list(self.betas)}")
        check_min(self, "train", ("ema_every", "max_nonfinite"), 1)
        if self.epochs < 0:
            raise UserError(f"train.epochs must be >= 0, got {self.epochs}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.seed < 0:
            raise UserError(f"train.seed must be >= 0, got {self.seed}")


@dataclass
class RolloutOptimConfig(OptimConfig):
    """Optimisation on scored rollouts, shared by GRPO, OPD and CRD (objectives: grpo/opd/crd).

    The shared settings plus the epoch's minibatches and accumulation, the advantage clip
    and the gradient path through classifier-free guidance. Each algorithm's objective
    knobs live in its own method section (``grpo:``, ``opd:``, ``crd:``)."""

    batch_size: int | None = help_field(
        "Training minibatch (trajectories) per process; null = sample.batch_size.", None
    )
    gradient_accumulation: int | None = help_field(
        "Minibatches per optimizer step; null = derived from train.optimizer_steps_per_epoch.",
        None,
    )
    optimizer_steps_per_epoch: int = help_field(
        "Optimizer steps per pass over an epoch's samples, used to derive "
        "gradient_accumulation when it is null (the paper: 2).",
        2,
    )
    inner_epochs: int = help_field("Passes over each epoch's samples.", 1)
    cfg_grad: Literal["cond", "both"] = help_field(
        "Gradient through the CFG pair v = v_u + w (v_c - v_u) of the training forward: "
        "'cond' (Flow-GRPO's training code) detaches the unconditional prediction, so the "
        "LoRA gradient is w dv_c (text-conditioned branch only); 'both' differentiates the "
        "whole guided velocity, (1 - w) dv_u + w dv_c. The forward value is the same either "
        "way (ratio 1 at the first step). So is the compute under model.cfg_forward=batched "
        "(the backward still runs through the unconditional rows); with split, 'cond' skips "
        "the unconditional backward. No effect without CFG (guidance_scale <= 1).",
        "cond",
    )
    adv_clip: float = help_field("Advantages are clipped to +-adv_clip.", 5.0)

    def validate(self) -> None:
        super().validate()
        check_min(self, "train", ("inner_epochs", "optimizer_steps_per_epoch"), 1)
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"train.batch_size must be >= 1 (or null), got {self.batch_size}")
        if self.gradient_accumulation is not None and self.gradient_accumulation < 1:
            raise UserError(
                f"train.gradient_accumulation must be >= 1 (or null), "
                f"got {self.gradient_accumulation}"
            )
        if self.adv_clip <= 0:
            raise UserError(
                f"train.adv_clip must be > 0 (advantages are clipped to +-adv_clip; 0 zeroes "
                f"every one), got {self.adv_clip}"
            )


def advantage_std_field() -> Any:
    """The ``adv_std`` field of the GRPO and CRD method sections (group advantages)."""
    return help_field(
        "Advantage normaliser: std of all rewards of the epoch ('global') or of the group.",
        "global",
    )


def timestep_fraction_field() -> Any:
    """The ``timestep_fraction`` field of the methods that train recorded steps (GRPO, OPD)."""
    return help_field("Train on the first int(num_steps * fraction) steps (0.99 -> 9 of 10).", 0.99)


def trained_steps(sample: SampleConfig, timestep_fraction: float) -> int:
    """Denoising steps trained per trajectory: the window size in Fast mode, else
    int(num_steps x timestep_fraction) (10 x 0.99 -> 9)."""
    if sample.sde_window_size:
        return sample.sde_window_size
    return int(sample.num_steps * timestep_fraction)


def check_trained_steps(sample: SampleConfig, timestep_fraction: float, key: str) -> None:
    """UserError when ``timestep_fraction`` (the config key ``key``) leaves no denoising
    step to train."""
    if not sample.sde_window_size and trained_steps(sample, timestep_fraction) < 1:
        raise UserError(
            f"{key}={timestep_fraction} trains "
            f"int({sample.num_steps} x {timestep_fraction}) = 0 steps; "
            "raise it so at least one step is trained"
        )


def check_timestep_fraction(timestep_fraction: float, key: str) -> None:
    if not 0 < timestep_fraction <= 1:
        raise UserError(f"{key} must be in (0, 1], got {timestep_fraction}")


def check_clip_range(clip_range: float, key: str) -> None:
    if clip_range <= 0:
        raise UserError(f"{key} must be > 0, got {clip_range}")


@dataclass
class EvalConfig:
    """Periodic evaluation with the ODE sampler (and the EMA weights when train.ema)."""

    every: int = help_field("Evaluate every this many epochs (0 = only at the end).", 60)
    num_prompts: int | None = help_field(
        "Unique prompts per benchmark; null = all of each benchmark's prompt file.", None
    )
    benchmarks: list[str] = help_field(
        "Benchmarks to report: geneval=PATH (GenEval metadata JSONL), ocr=PATH (OCR prompts "
        ".txt), pickscore=PATH (DrawBench prompts .txt), toy-geneval, toy-ocr, toy-quality.",
        factory=list,
    )
    images_per_prompt: int | None = help_field(
        "Images sampled per unique prompt; null = each benchmark's published count "
        "(GenEval 4, OCR 1, DrawBench 5; docs/EVALUATION.md).",
        None,
    )
    batch_size: int = help_field("Evaluation batch per process.", 16)

    def validate(self) -> None:
        if self.every < 0:
            raise UserError(f"eval.every must be >= 0, got {self.every}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise UserError(f"eval.num_prompts must be >= 1 (or null), got {self.num_prompts}")
        if self.batch_size < 1:
            raise UserError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.images_per_prompt is not None and self.images_per_prompt < 1:
            raise UserError(
                f"eval.images_per_prompt must be >= 1 (or null), got {self.images_per_prompt}"
            )

    def resolved_benchmarks(self, test: str = "") -> list[str]:
        """``eval.benchmarks`` with each real benchmark given by name alone scored on
        ``data.test`` (``geneval`` -> ``geneval=<data.test>``); checked with
        :func:`check_benchmarks`."""
        return check_benchmarks(self.benchmarks, test)


def check_benchmarks(
    benchmarks: list[str], test: str = "", key: str = "eval.benchmarks"
) -> list[str]:
    """The benchmark names with their prompt files, or a UserError naming the fix.

    A real benchmark given by name alone (``geneval``, ``ocr``) reads ``test`` (the run's
    ``data.test``); ``name=PATH`` reads PATH. Every name must be known and every prompt file
    must exist; the files' contents are read by ``flowopd check`` and before training.
    """
    if not benchmarks:
        return []
    from flowopd.eval.benchmarks import TOY_BENCHMARKS, parse_benchmarks  # lazy: imports torch

    named = []
    for name in benchmarks:
        name = name.strip()
        if name and "=" not in name and name not in TOY_BENCHMARKS and test:
            name = f"{name}={test}"
        named.append(name)
    try:
        names = parse_benchmarks(named)
    except UserError as e:
        hint = (
            "; or set data.test=PATH to score it on the test prompts"
            if "needs its prompt" in str(e)
            else ""
        )
        raise UserError(f"{key}: {e}{hint}") from None
    for name in names:
        base, _, path = name.partition("=")
        if path and not Path(path).expanduser().is_file():
            raise UserError(
                f"{key}: the prompt file of benchmark '{base}' ('{path}') not found; "
                f"fix the path (data.test=PATH or {base}=PATH)"
            )
    return names


@dataclass
class OutputConfig:
    """Where the run writes config.yaml, log.jsonl, tensorboard/, checkpoints/, lora/."""

    dir: str = help_field("Output directory of the run.", "runs/grpo")
    checkpoint_every: int = help_field(
        "Checkpoint every this many epochs (0 = only at the end).", 60
    )
    keep_last: int = help_field("Checkpoints kept (older ones are deleted; 0 = keep all).", 3)
    resume: bool = help_field(
        "Resume from the latest checkpoint in output.dir when one exists (CLI: --resume).",
        False,
    )

    def validate(self) -> None:
        if not self.dir:
            raise UserError("output.dir is empty; set output.dir=DIR")
        if self.checkpoint_every < 0 or self.keep_last < 0:
            raise UserError("output.checkpoint_every and output.keep_last must be >= 0")


def check_rewards(reward: RewardConfig, data: DataConfig) -> None:
    """UserError unless every reward named (reward: and data.datasets[i].reward) is
    registered, the weights are finite and not all 0, and reward.options names used ones."""
    from flowopd.rewards.base import available_rewards  # lazy: keeps config import light

    available = available_rewards()
    names = [(f"reward.{k}", n) for k, n in _reward_items(reward)]
    names += [
        (f"data.datasets.{i}.reward", d.reward) for i, d in enumerate(data.datasets) if d.reward
    ]
    for key, name in names:
        if name not in available:
            raise UserError(f"{key}: {unknown('reward', name, available)}")
    for name, w in reward.weights.items():
        if w != w or w in (float("inf"), float("-inf")):
            raise UserError(f"reward.weights.{name} must be a finite number, got {w}")
    if reward.weights and not any(reward.weights.values()):
        raise UserError("reward.weights are all 0; give at least one reward a weight")
    if reward.mode == "none":
        missing = [i for i, d in enumerate(data.datasets) if not d.reward]
        if not data.datasets or missing:
            where = f" (data.datasets {missing} have no reward)" if data.datasets else ""
            raise UserError(
                "missing reward: set reward=NAME, reward.weights={NAME: W, ...} or "
                f"reward.routing={{TASK: NAME, ...}}{where}"
            )
    unknown_opts = set(reward.options) - {n for _, n in names}
    if unknown_opts:
        raise UserError(
            f"reward.options names reward(s) {sorted(unknown_opts)} that the run does "
            "not use; remove them or fix the name"
        )


def _reward_items(r: RewardConfig) -> list[tuple[str, str]]:
    items = [("name", r.name)] if r.name else []
    items += [(f"weights.{n}", n) for n in r.weights]
    items += [(f"routing.{t}", n) for t, n in r.routing.items()]
    return items
