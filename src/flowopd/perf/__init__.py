"""FLOPs, memory and time of an MMDiT (SD3 / SD3.5) or FLUX.1 run, counted from the architecture.

Modules: ``flops`` (architectures, per-op FLOPs), ``memory`` (parameters, bytes),
``device`` (peaks, MFU), ``estimate`` (a run config's estimate); every public name is
imported here, so ``from flowopd.perf import estimate_run`` works.

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

from flowopd.perf.device import (
    DEFAULT_MFU,
    DEVICES,
    GPU_MFU,
    DeviceSpec,
    cpu_matmul_tflops,
    default_mfu,
    gpu_peak_for_name,
    machine_info,
)
from flowopd.perf.estimate import (
    REWARD_RATES,
    RunEstimate,
    RunInputs,
    estimate_run,
    format_estimate,
    reference_rows,
    reward_rate,
    si,
)
from flowopd.perf.flops import (
    FLUX1_DEV,
    FLUX1_SCHNELL,
    FLUX_PIPELINE,
    KNOWN_ARCHS,
    SD3_PIPELINE,
    SD3_VAE_CONFIG,
    SD35_LARGE,
    SD35_MEDIUM,
    Arch,
    Attention,
    FluxArch,
    Linear,
    MMDiTArch,
    PipelineShape,
    TrainFlops,
    flux_ops,
    forward_flops,
    image_tokens,
    is_lora_target,
    load_architecture,
    mark_gradients,
    measure_flops,
    mmdit_ops,
    train_step_flops,
    vae_decode_flops,
)
from flowopd.perf.memory import (
    ACT_PER_TOKEN,
    ACT_PER_TOKEN_DUAL,
    ACT_PER_TOKEN_LAST_TEXT,
    ACT_PER_TOKEN_SINGLE,
    RUNTIME_OVERHEAD_BYTES,
    GiB,
    activation_bytes,
    dtype_bytes,
    lora_params,
    pos_embed_elements,
    transformer_params,
)

__all__ = [
    "ACT_PER_TOKEN",
    "ACT_PER_TOKEN_DUAL",
    "ACT_PER_TOKEN_LAST_TEXT",
    "ACT_PER_TOKEN_SINGLE",
    "Arch",
    "FLUX1_DEV",
    "FLUX1_SCHNELL",
    "FLUX_PIPELINE",
    "FluxArch",
    "Attention",
    "DEFAULT_MFU",
    "DEVICES",
    "DeviceSpec",
    "GPU_MFU",
    "GiB",
    "KNOWN_ARCHS",
    "Linear",
    "MMDiTArch",
    "PipelineShape",
    "REWARD_RATES",
    "RUNTIME_OVERHEAD_BYTES",
    "RunEstimate",
    "RunInputs",
    "SD35_LARGE",
    "SD35_MEDIUM",
    "SD3_PIPELINE",
    "SD3_VAE_CONFIG",
    "TrainFlops",
    "activation_bytes",
    "cpu_matmul_tflops",
    "default_mfu",
    "dtype_bytes",
    "estimate_run",
    "format_estimate",
    "flux_ops",
    "forward_flops",
    "gpu_peak_for_name",
    "image_tokens",
    "is_lora_target",
    "load_architecture",
    "lora_params",
    "machine_info",
    "mark_gradients",
    "measure_flops",
    "mmdit_ops",
    "pos_embed_elements",
    "reference_rows",
    "reward_rate",
    "si",
    "train_step_flops",
    "transformer_params",
    "vae_decode_flops",
]
