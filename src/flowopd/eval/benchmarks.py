"""Benchmarks: prompt sets + scorers + metrics, run with the deterministic ODE sampler.

``evaluate(model, ["toy-geneval", "toy-ocr", "toy-quality"])`` returns the metrics.json
mapping ``{benchmark: {"overall": x, <category>: y, ...}}`` and the sampled images.

Benchmarks:
- ``toy-geneval``: world GenEval test split, strict per-prompt correctness, metric =
  mean over the six categories of per-category accuracy (GenEval's averaging);
- ``toy-ocr``: world OCR test split, mean ``max(1 - edit/len, 0)``;
- ``toy-quality``: task-agnostic quality of the images sampled for the other benchmarks
  (or of both test splits when asked alone);
- ``geneval=PATH`` / ``ocr=PATH``: real prompt files (GenEval metadata JSONL / OCR
  text prompts) scored by the real rewards (``geneval`` detector, ``ocr`` engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowopd.errors import UserError, unknown
from flowopd.models.base import FlowModel

TOY_BENCHMARKS = ("toy-geneval", "toy-ocr", "toy-quality")
EVAL_SEED = 1234  # the fixed prompt draw of the toy test splits


@dataclass
class EvalSettings:
    steps: int = 40
    guidance_scale: float | None = None  # None: the model's default_guidance_scale
    n: int | None = None  # prompts per benchmark (None: each benchmark's default)
    seed: int = 0
    batch_size: int = 32
    adapters: Sequence[str] | None = None  # not used: the active adapter is evaluated


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    images: dict[str, Tensor] = field(default_factory=dict)  # benchmark -> (N, 3, H, W)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)  # per-image score


def parse_benchmarks(spec: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError("no benchmark given; e.g. --benchmark toy-geneval,toy-ocr,toy-quality")
    for name in names:
        base = name.split("=", 1)[0]
        if base not in (*TOY_BENCHMARKS, "geneval", "ocr"):
            raise unknown("benchmark", base, (*TOY_BENCHMARKS, "geneval=PATH", "ocr=PATH"))
        if base in ("geneval", "ocr") and "=" not in name:
            raise UserError(f"benchmark '{base}' needs its prompt file: {base}=PATH")
    return names


def benchmark_records(name: str, n: int | None) -> list[dict]:
    """The prompt records of a benchmark (deterministic)."""
    from flowopd.world.prompts import make_records

    if name == "toy-geneval":
        return make_records("geneval", "test", n or 120, seed=EVAL_SEED)
    if name == "toy-ocr":
        return make_records("ocr", "test", n or 60, seed=EVAL_SEED)
    if name == "toy-quality":
        k = n or 60
        return make_records("geneval", "test", k - k // 3, seed=EVAL_SEED) + make_records(
            "ocr", "test", k // 3, seed=EVAL_SEED
        )
    base, path = name.split("=", 1)
    if base == "geneval":
        from flowopd.rewards.geneval import read_geneval_metadata

        recs = read_geneval_metadata(path)
    else:
        from flowopd.rewards.ocr import read_ocr_prompts

        recs = read_ocr_prompts(path)
    return recs[:n] if n else recs


@torch.no_grad()
def generate(model: FlowModel, prompts: Sequence[str], settings: EvalSettings) -> Tensor:
    """Images for prompts with the deterministic ODE sampler: (N, 3, H, W) in [0, 1].

    Image i's initial noise depends only on (seed, i), so results do not depend on the
    batch size. CFG: ``settings.guidance_scale``, or the model's default when None.
    """
    from flowopd.sampling import sample

    shape = model.latent_shape()
    guidance = settings.guidance_scale
    if guidance is None:
        guidance = getattr(model, "default_guidance_scale", 4.5)
    out = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = list(prompts[start : start + settings.batch_size])
        noise = torch.stack(
            [
                torch.randn(
                    shape,
                    generator=torch.Generator().manual_seed(settings.seed * 100_003 + start + i),
                )
                for i in range(len(chunk))
            ]
        )
        res = sample(model, chunk, settings.steps, kind="ode", guidance_scale=guidance,
                     latents=noise, record=False)  # fmt: skip
        out.append(res.images.cpu())
    return torch.cat(out)


def _score(name: str, images: Tensor, recs: list[dict]) -> tuple[dict[str, float], Tensor]:
    """``(metrics, per-image scores)``; metrics hold ``overall`` and its standard error
    ``overall_se`` (``flowopd.eval.stats``: per-category for GenEval, else of the mean)."""
    from flowopd.eval.stats import category_mean_se, mean_se

    metrics, scores = _score_only(name, images, recs)
    if name.split("=", 1)[0] in ("toy-geneval", "geneval"):
        se = category_mean_se(scores.tolist(), [r["tag"] for r in recs])
    else:
        se = mean_se(scores.tolist())
    return {**metrics, "overall_se": se}, scores


def _score_only(name: str, images: Tensor, recs: list[dict]) -> tuple[dict[str, float], Tensor]:
    from flowopd.rewards.base import get_reward

    prompts = [r["prompt"] for r in recs]
    if name == "toy-geneval":
        from flowopd.rewards.toy import geneval_metric

        s = get_reward("toy_geneval_strict")(images, prompts, recs)
        return geneval_metric(s, [r["tag"] for r in recs]), s
    if name == "toy-ocr":
        s = get_reward("toy_ocr")(images, prompts, recs)
        return {"overall": float(s.mean())}, s
    if name == "toy-quality":
        s = get_reward("toy_quality")(images, prompts, recs)
        return {"overall": float(s.mean())}, s
    base = name.split("=", 1)[0]
    if base == "geneval":
        from flowopd.rewards.geneval import geneval_metric as real_metric

        # the official 0/1 judgement; the detector comes from the reward's defaults (a local
        # path or a cached hub id: nothing is downloaded when HF_HUB_OFFLINE=1)
        s = get_reward("geneval", mode="correct")(images, prompts, recs)
        flags = [
            {"tag": r["tag"], "correct": bool(v)} for r, v in zip(recs, s.tolist(), strict=True)
        ]
        return real_metric(flags), s
    s = get_reward("ocr")(images, prompts, recs)
    return {"overall": float(s.mean())}, s


def evaluate(
    model: FlowModel, benchmarks: str | Sequence[str], settings: EvalSettings | None = None
) -> EvalResult:
    """Sample every benchmark's prompts with the active adapter and score them."""
    settings = settings or EvalSettings()
    names = parse_benchmarks(benchmarks)
    result = EvalResult(metrics={})
    quality_alone = "toy-quality" in names and len(names) == 1
    for name in names:
        if name == "toy-quality" and not quality_alone:
            continue
        recs = benchmark_records(name, settings.n)
        images = generate(model, [r["prompt"] for r in recs], settings)
        metrics, scores = _score(name, images, recs)
        result.metrics[name] = metrics
        result.images[name] = images
        result.prompts[name] = [r["prompt"] for r in recs]
        result.scores[name] = scores
    if "toy-quality" in names and not quality_alone:
        # quality of everything sampled for the task benchmarks (no extra sampling)
        images = torch.cat(list(result.images.values()))
        prompts = sum(result.prompts.values(), [])
        metrics, scores = _score("toy-quality", images, [{"prompt": p} for p in prompts])
        result.metrics["toy-quality"] = metrics
        result.scores["toy-quality"] = scores
    return result
