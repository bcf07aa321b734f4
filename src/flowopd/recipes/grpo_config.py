"""The Flow-GRPO run config: sections, the paper's SD3.5-M defaults, derived values, checks.

Defaults follow METHODS.md §2 (SD3.5-M): LoRA r=32/alpha=64 on attention and context
projections, 10 SDE steps at noise level 0.7 with 9 trained, 40-step ODE evaluation,
48 prompts x 24 images per epoch, AdamW 3e-4, clip 1e-4, KL beta 0.04, EMA for eval.

How an epoch is laid out (what the divisibility rules below protect):

- each of the ``W`` processes takes ``prompts_per_epoch / W`` whole prompts and samples
  all ``group_size`` images of each of them, so a group never spans processes;
- a process samples its ``prompts_per_epoch / W * group_size`` images in micro-batches of
  ``sample.batch_size`` and trains on them in minibatches of ``train.batch_size``;
- one optimizer step accumulates ``gradient_accumulation`` minibatches, each over all
  ``trained_steps`` denoising steps of its trajectories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from flowopd.errors import UserError, unknown
from flowopd.lora_targets import SD3_ATTN2_TARGETS, SD3_TARGETS

__all__ = [
    "LoRAConfig",
    "ModelConfig",
    "DatasetConfig",
    "DataConfig",
    "RewardConfig",
    "SampleConfig",
    "TrainConfig",
    "EvalConfig",
    "OutputConfig",
    "GRPOConfig",
    "SD3_LORA_TARGETS",
    "check_benchmarks",
]

# Flow-GRPO's targets: the joint attention's image-stream q/k/v/out and text (context)
# stream projections, ``attn`` only (models/adapters.py says why the prefix matters).
SD3_LORA_TARGETS = list(SD3_TARGETS)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _help(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _divisors(n: int, limit: int = 12) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    shown = divs[:limit]
    return ", ".join(map(str, shown)) + (", ..." if len(divs) > limit else "")


# --------------------------------------------------------------------------------------
# sections


@dataclass
class LoRAConfig:
    """LoRA adapter trained on the transformer."""

    rank: int = _help("LoRA rank r.", 32)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / rank.", 64.0)
    target_modules: list[str] = _help(
        "Module names (matched as dotted suffixes) that get an adapter. Default: "
        "Flow-GRPO's, the joint attention's q/k/v/out and context projections "
        f"({', '.join(SD3_TARGETS)}), not attn2 of SD3.5-M's dual-attention blocks "
        "(18.8 M parameters at rank 32 on SD3.5-M). To adapt attn2 too, add "
        f"{', '.join(SD3_ATTN2_TARGETS)} (23.9 M).",
        factory=lambda: list(SD3_LORA_TARGETS),
    )
    init: Literal["gaussian", "default"] = _help(
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

    path: str = _help(
        "Base model: a local diffusers pipeline directory, a hub id 'org/name', or "
        "'embedded' (the shipped model). Required.",
        "",
    )
    backend: str = _help("Model backend (one file in flowopd/models).", "sd3")
    dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "Dtype of the frozen base weights and of autocast; LoRA weights and the SDE math "
        "stay float32.",
        "bfloat16",
    )
    resolution: int | None = _help(
        "Image side in pixels; null = the model's default (the paper trains SD3.5-M at 512).",
        None,
    )
    guidance_scale: float = _help(
        "Classifier-free guidance w in v_u + w (v_c - v_u), for sampling and training.", 4.5
    )
    lora: LoRAConfig = _help("LoRA adapter.", factory=LoRAConfig)
    gradient_checkpointing: bool = _help(
        "Recompute each transformer block in the backward instead of keeping its "
        "activations (~20 d values per token per block): activations shrink ~10x for ~1 "
        "extra forward per training step. Not combinable with per-sample adapter routing "
        "under gradients; the active adapter must not change between a forward with "
        "gradients and its backward (the re-run uses the state at backward time).",
        False,
    )
    compile: bool = _help(
        "torch.compile the transformer (in place). Compiles on the first steps and again "
        "on new shapes or adapters; gains depend on GPU and torch version.",
        False,
    )
    cfg_forward: Literal["batched", "split"] = _help(
        "How the CFG pair [negative, positive] runs, the same in sampling, training and "
        "evaluation (so the first ratio is still 1): 'batched' = one forward of 2B rows, as "
        "diffusers and Flow-GRPO; 'split' = two forwards of B rows, and with "
        "train.cfg_grad=cond the unconditional one runs without autograd: the backward "
        "covers B rows instead of 2B and keeps half the activations, for the same gradient "
        "(bench/cfg_train_time.py: training phase 0.76-0.80x on the embedded model, CPU).",
        "batched",
    )
    offload_text_encoders: bool = _help(
        "Keep the text encoders (SD3: CLIP-L, CLIP-G, T5-XXL, ~22 GB in float32) on the "
        "CPU and move them to the device only while encoding prompts.",
        False,
    )

    def validate(self) -> None:
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


@dataclass
class DatasetConfig:
    """One prompt dataset of a GRPO-Mix run."""

    path: str = _help(
        "Prompt file: GenEval metadata JSONL, OCR or plain prompt .txt, or JSONL of prompt "
        "records ({prompt, task, ...}); records without a task get this entry's reward name.",
        "",
    )
    reward: str = _help("Reward scoring this dataset's prompts; '' = the reward section.", "")
    name: str = _help("Label in logs; '' = the file name without extension.", "")

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

    train: str = _help(
        "Training prompts (GenEval metadata JSONL, OCR or plain prompt .txt, prompt-record "
        "JSONL). Leave empty when data.datasets is used.",
        "",
    )
    datasets: list[DatasetConfig] = _help(
        "GRPO-Mix: several prompt datasets, each with its own reward; epochs alternate "
        "between them in data.mix_ratio.",
        factory=list,
    )
    mix_ratio: list[int] = _help(
        "Epochs per dataset in one cycle of data.datasets, e.g. [3, 1, 1] "
        "(empty = one epoch each).",
        factory=list,
    )
    test: str = _help("Evaluation prompts (JSONL); '' = no evaluation set.", "")

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

    name: str = _help("A single registered reward.", "")
    weights: dict[str, float] = _help(
        "Weighted sum of rewards {name: weight} (GRPO-Mix by reward mixing).", factory=dict
    )
    routing: dict[str, str] = _help(
        "Per-task reward {task: name}: each prompt is scored by its record's task's reward.",
        factory=dict,
    )
    options: dict[str, dict[str, Any]] = _help(
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

    num_steps: int = _help("Denoising steps of training rollouts.", 10)
    eval_num_steps: int = _help("ODE steps for evaluation (noise level 0).", 40)
    noise_level: float = _help("SDE noise level a (sigma_t = a sqrt(t / (1 - t))).", 0.7)
    kind: Literal["sde", "cps"] = _help(
        "Stochastic step: Flow-GRPO SDE, or coefficients-preserving sampling (use "
        "train.clip_range=1e-5 with cps).",
        "sde",
    )
    sde_window_size: int = _help(
        "Flow-GRPO-Fast: only this many consecutive steps are stochastic and trained "
        "(0 = off: every step is stochastic).",
        0,
    )
    sde_window_range: tuple[int, int] = _help(
        "Flow-GRPO-Fast: the window's steps lie in [start, end) of this range; its start "
        "is drawn per sampling call.",
        (0, 5),
    )
    group_size: int = _help("Images per prompt G (the paper: 24; <= 12 was unstable).", 24)
    same_initial_noise: bool = _help(
        "All images of a prompt start from the same initial noise x_T (DanceGRPO), so the "
        "reward differences within a group come only from the SDE steps, the actions the "
        "policy gradient credits. Off: Flow-GRPO (one x_T per image).",
        False,
    )
    antithetic: bool = _help(
        "Images 2k and 2k + 1 of a group are an antithetic pair: one x_T and mirrored SDE "
        "noise (eps, -eps), which cancels the even-order noise terms in the policy "
        "gradient (as in evolution strategies). Needs an even group_size.",
        False,
    )
    prompts_per_epoch: int = _help("Distinct prompts per epoch, over all processes.", 48)
    batch_size: int = _help("Sampling micro-batch (images) per process.", 24)

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
class TrainConfig:
    """Optimisation: AdamW on the LoRA weights with the clipped GRPO objective."""

    lr: float = _help("AdamW learning rate.", 3e-4)
    betas: tuple[float, float] = _help("AdamW betas.", (0.9, 0.999))
    weight_decay: float = _help("AdamW weight decay.", 1e-4)
    max_grad_norm: float = _help("Gradient-norm clip (0 = off).", 1.0)
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
    cfg_grad: Literal["cond", "both"] = _help(
        "Gradient through the CFG pair v = v_u + w (v_c - v_u) of the training forward: "
        "'cond' (Flow-GRPO's training code) detaches the unconditional prediction, so the "
        "LoRA gradient is w dv_c (text-conditioned branch only); 'both' differentiates the "
        "whole guided velocity, (1 - w) dv_u + w dv_c. The forward value is the same either "
        "way (ratio 1 at the first step). So is the compute under model.cfg_forward=batched "
        "(the backward still runs through the unconditional rows); with split, 'cond' skips "
        "the unconditional backward. No effect without CFG (guidance_scale <= 1).",
        "cond",
    )
    adv_std: Literal["global", "group"] = _help(
        "Advantage normaliser: std of all rewards of the epoch ('global') or of the group.",
        "global",
    )
    adv_clip: float = _help("Advantages are clipped to +-adv_clip.", 5.0)
    timestep_fraction: float = _help(
        "Train on the first int(num_steps * fraction) steps (0.99 -> 9 of 10).", 0.99
    )
    batch_size: int | None = _help(
        "Training minibatch (trajectories) per process; null = sample.batch_size.", None
    )
    gradient_accumulation: int | None = _help(
        "Minibatches per optimizer step; null = derived from train.optimizer_steps_per_epoch.",
        None,
    )
    optimizer_steps_per_epoch: int = _help(
        "Optimizer steps per pass over an epoch's samples, used to derive "
        "gradient_accumulation when it is null (the paper: 2).",
        2,
    )
    inner_epochs: int = _help("Passes over each epoch's samples.", 1)
    epochs: int = _help("Training epochs (sample + train rounds).", 1000)
    ema: bool = _help("Keep an EMA of the LoRA weights and evaluate with it.", True)
    ema_decay: float = _help("EMA decay cap: decay = min((1 + s) / (10 + s), ema_decay).", 0.9)
    ema_every: int = _help("Update the EMA every this many optimizer steps.", 8)
    max_nonfinite: int = _help(
        "Abort after this many consecutive optimizer steps with a non-finite loss or grad.", 3
    )
    seed: int = _help("Random seed (prompts, noise, shuffling).", 42)
    adamw_8bit: bool = _help(
        "AdamW with 8-bit states (bitsandbytes, CUDA only); falls back to torch AdamW "
        "with a warning when unavailable.",
        False,
    )

    def validate(self) -> None:
        if not 0 < self.timestep_fraction <= 1:
            raise UserError(
                f"train.timestep_fraction must be in (0, 1], got {self.timestep_fraction}"
            )
        for name in ("lr", "clip_range"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "beta_kl"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.adv_clip <= 0:
            raise UserError(
                f"train.adv_clip must be > 0 (advantages are clipped to +-adv_clip; 0 zeroes "
                f"every one), got {self.adv_clip}"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"train.betas must lie in [0, 1), got {list(self.betas)}")
        for name in ("inner_epochs", "optimizer_steps_per_epoch", "ema_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise UserError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"train.batch_size must be >= 1 (or null), got {self.batch_size}")
        if self.gradient_accumulation is not None and self.gradient_accumulation < 1:
            raise UserError(
                f"train.gradient_accumulation must be >= 1 (or null), "
                f"got {self.gradient_accumulation}"
            )
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.seed < 0:
            raise UserError(f"train.seed must be >= 0, got {self.seed}")


@dataclass
class EvalConfig:
    """Periodic evaluation with the ODE sampler (and the EMA weights when train.ema)."""

    every: int = _help("Evaluate every this many epochs (0 = only at the end).", 60)
    num_prompts: int | None = _help(
        "Unique prompts per benchmark; null = all of each benchmark's prompt file.", None
    )
    benchmarks: list[str] = _help(
        "Benchmarks to report: geneval=PATH (GenEval metadata JSONL), ocr=PATH (OCR prompts "
        ".txt), pickscore=PATH (DrawBench prompts .txt), toy-geneval, toy-ocr, toy-quality.",
        factory=list,
    )
    images_per_prompt: int | None = _help(
        "Images sampled per unique prompt; null = each benchmark's published count "
        "(GenEval 4, OCR 1, DrawBench 5; docs/EVALUATION.md).",
        None,
    )
    batch_size: int = _help("Evaluation batch per process.", 16)

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

    dir: str = _help("Output directory of the run.", "runs/grpo")
    checkpoint_every: int = _help("Checkpoint every this many epochs (0 = only at the end).", 60)
    keep_last: int = _help("Checkpoints kept (older ones are deleted; 0 = keep all).", 3)
    resume: bool = _help(
        "Resume from the latest checkpoint in output.dir when one exists (CLI: --resume).",
        False,
    )

    def validate(self) -> None:
        if not self.dir:
            raise UserError("output.dir is empty; set output.dir=DIR")
        if self.checkpoint_every < 0 or self.keep_last < 0:
            raise UserError("output.checkpoint_every and output.keep_last must be >= 0")


# --------------------------------------------------------------------------------------
# the run


@dataclass
class GRPOConfig:
    """A Flow-GRPO run (SD3.5-M defaults of METHODS.md §2)."""

    model: ModelConfig = _help("Base model and LoRA.", factory=ModelConfig)
    data: DataConfig = _help("Prompt datasets.", factory=DataConfig)
    reward: RewardConfig = _help("Reward.", factory=RewardConfig)
    sample: SampleConfig = _help("Rollouts.", factory=SampleConfig)
    train: TrainConfig = _help("Optimisation.", factory=TrainConfig)
    eval: EvalConfig = _help("Evaluation.", factory=EvalConfig)
    output: OutputConfig = _help("Outputs.", factory=OutputConfig)

    # -- derived values -----------------------------------------------------------------

    @property
    def images_per_epoch(self) -> int:
        """prompts_per_epoch x group_size, over all processes (48 x 24 = 1152)."""
        return self.sample.prompts_per_epoch * self.sample.group_size

    @property
    def trained_steps(self) -> int:
        """Denoising steps trained per trajectory: the window size in Fast mode, else
        int(num_steps x timestep_fraction) (10 x 0.99 -> 9)."""
        if self.sample.sde_window_size:
            return self.sample.sde_window_size
        return int(self.sample.num_steps * self.train.timestep_fraction)

    @property
    def train_batch_size(self) -> int:
        """Training minibatch per process (train.batch_size, else sample.batch_size)."""
        return self.train.batch_size or self.sample.batch_size

    def prompts_per_process(self, world_size: int = 1) -> int:
        return self.sample.prompts_per_epoch // world_size

    def images_per_process(self, world_size: int = 1) -> int:
        """Images one process samples per epoch: prompts_per_epoch / W x group_size."""
        return self.prompts_per_process(world_size) * self.sample.group_size

    def sampling_batches(self, world_size: int = 1) -> int:
        """Sampling micro-batches per process per epoch."""
        return self.images_per_process(world_size) // self.sample.batch_size

    def minibatches_per_pass(self, world_size: int = 1) -> int:
        """Training minibatches per process in one pass over the epoch's samples."""
        return self.images_per_process(world_size) // self.train_batch_size

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Minibatches per optimizer step (train.gradient_accumulation, else derived so
        that one pass makes train.optimizer_steps_per_epoch steps)."""
        if self.train.gradient_accumulation is not None:
            return self.train.gradient_accumulation
        return max(1, self.minibatches_per_pass(world_size) // self.train.optimizer_steps_per_epoch)

    def optimizer_steps_per_epoch(self, world_size: int = 1) -> int:
        """Optimizer steps per epoch, inner epochs included (the paper: 2)."""
        per_pass = self.minibatches_per_pass(world_size) // self.gradient_accumulation_steps(
            world_size
        )
        return per_pass * self.train.inner_epochs

    # -- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        """Cross-section checks (each section checked itself already; see validate_config)."""
        self._check_rewards()
        self.eval.resolved_benchmarks(self.data.test)
        if self.sample.kind == "cps" and self.train.kl_form == "exact" and self.train.beta_kl:
            raise UserError(
                "train.kl_form=exact is the KL of the Flow-GRPO SDE step (transition std "
                "sigma_t sqrt(-dt)); a CPS step's std carries no dt, so its KL is the 'public' "
                "form: set train.kl_form=public with sample.kind=cps"
            )
        if not self.sample.sde_window_size and self.trained_steps < 1:
            raise UserError(
                f"train.timestep_fraction={self.train.timestep_fraction} trains "
                f"int({self.sample.num_steps} x {self.train.timestep_fraction}) = 0 steps; "
                "raise it so at least one step is trained"
            )
        # Every divisibility rule that holds for W processes also holds for W = 1, so the
        # single-process check here catches what no process count can fix.
        self.check_distributed(1)

    def _check_rewards(self) -> None:
        from flowopd.rewards.base import available_rewards  # lazy: keeps config import light

        available = available_rewards()
        names = [(f"reward.{k}", n) for k, n in self._reward_items()]
        names += [
            (f"data.datasets.{i}.reward", d.reward)
            for i, d in enumerate(self.data.datasets)
            if d.reward
        ]
        for key, name in names:
            if name not in available:
                raise UserError(f"{key}: {unknown('reward', name, available)}")
        for name, w in self.reward.weights.items():
            if w != w or w in (float("inf"), float("-inf")):
                raise UserError(f"reward.weights.{name} must be a finite number, got {w}")
        if self.reward.weights and not any(self.reward.weights.values()):
            raise UserError("reward.weights are all 0; give at least one reward a weight")
        if self.reward.mode == "none":
            missing = [i for i, d in enumerate(self.data.datasets) if not d.reward]
            if not self.data.datasets or missing:
                where = f" (data.datasets {missing} have no reward)" if self.data.datasets else ""
                raise UserError(
                    "missing reward: set reward=NAME, reward.weights={NAME: W, ...} or "
                    f"reward.routing={{TASK: NAME, ...}}{where}"
                )
        unknown_opts = set(self.reward.options) - {n for _, n in names}
        if unknown_opts:
            raise UserError(
                f"reward.options names reward(s) {sorted(unknown_opts)} that the run does "
                "not use; remove them or fix the name"
            )

    def _reward_items(self) -> list[tuple[str, str]]:
        r = self.reward
        items = [("name", r.name)] if r.name else []
        items += [(f"weights.{n}", n) for n in r.weights]
        items += [(f"routing.{t}", n) for t, n in r.routing.items()]
        return items

    def check_distributed(self, world_size: int) -> None:
        """Raise UserError unless the epoch splits evenly over ``world_size`` processes.

        Rules (P prompts per epoch, G group size, W processes, per-process images
        N = P / W x G):
        1. W divides P (each process samples whole prompt groups);
        2. sample.batch_size divides N;  3. the training minibatch divides N;
        4. the gradient accumulation divides the minibatches per pass N / minibatch.
        """
        s, W = self.sample, world_size
        if W < 1:
            raise UserError(f"world size must be >= 1, got {W}")
        P, G = s.prompts_per_epoch, s.group_size
        if P % W:
            lo, hi = P - P % W, P + W - P % W
            raise UserError(
                f"sample.prompts_per_epoch={P} must be divisible by the number of processes "
                f"({W}) so each process samples whole prompt groups; use {lo or hi} or {hi}"
            )
        n = self.images_per_process(W)
        rule = f"prompts_per_epoch / processes x group_size = {P} / {W} x {G} = {n}"
        if n % s.batch_size:
            raise UserError(
                f"sample.batch_size={s.batch_size} must divide the images each process "
                f"samples per epoch, {rule}; choose one of {_divisors(n)}"
            )
        mb = self.train_batch_size
        if n % mb:
            raise UserError(
                f"the training minibatch (train.batch_size={mb}) must divide the images each "
                f"process trains on per epoch, {rule}; choose one of {_divisors(n)}"
            )
        passes = n // mb
        acc = self.gradient_accumulation_steps(W)
        if self.train.gradient_accumulation is None:
            k = self.train.optimizer_steps_per_epoch
            if passes % k:
                raise UserError(
                    f"train.optimizer_steps_per_epoch={k} must divide the minibatches per "
                    f"process and epoch ({n} / {mb} = {passes}); choose one of "
                    f"{_divisors(passes)} or set train.gradient_accumulation"
                )
        elif passes % acc:
            raise UserError(
                f"train.gradient_accumulation={acc} must divide the minibatches per process "
                f"and epoch ({n} / {mb} = {passes}); choose one of {_divisors(passes)}"
            )
