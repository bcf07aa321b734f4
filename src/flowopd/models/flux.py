"""The ``flux`` backend: FLUX.1 (dev / schnell) through diffusers' ``FluxPipeline``.

Latents. Outside this file latents are the protocol's unpacked ``(B, C, h, w)`` (C = 16,
h = w = resolution / 8 for FLUX.1): samplers, SDE steps, losses and trajectories are the
same as for SD3. ``velocity`` packs them into FLUX's 2x2-patch token sequence
``(B, h/2 * w/2, 4 C)`` with the image position ids, runs the transformer and unpacks the
output again; packing is a permutation, so the Euler / SDE updates of FluxPipeline (on
packed latents) and of flowopd (on unpacked ones) are the same numbers.

Text. CLIP-L's pooled output and T5-XXL's token sequence: ``Cond(embeds=T5 tokens
(B, L, 4096), pooled=CLIP pooled (B, 768))``; text position ids are zeros (L, 3).

Guidance. FLUX.1-dev is guidance-distilled (``transformer.config.guidance_embeds``): the
guidance scale w enters as an embedding of the same single forward, with no
classifier-free guidance pair. ``velocity(guidance_scale=w)`` passes w as that embedding
(FluxPipeline's ``guidance_scale``, 3.5 by default). So for FLUX:

- sampling and every re-scored training forward are one forward of B rows at the run's w;
- GRPO's KL reference is that same single forward, same w, with the adapters switched
  off (``adapters_disabled``), exactly as Flow-GRPO's FLUX script computes it;
- Flow-OPD's teacher and anchor velocities are that same forward, same w, routed through
  the teacher / anchor LoRAs (per-sample adapters);
- ``train.cfg_grad`` has no effect: there is no unconditional branch to detach, and
  ``model.cfg_forward`` ("batched" / "split") is accepted and ignored for the same reason.

FLUX.1-schnell (``guidance_embeds=False``) ignores w: flowopd does not run true CFG with a
negative prompt for FLUX (FluxPipeline's ``true_cfg_scale``, off by default), so every
FLUX velocity is one forward.

Schedule. FluxPipeline samples at sigmas ``linspace(1, 1/N, N)`` time-shifted by
``exp(mu)`` with ``mu`` linear in the image-token count (resolution-dependent
"dynamic shifting"), then 0; ``schedule`` builds exactly those with diffusers' own
scheduler. At a fixed resolution that is SD3's shift formula with ``shift = exp(mu)``,
which ``shift`` returns for the recipes' training-time grids (CRD, NFT, AWM).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from flowopd.errors import UserError, unknown
from flowopd.lora_targets import FLUX_TARGETS
from flowopd.models.backend import DiffusersBackend, load_pipeline, looks_like_hub_id, parse_dtype
from flowopd.models.base import Cond

__all__ = ["FLUX_HUB_IDS", "FluxModel", "check_not_flux", "pack_latents", "unpack_latents"]

# hub ids known to be FLUX pipelines (the sd3 backend refuses them with a clear error)
FLUX_HUB_IDS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
CFG_GRAD = ("cond", "both")
CFG_FORWARD = ("batched", "split")


def pipeline_class(path: str) -> str | None:
    """The pipeline class a model names: ``model_index.json``'s ``_class_name`` of a local
    directory, ``FluxPipeline`` for a known FLUX hub id, else None (unknown)."""
    index = Path(path).expanduser() / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (ValueError, AttributeError):
            return None  # the backend's loader reports a broken file
    if looks_like_hub_id(path) and path in FLUX_HUB_IDS:
        return "FluxPipeline"
    return None


def check_not_flux(path: str, backend: str) -> None:
    """One-line UserError when a FLUX model is loaded with another backend."""
    name = pipeline_class(path)
    if name is not None and name.startswith("Flux"):
        raise UserError(
            f"model '{path}' is a FLUX pipeline ({name}), not {backend}: set model.backend=flux "
            "(or --backend flux)"
        )


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4 C): 2x2 patches as tokens, row-major, each token's
    features ordered (C, 2, 2) as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4 C) -> (B, C, h, w): the inverse of ``pack_latents``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxModel(DiffusersBackend):
    """A diffusers FLUX.1 pipeline behind the ``FlowModel`` protocol (module docstring).

    Like the sd3 backend: base weights in ``dtype`` under autocast, LoRA weights and the
    SDE math in float32, VAE and text encoders in float32.
    """

    backend = "flux"
    DEFAULT_TARGETS = FLUX_TARGETS

    def __init__(
        self,
        pipe,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_sequence_length: int = 512,
        decode_chunk: int = 16,
        path: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        offload_text_encoders: bool = False,
        default_guidance_scale: float = 3.5,
        resolution: int | None = None,
        native_resolution: int | None = None,
        cfg_forward: str = "batched",
    ) -> None:
        if cfg_forward not in CFG_FORWARD:  # accepted for config parity; one forward anyway
            raise unknown("cfg_forward", cfg_forward, CFG_FORWARD)
        if pipe.vae is None:
            raise UserError("a FLUX pipeline needs its VAE; re-save the model with one")
        self.pipe = pipe
        self.path = path
        # FluxPipeline's default guidance 3.5 unless the directory's flowopd.json says
        self.default_guidance_scale = float(default_guidance_scale)
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.max_sequence_length = max_sequence_length
        self.decode_chunk = decode_chunk
        self.transformer: nn.Module = pipe.transformer
        self.vae = pipe.vae
        self._setup(
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
            offload_text_encoders=offload_text_encoders,
        )
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        # FluxPipeline's default side: default_sample_size (128) x the VAE scale = 1024 px
        self._native = native_resolution or int(pipe.default_sample_size) * self.vae_scale_factor
        self.resolution: int | None = None
        if resolution is not None:
            self.set_resolution(resolution)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_sequence_length: int | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        offload_text_encoders: bool = False,
        resolution: int | None = None,
        cfg_forward: str = "batched",
    ) -> FluxModel:
        """Load a FluxPipeline directory (``model_index.json``) or a hub id; the options
        are the sd3 backend's (``SD3Model.from_pretrained``)."""
        from diffusers import FluxPipeline

        name = pipeline_class(path)
        if name is not None and not name.startswith("Flux"):
            raise UserError(
                f"model '{path}' is a {name}, not a FLUX pipeline: set model.backend=sd3 "
                "(or --backend sd3)"
            )
        pipe, meta = load_pipeline(FluxPipeline, path, FLUX_HUB_IDS[0])
        msl = max_sequence_length or int(meta.get("max_sequence_length", 512))
        return cls(
            pipe, device=device, dtype=dtype, max_sequence_length=msl, path=str(path),
            gradient_checkpointing=gradient_checkpointing, compile=compile,
            offload_text_encoders=offload_text_encoders, cfg_forward=cfg_forward,
            default_guidance_scale=float(meta.get("guidance_scale", 3.5)),
            resolution=resolution, native_resolution=meta.get("native_resolution"),
        )  # fmt: skip

    def save_pretrained(self, path: str | Path, meta: dict | None = None) -> None:
        """Save the pipeline (and flowopd metadata) atomically to ``path``."""
        info = {
            "max_sequence_length": self.max_sequence_length,
            "guidance_scale": self.default_guidance_scale,
            "native_resolution": self._native,
            **(meta or {}),
        }
        self._write_pipeline(path, info)

    def _text_encoders(self) -> list[nn.Module]:
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2) if m is not None]

    def _modules(self) -> list[nn.Module]:
        p = self.pipe
        mods = [p.transformer, p.vae, p.text_encoder, p.text_encoder_2]
        return [m for m in mods if m is not None]

    # -- shapes and schedule ----------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def native_resolution(self) -> int:
        return self._native

    @property
    def default_resolution(self) -> int:
        return self.resolution or self._native

    def set_resolution(self, resolution: int | None) -> None:
        """Sample (and so train and evaluate) at ``resolution`` px by default; None = native."""
        if resolution is not None:
            self.latent_shape(resolution)
        self.resolution = resolution

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) at ``resolution`` px: C = in_channels / 4 (16), h = w = res / vae (the
        side must be a multiple of 2 x the VAE scale, 16 px for FLUX.1, for the packing)."""
        res = resolution or self.default_resolution
        mult = 2 * self.vae_scale_factor
        if res < mult or res % mult:
            raise UserError(
                f"resolution {res} must be a positive multiple of {mult} for this model "
                f"(VAE scale {self.vae_scale_factor} x 2x2 packing); fix model.resolution"
            )
        side = res // self.vae_scale_factor
        return (int(self.transformer.config.in_channels) // 4, side, side)

    def _mu(self, resolution: int | None) -> float:
        """FluxPipeline's ``mu``: linear in the packed image-token count (h/2)(w/2)."""
        _, h, w = self.latent_shape(resolution)
        cfg = self.pipe.scheduler.config
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        s_lo, s_hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (s_hi - s_lo) / (hi - lo)
        return (h // 2) * (w // 2) * m + s_lo - m * lo

    @property
    def shift(self) -> float:
        """The equivalent fixed time shift at ``default_resolution``: ``exp(mu)`` with
        dynamic shifting (FLUX.1), else the scheduler's ``shift``."""
        if self.pipe.scheduler.config.get("use_dynamic_shifting", False):
            return math.exp(self._mu(None))
        return float(self.pipe.scheduler.config.get("shift", 1.0))

    def schedule(self, num_steps: int, resolution: int | None = None) -> Tensor:
        """(num_steps + 1,) float32 sigmas, FluxPipeline's: ``linspace(1, 1/N, N)`` shifted
        by diffusers' own scheduler at ``mu(resolution)``, then 0."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        dynamic = sched.config.get("use_dynamic_shifting", False)
        sched.set_timesteps(
            sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
            mu=self._mu(resolution) if dynamic else None,
        )
        return sched.sigmas.to(torch.float32).cpu()

    # -- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Cond(embeds=T5 tokens (B, L, D_t5), pooled=CLIP pooled (B, D_clip)), float32."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be a list of strings")
        if len(prompts) == 0:
            raise UserError("no prompts given")
        with self._text_encoders_on_device():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return Cond(embeds.float(), pooled.float())

    # -- velocity ---------------------------------------------------------------------------
    def velocity(
        self,
        x: Tensor,
        sigma: float | Tensor,
        cond: Cond,
        *,
        guidance_scale: float = 1.0,
        adapters: Sequence[str] | None = None,
        cfg_grad: str = "both",
    ) -> Tensor:
        """v(x, sigma | cond, w) in one forward of B rows; returns float32 (B, C, h, w).

        x: (B, C, h, w) unpacked latents; sigma: float or (B,); cond: B rows.
        guidance_scale w: the guidance embedding of a guidance-distilled model (FLUX.1-dev,
        passed as FluxPipeline does: a float32 (B,) tensor); ignored when the transformer
        has no guidance embedding (schnell). cfg_grad: validated, no effect (no CFG pair).
        The transformer gets ``timestep = (1000 sigma) / 1000`` in float32, the value
        FluxPipeline passes (its scheduler's timesteps over 1000).
        """
        b, _, h, w = x.shape
        if cfg_grad not in CFG_GRAD:
            raise unknown("cfg_grad", cfg_grad, CFG_GRAD)
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows for a batch of {b}")
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        sig = sig.expand(b) if sig.ndim == 0 else sig
        names = list(adapters) if adapters is not None else None
        self._check_routing(names)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full(
                (b,), float(guidance_scale), dtype=torch.float32, device=self.device
            )
        tokens = pack_latents(x.to(self.device))  # (B, h/2 * w/2, 4 C)
        out = self._forward(
            tokens, (sig * 1000.0) / 1000.0, guidance, cond.to(self.device), names, h, w
        )
        return unpack_latents(out, h, w)

    def _forward(
        self,
        tokens: Tensor,
        t: Tensor,
        guidance: Tensor | None,
        cond: Cond,
        names: list[str] | None,
        h: int,
        w: int,
    ) -> Tensor:
        """One transformer call on packed tokens (N, h/2 * w/2, 4 C); float32 out, same shape."""
        routing = self._routing(names) if names else nullcontext()
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        with routing, self._autocast():
            out = self.transformer(
                hidden_states=tokens.to(self.dtype),
                timestep=t,  # float32 (N,)
                guidance=guidance,
                pooled_projections=cond.pooled.to(self.dtype),
                encoder_hidden_states=cond.embeds.to(self.dtype),
                txt_ids=txt_ids,
                img_ids=image_ids(h, w, self.device, self.dtype),
                return_dict=False,
            )[0]
        return out.float()

    # -- images -----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, 3, H, W) in [0, 1]: ``z / scaling + shift`` through the VAE."""
        cfg = self.vae.config
        images = []
        for chunk in latents.split(self.decode_chunk):
            z = chunk.to(self.device, self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
            images.append(self.vae.decode(z, return_dict=False)[0].float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, h, w): ``(mode - shift) x scaling``."""
        cfg = self.vae.config
        out = []
        for chunk in images.split(self.decode_chunk):
            dist = self.vae.encode(chunk.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
            out.append((dist.mode().float() - cfg.shift_factor) * cfg.scaling_factor)
        return torch.cat(out)
