"""Devices: datasheet peaks, a CPU GEMM measured now, and the assumed MFU.

The FLOP convention is in the docstring of :mod:`flowopd.perf`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowopd.perf.memory import _dtype_key

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
