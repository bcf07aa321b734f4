"""Sampling with trajectories: ODE, Flow-GRPO SDE, CPS, and the windowed "Fast" variant.

``sample`` runs the model's schedule (``model.schedule``: SD3's ``sde.timesteps``, FLUX's
resolution-shifted one) with the model's velocity (CFG or guidance embedding in one
forward) and records everything training needs: the state before every step, each
step's log-prob, mean and std. "Denoising reduction" is just fewer steps here (10) than
at evaluation (40).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from flowopd import sde
from flowopd.engine.logging import progress as log_progress
from flowopd.models.base import Cond, FlowModel

KINDS = ("sde", "cps", "ode")


@dataclass(frozen=True)
class SamplerSpec:
    """How rollouts are sampled and their steps re-scored, as one value: built once from a
    config (``rollouts.sampler_spec``) and passed whole to ``collect_rollouts`` and
    ``rescore_step`` (``sample`` takes the same fields as keywords: ``**spec.kwargs()``).

    kind: "ode" (Euler), "sde" (Flow-GRPO) or "cps"; num_steps T; noise_level a (the SDE's
    sigma_t = a sqrt(t / (1 - t))); guidance_scale w (CFG: v = v_u + w (v_c - v_u));
    sde_window: (start, end) step indices that are stochastic (Flow-GRPO-Fast), None = all.
    """

    num_steps: int
    kind: str = "sde"
    noise_level: float = 0.7
    guidance_scale: float = 4.5
    sde_window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sampler kind '{self.kind}'; choose one of {KINDS}")

    def kwargs(self) -> dict:
        """The fields as ``sample``'s keyword arguments."""
        return asdict(self)


@dataclass
class Trajectory:
    """What a sampling call recorded. B samples, T steps, latents (C, h, w).

    latents:    (B, T + 1, C, h, w) the state before step i (index T: the final sample)
    log_probs:  (B, T) log-prob of each step's transition (0 for deterministic steps)
    means:      (B, T, C, h, w) each step's Gaussian mean (the ODE update on ODE steps)
    stds:       (T,) each step's noise scale (``StepOutput.std``; 0 on ODE steps)
    sigmas:     (T + 1,) the schedule
    stochastic: (T,) bool, True where the step was stochastic (the steps one can train)
    """

    latents: Tensor
    log_probs: Tensor
    means: Tensor
    stds: Tensor
    sigmas: Tensor
    stochastic: Tensor

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def __getitem__(self, idx) -> Trajectory:
        """Select samples (rows); the schedule is shared."""
        return Trajectory(
            self.latents[idx],
            self.log_probs[idx],
            self.means[idx],
            self.stds,
            self.sigmas,
            self.stochastic,
        )

    @staticmethod
    def cat(items: Sequence[Trajectory]) -> Trajectory:
        first = items[0]
        return Trajectory(
            torch.cat([t.latents for t in items]),
            torch.cat([t.log_probs for t in items]),
            torch.cat([t.means for t in items]),
            first.stds,
            first.sigmas,
            first.stochastic,
        )


@dataclass
class SampleOutput:
    images: Tensor | None  # (B, 3, H, W) in [0, 1]; None when decode=False
    latents: Tensor  # (B, C, h, w) final clean latents
    trajectory: Trajectory


def step_fn(kind: str):
    """The step function for a sampler kind (one function per kind, no switches in the math)."""
    return {"sde": sde.sde_step, "cps": sde.cps_step}[kind]


def _noise_source(generator, b: int):
    """shape -> float32 N(0, I) noise from one generator or one generator per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return lambda shape: torch.randn(shape, generator=generator, dtype=torch.float32)
    gens = list(generator)
    if len(gens) != b:
        raise ValueError(f"{len(gens)} generators for a batch of {b}")
    return lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gens])


@torch.no_grad()
def sample(
    model: FlowModel,
    prompts: Sequence[str] | Cond,
    num_steps: int,
    kind: str = "sde",
    noise_level: float = 0.7,
    guidance_scale: float = 4.5,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    sde_window: tuple[int, int] | None = None,
    *,
    resolution: int | None = None,
    latents: Tensor | None = None,
    adapters: Sequence[str] | None = None,
    decode: bool = True,
    record: bool = True,
    noise_sign: Tensor | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Sample images and their trajectory.

    kind: "ode" (deterministic Euler), "sde" (Flow-GRPO SDE) or "cps".
    sde_window: (start, end) step indices; only steps start <= i < end are stochastic
        (Flow-GRPO-Fast); None = every step stochastic for "sde"/"cps".
    prompts: strings, or a ``Cond`` already encoded (B rows).
    generator: one generator for the batch (initial noise drawn exactly as diffusers does,
        ``torch.randn(shape, generator=...)``), or one per sample, so that each sample's
        noise is independent of the batch it is in (used for process-count invariance).
    latents: optional initial noise (B, C, h, w); otherwise drawn from ``generator``.
    adapters: per-sample adapter names (e.g. sample from routed teachers), or None.
    noise_sign: optional (B,) of +1 / -1 multiplying each row's step noise (not its
        initial noise): two rows with equally seeded generators and opposite signs are an
        antithetic pair (x_T shared, every SDE step's noise mirrored).
    progress: a bar over the denoising steps (``engine.logging.progress``: main process,
        terminal only); callers that loop over batches show their own bar instead.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown sampler kind '{kind}'; choose one of {KINDS}")
    cond = prompts if isinstance(prompts, Cond) else model.encode_prompts(list(prompts))
    b = len(cond)
    shape = (b, *model.latent_shape(resolution))
    randn = _noise_source(generator, b)
    if latents is None:
        latents = randn(shape)
    x = latents.to(model.device, torch.float32)
    sigmas = model.schedule(num_steps, resolution)  # (num_steps + 1,) from 1 to 0
    sigma_max = float(sigmas[1]) if num_steps > 1 else 0.0
    lo, hi = (0, num_steps) if sde_window is None else sde_window
    stochastic = torch.tensor([kind != "ode" and lo <= i < hi for i in range(num_steps)])

    states, log_probs, means, stds = [x], [], [], []
    steps = range(num_steps)
    for i in log_progress(steps, desc=f"sampling {b}", total=num_steps) if progress else steps:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = model.velocity(x, s, cond, guidance_scale=guidance_scale, adapters=adapters)
        if stochastic[i]:
            noise = randn(tuple(x.shape)).to(x.device)
            if noise_sign is not None:
                noise = noise * noise_sign.to(noise).view(-1, *([1] * (noise.dim() - 1)))
            out = step_fn(kind)(v, x, s, s_next, noise_level, sigma_max=sigma_max, noise=noise)
            x, lp, mean, std = out.prev_sample, out.log_prob, out.mean, float(out.std)
        else:
            x = sde.ode_step(v, x, s, s_next)
            lp, mean, std = torch.zeros(b, device=x.device), x, 0.0
        if record:
            states.append(x)
            log_probs.append(lp)
            means.append(mean)
            stds.append(std)
    traj = _trajectory(x, states, log_probs, means, stds, sigmas, stochastic, record)
    images = model.decode(x) if decode else None
    return SampleOutput(images=images, latents=x, trajectory=traj)


def _trajectory(
    x: Tensor,
    states: list,
    log_probs: list,
    means: list,
    stds: list,
    sigmas: Tensor,
    stochastic: Tensor,
    record: bool,
) -> Trajectory:
    """The recorded trajectory (states (B, T + 1, ...), per-step log-probs, means, stds);
    without ``record`` only the final sample x (B, C, h, w) as its one state."""
    if not record:
        b = len(x)
        return Trajectory(
            x[:, None], torch.zeros(b, 0), x[:, :0], torch.zeros(0), sigmas, stochastic
        )
    return Trajectory(
        latents=torch.stack(states, 1),
        log_probs=torch.stack(log_probs, 1),
        means=torch.stack(means, 1),
        stds=torch.tensor(stds, dtype=torch.float32),
        sigmas=sigmas,
        stochastic=stochastic,
    )
