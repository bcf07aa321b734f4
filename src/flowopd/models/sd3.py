"""The ``sd3`` backend: Stable Diffusion 3 / 3.5 through diffusers.

Loads a diffusers ``StableDiffusion3Pipeline`` directory (local path, or a hub id when the
hub is reachable) and exposes it as a ``FlowModel``. Also serves the embedded default:
an SD3 pipeline directory whose ``vae`` is null works in pixel space (latents are the
image scaled to [-1, 1]).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from flowopd.engine.logging import library_warnings
from flowopd.errors import UserError, unknown
from flowopd.models import adapters as ad
from flowopd.models.base import Cond

LORA_WEIGHTS = ad.LORA_WEIGHTS
FLOWOPD_META = "flowopd.json"  # optional per-model defaults written by `flowopd pretrain`

# Gradient through the CFG pair in a forward with grad, and how the pair runs: one
# batched forward or two (see ``SD3Model.velocity``).
CFG_GRAD = ("cond", "both")
CFG_FORWARD = ("batched", "split")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise unknown("dtype", dtype, _DTYPES)
    return _DTYPES[dtype]


def _read_json(path: Path) -> dict:
    """A JSON object of a pipeline directory; a broken file is a one-line UserError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"'{path}' is not valid JSON ({e}); re-save the model directory") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a JSON object; re-save the model directory")
    return data


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


class SD3Model:
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
        # offloaded text encoders stay on the CPU and visit the device only while encoding
        self._offload_te = offload_text_encoders
        for m in self._modules():
            m.requires_grad_(False)
            m.eval()
            if not (offload_text_encoders and m in self._text_encoders()):
                m.to(self.device)
        if self.transformer.dtype != self.dtype:
            self.transformer.to(dtype=self.dtype)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # diffusers re-runs each block in the backward (non-reentrant torch checkpoint,
            # so LoRA weights inside a block still get gradients) instead of storing its
            # ~20 d activations per token: ~1 extra forward for most of the activations.
            # The re-run sees the adapter state of backward time: callers must not switch
            # the active adapter between a forward with grad and its backward.
            self.transformer.enable_gradient_checkpointing()
        self.compiled = compile
        if compile:
            # in place (nn.Module.compile): parameter names, peft adapters and saving are
            # unchanged; adding an adapter or new shapes trigger a recompilation
            self.transformer.compile()
        self._neg: Cond | None = None
        if resolution is not None:
            self.set_resolution(resolution)
        self._trainable: str | None = None
        self._active: str | None = None
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

        local = Path(path).expanduser()
        kwargs: dict = {}
        meta: dict = {}
        if local.is_dir():
            index = local / "model_index.json"
            if not index.is_file():
                raise UserError(
                    f"model '{path}' is not a diffusers pipeline directory (no model_index.json); "
                    "pass a directory saved with save_pretrained or a hub id like org/name"
                )
            components = _read_json(index)
            # components saved as null must be passed as None again to reload
            for key, value in components.items():
                if isinstance(value, list) and value[0] is None:
                    kwargs[key] = None
            if (local / FLOWOPD_META).is_file():
                meta = _read_json(local / FLOWOPD_META)
            source = str(local)
        elif _looks_like_hub_id(path):
            source = path
        else:
            raise UserError(
                f"model '{path}' not found: pass an existing diffusers pipeline directory "
                "or a hub id like stabilityai/stable-diffusion-3.5-medium"
            )
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(
                source,
                dtype=torch.float32,
                local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") == "1" or local.is_dir(),
                **kwargs,
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load model '{path}': {first}") from None
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
        with ad.atomic_dir(path) as tmp:
            self.pipe.save_pretrained(tmp, safe_serialization=True)
            info = {
                "max_sequence_length": self.max_sequence_length,
                "guidance_scale": self.default_guidance_scale,
                **(meta or {}),
            }
            (tmp / FLOWOPD_META).write_text(json.dumps(info, indent=2))

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

    def negative_cond(self, n: int) -> Cond:
        if self._neg is None:
            self._neg = self.encode_prompts([""])
        return self._neg.expand(n)

    def offload_text_encoders(self) -> None:
        """Move the text encoders to CPU now and keep them there between encodings
        (each later ``encode_prompts`` brings them to the device and back)."""
        self._offload_te = True
        for m in self._text_encoders():
            m.to("cpu")

    @contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """With offloading: the encoders on the device for the body, back on CPU after.

        SD3's encoders (CLIP-L, CLIP-G, T5-XXL: 5.6B parameters, 22 GB in float32) are
        needed for a few prompts per epoch; keeping them off the GPU frees that memory for
        activations at the cost of a host-to-device copy per encoding call.
        """
        if not self._offload_te or self.device.type == "cpu":
            yield
            return
        encoders = self._text_encoders()
        for m in encoders:
            m.to(self.device)
        try:
            yield
        finally:
            for m in encoders:
                m.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- velocity ---------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

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
        if names and self.gradient_checkpointing and torch.is_grad_enabled():
            # the backward re-runs each block after the routing hooks are gone: it would
            # silently recompute with the active adapter instead of the per-sample ones
            raise UserError(
                "per-sample adapter routing with gradients cannot be combined with "
                "gradient_checkpointing; turn one of them off"
            )
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

    @contextmanager
    def _routing(self, names: list[str]) -> Iterator[None]:
        # peft ignores per-sample names while adapters are disabled (our "no active adapter")
        disabled = self._active is None and bool(self.adapter_names)
        if disabled:
            self.transformer.enable_adapters()
        try:
            with ad.per_sample_adapters(self.transformer, names):
                yield
        finally:
            if disabled:
                self._restore_active()

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

    # -- adapters ---------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return ad.adapter_names(self.transformer)

    def _check_adapter(self, name: str) -> None:
        if name not in self.adapter_names:
            raise unknown("adapter", name, self.adapter_names or ["(none loaded)"])

    def add_adapter(
        self,
        name: str,
        *,
        rank: int,
        alpha: float,
        target_modules: Sequence[str] | None = None,
        init: str | bool = "gaussian",
    ) -> None:
        from peft import LoraConfig

        if name in self.adapter_names:
            raise UserError(f"adapter '{name}' already exists")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=init,
            target_modules=list(target_modules or ad.SD3_TARGETS),
        )
        with library_warnings():  # peft's warning on every adapter after the first
            self.transformer.add_adapter(config, adapter_name=name)
        for p in ad.adapter_parameters(self.transformer, name):
            p.data = p.data.float()  # LoRA weights stay float32 under a bf16/fp16 base
        self._restore_active()

    def load_adapter(self, path: str, name: str) -> None:
        """Load a diffusers-format LoRA directory (``pytorch_lora_weights.safetensors``)."""
        p = Path(path)
        if not (p / LORA_WEIGHTS).is_file() and not (p.is_file() and p.suffix == ".safetensors"):
            raise UserError(
                f"LoRA '{path}' not found: expected a directory containing {LORA_WEIGHTS}"
            )
        if name in self.adapter_names:
            raise UserError(f"adapter '{name}' already exists")
        ad.read_safetensors_header(p if p.is_file() else p / LORA_WEIGHTS)
        try:
            with library_warnings():  # peft's warning on every adapter after the first
                self.pipe.load_lora_weights(str(p), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"could not load LoRA '{path}': {str(e).splitlines()[0]}") from None
        for prm in ad.adapter_parameters(self.transformer, name):
            prm.data = prm.data.float().to(self.device)
        self._restore_active()

    def save_adapter(self, name: str, path: str | Path) -> None:
        """Write adapter ``name`` in the diffusers format (loads with ``load_lora_weights``)."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        self._check_adapter(name)
        state = get_peft_model_state_dict(self.transformer, adapter_name=name)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        meta = self.transformer.peft_config[name].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        with ad.atomic_dir(path) as tmp:
            StableDiffusion3Pipeline.save_lora_weights(
                str(tmp),
                transformer_lora_layers=state,
                transformer_lora_adapter_metadata=meta,
                safe_serialization=True,
            )

    def delete_adapter(self, name: str) -> None:
        self._check_adapter(name)
        self.transformer.delete_adapters(name)
        if self._active == name:
            self._active = None
        if self._trainable == name:
            self._trainable = None
        self._restore_active()

    def set_adapter(self, name: str | None, *, trainable: bool = False) -> None:
        if name is not None:
            self._check_adapter(name)
        self._active = name
        self._trainable = name if trainable else None
        self._restore_active()

    def _restore_active(self) -> None:
        # peft's set_adapter / enable_adapters toggle requires_grad: re-impose ours each time
        if self.adapter_names:
            if self._active is None:
                self.transformer.disable_adapters()
            else:
                self.transformer.enable_adapters()
                self.transformer.set_adapter(self._active)
        ad.set_trainable(self.transformer, self._trainable)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        if not self.adapter_names or self._active is None:
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self._restore_active()

    @contextmanager
    def adapter_active(self, name: str | None) -> Iterator[None]:
        """Temporarily make ``name`` the active adapter (None: the base)."""
        prev, prev_train = self._active, self._trainable
        self.set_adapter(name, trainable=prev_train == name and name is not None)
        try:
            yield
        finally:
            self._active, self._trainable = prev, prev_train
            self._restore_active()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        self._check_adapter(name)
        return ad.adapter_parameters(self.transformer, name)

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        self._check_adapter(name)
        return ad.adapter_state_dict(self.transformer, name)

    def load_adapter_state_dict(self, name: str, state: dict[str, Tensor]) -> None:
        self._check_adapter(name)
        ad.load_adapter_state_dict(self.transformer, name, state)
