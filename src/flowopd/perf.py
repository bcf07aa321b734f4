"""FLOPs, memory and time of an MMDiT (SD3 / SD3.5) run, counted from the architecture.

Nothing here loads weights or touches a GPU: the counts come from the transformer's
diffusers config (``transformer/config.json``, or a known hub id) and the run's shapes.
Used by ``flowopd estimate`` (before launch) and ``bench/full_size.py`` (achieved TFLOP/s, MFU).

FLOP convention (the one of the scaling-law and MFU literature):

- a matmul ``(m, k) @ (k, n)`` costs ``2 m k n`` FLOPs (one multiply + one add per MAC);
  bias adds, norms, activations, softmax, residual adds and the SDE math are not counted
  (O(tokens x d) against the matmuls' O(tokens x d^2); torch's ``FlopCounterMode``
  skips them too);
- attention over q_len queries and kv_len keys of width ``w = heads * head_dim`` costs
  ``4 q_len kv_len w`` (``Q K^T`` and ``P V``);
- backward of a linear layer: ``dX = dY W^T`` (same FLOPs as the forward) only where X
  depends on a trainable parameter; ``dW = X^T dY`` only for trainable weights, i.e. the
  LoRA factors (the base is frozen). Backward of attention = 2x its forward
  (dV, dP, dQ, dK). So for a frozen base with LoRA, training ~ 2x forward for the linear
  layers (not the 3x of full fine-tuning) and 3x forward for attention;
- recomputation is counted apart and left out of MFU (model FLOPs, not hardware FLOPs):
  gradient checkpointing re-runs each block's forward in the backward
  (``TrainFlops.recompute``); flash / memory-efficient attention recomputes ``Q K^T`` in
  its backward (+0.5x the attention forward, ``TrainFlops.attention_recompute``, which
  torch's counter includes). Times are predicted from the hardware FLOPs.

A "row" is one sequence through the transformer: with classifier-free guidance every
image costs 2 rows per denoising step (negative + positive prompt in one batch).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3

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

KNOWN_ARCHS: dict[str, MMDiTArch] = {
    "stabilityai/stable-diffusion-3.5-medium": SD35_MEDIUM,
    "stabilityai/stable-diffusion-3.5-large": SD35_LARGE,
    "stabilityai/stable-diffusion-3.5-large-turbo": SD35_LARGE,
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
) -> tuple[MMDiTArch, PipelineShape]:
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
        try:
            arch = MMDiTArch.from_config(_read_json(tcfg))
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
        shape = SD3_PIPELINE
        if max_sequence_length is not None:
            shape = PipelineShape(**{**asdict(shape), "t5_tokens": max_sequence_length})
        return KNOWN_ARCHS[path], shape
    raise UserError(
        f"cannot read the architecture of '{path}': not a local pipeline directory and not a "
        f"known hub id ({', '.join(KNOWN_ARCHS)}); download it and pass the directory"
    )


def image_tokens(arch: MMDiTArch, resolution: int, vae_scale: int = 8) -> int:
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


def mmdit_ops(arch: MMDiTArch, n_img: int, n_txt: int) -> list[Linear | Attention]:
    """Every matmul of one forward of one row, in execution order.

    n_img image tokens, n_txt text tokens, d = arch.dim, N = n_img + n_txt. Per block:
    adaLN modulation (per row: d -> 6d, 9d in dual blocks; the context 6d, or 2d in the
    last block), image q/k/v/out and text q/k/v(/out) projections, joint attention over
    N tokens, in dual blocks a second image-only attention (q/k/v/out + n_img^2), and the
    4d-wide GELU MLPs of both streams (the last block has no text out-projection or MLP:
    its text stream is only read as keys and values).
    """
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
        b = f"transformer_blocks.{i}"
        last, dual = i == L - 1, i in arch.dual_attention_layers
        ops.append(Linear(f"{b}.norm1.linear", 1, d, (9 if dual else 6) * d))
        ops.append(Linear(f"{b}.norm1_context.linear", 1, d, (2 if last else 6) * d))
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
    ops.append(Linear("norm_out.linear", 1, d, 2 * d))
    ops.append(Linear("proj_out", n_img, d, p2 * arch.out_channels))
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


def _with_grad(op: Linear, grad: bool) -> Linear:
    return Linear(op.name, op.m, op.k, op.n, op.bias, grad)


def forward_flops(
    arch: MMDiTArch,
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
    arch: MMDiTArch,
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
        in_block = op.name.startswith("transformer_blocks.")
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
# parameters and memory


def transformer_params(arch: MMDiTArch) -> int:
    """Trainable-parameter count of the transformer (weights + biases + q/k RMSNorm gains);
    SD3.5-Medium: 2,243,171,520. The positional-embedding buffer is ``pos_embed_elements``."""
    n = 0
    for op in mmdit_ops(arch, 1, 1):
        if isinstance(op, Linear):
            n += op.k * op.n + (op.n if op.bias else 0)
    if arch.qk_norm == "rms_norm":  # norm_q, norm_k, norm_added_q, norm_added_k (+ attn2's 2)
        n += arch.attention_head_dim * (4 * arch.num_layers + 2 * len(arch.dual_attention_layers))
    return n


def pos_embed_elements(arch: MMDiTArch) -> int:
    """The fixed sin-cos positional-embedding buffer: pos_embed_max_size^2 x d."""
    return arch.pos_embed_max_size**2 * arch.dim


def lora_params(arch: MMDiTArch, rank: int, targets: Sequence[str]) -> int:
    """LoRA parameters: r (k + n) per adapted linear (A: r x k, B: n x r)."""
    return sum(
        rank * (op.k + op.n)
        for op in mmdit_ops(arch, 1, 1)
        if isinstance(op, Linear) and is_lora_target(op.name, targets)
    )


# Saved-for-backward activations per token per block, in units of d elements of the
# autocast dtype (bf16: 2 bytes). Derived from what autograd keeps for one image token in
# a block: LayerNorm input x, the normalised x (q/k/v/LoRA input), q and k before their
# RMSNorm, q/k/v after it (concatenated, kept by SDPA) and SDPA's output, the out-projection
# input, norm2's input, the MLP input, the 4d GELU input and the 4d GELU output:
# 1 + 1 + 2 + 3 + 1 + 1 + 1 + 1 + 4 + 4 = 20. A text token in the last block keeps only its
# attention inputs (~9); attn2 in a dual block adds ~8 per image token (normalised input,
# q/k pre-norm, q/k, output, out-projection input). Measured on CPU with
# saved_tensors_hooks (tests/test_perf.py): 20.2 / 18.5 (4-block average) / 7.5.
# Memory-efficient attention is assumed: no N^2 score matrix is stored.
ACT_PER_TOKEN = 20
ACT_PER_TOKEN_LAST_TEXT = 9
ACT_PER_TOKEN_DUAL = 8


def activation_bytes(
    arch: MMDiTArch,
    n_img: int,
    n_txt: int,
    rows: int,
    *,
    dtype_bytes: int = 2,
    checkpointing: bool = False,
) -> int:
    """Activations kept for the backward of one micro-batch of ``rows`` rows.

    Without checkpointing: d x dtype_bytes x rows x sum over blocks of
    (20 n_img + 20 n_txt [9 in the last block] + 8 n_img in dual blocks).
    With checkpointing: each block keeps only its two input streams (n_img + n_txt) d,
    plus one block's full activations while it is recomputed.
    """
    d, L = arch.dim, arch.num_layers
    per_block = []
    for i in range(L):
        t = ACT_PER_TOKEN_LAST_TEXT if i == L - 1 else ACT_PER_TOKEN
        e = ACT_PER_TOKEN * n_img + t * n_txt
        if i in arch.dual_attention_layers:
            e += ACT_PER_TOKEN_DUAL * n_img
        per_block.append(e)
    if checkpointing:
        elems = L * (n_img + n_txt) + max(per_block)
    else:
        elems = sum(per_block)
    return elems * d * dtype_bytes * rows


# --------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class DeviceSpec:
    """Dense peak TFLOP/s by compute dtype (datasheet, no sparsity) and memory.

    float32 on GPUs is the non-tensor-core peak: PyTorch's default matmul precision
    ('highest') does not use TF32.
    """

    name: str
    peak_tflops: Mapping[str, float]
    memory_gib: float

    def peak(self, dtype: str) -> float:
        return self.peak_tflops[_dtype_key(dtype)]


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("NVIDIA H100 SXM 80GB", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 80.0),
    "h200": DeviceSpec("NVIDIA H200 SXM 141GB", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 141.0),
    "a100": DeviceSpec("NVIDIA A100 SXM 80GB", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}, 80.0),
    "l40s": DeviceSpec("NVIDIA L40S 48GB", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}, 48.0),
}  # fmt: skip

# Fraction of a GPU's datasheet peak flowopd's own GRPO step reaches, measured on one
# H100 80GB HBM3 (bf16, SD3.5-Medium size with random weights, 512 px, CFG, LoRA r=32,
# torch 2.11; bench/results/sd35m_h100_*.json, `python bench/full_size.py --size full`):
# sampling 0.18-0.19, a training step 0.13 (0.10-0.12 with gradient checkpointing,
# recomputation not counted). Tuned public SD3/FLUX training reports 0.3-0.5.
GPU_MFU = 0.15
# On a CPU the rate is a GEMM measured now x this fraction (fp32 MMDiT steps ran at
# 0.4-0.77 of the GEMM rate on the 2-core dev machine, PERFORMANCE.md section 4).
DEFAULT_MFU = 0.4


def default_mfu(device: str) -> float:
    """The MFU an estimate assumes on ``device`` ('cpu' or a GPU name of ``DEVICES``)."""
    return DEFAULT_MFU if device == "cpu" else GPU_MFU


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where a benchmark ran: platform, python, torch and its threads, cores, the device
    (and the GPU's name on CUDA) and the 1-minute load average (the machine may be shared)."""
    import os
    import platform

    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return info


# CUDA context, cuBLAS workspaces and allocator fragmentation, added to every GPU estimate.
RUNTIME_OVERHEAD_BYTES = int(1.5 * GiB)


def _dtype_key(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)


def dtype_bytes(dtype: str) -> int:
    return 4 if _dtype_key(dtype) == "float32" else 2


def gpu_peak_for_name(name: str, dtype: str) -> float | None:
    """Datasheet peak for a ``torch.cuda.get_device_name()`` string, None when unknown."""
    n = name.upper()
    for key in ("H200", "H100", "A100", "L40S"):
        if key in n:
            peak = DEVICES[key.lower()].peak(dtype)
            # H100 PCIe: 756 TFLOP/s bf16 dense (the SXM's 989 does not apply)
            if key == "H100" and "PCIE" in n and _dtype_key(dtype) != "float32":
                peak = 756.0
            return peak
    return None


def cpu_matmul_tflops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """This CPU's achievable matmul rate, measured now (an (n, n) @ (n, n) GEMM at the
    current torch thread count): CPUs have no datasheet peak we can rely on here."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        _dtype_key(dtype)
    ]
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


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
# a run's estimate


# Reward throughput per device, images/s per process: ROUGH orders of magnitude from the
# size of each scorer (detector + CLIP for geneval, ONNX PP-OCR on the host CPU for ocr,
# one CLIP-H/L forward for pickscore/clip_score/aesthetic), not measurements on these
# GPUs. The CPU column for ocr is this project's measurement (~0.35 s per image).
REWARD_RATES: dict[str, dict[str, float]] = {
    "geneval": {"gpu": 20.0, "cpu": 0.5},
    "ocr": {"gpu": 4.0, "cpu": 3.0},
    "pickscore": {"gpu": 200.0, "cpu": 2.0},
    "clip_score": {"gpu": 400.0, "cpu": 4.0},
    "aesthetic": {"gpu": 400.0, "cpu": 4.0},
    "toy": {"gpu": 500.0, "cpu": 200.0},
    "remote": {"gpu": 10.0, "cpu": 1.0},
}


def reward_rate(name: str, device: str) -> float:
    """Rough images/s of reward ``name`` on ``device`` ('cpu' or any GPU kind)."""
    col = "cpu" if device == "cpu" else "gpu"
    key = "toy" if name.startswith("toy_") else "remote" if name.startswith("remote:") else name
    return REWARD_RATES.get(key, REWARD_RATES["remote"])[col]


@dataclass
class RunEstimate:
    """Per-process memory and per-epoch time of a training run (see ``estimate_run``)."""

    model: str
    device: str
    device_name: str
    gpus: int
    dtype: str
    mfu: float
    peak_tflops: float
    resolution: int
    image_tokens: int
    text_tokens: int
    rows_per_image: int
    params: int
    lora_params: int
    flops: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    time_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_memory_bytes(self) -> int:
        return self.memory.get("peak", 0)

    @property
    def epoch_seconds(self) -> float:
        return sum(self.time_s.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_memory_gib"] = self.peak_memory_bytes / GiB
        d["epoch_seconds"] = self.epoch_seconds
        return d


@dataclass(frozen=True)
class RunInputs:
    """What an estimate reads from a run config (GRPO, OPD or CRD: the shared model:,
    sample: and train: sections, the epoch layout, the rewards)."""

    model: str
    dtype: str
    rank: int
    targets: list[str]
    checkpointing: bool
    offload_text_encoders: bool
    resolution: int | None
    cfg_rows: int  # 2 under CFG (model.guidance_scale > 1), else 1
    grad_rows: int  # CFG rows that run with autograd in training
    prompts_per_epoch: int
    group_size: int
    num_steps: int
    trained_steps: int
    inner_epochs: int
    train_batch_size: int
    beta_kl: float  # > 0: one KL reference forward per trained step
    adamw_8bit: bool
    ema: bool
    rewards: list[str]
    weighted: bool  # reward.mode == "weighted": every image scored by every reward

    @classmethod
    def of(cls, cfg: Any) -> RunInputs:
        from flowopd.config.grpo import GRPOTrainConfig
        from flowopd.errors import UserError
        from flowopd.paths import resolve_model_path

        if not hasattr(cfg, "layout"):
            raise UserError(
                f"{type(cfg).__name__}: the estimate costs epochs of sampled prompt groups "
                "(grpo, opd, crd); this config has none"
            )
        m, s, t, layout = cfg.model, cfg.sample, cfg.train, cfg.layout
        cfg_rows = 2 if m.guidance_scale > 1.0 else 1
        # model.cfg_forward=split with train.cfg_grad=cond runs the unconditional forward
        # without autograd (no backward, no activations); batched CFG back-propagates
        # through both halves whatever cfg_grad says
        split_cond = m.cfg_forward == "split" and t.cfg_grad == "cond"
        # GRPO and OPD train recorded trajectory steps; CRD trains on forward-noised
        # samples, costed as GRPO's default int(num_steps x 0.99) steps
        trained = cfg.trained_steps if hasattr(cfg, "trained_steps") else 0
        return cls(
            model=resolve_model_path(m.path),
            dtype=_dtype_key(m.dtype),
            rank=m.lora.rank,
            targets=list(m.lora.target_modules),
            checkpointing=m.gradient_checkpointing,
            offload_text_encoders=m.offload_text_encoders,
            resolution=m.resolution,
            cfg_rows=cfg_rows,
            grad_rows=1 if split_cond else cfg_rows,
            prompts_per_epoch=layout.prompts_per_epoch,
            group_size=layout.group_size,
            num_steps=s.num_steps,
            trained_steps=trained or max(1, int(s.num_steps * 0.99)),
            inner_epochs=layout.inner_epochs,
            train_batch_size=layout.train_batch_size,
            beta_kl=t.beta_kl if isinstance(t, GRPOTrainConfig) else 0.0,
            adamw_8bit=t.adamw_8bit,
            ema=t.ema,
            rewards=_reward_names(cfg),
            weighted=cfg.reward.mode == "weighted",
        )


def _reward_names(cfg: Any) -> list[str]:
    names = list(cfg.reward.names())
    names += [d.reward for d in cfg.data.datasets if d.reward]
    return list(dict.fromkeys(names))


def _device_rate(
    device: str, dtype: str, cpu_tflops: float | None, notes: list[str]
) -> tuple[float, str, float | None]:
    """(peak TFLOP/s, device name, memory GiB or None) of ``device``; cpu: a GEMM now."""
    if device == "cpu":
        peak = cpu_tflops if cpu_tflops is not None else cpu_matmul_tflops(dtype)
        notes.append(f"cpu: no datasheet peak; {peak * 1e3:.1f} GFLOP/s measured with a GEMM")
        return peak, "this CPU (matmul rate measured now)", None
    if device not in DEVICES:
        from flowopd.errors import unknown

        raise unknown("device", device, [*DEVICES, "cpu"])
    spec = DEVICES[device]
    return spec.peak(dtype), spec.name, spec.memory_gib


def _epoch_flops(
    run: RunInputs, arch: MMDiTArch, shape: PipelineShape, res: int, prompts: int
) -> dict[str, int]:
    """Per-row and per-epoch FLOPs of one process (the ``flops`` of a RunEstimate).

    sampling = images x num_steps x rows x F_fwd + images x F_vae + (prompts + 1) x F_text
    training = inner x images x trained x (grad_rows x F_train + (rows - grad_rows) x F_fwd
               + rows x F_ref)
    """
    n_img, n_txt = image_tokens(arch, res, shape.vae_scale), shape.text_tokens
    images = prompts * run.group_size
    lora = {"lora_rank": run.rank, "lora_targets": run.targets}
    f_fwd_lora = forward_flops(arch, n_img, n_txt, **lora)
    f_fwd_base = forward_flops(arch, n_img, n_txt)
    tf = train_step_flops(arch, n_img, n_txt, **lora, checkpointing=run.checkpointing)
    f_vae = vae_decode_flops(shape.vae_config, res)
    f_text = 2 * shape.text_encoder_params * n_txt  # encoders see their own tokens; upper bound
    rows, grad_rows = run.cfg_rows, run.grad_rows
    sample_flops = (
        images * run.num_steps * rows * f_fwd_lora + images * f_vae + (prompts + 1) * f_text
    )
    ref = f_fwd_base if run.beta_kl > 0 else 0
    train_flops = (
        run.inner_epochs * images * run.trained_steps
        * (grad_rows * tf.hardware + (rows - grad_rows) * f_fwd_lora + rows * ref)
    )  # fmt: skip
    return {
        "forward_per_row": f_fwd_lora,
        "forward_per_row_base": f_fwd_base,
        "train_per_row_model": tf.model,
        "train_per_row_recompute": tf.recompute,
        "vae_decode_per_image": f_vae,
        "sampling_per_epoch": sample_flops,
        "training_per_epoch": train_flops,
    }


def _scoring_seconds(run: RunInputs, images: int, device: str, notes: list[str]) -> float:
    """A weighted sum scores every image with every reward; one reward, task routing or
    GRPO-Mix datasets score each image with one of them (their mean here)."""
    per_image = [1.0 / reward_rate(r, device) for r in run.rewards]
    if run.rewards:
        notes.append(
            "scoring rates are rough orders of magnitude (perf.REWARD_RATES), not measured"
        )
    if run.weighted:
        return images * sum(per_image)
    return images * sum(per_image) / max(1, len(per_image))


def _memory(
    run: RunInputs, arch: MMDiTArch, shape: PipelineShape, res: int, images: int, device: str
) -> dict[str, int]:
    """Bytes per process by component, and ``peak`` (see :func:`estimate_run`)."""
    db = dtype_bytes(run.dtype)
    n_img, n_txt = image_tokens(arch, res, shape.vae_scale), shape.text_tokens
    lora_n = lora_params(arch, run.rank, run.targets)
    opt_state = 2 if run.adamw_8bit else 8
    ema = 4 if run.ema else 0
    side = res // shape.vae_scale
    latent = arch.in_channels * side * side * 4
    rollout_bytes = (
        (run.num_steps + 1) * latent  # trajectory states
        + run.num_steps * latent  # step means
        + 3 * res * res * 4  # decoded images, float32
        + (n_txt * arch.joint_attention_dim + arch.pooled_projection_dim) * 4  # cond
    )
    act_rows = run.train_batch_size * run.grad_rows
    mem = {
        "transformer": (transformer_params(arch) + pos_embed_elements(arch)) * db,
        "vae": shape.vae_params * 4,
        "text_encoders": 0 if run.offload_text_encoders else shape.text_encoder_params * 4,
        "lora+grads+adamw+ema": lora_n * (4 + 4 + opt_state + ema),
        "activations": activation_bytes(arch, n_img, n_txt, act_rows, dtype_bytes=db, checkpointing=run.checkpointing),
        "rollouts": images * rollout_bytes,
        "runtime": RUNTIME_OVERHEAD_BYTES if device != "cpu" else 0,
    }  # fmt: skip
    steady = sum(mem.values())
    # offloaded encoders come back for the epoch's encoding, before rollouts/activations exist
    encoding = mem["transformer"] + mem["vae"] + mem["lora+grads+adamw+ema"] + mem["runtime"]
    encoding += shape.text_encoder_params * 4
    mem["peak"] = max(steady, encoding if run.offload_text_encoders else 0)
    return mem


def _memory_notes(
    run: RunInputs, mem: dict[str, int], device: str, mem_cap: float | None, notes: list[str]
) -> None:
    if mem_cap is not None and mem["peak"] > mem_cap * GiB:
        notes.append(
            f"estimated peak {mem['peak'] / GiB:.1f} GiB exceeds the {mem_cap:.0f} GiB of a "
            f"{device}: lower train.batch_size, enable model.gradient_checkpointing / "
            "model.offload_text_encoders, or use more GPUs"
        )
    steady = sum(v for k, v in mem.items() if k != "peak")
    if not run.checkpointing and mem["activations"] > 0.5 * steady:
        notes.append(
            "activations dominate: model.gradient_checkpointing trades ~1 extra forward for most of them"
        )


def estimate_run(
    cfg: Any,
    device: str = "h100",
    gpus: int = 1,
    *,
    mfu: float | None = None,
    arch: MMDiTArch | None = None,
    shape: PipelineShape | None = None,
    cpu_tflops: float | None = None,
) -> RunEstimate:
    """Peak memory per process and time per epoch of a GRPO-style run config.

    Reads the typed config through :class:`RunInputs` (``model:``, ``sample:``, ``train:``,
    the epoch layout and the reward names of a GRPO, OPD or CRD config). Time per epoch,
    per process (each of ``gpus`` processes samples P / gpus prompts x G images):

        sampling = images x num_steps x rows x F_fwd / R + images x F_vae / R + text
        scoring  = images / reward_rate(reward, device)          (rough table)
        training = inner_epochs x images x trained_steps x rows x (F_train + F_ref) / R

    with rows = 2 under CFG, F_ref the KL reference forward (no LoRA) when beta_kl > 0,
    R = peak x mfu (CPU: a GEMM measured now x mfu; mfu None = ``default_mfu(device)``,
    measured on an H100 for GPUs). Memory: frozen weights in the model
    dtype, VAE and text encoders in float32 (as the sd3 backend loads them; the text
    encoders only while encoding when offloaded), LoRA weights + grads + AdamW states
    (+ EMA) in float32, activations of one training micro-batch, the epoch's rollouts
    kept on the device (float32 states, means, images, text embeddings) and a fixed
    runtime overhead.
    """
    run = RunInputs.of(cfg)
    if arch is None or shape is None:
        arch, shape = load_architecture(run.model)
    res = run.resolution or arch.sample_size * shape.vae_scale
    notes: list[str] = []
    peak, device_name, mem_cap = _device_rate(device, run.dtype, cpu_tflops, notes)
    if mfu is None:
        mfu = default_mfu(device)
    rate = peak * 1e12 * mfu
    P = run.prompts_per_epoch
    if P % gpus:
        from flowopd.errors import UserError

        raise UserError(f"sample.prompts_per_epoch={P} is not divisible by --gpus {gpus}")
    prompts = P // gpus
    images = prompts * run.group_size
    flops = _epoch_flops(run, arch, shape, res, prompts)
    score_s = _scoring_seconds(run, images, device, notes)
    mem = _memory(run, arch, shape, res, images, device)
    _memory_notes(run, mem, device, mem_cap, notes)
    return RunEstimate(
        model=run.model,
        device=device,
        device_name=device_name,
        gpus=gpus,
        dtype=run.dtype,
        mfu=mfu,
        peak_tflops=peak,
        resolution=res,
        image_tokens=image_tokens(arch, res, shape.vae_scale),
        text_tokens=shape.text_tokens,
        rows_per_image=run.cfg_rows,
        params=transformer_params(arch),
        lora_params=lora_params(arch, run.rank, run.targets),
        flops=flops,
        memory=mem,
        time_s={
            "sampling": flops["sampling_per_epoch"] / rate,
            "scoring": score_s,
            "training": flops["training_per_epoch"] / rate,
        },
        notes=notes,
    )


def si(x: float) -> str:
    """3 significant digits with an SI prefix: 2442642604032 -> '2.44 T'."""
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}"
    return f"{x:.3g} "


def format_estimate(est: RunEstimate) -> str:
    """The human report of ``flowopd estimate``."""

    def gib(b: int) -> str:
        return f"{b / GiB:7.2f} GiB"

    f = est.flops
    recompute = f["train_per_row_recompute"]
    lines = [
        f"model        {est.model}  ({si(est.params)}params, LoRA {si(est.lora_params)}params)",
        f"device       {est.gpus} x {est.device_name}, {est.dtype}, peak "
        f"{est.peak_tflops:.3g} TFLOP/s x assumed MFU {est.mfu:.2f}",
        f"sequence     {est.resolution} px: {est.image_tokens} image + {est.text_tokens} text "
        f"tokens, {est.rows_per_image} row(s) per image (CFG)",
        f"FLOP/row     forward {si(f['forward_per_row'])}FLOP, train step "
        f"{si(f['train_per_row_model'])}FLOP"
        + (f" (+{si(recompute)}FLOP checkpoint recompute)" if recompute else ""),
        "memory per process:",
    ]
    for k, v in est.memory.items():
        if k != "peak":
            lines.append(f"  {k:<22}{gib(v)}")
    lines.append(f"  {'peak':<22}{gib(est.memory['peak'])}")
    lines.append("time per epoch:")
    for k, v in est.time_s.items():
        lines.append(f"  {k:<22}{v:9.1f} s")
    lines.append(f"  {'total':<22}{est.epoch_seconds:9.1f} s")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
