"""FLOPs of an MMDiT forward / training step and of the VAE decode, counted from the architecture.

The FLOP convention is in the docstring of :mod:`flowopd.perf`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class MMDiTArch:
    """The fields of diffusers' ``SD3Transformer2DModel`` config that set its cost."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    sample_size: int = 128
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @property
    def dim(self) -> int:
        """Hidden width d = heads x head_dim (both streams)."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MMDiTArch:
        """From a diffusers transformer config dict (unknown keys ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in cfg.items() if k in names}
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw.get("in_channels", 16)
        kw["dual_attention_layers"] = tuple(kw.get("dual_attention_layers") or ())
        return cls(**kw)

    def to_config(self) -> dict[str, Any]:
        """kwargs for ``diffusers.SD3Transformer2DModel``."""
        cfg = asdict(self)
        cfg["dual_attention_layers"] = tuple(self.dual_attention_layers)
        return cfg


@dataclass(frozen=True)
class FluxArch:
    """The fields of diffusers' ``FluxTransformer2DModel`` config that set its cost.

    In flowopd's latent terms: ``in_channels`` are the VAE's latent channels (16; the
    transformer's own ``in_channels`` 64 are these x the 2x2 packing) and ``patch_size``
    is that packing (2; the transformer config says 1), so ``image_tokens`` and the latent
    shape follow the same formulas as SD3's. ``sample_size``: the default latent side
    (FluxPipeline's 128, 1024 px). RoPE positions: no positional table.
    """

    num_layers: int = 19  # double-stream (MMDiT) blocks
    num_single_layers: int = 38  # single-stream (parallel attention + MLP) blocks
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 16
    patch_size: int = 2
    sample_size: int = 128
    joint_attention_dim: int = 4096  # T5-XXL width
    pooled_projection_dim: int = 768  # CLIP-L pooled width
    guidance_embeds: bool = True  # FLUX.1-dev: guidance-distilled (no CFG pair)
    pos_embed_max_size: int = 0
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = "rms_norm"

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], sample_size: int = 128) -> FluxArch:
        """From a diffusers ``FluxTransformer2DModel`` config dict (2x2 packing undone)."""
        return cls(
            num_layers=int(cfg.get("num_layers", 19)),
            num_single_layers=int(cfg.get("num_single_layers", 38)),
            num_attention_heads=int(cfg.get("num_attention_heads", 24)),
            attention_head_dim=int(cfg.get("attention_head_dim", 128)),
            in_channels=int(cfg.get("in_channels", 64)) // 4,
            sample_size=sample_size,
            joint_attention_dim=int(cfg.get("joint_attention_dim", 4096)),
            pooled_projection_dim=int(cfg.get("pooled_projection_dim", 768)),
            guidance_embeds=bool(cfg.get("guidance_embeds", False)),
        )


Arch = MMDiTArch | FluxArch

# Published transformer configs (huggingface.co/<id>/blob/main/transformer/config.json).
# SD3.5-Medium: MMDiT-X, dual (image self-)attention in blocks 0..12, 2.24B parameters
# plus a 384 x 384 x 1536 positional-embedding buffer; SD3.5-Large: 38 blocks of width 2432.
SD35_MEDIUM = MMDiTArch(
    num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
SD35_LARGE = MMDiTArch(
    num_layers=38, num_attention_heads=38, attention_head_dim=64, caption_projection_dim=2432,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip

# FLUX.1-dev: 19 double + 38 single blocks of width 3072 (24 x 128), T5 4096 / CLIP 768,
# 16-channel latents packed 2x2, guidance embedding: 11,901,408,320 parameters (schnell,
# no guidance embedder: 11,891,178,560).
FLUX1_DEV = FluxArch()
FLUX1_SCHNELL = FluxArch(guidance_embeds=False)

KNOWN_ARCHS: dict[str, Arch] = {
    "stabilityai/stable-diffusion-3.5-medium": SD35_MEDIUM,
    "stabilityai/stable-diffusion-3.5-large": SD35_LARGE,
    "stabilityai/stable-diffusion-3.5-large-turbo": SD35_LARGE,
    "black-forest-labs/FLUX.1-dev": FLUX1_DEV,
    "black-forest-labs/FLUX.1-schnell": FLUX1_SCHNELL,
}


@dataclass(frozen=True)
class PipelineShape:
    """What the rest of an SD3 pipeline adds to the cost: sequence lengths and side models.

    clip_tokens + t5_tokens text tokens (SD3 concatenates the CLIP-L/G embeddings, padded
    to the T5 width, with T5's along the sequence: 77 + 256 = 333); vae_scale pixels per
    latent; parameter counts of the text encoders and the VAE (they load in float32).
    """

    clip_tokens: int = 77
    t5_tokens: int = 256
    vae_scale: int = 8
    text_encoder_params: int = 0
    vae_params: int = 0
    vae_config: dict[str, Any] | None = None

    @property
    def text_tokens(self) -> int:
        return self.clip_tokens + self.t5_tokens


# SD3 / SD3.5 side models (all hub SD3.5 checkpoints share them). Text encoders: CLIP-L
# (123.7M) + OpenCLIP bigG (694.7M) text towers with projections, T5-XXL encoder (4.76B).
SD3_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD3_PIPELINE = PipelineShape(
    clip_tokens=77,
    t5_tokens=256,
    vae_scale=8,
    text_encoder_params=123_650_304 + 694_659_840 + 4_762_310_656,
    vae_params=83_819_683,
    vae_config=SD3_VAE_CONFIG,
)


# FLUX.1 side models: CLIP-L text tower without projection (123,060,480; only its pooled
# output is used) + T5-XXL encoder (4,762,310,656); the VAE has SD3's architecture (16
# latent channels, no quant convs; scaling 0.3611, shift 0.1159). Text tokens: T5's only
# (512, FluxPipeline's max_sequence_length); CLIP contributes no sequence.
FLUX_PIPELINE = PipelineShape(
    clip_tokens=0,
    t5_tokens=512,
    vae_scale=8,
    text_encoder_params=123_060_480 + 4_762_310_656,
    vae_params=83_819_683,
    vae_config=SD3_VAE_CONFIG,
)


def _safetensors_params(folder: Path) -> int:
    """Parameter count of every ``*.safetensors`` in ``folder`` from their JSON headers
    (8-byte little-endian length, then {name: {dtype, shape, ...}}); no tensor is read."""
    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if size > f.stat().st_size:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(size))
            n += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            from flowopd.errors import UserError

            raise UserError(
                f"'{f}' is not a readable safetensors file ({e}); re-download or re-save the model"
            ) from None
    return n


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model directory; a broken file is a one-line UserError."""
    from flowopd.errors import UserError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"'{path}' is not valid JSON ({e}); re-download or re-save the model"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a JSON object; re-download or re-save the model")
    return data


def load_architecture(
    path: str, max_sequence_length: int | None = None
) -> tuple[Arch, PipelineShape]:
    """Architecture of a model without loading it: a local diffusers pipeline directory
    (reads ``transformer/config.json``, tokenizer/VAE configs, safetensors headers) or a
    known hub id (``KNOWN_ARCHS``, nothing downloaded)."""
    from flowopd.errors import UserError

    local = Path(path).expanduser()
    if local.is_dir():
        tcfg = local / "transformer" / "config.json"
        if not tcfg.is_file():
            raise UserError(
                f"'{path}' has no transformer/config.json; pass a diffusers SD3 pipeline directory"
            )
        tconfig = _read_json(tcfg)
        if str(tconfig.get("_class_name", "")).startswith("Flux"):
            return _local_flux(local, tconfig, max_sequence_length)
        try:
            arch = MMDiTArch.from_config(tconfig)
        except TypeError as e:  # a required field (num_layers, ...) is missing
            raise UserError(
                f"'{tcfg}' is not an SD3 transformer config ({e}); pass an SD3/SD3.5 pipeline"
            ) from None
        clip = 77
        tok = local / "tokenizer" / "tokenizer_config.json"
        if tok.is_file():
            clip = int(_read_json(tok).get("model_max_length", 77))
        meta = local / "flowopd.json"
        msl = max_sequence_length
        if msl is None:
            msl = int(_read_json(meta).get("max_sequence_length", 256)) if meta.is_file() else 256
        vae_cfg_path = local / "vae" / "config.json"
        vae_cfg = _read_json(vae_cfg_path) if vae_cfg_path.is_file() else None
        scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1) if vae_cfg else 1
        te = sum(_safetensors_params(local / f"text_encoder{s}") for s in ("", "_2", "_3"))
        vae = _safetensors_params(local / "vae") if vae_cfg else 0
        return arch, PipelineShape(clip, msl, scale, te, vae, vae_cfg)
    if path in KNOWN_ARCHS:
        shape = FLUX_PIPELINE if isinstance(KNOWN_ARCHS[path], FluxArch) else SD3_PIPELINE
        if max_sequence_length is not None:
            shape = PipelineShape(**{**asdict(shape), "t5_tokens": max_sequence_length})
        return KNOWN_ARCHS[path], shape
    raise UserError(
        f"cannot read the architecture of '{path}': not a local pipeline directory and not a "
        f"known hub id ({', '.join(KNOWN_ARCHS)}); download it and pass the directory"
    )


def _local_flux(
    local: Path, tconfig: dict[str, Any], max_sequence_length: int | None
) -> tuple[FluxArch, PipelineShape]:
    """A local FluxPipeline directory: T5 tokens and the native side from flowopd.json
    (else FluxPipeline's 512 tokens and 1024 px), side-model sizes from the headers."""
    meta_path = local / "flowopd.json"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    vae_cfg_path = local / "vae" / "config.json"
    vae_cfg = _read_json(vae_cfg_path) if vae_cfg_path.is_file() else None
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1) if vae_cfg else 8
    native = int(meta.get("native_resolution") or 128 * scale)
    arch = FluxArch.from_config(tconfig, sample_size=native // scale)
    msl = max_sequence_length or int(meta.get("max_sequence_length", 512))
    te = sum(_safetensors_params(local / f"text_encoder{s}") for s in ("", "_2"))
    vae = _safetensors_params(local / "vae") if vae_cfg else 0
    return arch, PipelineShape(0, msl, scale, te, vae, vae_cfg)


def image_tokens(arch: Arch, resolution: int, vae_scale: int = 8) -> int:
    """Image tokens per row: (H / vae_scale / patch)^2, e.g. 512 px -> (512/8/2)^2 = 1024."""
    side = resolution // vae_scale // arch.patch_size
    return side * side


# --------------------------------------------------------------------------------------
# the matmuls of one forward


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` (or the patch-embedding conv) applied to ``m`` rows per sequence.

    name: the diffusers module path (LoRA target names match it as peft does);
    input_grad: whether the backward needs dL/d(input), i.e. the input depends on a
    trainable parameter; filled in by ``mark_gradients``.
    """

    name: str
    m: int
    k: int
    n: int
    bias: bool = True
    input_grad: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


@dataclass(frozen=True)
class Attention:
    """softmax(Q K^T) V over q_len queries and kv_len keys of total width w."""

    name: str
    q_len: int
    kv_len: int
    width: int
    backward: bool = False

    @property
    def flops(self) -> int:
        return 4 * self.q_len * self.kv_len * self.width


def _joint_block(
    b: str, d: int, n_img: int, n_txt: int, *, last: bool, dual: bool
) -> list[Linear | Attention]:
    """The matmuls of one joint-attention (MMDiT / FLUX double-stream) block ``b``."""
    ops: list[Linear | Attention] = [
        Linear(f"{b}.norm1.linear", 1, d, (9 if dual else 6) * d),
        Linear(f"{b}.norm1_context.linear", 1, d, (2 if last else 6) * d),
    ]
    for proj in ("to_q", "to_k", "to_v"):
        ops.append(Linear(f"{b}.attn.{proj}", n_img, d, d))
    for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
        ops.append(Linear(f"{b}.attn.{proj}", n_txt, d, d))
    ops.append(Attention(f"{b}.attn", n_img + n_txt, n_img + n_txt, d))
    if not last:
        ops.append(Linear(f"{b}.attn.to_add_out", n_txt, d, d))
    ops.append(Linear(f"{b}.attn.to_out.0", n_img, d, d))
    if dual:
        for proj in ("to_q", "to_k", "to_v"):
            ops.append(Linear(f"{b}.attn2.{proj}", n_img, d, d))
        ops.append(Attention(f"{b}.attn2", n_img, n_img, d))
        ops.append(Linear(f"{b}.attn2.to_out.0", n_img, d, d))
    ops.append(Linear(f"{b}.ff.net.0.proj", n_img, d, 4 * d))
    ops.append(Linear(f"{b}.ff.net.2", n_img, 4 * d, d))
    if not last:
        ops.append(Linear(f"{b}.ff_context.net.0.proj", n_txt, d, 4 * d))
        ops.append(Linear(f"{b}.ff_context.net.2", n_txt, 4 * d, d))
    return ops


def mmdit_ops(arch: Arch, n_img: int, n_txt: int) -> list[Linear | Attention]:
    """Every matmul of one forward of one row, in execution order.

    n_img image tokens, n_txt text tokens, d = arch.dim, N = n_img + n_txt. Per block:
    adaLN modulation (per row: d -> 6d, 9d in dual blocks; the context 6d, or 2d in the
    last block), image q/k/v/out and text q/k/v(/out) projections, joint attention over
    N tokens, in dual blocks a second image-only attention (q/k/v/out + n_img^2), and the
    4d-wide GELU MLPs of both streams (the last block has no text out-projection or MLP:
    its text stream is only read as keys and values). FLUX: ``flux_ops``.
    """
    if isinstance(arch, FluxArch):
        return flux_ops(arch, n_img, n_txt)
    d, L = arch.dim, arch.num_layers
    p2 = arch.patch_size**2
    ops: list[Linear | Attention] = [
        Linear("pos_embed.proj", n_img, arch.in_channels * p2, d),  # patchify conv as matmul
        Linear("time_text_embed.timestep_embedder.linear_1", 1, 256, d),
        Linear("time_text_embed.timestep_embedder.linear_2", 1, d, d),
        Linear("time_text_embed.text_embedder.linear_1", 1, arch.pooled_projection_dim, d),
        Linear("time_text_embed.text_embedder.linear_2", 1, d, d),
        Linear("context_embedder", n_txt, arch.joint_attention_dim, arch.caption_projection_dim),
    ]
    for i in range(L):
        dual = i in arch.dual_attention_layers
        ops += _joint_block(f"transformer_blocks.{i}", d, n_img, n_txt, last=i == L - 1, dual=dual)
    ops.append(Linear("norm_out.linear", 1, d, 2 * d))
    ops.append(Linear("proj_out", n_img, d, p2 * arch.out_channels))
    return ops


def flux_ops(arch: FluxArch, n_img: int, n_txt: int) -> list[Linear | Attention]:
    """Every matmul of one FLUX forward of one row, in execution order.

    Embedders (packed latents 4C -> d, timestep, guidance when distilled, pooled CLIP,
    T5 tokens -> d); ``num_layers`` double-stream blocks (SD3's joint block, every one
    with its text out-projection and MLP); ``num_single_layers`` single-stream blocks over
    the N = n_img + n_txt concatenated tokens: adaLN d -> 3d, q/k/v d -> d, attention,
    proj_mlp d -> 4d and proj_out (d + 4d) -> d (attention output and GELU(MLP) fused);
    norm_out and proj_out d -> 4C on the image tokens.
    """
    d, n = arch.dim, n_img + n_txt
    pack = arch.in_channels * arch.patch_size**2
    ops: list[Linear | Attention] = [
        Linear("x_embedder", n_img, pack, d),
        Linear("time_text_embed.timestep_embedder.linear_1", 1, 256, d),
        Linear("time_text_embed.timestep_embedder.linear_2", 1, d, d),
    ]
    if arch.guidance_embeds:
        ops.append(Linear("time_text_embed.guidance_embedder.linear_1", 1, 256, d))
        ops.append(Linear("time_text_embed.guidance_embedder.linear_2", 1, d, d))
    ops += [
        Linear("time_text_embed.text_embedder.linear_1", 1, arch.pooled_projection_dim, d),
        Linear("time_text_embed.text_embedder.linear_2", 1, d, d),
        Linear("context_embedder", n_txt, arch.joint_attention_dim, d),
    ]
    for i in range(arch.num_layers):
        ops += _joint_block(f"transformer_blocks.{i}", d, n_img, n_txt, last=False, dual=False)
    for i in range(arch.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        ops.append(Linear(f"{b}.norm.linear", 1, d, 3 * d))
        ops += [Linear(f"{b}.attn.{p}", n, d, d) for p in ("to_q", "to_k", "to_v")]
        ops.append(Attention(f"{b}.attn", n, n, d))
        ops.append(Linear(f"{b}.proj_mlp", n, d, 4 * d))
        ops.append(Linear(f"{b}.proj_out", n, 5 * d, d))
    ops.append(Linear("norm_out.linear", 1, d, 2 * d))
    ops.append(Linear("proj_out", n_img, d, pack))
    return ops


def is_lora_target(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the module path equals a target or ends
    with '.' + target (so 'to_q' also matches 'attn2.to_q', 'attn.to_q' does not)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def mark_gradients(
    ops: list[Linear | Attention], targets: Sequence[str]
) -> list[Linear | Attention]:
    """Which backward matmuls a frozen base with LoRA on ``targets`` needs.

    Dataflow of "depends on a trainable parameter" through the two residual streams:
    embeddings, adaLN modulations (functions of the timestep and pooled text only) and
    everything before the first LoRA layer never need gradients; a LoRA layer makes its
    output depend on trainable weights; attention needs a backward when any of its
    q/k/v does. Assumes no LoRA on the embedders or adaLN linears.
    """
    img = txt = False  # does the image / text residual stream depend on a LoRA weight?
    ff_hidden = ffc_hidden = False  # does the MLP hidden layer (image / text) depend on one?
    out: list[Linear | Attention] = []
    pending: dict[str, bool] = {}  # q/k/v of the current attention depend on a LoRA weight
    attn_grad = attn2_grad = False
    stream_before_block = False
    for op in ops:
        name = op.name
        if isinstance(op, Attention):
            if name.endswith(".attn2"):
                attn2_grad = pending.get("attn2", False)
                out.append(Attention(name, op.q_len, op.kv_len, op.width, backward=attn2_grad))
            else:
                attn_grad = pending.get("attn", False)
                out.append(Attention(name, op.q_len, op.kv_len, op.width, backward=attn_grad))
            continue
        lora = is_lora_target(name, targets)
        part = name.split(".")
        if name.startswith("single_transformer_blocks."):  # FLUX: one joint stream
            grad, img, ff_hidden = _single_block_grad(
                ".".join(part[2:]), lora, img or txt, ff_hidden, attn_grad, pending
            )
            txt = img
            out.append(_with_grad(op, grad))
            continue
        if not name.startswith("transformer_blocks."):
            grad = name == "proj_out" and img
            out.append(_with_grad(op, grad))
            continue
        kind = ".".join(part[2:])
        if kind == "norm1.linear":  # first op of a block: snapshot the incoming stream
            stream_before_block = img
            pending = {}
            out.append(_with_grad(op, False))
        elif kind == "norm1_context.linear":
            out.append(_with_grad(op, False))
        elif kind in ("attn.to_q", "attn.to_k", "attn.to_v"):
            out.append(_with_grad(op, img))
            pending["attn"] = pending.get("attn", False) or img or lora
        elif kind in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
            out.append(_with_grad(op, txt))
            pending["attn"] = pending.get("attn", False) or txt or lora
        elif kind == "attn.to_add_out":
            out.append(_with_grad(op, attn_grad))
            txt = txt or attn_grad or lora
        elif kind == "attn.to_out.0":
            out.append(_with_grad(op, attn_grad))
            img = img or attn_grad or lora
        elif kind in ("attn2.to_q", "attn2.to_k", "attn2.to_v"):
            # attn2 reads norm1's second output of the stream as it entered the block
            out.append(_with_grad(op, stream_before_block))
            pending["attn2"] = pending.get("attn2", False) or stream_before_block or lora
        elif kind == "attn2.to_out.0":
            out.append(_with_grad(op, attn2_grad))
            img = img or attn2_grad or lora
        elif kind == "ff.net.0.proj":
            out.append(_with_grad(op, img))
            ff_hidden = img or lora
        elif kind == "ff.net.2":
            out.append(_with_grad(op, ff_hidden))
            img = img or ff_hidden or lora
        elif kind == "ff_context.net.0.proj":
            out.append(_with_grad(op, txt))
            ffc_hidden = txt or lora
        elif kind == "ff_context.net.2":
            out.append(_with_grad(op, ffc_hidden))
            txt = txt or ffc_hidden or lora
        else:  # pragma: no cover - mmdit_ops emits only the kinds above
            raise ValueError(f"unknown op {name}")
    return out


def _single_block_grad(
    kind: str, lora: bool, stream: bool, hidden: bool, attn_grad: bool, pending: dict[str, bool]
) -> tuple[bool, bool, bool]:
    """One linear of a FLUX single-stream block: (its input needs a gradient, the joint
    stream depends on a LoRA weight after it, the MLP hidden layer does). q/k/v and
    proj_mlp read the normalised stream; proj_out reads [attention output, GELU(MLP)]
    and adds to the stream; the adaLN linear needs none. Updates ``pending['attn']``."""
    if kind == "norm.linear":  # first op of a block
        pending.clear()
        return False, stream, hidden
    if kind == "proj_mlp":
        return stream, stream, stream or lora
    if kind == "proj_out":
        grad = attn_grad or hidden
        return grad, stream or grad or lora, hidden
    pending["attn"] = pending.get("attn", False) or stream or lora  # attn.to_q/k/v
    return stream, stream, hidden


def _with_grad(op: Linear, grad: bool) -> Linear:
    return Linear(op.name, op.m, op.k, op.n, op.bias, grad)


def forward_flops(
    arch: Arch,
    n_img: int,
    n_txt: int,
    *,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = (),
) -> int:
    """FLOPs of one forward of one row: sum of 2 m k n over the linears, 4 N^2 d per
    attention, plus 2 m r (k + n) per LoRA-adapted linear (x A then (x A) B)."""
    total = 0
    for op in mmdit_ops(arch, n_img, n_txt):
        total += op.flops
        if lora_rank and isinstance(op, Linear) and is_lora_target(op.name, lora_targets):
            total += 2 * op.m * lora_rank * (op.k + op.n)
    return total


@dataclass(frozen=True)
class TrainFlops:
    """FLOPs of one training step of one row (forward with grad + backward).

    recompute: the blocks' second forward under gradient checkpointing;
    attention_recompute: flash / memory-efficient attention kernels recompute Q K^T in
    their backward (0.5x the attention forward; torch's FlopCounterMode counts it).
    Both are work the hardware does, not model FLOPs.
    """

    forward: int
    backward: int
    recompute: int = 0
    attention_recompute: int = 0

    @property
    def model(self) -> int:
        """Model FLOPs (what MFU divides): forward + backward, recomputation excluded."""
        return self.forward + self.backward

    @property
    def hardware(self) -> int:
        return self.forward + self.backward + self.recompute + self.attention_recompute


def train_step_flops(
    arch: Arch,
    n_img: int,
    n_txt: int,
    *,
    lora_rank: int,
    lora_targets: Sequence[str],
    checkpointing: bool = False,
) -> TrainFlops:
    """Forward + backward of one row with a frozen base and LoRA (rank r) on ``lora_targets``.

    Backward per linear (m, k) -> (m, n): base ``dX``: 2 m k n when the input needs a
    gradient; LoRA: ``dB`` 2 m r n, ``d(xA)`` 2 m n r, ``dA`` 2 m k r, and ``dX`` through
    A 2 m r k when the input needs a gradient. Attention: 2x its forward when it needs one
    (+ 0.5x recomputed scores in ``attention_recompute``, for every attention backward
    that runs, the checkpointed re-run's included).
    """
    if not lora_rank or not lora_targets:
        raise ValueError("train_step_flops models a LoRA run: give lora_rank and lora_targets")
    ops = mark_gradients(mmdit_ops(arch, n_img, n_txt), lora_targets)
    fwd = forward_flops(arch, n_img, n_txt, lora_rank=lora_rank, lora_targets=lora_targets)
    bwd = recompute = attn_recompute = 0
    r = lora_rank
    for op in ops:
        in_block = op.name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if isinstance(op, Attention):
            bwd += 2 * op.flops if op.backward else 0
            attn_recompute += op.flops // 2 if op.backward else 0
            recompute += op.flops if in_block else 0
            continue
        lora = is_lora_target(op.name, lora_targets)
        if op.input_grad:
            bwd += op.flops
        if lora:
            bwd += 2 * op.m * r * op.n * 2 + 2 * op.m * op.k * r
            bwd += 2 * op.m * r * op.k if op.input_grad else 0
        if in_block:
            recompute += op.flops + (2 * op.m * r * (op.k + op.n) if lora else 0)
    return TrainFlops(fwd, bwd, recompute if checkpointing else 0, attn_recompute)


# --------------------------------------------------------------------------------------
# measured FLOPs (torch's counter), for cross-checks


def measure_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's ``FlopCounterMode`` sees while ``fn()`` runs (forward and backward).

    Adds the CPU flash-attention kernels, which torch 2.x's counter does not know (it
    would count attention as 0 on CPU), with the same formula as the CUDA kernels.
    Works on the ``meta`` device (shapes only, no compute).
    """
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    for op, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop_count),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop_count),
    ):
        if hasattr(aten, op):
            if formula is fc.sdpa_flop_count:
                mapping[getattr(aten, op)] = _shapes(
                    lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v)
                )
            else:
                mapping[getattr(aten, op)] = _shapes(
                    lambda g, q, k, v, *a, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
                )
    counter = fc.FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _shapes(formula: Callable[..., int]) -> Callable[..., int]:
    """Wrap a formula over shapes into one over tensors (FlopCounterMode's raw form)."""

    def raw(*args, out_val=None, **kwargs):
        shapes = [a.shape if hasattr(a, "shape") else a for a in args]
        return formula(*shapes)

    raw._get_raw = True  # type: ignore[attr-defined]
    return raw


def vae_decode_flops(vae_config: Mapping[str, Any] | None, resolution: int) -> int:
    """FLOPs of decoding one image with a diffusers ``AutoencoderKL`` config, counted by
    ``FlopCounterMode`` on the meta device (no weights, no compute; ~0.1 s). SD3's VAE at
    512 px: 2.51 TFLOPs (convolutions 98 %: 9.43 MFLOPs per output pixel). 0 without a VAE."""
    if not vae_config:
        return 0
    import inspect

    import torch
    from diffusers import AutoencoderKL

    names = set(inspect.signature(AutoencoderKL.__init__).parameters)
    kw = {k: v for k, v in vae_config.items() if k in names and not k.startswith("_")}
    scale = 2 ** (len(kw["block_out_channels"]) - 1)
    with torch.device("meta"):
        vae = AutoencoderKL(**kw)
        z = torch.empty(1, kw.get("latent_channels", 4), resolution // scale, resolution // scale)
    return measure_flops(lambda: vae.decode(z))


# --------------------------------------------------------------------------------------
