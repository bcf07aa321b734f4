"""What every recipe shares: prompt data, rewards, rollouts, re-scoring recorded steps.

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
from flowopd.models.base import Cond, FlowModel
from flowopd.sampling import SampleOutput, Trajectory, sample, step_fn

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


def collect_rollouts(
    model: FlowModel,
    records: Sequence[dict],
    first_group: int,
    group_size: int,
    *,
    num_steps: int,
    kind: str,
    noise_level: float,
    guidance_scale: float,
    batch_size: int,
    seed: int,
    epoch: int,
    sde_window: tuple[int, int] | None = None,
    adapters_for: callable | None = None,
    record: bool = True,
    reward: Callable[[Tensor, list[str], list[dict]], Tensor] | None = None,
    overlap: bool | None = None,
    same_initial_noise: bool = False,
    antithetic: bool = False,
) -> Rollouts:
    """Sample ``group_size`` images for each record with the active adapter (no grad).

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
    prompts = [r["prompt"] for r in records]
    cond_unique = model.encode_prompts(prompts)
    n = len(records) * group_size
    group_ids = torch.arange(first_group, first_group + len(records)).repeat_interleave(group_size)
    sample_records = [r for r in records for _ in range(group_size)]
    sample_prompts = [r["prompt"] for r in sample_records]
    cond = cond_unique.repeat_interleave(group_size)
    outs: list[SampleOutput] = []
    futures: list[Future[Tensor]] = []
    scores: list[Tensor] = []
    score_seconds = 0.0
    for start in range(0, n, batch_size):
        rows = list(range(start, min(n, start + batch_size)))
        # image k of a group draws from seed (.., k); antithetic pairs share seed k // 2
        k_of = [(i % group_size) // 2 if antithetic else i % group_size for i in rows]
        gens = [
            torch.Generator().manual_seed(seed_for(seed, epoch, int(group_ids[i]), k))
            for i, k in zip(rows, k_of, strict=True)
        ]
        sign = None
        if antithetic:
            sign = torch.tensor([1.0 - 2.0 * ((i % group_size) % 2) for i in rows])
        x_T = None
        if same_initial_noise:
            shape = model.latent_shape(None)
            x_T = torch.stack([
                torch.randn(shape, generator=torch.Generator().manual_seed(
                    seed_for(seed, epoch, int(group_ids[i]), "x_T")))
                for i in rows
            ])  # fmt: skip
        out = sample(
            model, cond[rows], num_steps, kind=kind, noise_level=noise_level,
            guidance_scale=guidance_scale, generator=gens, sde_window=sde_window, latents=x_T,
            noise_sign=sign,
            adapters=adapters_for([sample_records[i] for i in rows]) if adapters_for else None,
            record=record,
        )  # fmt: skip
        outs.append(out)
        if reward is not None:
            meta = [sample_records[i] for i in rows]
            texts = [m["prompt"] for m in meta]
            if overlap:
                futures.append(submit_reward(reward, out.images, texts, meta))
            else:
                t_score = time.time()
                scores.append(reward(out.images, texts, meta))
                score_seconds += time.time() - t_score
    t_wait = time.time()
    rewards = None
    if reward is not None:
        scores += [f.result() for f in futures]
        rewards = torch.cat([torch.as_tensor(r).float().cpu().reshape(-1) for r in scores])
        if rewards.shape != (n,):
            raise ValueError(f"reward returned {tuple(rewards.shape)} scores for {n} samples")
    return Rollouts(
        records=sample_records,
        prompts=sample_prompts,
        group_ids=group_ids,
        cond=cond,
        trajectory=Trajectory.cat([o.trajectory for o in outs]),
        images=torch.cat([o.images for o in outs]),
        latents=torch.cat([o.latents for o in outs]),
        rewards=rewards,
        score_seconds=score_seconds + time.time() - t_wait,
    )


def rescore_step(
    model: FlowModel,
    traj: Trajectory,
    step: int,
    cond: Cond,
    *,
    kind: str,
    noise_level: float,
    guidance_scale: float,
    adapters: Sequence[str] | None = None,
    cfg_grad: str = "both",
) -> tuple[sde.StepOutput, Tensor]:
    """Recompute step ``step`` of recorded trajectories with the current weights.

    Returns the step (its ``log_prob`` scores the recorded next state, ``mean`` carries the
    gradient) and the CFG-combined velocity v (B, C, h, w). ``cfg_grad``: which CFG branches
    carry the gradient (``train.cfg_grad``; see ``FlowModel.velocity``); the velocity is
    computed exactly as in sampling either way, so the ratio is 1 before any update.
    """
    sigmas = traj.sigmas
    s, s_next = float(sigmas[step]), float(sigmas[step + 1])
    x = traj.latents[:, step]
    v = model.velocity(
        x, s, cond, guidance_scale=guidance_scale, adapters=adapters, cfg_grad=cfg_grad
    )
    out = step_fn(kind)(
        v, x, s, s_next, noise_level, sigma_max=float(sigmas[1]),
        prev_sample=traj.latents[:, step + 1],
    )  # fmt: skip
    return out, v


def trained_steps(stochastic: Tensor, num_steps: int, timestep_fraction: float) -> list[int]:
    """Steps to train: the stochastic ones among the first int(T * fraction)."""
    last = max(1, int(num_steps * timestep_fraction))
    return [i for i in range(min(last, num_steps)) if bool(stochastic[i])] or [
        i for i in range(num_steps) if bool(stochastic[i])
    ]
