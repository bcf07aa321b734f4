"""Helpers for the distillation tests: teacher LoRAs and mixed-task prompt files."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from flowopd.config.sections import SD3_LORA_TARGETS

TASKS = ("geneval", "ocr")


def make_teacher_loras(
    model_dir: Path,
    root: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    std: float = 0.3,
    backend: str = "sd3",
) -> dict[str, Path]:
    """One randomised LoRA per task, saved like a GRPO run's OUT/lora: {task: dir}.

    Both A and B are drawn N(0, std^2) (a fresh LoRA has B = 0), so each teacher's
    velocity differs clearly from the base and from the other teacher.
    """
    from flowopd.models import load_model

    model = load_model(str(model_dir), backend=backend)
    targets = SD3_LORA_TARGETS if backend == "sd3" else None  # None: the backend's default
    out = {}
    for i, task in enumerate(TASKS):
        name = f"t_{task}"
        with warnings.catch_warnings():  # peft warns about a second adapter on one model
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(name, rank=rank, alpha=alpha, target_modules=targets)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        out[task] = root / task
        model.save_adapter(name, out[task])
    return out


def write_mixed_prompts(path: Path, per_task: int) -> Path:
    """A JSONL of ``per_task`` world train records of each task (their 'task' labels)."""
    from flowopd.world.prompts import make_records, write_jsonl

    write_jsonl(path, [r for t in TASKS for r in make_records(t, "train", per_task, seed=0)])
    return path
