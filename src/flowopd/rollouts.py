"""Rollouts beside sampling: prompt data for an epoch, the run's sampler spec, rollout
collection with overlapped reward scoring, re-scoring recorded steps.

Kept small and explicit so each recipe still reads top to bottom.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowopd import sde
from flowopd.engine.logging import progress
from flowopd.models.base import Cond, FlowModel
from flowopd.rewards.combine import build_reward
from flowopd.sampling import SampleOutput, SamplerSpec, Trajectory, sample, step_fn

WORLD_PREFIX = "world:"  # data spec "world:geneval" / "world:ocr": the embedded world's train split


def load_prompts(
    spec: str, *, split: str = "train", n: int = 4000, task: str | None = None
) -> list[dict]:
    """Prompt records of a file in any published format (``data.prompts.read_prompt_file``:
    GenEval metadata JSONL, OCR or plain prompt ``.txt``, prompt-record JSONL), or
    ``world:TASK`` for the embedded world.

    task: a label for records that carry none (a plain prompt file's lines), e.g. the reward
    name of a ``data.datasets`` entry, so Flow-OPD can route them to that task's teacher.
    """
    if spec.startswith(WORLD_PREFIX):
        from flowopd.world.prompts import make_records

        return make_records(spec[len(WORLD_PREFIX) :], split, n, seed=0)
    from flowopd.data.prompts import read_prompt_file

    recs = read_prompt_file(spec)
    if task:
        for rec in recs:
            rec.setdefault("task", task)
    return recs


_SCORER: ThreadPoolExecutor | None = None


def submit_reward(
    reward: Callable[[Tensor, list[str], list[dict]], Tensor],
    images: Tensor,
    prompts: list[str],
    metadata: list[dict],
) -> Future[Tensor]:
    """Start scoring a batch and return at once: ``future.result()`` is the (B,) reward.

    A reward with its own ``submit`` (the OCR reward's worker pool) scores there; any other
    runs on one background thread. Either way the caller goes on sampling the next batch
    while this one is scored (the network's forward releases the GIL).
    """
    own = getattr(reward, "submit", None)
    if callable(own):
        return own(images, prompts, metadata)
    global _SCORER
    if _SCORER is None:
        _SCORER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowopd-reward")
    return _SCORER.submit(reward, images, prompts, metadata)


def sde_window(sample_cfg, seed: int, epoch: int) -> tuple[int, int] | None:
    """Flow-GRPO-Fast: the epoch's stochastic window (start, end), the same on every process;
    None when ``sample.sde_window_size`` is 0 (every step stochastic)."""
    size = sample_cfg.sde_window_size
    if not size:
        return None
    lo, hi = sample_cfg.sde_window_range
    start = int(np.random.default_rng(seed_for(seed, "window", epoch)).integers(lo, hi - size + 1))
    return (start, start + size)


def load_datasets(data) -> tuple[list[list[dict]], list[int]]:
    """A config's prompt datasets (``data.datasets`` or ``data.train``) and their mix ratio."""
    if data.datasets:
        datasets = [load_prompts(d.path, task=d.reward or None) for d in data.datasets]
        return datasets, list(data.mix_ratio or [1] * len(datasets))
    return [load_prompts(data.train)], [1]


def seed_for(*parts: int | str) -> int:
    """A stable 63-bit seed from parts (independent of process, hash randomisation, order)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def epoch_prompts(records: Sequence[dict], n: int, seed: int, epoch: int) -> list[dict]:
    """n records for an epoch, the same on every process (without replacement when possible)."""
    rng = np.random.default_rng(seed_for(seed, "prompts", epoch))
    idx = rng.choice(len(records), size=n, replace=len(records) < n)
    return [records[i] for i in idx]


@dataclass
class Rollouts:
    """A process's rollouts for one epoch: N = prompts x G samples.

    records/prompts: per sample; group_ids: (N,) global prompt index; cond: N rows;
    trajectory: as ``sampling.Trajectory``; images (N, 3, H, W); rewards (N,) float32 when
    ``collect_rollouts`` was given a reward (scored batch by batch, overlapping sampling),
    else None; score_seconds: time this thread spent scoring (in-line scoring, or the wait
    for the overlapped scores after the last batch), so recipes can split sample/score time.
    """

    records: list[dict]
    prompts: list[str]
    group_ids: Tensor
    cond: Cond
    trajectory: Trajectory
    images: Tensor
    latents: Tensor
    rewards: Tensor | None = None
    score_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.prompts)


def sampler_spec(cfg, epoch: int | None = None) -> SamplerSpec:
    """The run's sampler from its config (``sample.*`` and ``model.guidance_scale``); with
    ``epoch``, the epoch's Flow-GRPO-Fast window (``sde_window``) too, else every step of
    an SDE/CPS sampler is stochastic."""
    s = cfg.sample
    window = None if epoch is None else sde_window(s, cfg.train.seed, epoch)
    return SamplerSpec(
        num_steps=s.num_steps,
        kind=s.kind,
        noise_level=s.noise_level,
        guidance_scale=cfg.model.guidance_scale,
        sde_window=window,
    )


@dataclass(frozen=True)
class _Noise:
    """Where a rollout batch's noise comes from (see ``collect_rollouts``)."""

    seed: int
    epoch: int
    group_size: int
    same_initial_noise: bool
    antithetic: bool

    def draws(self, model: FlowModel, group_ids: Tensor, rows: list[int]) -> dict:
        """``sample``'s generator / noise_sign / latents for the sample rows ``rows``."""
        g = self.group_size
        # image k of a group draws from seed (.., k); antithetic pairs share seed k // 2
        k_of = [(i % g) // 2 if self.antithetic else i % g for i in rows]
        gens = [
            torch.Generator().manual_seed(seed_for(self.seed, self.epoch, int(group_ids[i]), k))
            for i, k in zip(rows, k_of, strict=True)
        ]
        sign = None
        if self.antithetic:
            sign = torch.tensor([1.0 - 2.0 * ((i % g) % 2) for i in rows])
        x_T = None
        if self.same_initial_noise:
            shape = model.latent_shape(None)
            seeds = [seed_for(self.seed, self.epoch, int(group_ids[i]), "x_T") for i in rows]
            x_T = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(k)) for k in seeds]
            )
        return {"generator": gens, "noise_sign": sign, "latents": x_T}


class _Scorer:
    """Scores rollout batches in sample order: on a background thread (``overlap``) or in
    line, keeping the seconds this thread spent scoring."""

    def __init__(self, reward, overlap: bool) -> None:
        self.reward, self.overlap = reward, overlap
        self.futures: list[Future[Tensor]] = []
        self.scores: list[Tensor] = []
        self.seconds = 0.0

    def add(self, images: Tensor, meta: list[dict]) -> None:
        if self.reward is None:
            return
        texts = [m["prompt"] for m in meta]
        if self.overlap:
            self.futures.append(submit_reward(self.reward, images, texts, meta))
            return
        t = time.time()
        self.scores.append(self.reward(images, texts, meta))
        self.seconds += time.time() - t

    def result(self, n: int) -> Tensor | None:
        """(n,) float32 rewards, or None without a reward."""
        if self.reward is None:
            return None
        scores = self.scores + [f.result() for f in self.futures]
        rewards = torch.cat([torch.as_tensor(r).float().cpu().reshape(-1) for r in scores])
        if rewards.shape != (n,):
            raise ValueError(f"reward returned {tuple(rewards.shape)} scores for {n} samples")
        return rewards


def collect_rollouts(
    model: FlowModel,
    records: Sequence[dict],
    first_group: int,
    group_size: int,
    spec: SamplerSpec,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    adapters_for: Callable[[list[dict]], list[str]] | None = None,
    record: bool = True,
    reward: Callable[[Tensor, list[str], list[dict]], Tensor] | None = None,
    overlap: bool | None = None,
    same_initial_noise: bool = False,
    antithetic: bool = False,
) -> Rollouts:
    """Sample ``group_size`` images for each record with the active adapter and sampler
    ``spec`` (no grad).

    Prompts are encoded once. Each sample's noise comes from a generator seeded by
    (seed, epoch, global prompt index, image index), so a run gives the same samples on
    any number of processes and any batch size. ``record=False`` keeps no trajectory
    (``trajectory.latents`` holds only the final sample): for recipes that train on the
    clean samples alone (CRD), it saves the (N, T + 1, C, h, w) states and step means.

    With ``reward``, each batch is scored as soon as it is decoded and ``Rollouts.rewards``
    holds the scores in sample order (the same values as scoring the whole epoch at once).
    ``same_initial_noise`` starts every image of a prompt from one x_T, seeded by
    (seed, epoch, global prompt index) (DanceGRPO); the SDE noise stays per image.
    ``antithetic`` pairs images 2k and 2k + 1 of a group (``group_size`` even): one x_T
    and mirrored SDE noise, eps and -eps at every stochastic step.
    ``overlap`` hands each batch to :func:`submit_reward`, so scoring batch k runs while
    batch k + 1 samples; None (default) overlaps when the model is not on the CPU. On a
    CPU-only machine the two compete for the same cores: measured 0.90x on 2 cores with the
    OCR reward (``bench/score_overlap.py``).
    """
    if overlap is None:
        overlap = model.device.type != "cpu"
    cond_unique = model.encode_prompts([r["prompt"] for r in records])
    n = len(records) * group_size
    group_ids = torch.arange(first_group, first_group + len(records)).repeat_interleave(group_size)
    sample_records = [r for r in records for _ in range(group_size)]
    cond = cond_unique.repeat_interleave(group_size)
    noise = _Noise(seed, epoch, group_size, same_initial_noise, antithetic)
    scorer = _Scorer(reward, overlap)
    outs: list[SampleOutput] = []
    starts = range(0, n, batch_size)
    for start in progress(starts, desc=f"sample epoch {epoch}", total=len(starts)):
        rows = list(range(start, min(n, start + batch_size)))
        meta = [sample_records[i] for i in rows]
        out = sample(
            model,
            cond[rows],
            **spec.kwargs(),
            **noise.draws(model, group_ids, rows),
            adapters=adapters_for(meta) if adapters_for else None,
            record=record,
        )
        outs.append(out)
        scorer.add(out.images, meta)
    t_wait = time.time()
    rewards = scorer.result(n)
    return Rollouts(
        records=sample_records,
        prompts=[r["prompt"] for r in sample_records],
        group_ids=group_ids,
        cond=cond,
        trajectory=Trajectory.cat([o.trajectory for o in outs]),
        images=torch.cat([o.images for o in outs]),
        latents=torch.cat([o.latents for o in outs]),
        rewards=rewards,
        score_seconds=scorer.seconds + time.time() - t_wait,
    )


def epoch_rollouts(
    cfg,
    model: FlowModel,
    records: Sequence[dict],
    first_group: int,
    spec: SamplerSpec,
    epoch: int,
    **kwargs,
) -> Rollouts:
    """``collect_rollouts`` as a recipe's config sets it: ``sample.group_size`` images per
    record, in batches of ``sample.batch_size``, seeded by ``train.seed`` and the epoch,
    with the config's shared-x_T / antithetic choices; ``kwargs`` go through (reward,
    record, adapters_for)."""
    s = cfg.sample
    return collect_rollouts(
        model,
        records,
        first_group,
        s.group_size,
        spec,
        batch_size=s.batch_size,
        seed=cfg.train.seed,
        epoch=epoch,
        same_initial_noise=s.same_initial_noise,
        antithetic=s.antithetic,
        **kwargs,
    )


def rescore_step(
    model: FlowModel,
    traj: Trajectory,
    step: int,
    cond: Cond,
    spec: SamplerSpec,
    *,
    adapters: Sequence[str] | None = None,
    cfg_grad: str = "both",
) -> tuple[sde.StepOutput, Tensor]:
    """Recompute step ``step`` of recorded trajectories with the current weights, with the
    sampler ``spec`` they were sampled with (its kind, noise level and guidance).

    Returns the step (its ``log_prob`` scores the recorded next state, ``mean`` carries the
    gradient) and the CFG-combined velocity v (B, C, h, w). ``cfg_grad``: which CFG branches
    carry the gradient (``train.cfg_grad``; see ``FlowModel.velocity``); the velocity is
    computed exactly as in sampling either way, so the ratio is 1 before any update.
    """
    sigmas = traj.sigmas
    s, s_next = float(sigmas[step]), float(sigmas[step + 1])
    x = traj.latents[:, step]
    v = model.velocity(
        x, s, cond, guidance_scale=spec.guidance_scale, adapters=adapters, cfg_grad=cfg_grad
    )
    out = step_fn(spec.kind)(
        v,
        x,
        s,
        s_next,
        spec.noise_level,
        sigma_max=float(sigmas[1]),
        prev_sample=traj.latents[:, step + 1],
    )
    return out, v


def trained_steps(stochastic: Tensor, num_steps: int, timestep_fraction: float) -> list[int]:
    """Steps to train: the stochastic ones among the first int(T * fraction)."""
    last = max(1, int(num_steps * timestep_fraction))
    return [i for i in range(min(last, num_steps)) if bool(stochastic[i])] or [
        i for i in range(num_steps) if bool(stochastic[i])
    ]


def task_data(cfg) -> tuple[list[list[dict]], list, list[str]]:
    """Prompt datasets, their rewards and their log labels: one entry per ``data.datasets``
    entry (mixing alternates between them), or the one ``data.train`` file."""
    if cfg.data.datasets:
        datasets = [load_prompts(d.path, task=d.reward or None) for d in cfg.data.datasets]
        rewards = [build_reward(cfg.reward, d.reward) for d in cfg.data.datasets]
        return datasets, rewards, [d.label for d in cfg.data.datasets]
    return [load_prompts(cfg.data.train)], [build_reward(cfg.reward)], [""]


@dataclass
class GroupScores:
    """An epoch's rewards gathered from all processes, with group-relative advantages.

    rewards, group_ids, advantages: (N_all,) over every process's samples, in rank order
    (``algorithms.group_advantages``: ``(r - mean_group) / std``, clipped to +-clip).
    """

    rewards: Tensor
    group_ids: Tensor
    advantages: Tensor
    clip: float

    @classmethod
    def gather(cls, ro: Rollouts, *, std: str, clip: float) -> GroupScores:
        from flowopd.algorithms import group_advantages
        from flowopd.engine import distributed as dist

        all_r, all_g = dist.gather_cat(ro.rewards), dist.gather_cat(ro.group_ids)
        return cls(all_r, all_g, group_advantages(all_r, all_g, std=std, clip=clip), clip)

    def mine(self, values: Tensor, rank: int, n: int) -> Tensor:
        """This process's rows ``rank * n .. (rank + 1) * n`` of an (N_all,) tensor."""
        return values[rank * n : (rank + 1) * n]

    def record(self) -> dict:
        """Advantage statistics, reward mean / std and images this epoch, for the log."""
        from flowopd.algorithms.advantages import advantage_stats

        rec = advantage_stats(self.rewards, self.group_ids, self.advantages, clip=self.clip)
        rec.update(reward_mean=float(self.rewards.mean()), reward_std=float(self.rewards.std()))
        return rec
