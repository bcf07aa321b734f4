"""What every diffusers backend shares: loading a pipeline directory, device / dtype set-up,
text-encoder offloading, autocast, and the named peft LoRA adapters of ``FlowModel``.

``DiffusersBackend`` is a mixin, not a model: a backend (``sd3.py``, ``flux.py``) sets
``pipe`` / ``transformer`` and implements its own prompt encoding, velocity, schedule and
images; the methods here only touch ``self.transformer``, ``self.pipe`` and the adapter
state (``_active``, ``_trainable``).
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


def read_json(path: Path) -> dict:
    """A JSON object of a pipeline directory; a broken file is a one-line UserError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"'{path}' is not valid JSON ({e}); re-save the model directory") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a JSON object; re-save the model directory")
    return data


def looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def load_pipeline(pipeline_cls, path: str, example_id: str) -> tuple[object, dict]:
    """(pipeline, flowopd.json metadata) of a diffusers directory or hub id, in float32.

    Components saved as null (a pixel-space model's VAE) are passed as None again; a
    missing directory, a directory without ``model_index.json`` or a failed load is a
    one-line UserError (``example_id`` is the hub id the message suggests).
    """
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
        for key, value in read_json(index).items():
            if isinstance(value, list) and value[0] is None:
                kwargs[key] = None
        if (local / FLOWOPD_META).is_file():
            meta = read_json(local / FLOWOPD_META)
        source = str(local)
    elif looks_like_hub_id(path):
        source = path
    else:
        raise UserError(
            f"model '{path}' not found: pass an existing diffusers pipeline directory "
            f"or a hub id like {example_id}"
        )
    try:
        pipe = pipeline_cls.from_pretrained(
            source,
            dtype=torch.float32,
            local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") == "1" or local.is_dir(),
            **kwargs,
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{path}': {first}") from None
    return pipe, meta


class DiffusersBackend:
    """Shared machinery of the diffusers backends (see the module docstring).

    A backend sets ``pipe``, ``transformer``, ``device``, ``dtype`` and ``DEFAULT_TARGETS``
    and implements ``_text_encoders()`` / ``_modules()`` / ``encode_prompts()``.
    """

    DEFAULT_TARGETS: tuple[str, ...] = ()
    pipe: object
    transformer: nn.Module
    device: torch.device
    dtype: torch.dtype
    # full fine-tuning's frozen base (engine/full.py): what adapters_disabled() runs
    reference: nn.Module | None = None

    def _setup(
        self,
        *,
        gradient_checkpointing: bool,
        compile: bool,
        offload_text_encoders: bool,
    ) -> None:
        """Freeze every module, move it to the device (text encoders stay on the CPU when
        offloaded), cast the transformer to ``dtype`` and apply the speed options."""
        self._offload_te = offload_text_encoders
        self._neg: Cond | None = None  # the empty prompt's embedding, encoded once
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
        self._trainable: str | None = None
        self._active: str | None = None

    def negative_cond(self, n: int) -> Cond:
        """The empty prompt's embedding for ``n`` images (CFG's unconditional branch)."""
        if self._neg is None:
            self._neg = self.encode_prompts([""])
        return self._neg.expand(n)

    def _text_encoders(self) -> list[nn.Module]:  # pragma: no cover - backends override
        raise NotImplementedError

    def _modules(self) -> list[nn.Module]:  # pragma: no cover - backends override
        raise NotImplementedError

    def _write_pipeline(self, path: str | Path, info: dict) -> None:
        """Save the pipeline and ``info`` (flowopd.json) atomically to ``path``."""
        with ad.atomic_dir(path) as tmp:
            self.pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / FLOWOPD_META).write_text(json.dumps(info, indent=2))

    # -- text encoders ----------------------------------------------------------------------
    def offload_text_encoders(self) -> None:
        """Move the text encoders to CPU now and keep them there between encodings
        (each later ``encode_prompts`` brings them to the device and back)."""
        self._offload_te = True
        for m in self._text_encoders():
            m.to("cpu")

    @contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """With offloading: the encoders on the device for the body, back on CPU after.

        The text encoders (SD3: CLIP-L, CLIP-G, T5-XXL, 5.6B parameters; FLUX: CLIP-L,
        T5-XXL, 4.9B) are needed for a few prompts per epoch; keeping them off the GPU
        frees that memory for activations at the cost of a host-to-device copy per call.
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

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _check_routing(self, names: list[str] | None) -> None:
        if names and self.gradient_checkpointing and torch.is_grad_enabled():
            # the backward re-runs each block after the routing hooks are gone: it would
            # silently recompute with the active adapter instead of the per-sample ones
            raise UserError(
                "per-sample adapter routing with gradients cannot be combined with "
                "gradient_checkpointing; turn one of them off"
            )

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
            target_modules=list(target_modules or self.DEFAULT_TARGETS),
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
        """Write adapter ``name`` in the diffusers format: the pipeline class's own
        ``save_lora_weights`` (keys ``transformer.<module>.lora_A.weight``, the peft config
        as metadata), so the stock pipeline's ``load_lora_weights`` reads it back."""
        from peft.utils import get_peft_model_state_dict

        self._check_adapter(name)
        state = get_peft_model_state_dict(self.transformer, adapter_name=name)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        meta = self.transformer.peft_config[name].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        with ad.atomic_dir(path) as tmp:
            type(self.pipe).save_lora_weights(
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
        if self.reference is not None:  # full fine-tuning: the frozen copy is the base
            trained, self.transformer = self.transformer, self.reference
            try:
                yield
            finally:
                self.transformer = trained
            return
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
