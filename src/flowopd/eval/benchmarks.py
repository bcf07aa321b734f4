"""Benchmarks: prompt sets + scorers + metrics, sampled with the deterministic ODE sampler.

``evaluate(model, ["toy-geneval", "toy-ocr", "toy-quality"])`` returns the metrics.json
mapping ``{benchmark: {"overall": x, <category>: y, ...}}`` and the sampled images.

Benchmarks:
- ``toy-geneval``: world GenEval test split, strict per-prompt correctness, metric =
  mean over the six categories of per-category accuracy (GenEval's averaging);
- ``toy-ocr``: world OCR test split, mean ``max(1 - edit/len, 0)``;
- ``toy-quality``: task-agnostic quality of the images sampled for the other benchmarks
  (or of both test splits when asked alone);
- ``geneval=PATH``: GenEval metadata JSONL, scored by the ``geneval`` detector with GenEval's
  official 0/1 judgement, metric = mean over tags of per-tag accuracy;
- ``ocr=PATH``: OCR prompts (target in double quotes), mean ``ocr`` reward;
- ``pickscore=PATH``: plain prompts (DrawBench), mean raw PickScore ``exp(s) cos`` (not /26,
  the scale the papers report).

The papers' protocol (``PROTOCOLS``, docs/EVALUATION.md): each unique prompt of a real
benchmark is sampled ``images_per_prompt`` times (GenEval 4, OCR 1, DrawBench 5) with the
40-step ODE at CFG 4.5 and 512 px; a file that already repeats a prompt (Flow-GRPO's test
files do, once per image) is de-duplicated first, so both spellings give the same images.
``EvalSettings`` fields left at None take the benchmark's protocol; set ones override it.

Several processes (torchrun): every process samples and scores a contiguous block of each
benchmark's images (``shard_indices``); the per-image scores are gathered in the global order
and every process computes the same metrics. Image g's initial noise depends only on
``(seed, g)``, so the numbers do not depend on the process count or the batch size. No
process waits at a barrier while the others evaluate: the only collective is the gather of
each benchmark's scores, reached by all processes after equal shares of the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from flowopd.engine import distributed as dist
from flowopd.engine.logging import progress
from flowopd.errors import UserError, unknown
from flowopd.models.base import FlowModel
from flowopd.rewards.base import RewardFn

TOY_BENCHMARKS = ("toy-geneval", "toy-ocr", "toy-quality")
REAL_BENCHMARKS = ("geneval", "ocr", "pickscore")  # each takes its prompt file: NAME=PATH
EVAL_SEED = 1234  # the fixed prompt draw of the toy test splits


@dataclass(frozen=True)
class Protocol:
    """How a benchmark's images are sampled: images per unique prompt, ODE steps, CFG scale
    (None: the model's default) and image side in pixels (None: the model's default)."""

    images_per_prompt: int = 1
    steps: int = 40
    guidance_scale: float | None = None
    resolution: int | None = None


# The papers' SD3.5-M evaluation (Flow-GRPO, Flow-OPD; docs/EVALUATION.md): 40-step ODE,
# CFG 4.5, 512 px; GenEval 4 images per prompt (553 x 4), OCR 1 (1,018), DrawBench 5 (200 x 5).
PROTOCOLS = {
    "geneval": Protocol(images_per_prompt=4, steps=40, guidance_scale=4.5, resolution=512),
    "ocr": Protocol(images_per_prompt=1, steps=40, guidance_scale=4.5, resolution=512),
    "pickscore": Protocol(images_per_prompt=5, steps=40, guidance_scale=4.5, resolution=512),
}
TOY_PROTOCOL = Protocol()  # the embedded model's own CFG and resolution, one image a prompt


@dataclass
class EvalSettings:
    """Evaluation options; None takes each benchmark's ``Protocol`` value.

    scorer_options: scorer options per real benchmark, passed to its reward factory, e.g.
    ``{"geneval": {"detector": DIR, "clip_model": DIR, "device": "cuda:0"},
    "pickscore": {"model": DIR, "processor": DIR}}``; a scorer's device defaults to the
    model's.
    """

    steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None
    images_per_prompt: int | None = None
    n: int | None = None  # unique prompts per benchmark (None: all)
    seed: int = 0
    batch_size: int = 32
    keep_images: int = 64  # images per benchmark a process keeps in EvalResult (for grids)
    scorer_options: dict[str, dict] = field(default_factory=dict)
    adapters: Sequence[str] | None = None  # not used: the active adapter is evaluated


@dataclass(frozen=True)
class Plan:
    """One benchmark's resolved sampling: what ``generate`` runs, recorded in protocol.json."""

    prompts: int
    images_per_prompt: int
    steps: int
    guidance_scale: float
    resolution: int | None

    @property
    def images(self) -> int:
        return self.prompts * self.images_per_prompt

    def describe(self) -> str:
        px = f"{self.resolution} px" if self.resolution else "the model's resolution"
        return (
            f"{self.prompts} prompts x {self.images_per_prompt} images, {self.steps} steps, "
            f"CFG {self.guidance_scale:g}, {px}"
        )


@dataclass
class EvalResult:
    """metrics: every benchmark's metrics (the same on every process); scores: per-image
    scores in the global order, (prompts x images_per_prompt,) prompt-major; images and
    prompts: the first ``EvalSettings.keep_images`` images this process sampled and their
    prompts (the rest were scored and dropped); plans: the resolved sampling of each
    benchmark; sampled: the images each process sampled."""

    metrics: dict[str, dict[str, float]]
    images: dict[str, Tensor] = field(default_factory=dict)  # benchmark -> (n_local, 3, H, W)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)
    sampled: dict[str, list[int]] = field(default_factory=dict)  # images each process sampled

    def grid(self, limit: int = 64) -> tuple[Tensor, list[str]]:
        """Up to ``limit`` of this process's images with their prompts, for a grid: those of
        the benchmarks whose images have the first one's size (resolutions may differ)."""
        shown = [k for k, v in self.images.items() if len(v)]
        size = self.images[shown[0]].shape[1:] if shown else None
        keep = [k for k in shown if self.images[k].shape[1:] == size]
        if not keep:
            return torch.zeros(0, 3, 8, 8), []
        images = torch.cat([self.images[k] for k in keep])[:limit]
        return images, sum((self.prompts[k] for k in keep), [])[:limit]


def parse_benchmarks(spec: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError("no benchmark given; e.g. --benchmark toy-geneval,toy-ocr,toy-quality")
    for name in names:
        base = name.split("=", 1)[0]
        if base not in (*TOY_BENCHMARKS, *REAL_BENCHMARKS):
            raise unknown(
                "benchmark", base, (*TOY_BENCHMARKS, *(f"{b}=PATH" for b in REAL_BENCHMARKS))
            )
        if base in REAL_BENCHMARKS and ("=" not in name or not name.split("=", 1)[1].strip()):
            raise UserError(f"benchmark '{base}' needs its prompt file: {base}=PATH")
    return names


def benchmark_records(name: str, n: int | None) -> list[dict]:
    """The unique prompt records of a benchmark, in order (deterministic); the first n."""
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
    from flowopd.data.prompts import read_prompt_file, unique_records

    base, path = name.split("=", 1)
    path = path.strip()
    if base == "geneval":
        from flowopd.rewards.geneval import read_geneval_metadata

        recs = read_geneval_metadata(path)
    elif base == "ocr":
        from flowopd.rewards.ocr import read_ocr_prompts

        recs = read_ocr_prompts(path)
    else:  # pickscore: plain prompts, one a line (DrawBench)
        recs = read_prompt_file(path, format="plain")
    recs = unique_records(recs)
    return recs[:n] if n else recs


def plan_for(name: str, n_prompts: int, settings: EvalSettings, model: FlowModel) -> Plan:
    """A benchmark's sampling: the settings that are set, else its protocol's values."""
    proto = PROTOCOLS.get(name.split("=", 1)[0], TOY_PROTOCOL)
    guidance = settings.guidance_scale
    if guidance is None:
        guidance = proto.guidance_scale
    if guidance is None:
        guidance = getattr(model, "default_guidance_scale", 4.5)
    return Plan(
        prompts=n_prompts,
        images_per_prompt=settings.images_per_prompt or proto.images_per_prompt,
        steps=settings.steps or proto.steps,
        guidance_scale=float(guidance),
        resolution=settings.resolution or proto.resolution,
    )


def image_seed(seed: int, index: int) -> int:
    """Initial-noise seed of image ``index`` of a benchmark (independent of batch and process)."""
    return seed * 100_003 + index


@torch.no_grad()
def generate(
    model: FlowModel, prompts: Sequence[str], plan: Plan, seeds: Sequence[int], batch_size: int
) -> Tensor:
    """Images for prompts with the deterministic ODE sampler: (N, 3, H, W) in [0, 1].

    Image i starts from noise drawn with ``seeds[i]``, so results do not depend on the batch
    size; steps, CFG and resolution come from ``plan``.
    """
    from flowopd.sampling import sample

    shape = model.latent_shape(plan.resolution)  # (C, h, w)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(s))
            for s in seeds[start : start + len(chunk)]
        ])  # fmt: skip
        res = sample(model, chunk, plan.steps, kind="ode", guidance_scale=plan.guidance_scale,
                     resolution=plan.resolution, latents=noise, record=False)  # fmt: skip
        out.append(res.images.cpu())
    return torch.cat(out)


def _scorer_options(base: str, settings: EvalSettings, model: FlowModel) -> dict:
    opts = dict(settings.scorer_options.get(base, {}))
    if base in ("geneval", "pickscore"):
        opts.setdefault("device", str(model.device))
    if base == "geneval":
        opts["mode"] = "correct"  # the benchmark is GenEval's official 0/1 judgement
    if base == "pickscore":
        opts["divisor"] = 1.0  # the papers report raw PickScore (~21-23), not the /26 reward
    return opts


def make_scorer(name: str, settings: EvalSettings, model: FlowModel) -> RewardFn:
    """The per-image scorer of a benchmark, built (weights loaded) before anything is sampled,
    so a wrong detector or PickScore path fails in seconds, not after the sampling."""
    from flowopd.rewards.base import get_reward

    toy = {"toy-geneval": "toy_geneval_strict", "toy-ocr": "toy_ocr", "toy-quality": "toy_quality"}
    if name in toy:
        return get_reward(toy[name])
    base = name.split("=", 1)[0]
    return get_reward(base, **_scorer_options(base, settings, model))


def score_images(scorer: RewardFn, images: Tensor, recs: list[dict]) -> Tensor:
    """Per-image scores (N,) float32 (N = 0 gives an empty tensor without calling the scorer)."""
    if not recs:
        return torch.zeros(0)
    scores = scorer(images, [r["prompt"] for r in recs], recs)
    return torch.as_tensor(scores).float().cpu().reshape(-1)


METRIC_DIGITS = 6  # float32 sampling differs by ~1e-6 between batch compositions


def benchmark_metrics(name: str, scores: Tensor, recs: list[dict]) -> dict[str, float]:
    """metrics.json entry of a benchmark from all its per-image scores and their records:
    ``overall``, categories, and the standard error ``overall_se`` (``flowopd.eval.stats``:
    per-category for GenEval, else of the mean); rounded to ``METRIC_DIGITS`` decimals (the
    same on any batch size or process count)."""
    from flowopd.eval.stats import category_mean_se, mean_se

    metrics = _metrics(name, scores, recs)
    if name.split("=", 1)[0] in ("toy-geneval", "geneval"):
        metrics["overall_se"] = category_mean_se(scores.tolist(), [r["tag"] for r in recs])
    else:
        metrics["overall_se"] = mean_se(scores.tolist())
    return {k: round(float(v), METRIC_DIGITS) for k, v in metrics.items()}


def _metrics(name: str, scores: Tensor, recs: list[dict]) -> dict[str, float]:
    if name == "toy-geneval":
        from flowopd.rewards.toy import geneval_metric

        return geneval_metric(scores, [r["tag"] for r in recs])
    if name.startswith("geneval="):
        from flowopd.rewards.geneval import geneval_metric as real_metric

        flags = [{"tag": r["tag"], "correct": bool(v)} for r, v in zip(recs, scores.tolist(), strict=True)]  # fmt: skip
        return real_metric(flags)
    return {"overall": float(scores.mean())}


def _run(
    model: FlowModel,
    name: str,
    settings: EvalSettings,
    result: EvalResult,
    quality: RewardFn | None = None,
) -> Tensor | None:
    """Sample and score this process's share of one benchmark, batch by batch; gather the
    scores. Each batch is scored as soon as it is sampled and then dropped, except the first
    ``settings.keep_images`` (for grids): memory stays at one batch, not 2,212 images of
    512 px (7 GB in float32). ``quality``: a second scorer of the same images (toy-quality
    over the task benchmarks); returns its gathered scores."""
    recs = benchmark_records(name, settings.n)
    plan = plan_for(name, len(recs), settings, model)
    scorer = make_scorer(name, settings, model)
    k = plan.images_per_prompt
    mine = dist.shard_indices(plan.images, dist.rank(), dist.world_size())  # image g: prompt g // k
    local, local_q, kept, sampled = [torch.zeros(0)], [torch.zeros(0)], [], 0
    # every process runs as many batches (so as many transformer forwards) as the largest
    # shard needs: under FSDP each forward gathers the weights collectively, and a process
    # that stopped a batch early would leave the others waiting for ever
    largest = -(-plan.images // dist.world_size())
    starts = range(0, -(-largest // settings.batch_size) * settings.batch_size, settings.batch_size)
    for start in progress(starts, f"eval {name} ({len(mine)} images, {len(starts)} batches)"):
        batch = mine[start : start + settings.batch_size]
        if not batch:  # a shorter shard: one throwaway image, its result dropped
            generate(model, [recs[0]["prompt"]], plan, [settings.seed], settings.batch_size)
            continue
        batch_recs = [recs[g // k] for g in batch]
        prompts = [r["prompt"] for r in batch_recs]
        seeds = [image_seed(settings.seed, g) for g in batch]
        images = generate(model, prompts, plan, seeds, settings.batch_size)  # (b, 3, H, W)
        sampled += len(images)
        local.append(score_images(scorer, images, batch_recs))
        if quality is not None:
            local_q.append(score_images(quality, images, [{"prompt": p} for p in prompts]))
        room = settings.keep_images - sum(len(x) for x in kept)
        if room > 0:
            kept.append(images[:room])
    scores = dist.gather_shards(torch.cat(local), plan.images)
    all_recs = [r for r in recs for _ in range(k)]
    result.metrics[name] = benchmark_metrics(name, scores, all_recs)
    result.images[name] = torch.cat(kept) if kept else torch.zeros(0, 3, 1, 1)
    result.prompts[name] = [recs[g // k]["prompt"] for g in mine[: len(result.images[name])]]
    result.scores[name], result.plans[name] = scores, plan
    result.sampled[name] = dist.gather_cat(torch.tensor(sampled)).tolist()  # as counted
    return dist.gather_shards(torch.cat(local_q), plan.images) if quality is not None else None


def evaluate(
    model: FlowModel, benchmarks: str | Sequence[str], settings: EvalSettings | None = None
) -> EvalResult:
    """Sample every benchmark's prompts with the active adapter and score them.

    Call it on every process of a distributed run (each samples its share; see the module
    docstring); in a single process it samples everything.
    """
    settings = settings or EvalSettings()
    names = parse_benchmarks(benchmarks)
    result = EvalResult(metrics={})
    quality_alone = "toy-quality" in names and len(names) == 1
    # toy-quality beside task benchmarks scores the images sampled for them (no extra sampling)
    quality = None if quality_alone or "toy-quality" not in names else make_scorer("toy-quality", settings, model)  # fmt: skip
    parts = []
    for name in names:
        if name == "toy-quality" and not quality_alone:
            continue
        parts.append(_run(model, name, settings, result, quality))
    if quality is not None:
        scores = torch.cat(parts)  # each benchmark's in its global order, benchmark after benchmark
        result.metrics["toy-quality"] = benchmark_metrics("toy-quality", scores, [])
        result.scores["toy-quality"] = scores
    return result


def protocol_record(result: EvalResult) -> dict[str, dict]:
    """protocol.json: each benchmark's resolved sampling (prompts, images per prompt, steps,
    CFG, resolution) and the images each process sampled, so a metrics.json can be checked
    against the published protocol."""
    return {
        name: {**asdict(p), "images": p.images, "images_per_process": result.sampled.get(name)}
        for name, p in result.plans.items()
    }
