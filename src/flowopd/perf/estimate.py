"""A run's estimate: peak memory per process and time per epoch of a training config.

The FLOP convention is in the docstring of :mod:`flowopd.perf`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from flowopd.perf.device import DEVICES, cpu_matmul_tflops, default_mfu
from flowopd.perf.flops import (
    Arch,
    FluxArch,
    PipelineShape,
    forward_flops,
    image_tokens,
    load_architecture,
    train_step_flops,
    vae_decode_flops,
)
from flowopd.perf.memory import (
    RUNTIME_OVERHEAD_BYTES,
    GiB,
    _dtype_key,
    activation_bytes,
    dtype_bytes,
    lora_params,
    pos_embed_elements,
    transformer_params,
)

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
    base_rows: int  # forwards of the base without autograd per trained row and step
    adapter_rows: int  # forwards through another adapter (old, EMA, teacher) likewise
    adamw_8bit: bool
    ema: bool
    rewards: list[str]
    weighted: bool  # reward.mode == "weighted": every image scored by every reward
    full: bool = False  # model.finetune == "full": every weight trains, FSDP-sharded
    reference: bool = True  # full: a frozen copy of the base for the KL (GRPO beta_kl > 0)

    @classmethod
    def of(cls, cfg: Any) -> RunInputs:
        from flowopd.config.times import training_times_of
        from flowopd.errors import UserError
        from flowopd.paths import resolve_model_path

        if not hasattr(cfg, "layout"):
            raise UserError(
                f"{type(cfg).__name__}: the estimate costs epochs of sampled prompt groups "
                "(grpo, opd, crd, nft, awm); this config has none"
            )
        m, s, t, layout = cfg.model, cfg.sample, cfg.train, cfg.layout
        cfg_rows = 2 if m.guidance_scale > 1.0 else 1
        # model.cfg_forward=split with train.cfg_grad=cond runs the unconditional forward
        # without autograd (no backward, no activations); batched CFG back-propagates
        # through both halves whatever cfg_grad says
        split_cond = m.cfg_forward == "split" and t.cfg_grad == "cond"
        # GRPO and OPD train recorded trajectory steps; CRD, NFT and AWM train every
        # clean sample at their time grid's times_used times
        times = training_times_of(cfg)
        trained = times.times_used if times else getattr(cfg, "trained_steps", 0)
        base_rows, adapter_rows = reference_rows(cfg)
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
            base_rows=base_rows,
            adapter_rows=adapter_rows,
            adamw_8bit=t.adamw_8bit,
            ema=t.ema,
            rewards=_reward_names(cfg),
            weighted=cfg.reward.mode == "weighted",
            full=getattr(m, "finetune", "lora") == "full",
            reference=getattr(cfg, "uses_reference", True),
        )


def reference_rows(cfg: Any, cfg_pairs: bool = True) -> tuple[int, int]:
    """(base, adapter) forward rows without autograd per trained row and time, by method.

    Each forward at a guidance scale w > 1 is a CFG pair (2 rows) when ``cfg_pairs``, else
    1 row (FLUX: guidance is an embedding). GRPO: the KL reference (base) when
    ``grpo.beta_kl > 0``. OPD: the routed teachers (adapters), plus the MAR anchor when
    ``opd.mar_lambda > 0`` (the base, or an adapter when ``opd.anchor`` names one). CRD:
    the old snapshot, plus the base at ``crd.anchor_guidance_scale`` under the KL anchor.
    NFT: the old snapshot, plus the base when ``nft.kl_beta > 0``. AWM: the base when
    ``awm.kl_beta > 0`` and the EMA snapshot when ``awm.ema_kl_beta > 0``.
    """

    def at(w: float) -> int:
        return 2 if cfg_pairs and w > 1.0 else 1

    rows = at(cfg.model.guidance_scale)
    if (g := getattr(cfg, "grpo", None)) is not None:
        return (rows if g.beta_kl > 0 else 0), 0
    if (o := getattr(cfg, "opd", None)) is not None:
        mar = rows if o.mar_lambda > 0 else 0
        return (0, rows + mar) if o.anchor else (mar, rows)
    if (c := getattr(cfg, "crd", None)) is not None:
        return (at(c.anchor_guidance_scale) if c.kl_anchor else 0), rows
    if (n := getattr(cfg, "nft", None)) is not None:
        return (rows if n.kl_beta > 0 else 0), rows
    if (a := getattr(cfg, "awm", None)) is not None:
        return (rows if a.kl_beta > 0 else 0), (rows if a.ema_kl_beta > 0 else 0)
    return 0, 0


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
    run: RunInputs, arch: Arch, shape: PipelineShape, res: int, prompts: int
) -> dict[str, int]:
    """Per-row and per-epoch FLOPs of one process (the ``flops`` of a RunEstimate).

    sampling = images x num_steps x rows x F_fwd + images x F_vae + (prompts + 1) x F_text
    training = inner x images x trained x (grad_rows x F_train + (rows - grad_rows) x F_fwd
               + base_rows x F_base + adapter_rows x F_fwd)   (``reference_rows``)
    """
    n_img, n_txt = image_tokens(arch, res, shape.vae_scale), shape.text_tokens
    images = prompts * run.group_size
    lora = {"lora_rank": run.rank, "lora_targets": run.targets}
    f_fwd_lora = forward_flops(arch, n_img, n_txt, **lora)
    f_fwd_base = forward_flops(arch, n_img, n_txt)
    tf = train_step_flops(arch, n_img, n_txt, **lora, checkpointing=run.checkpointing)
    if run.full:  # + the weight gradients dW = 2 m k n per linear: ~one more forward
        tf = replace(tf, backward=tf.backward + f_fwd_base)
    f_vae = vae_decode_flops(shape.vae_config, res)
    f_text = 2 * shape.text_encoder_params * n_txt  # encoders see their own tokens; upper bound
    rows, grad_rows = run.cfg_rows, run.grad_rows
    sample_flops = (
        images * run.num_steps * rows * f_fwd_lora + images * f_vae + (prompts + 1) * f_text
    )
    no_grad = (rows - grad_rows + run.adapter_rows) * f_fwd_lora + run.base_rows * f_fwd_base
    train_flops = (
        run.inner_epochs * images * run.trained_steps * (grad_rows * tf.hardware + no_grad)
    )
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


def _weight_memory(run: RunInputs, arch: Arch, gpus: int) -> dict[str, int]:
    """Transformer and trained-state bytes per process.

    LoRA: the frozen transformer in the model dtype (b bytes) and the LoRA's float32
    weights + grads + AdamW (8 B, 8-bit: 2 B) + EMA (4 B) per LoRA parameter.
    Full fine-tuning (FSDP over ``gpus`` processes), P transformer parameters:
    ``trained state shard`` = (4 + 4 + 8 + 4 ema) P / gpus float32 weights, grads, AdamW
    moments and EMA shadow; ``reference shard`` = b P / gpus frozen reference
    (when the KL needs one), plus 2 blocks' float32 weights gathered at a time (the
    running block and the prefetched next one) and the unsharded positional buffer.
    """
    db = dtype_bytes(run.dtype)
    opt_state = 2 if run.adamw_8bit else 8
    ema = 4 if run.ema else 0
    n, pos = transformer_params(arch), pos_embed_elements(arch)
    if not run.full:
        lora_n = lora_params(arch, run.rank, run.targets)
        return {
            "transformer": (n + pos) * db,
            "lora+grads+adamw+ema": lora_n * (4 + 4 + opt_state + ema),
        }
    blocks = arch.num_layers + getattr(arch, "num_single_layers", 0)
    return {
        "reference shard": (n * db // gpus + pos * db) if run.reference else 0,
        "trained state shard": n * (4 + 4 + opt_state + ema) // gpus + pos * 4,
        "gathered blocks": 2 * (n // blocks) * 4 if gpus > 1 else 0,
    }  # fmt: skip


def _memory(
    run: RunInputs,
    arch: Arch,
    shape: PipelineShape,
    res: int,
    images: int,
    device: str,
    gpus: int = 1,
) -> dict[str, int]:
    """Bytes per process by component, and ``peak`` (see :func:`estimate_run`)."""
    db = dtype_bytes(run.dtype)
    n_img, n_txt = image_tokens(arch, res, shape.vae_scale), shape.text_tokens
    side = res // shape.vae_scale
    latent = arch.in_channels * side * side * 4
    rollout_bytes = (
        (run.num_steps + 1) * latent  # trajectory states
        + run.num_steps * latent  # step means
        + 3 * res * res * 4  # decoded images, float32
        + (n_txt * arch.joint_attention_dim + arch.pooled_projection_dim) * 4  # cond
    )
    act_rows = run.train_batch_size * run.grad_rows
    weights = _weight_memory(run, arch, gpus)
    mem = {
        **weights,
        "vae": shape.vae_params * 4,
        "text_encoders": 0 if run.offload_text_encoders else shape.text_encoder_params * 4,
        "activations": activation_bytes(arch, n_img, n_txt, act_rows, dtype_bytes=db, checkpointing=run.checkpointing),
        "rollouts": images * rollout_bytes,
        "runtime": RUNTIME_OVERHEAD_BYTES if device != "cpu" else 0,
    }  # fmt: skip
    steady = sum(mem.values())
    # offloaded encoders come back for the epoch's encoding, before rollouts/activations exist
    encoding = sum(weights.values()) + mem["vae"] + mem["runtime"]
    encoding += shape.text_encoder_params * 4
    mem["peak"] = max(steady, encoding if run.offload_text_encoders else 0)
    return mem


def _memory_notes(
    run: RunInputs, mem: dict[str, int], device: str, mem_cap: float | None, notes: list[str]
) -> None:
    if run.full:
        notes.append(
            "model.finetune=full: float32 weights, grads and AdamW states sharded over the "
            "processes with FSDP; the KL reference is a frozen sharded copy"
        )
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
    arch: Arch | None = None,
    shape: PipelineShape | None = None,
    cpu_tflops: float | None = None,
) -> RunEstimate:
    """Peak memory per process and time per epoch of a GRPO-style run config.

    Reads the typed config through :class:`RunInputs` (``model:``, ``sample:``, ``train:``,
    the epoch layout and the reward names of a GRPO, OPD, CRD, NFT or AWM config). Time per epoch,
    per process (each of ``gpus`` processes samples P / gpus prompts x G images):

        sampling = images x num_steps x rows x F_fwd / R + images x F_vae / R + text
        scoring  = images / reward_rate(reward, device)          (rough table)
        training = inner_epochs x images x trained_steps
                   x (rows x F_train + base_rows x F_base + adapter_rows x F_fwd) / R

    with rows = 2 under CFG (1 for FLUX: guidance embedding, no CFG pair), trained_steps
    the recorded steps (GRPO, OPD) or the time grid's times_used (CRD, NFT, AWM), base_rows / adapter_rows the method's frozen
    forwards (``reference_rows``: KL reference, old / EMA snapshots, teachers, anchor),
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
        arch, shape = load_architecture(run.model, getattr(cfg.model, "max_sequence_length", None))
    res = run.resolution or arch.sample_size * shape.vae_scale
    notes: list[str] = []
    if isinstance(arch, FluxArch):
        # FLUX: the guidance scale is an embedding (dev) or unused (schnell); no CFG pair
        base_rows, adapter_rows = reference_rows(cfg, cfg_pairs=False)
        run = replace(run, cfg_rows=1, grad_rows=1, base_rows=base_rows, adapter_rows=adapter_rows)
        notes.append("FLUX: guidance is an embedding of the one forward per step (1 row/image)")
    notes.insert(0, (
        f"per trained row and step: policy forward + backward, {run.base_rows} base and "
        f"{run.adapter_rows} adapter forward row(s) without autograd (KL reference, "
        "snapshots, teachers, anchor)"
    ))  # fmt: skip
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
    mem = _memory(run, arch, shape, res, images, device, gpus)
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
        f"tokens, {est.rows_per_image} row(s) per image"
        + (" (CFG pair)" if est.rows_per_image == 2 else ""),
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
