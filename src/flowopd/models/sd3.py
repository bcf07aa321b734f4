"""The ``sd3`` backend: Stable Diffusion 3 / 3.5 through diffusers.

Loads a diffusers ``StableDiffusion3Pipeline`` directory (local path, or a hub id when the
hub is reachable) and exposes it as a ``FlowModel``. Also serves the embedded default:
an SD3 pipeline directory whose ``vae`` is null works in pixel space (latents are the
image scaled to [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from flowopd import sde
from flowopd.errors import UserError, unknown
from flowopd.lora_targets import SD3_TARGETS
from flowopd.models.backend import (
    FLOWOPD_META,
    LORA_WEIGHTS,
    DiffusersBackend,
    load_pipeline,
    parse_dtype,
)
from flowopd.models.base import Cond

__all__ = ["CFG_FORWARD", "CFG_GRAD", "FLOWOPD_META", "LORA_WEIGHTS", "SD3Model", "parse_dtype"]

# Gradient through the CFG pair in a forward with grad, and how the pair runs: one
# batched forward or two (see ``SD3Model.velocity``).
CFG_GRAD = ("cond", "both")
CFG_FORWARD = ("batched", "split")


class SD3Model(DiffusersBackend):
    """A diffusers SD3/SD3.5 pipeline behind the ``FlowModel`` protocol.

    The transformer's frozen base weights live in ``dtype``; LoRA weights stay float32 and
    the forward runs under autocast to ``dtype`` (so a bf16 network feeds float32 SDE math).
    Classifier-free guidance concatenates [negative, positive] into one forward, as the
    diffusers pipeline does, so our sampler and the pipeline agree to float precision.
    ``cfg_forward="split"`` runs the two halves as two forwards instead: the same values up
    to float round-off, and a training forward that detaches the unconditional branch
    (``cfg_grad="cond"``) then runs it without autograd, so the backward covers half the
    rows and half the activations are kept.
    """

    backend = "sd3"
    DEFAULT_TARGETS = SD3_TARGETS

    def __init__(
        self,
        pipe,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_sequence_length: int = 256,
        decode_chunk: int = 16,
        path: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        offload_text_encoders: bool = False,
        default_guidance_scale: float = 4.5,
        resolution: int | None = None,
        cfg_forward: str = "batched",
    ) -> None:
        if cfg_forward not in CFG_FORWARD:
            raise unknown("cfg_forward", cfg_forward, CFG_FORWARD)
        # how the CFG pair runs, the same in sampling, training and evaluation so that the
        # re-scored log-probs equal the collected ones (see ``velocity``)
        self.cfg_forward = cfg_forward
        self.pipe = pipe
        # the CFG scale that sampling and evaluation use when none is given: the model
        # directory's flowopd.json "guidance_scale", else 4.5 (SD3.5's usual setting)
        self.default_guidance_scale = float(default_guidance_scale)
        self.path = path
        # the image side sampling uses when none is given (a run's model.resolution);
        # None = the transformer's sample_size x the VAE scale (1024 px for SD3.5-M)
        self.resolution: int | None = None
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
        if resolution is not None:
            self.set_resolution(resolution)
        self.shift = float(pipe.scheduler.config.get("shift", 3.0))
        if pipe.scheduler.config.get("use_dynamic_shifting", False):
            raise UserError(
                "this scheduler uses dynamic shifting, which flowopd's schedule does not implement; "
                "use an SD3/SD3.5 model with a fixed shift"
            )

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
    ) -> SD3Model:
        """Load a diffusers pipeline directory (``model_index.json``) or a hub id.

        gradient_checkpointing / compile / offload_text_encoders / cfg_forward: see
        ``SD3Model``'s constructor (memory and speed options; all off by default).
        resolution: the image side sampling uses by default (see ``set_resolution``).
        """
        from diffusers import StableDiffusion3Pipeline

        from flowopd.models.flux import check_not_flux

        check_not_flux(path, "sd3")
        pipe, meta = load_pipeline(
            StableDiffusion3Pipeline, path, "stabilityai/stable-diffusion-3.5-medium"
        )
        msl = max_sequence_length or int(meta.get("max_sequence_length", 256))
        return cls(
            pipe, device=device, dtype=dtype, max_sequence_length=msl, path=str(path),
            gradient_checkpointing=gradient_checkpointing, compile=compile,
            offload_text_encoders=offload_text_encoders, cfg_forward=cfg_forward,
            default_guidance_scale=float(meta.get("guidance_scale", 4.5)),
            resolution=resolution,
        )  # fmt: skip

    def save_pretrained(self, path: str | Path, meta: dict | None = None) -> None:
        """Save the pipeline (and flowopd metadata) atomically to ``path``."""
        info = {
            "max_sequence_length": self.max_sequence_length,
            "guidance_scale": self.default_guidance_scale,
            **(meta or {}),
        }
        self._write_pipeline(path, info)

    def _text_encoders(self) -> list[nn.Module]:
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2, p.text_encoder_3) if m is not None]

    def _modules(self) -> list[nn.Module]:
        p = self.pipe
        mods = [p.transformer, p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3]
        return [m for m in mods if m is not None]

    # -- shapes -----------------------------------------------------------------------------
    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.pixel_space else int(self.pipe.vae_scale_factor)

    @property
    def native_resolution(self) -> int:
        """The transformer's sample_size x the VAE scale (1024 px for SD3.5-M)."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def default_resolution(self) -> int:
        """The image side used when none is given: ``set_resolution``'s, else native."""
        return self.resolution or self.native_resolution

    def set_resolution(self, resolution: int | None) -> None:
        """Sample (and so train and evaluate) at ``resolution`` px by default; None = native.

        A run's ``model.resolution`` lands here: SD3.5-M at 512 px samples (4, 16, 64, 64)
        latents where its native 1024 px would give (4, 16, 128, 128), 4x the tokens.
        """
        if resolution is not None:
            self.latent_shape(resolution)  # a clear error for a side the model cannot use
        self.resolution = resolution

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) at ``resolution`` px (None: ``default_resolution``); h = w = res / vae."""
        res = resolution or self.default_resolution
        mult = self.vae_scale_factor * int(self.transformer.config.patch_size)
        if res < mult or res % mult:
            raise UserError(
                f"resolution {res} must be a positive multiple of {mult} for this model "
                f"(VAE scale {self.vae_scale_factor} x patch {self.transformer.config.patch_size}); "
                "fix model.resolution"
            )
        side = res // self.vae_scale_factor
        return (int(self.transformer.config.in_channels), side, side)

    def schedule(self, num_steps: int, resolution: int | None = None) -> Tensor:
        """(num_steps + 1,) float32 sigmas from 1 to 0, as diffusers' SD3 pipeline builds
        them: ``sde.timesteps(num_steps, shift)`` (the same at every resolution)."""
        return sde.timesteps(num_steps, self.shift)

    # -- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be a list of strings")
        if len(prompts) == 0:
            raise UserError("no prompts given")
        with self._text_encoders_on_device():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return Cond(embeds.float(), pooled.float())

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
        """v(x, sigma | cond) with CFG ``v_u + w (v_c - v_u)``.

        The CFG pair runs as ``cfg_forward`` says: "batched" (one forward over
        [negative, positive], as the diffusers pipeline) or "split" (two forwards).

        x: (B, C, h, w); sigma: float or (B,); cond: B rows. Returns float32 (B, C, h, w).
        cfg_grad: which CFG branches carry gradients; "both" (the derivative of the guided
        velocity, ``(1 - w) dv_u + w dv_c``) or "cond" (``v_u`` detached: ``w dv_c``, as
        Flow-GRPO trains). The forward value is the same either way; with "split" the
        detached branch also skips its backward and its stored activations.
        The transformer is called with ``timestep = 1000 * sigma`` in float32, as the
        diffusers pipeline passes it, whatever the model dtype (bf16 would round 987.65 to
        988; the sinusoidal embedding is computed in float32 inside the model).
        """
        b = x.shape[0]
        if cfg_grad not in CFG_GRAD:
            raise unknown("cfg_grad", cfg_grad, CFG_GRAD)
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows for a batch of {b}")
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        sig = sig.expand(b) if sig.ndim == 0 else sig
        cfg = guidance_scale > 1.0
        x_in = x.to(self.device)
        t_in = sig * 1000.0
        c_in = cond.to(self.device)
        names = list(adapters) if adapters is not None else None
        self._check_routing(names)
        if not cfg:
            return self._forward(x_in, t_in, c_in, names)
        neg = self.negative_cond(b).to(self.device)
        if self.cfg_forward == "split":
            # two forwards of B rows; under "cond" the unconditional one keeps no autograd
            # graph: no activations stored, and the backward covers the B conditional rows
            with torch.no_grad() if cfg_grad == "cond" else nullcontext():
                v_u = self._forward(x_in, t_in, neg, names)
            v_c = self._forward(x_in, t_in, c_in, names)
        else:
            out = self._forward(
                torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), Cond.cat([neg, c_in]),
                names + names if names is not None else None,
            )  # fmt: skip
            v_u, v_c = out.chunk(2)  # (B, C, h, w) each: [negative, positive]
            if cfg_grad == "cond":
                # the same values, but no gradient from the unconditional half (its rows
                # still run through the backward, with a zero upstream gradient)
                v_u = v_u.detach()
        return v_u + guidance_scale * (v_c - v_u)

    def _forward(self, x: Tensor, t: Tensor, cond: Cond, names: list[str] | None) -> Tensor:
        """One transformer call: x (N, C, h, w), t (N,) float32 timesteps, cond N rows;
        returns float32 (N, C, h, w)."""
        routing = self._routing(names) if names else nullcontext()
        with routing, self._autocast():
            out = self.transformer(
                hidden_states=x.to(self.dtype),
                timestep=t,  # float32 (N,): never cast to the model dtype
                encoder_hidden_states=cond.embeds.to(self.dtype),
                pooled_projections=cond.pooled.to(self.dtype),
                return_dict=False,
            )[0]
        return out.float()

    # -- images -----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if self.pixel_space:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        cfg = self.vae.config
        images = []
        for chunk in latents.split(self.decode_chunk):
            z = chunk.to(self.device, self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0)
            images.append(self.vae.decode(z, return_dict=False)[0].float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        if self.pixel_space:
            return images.float() * 2 - 1
        cfg = self.vae.config
        out = []
        for chunk in images.split(self.decode_chunk):
            dist = self.vae.encode(chunk.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
            out.append((dist.mode().float() - (cfg.shift_factor or 0)) * cfg.scaling_factor)
        return torch.cat(out)
