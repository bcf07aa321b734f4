"""Processes: accelerate setup that avoids the CPU traps, and small collective helpers.

Launch multi-process runs with ``torchrun --nproc_per_node=N -m flowopd ...``. On CPU:

- ``Accelerator()`` without ``cpu=True`` under torchrun runs N unsynchronised copies;
  :func:`setup_accelerator` passes ``cpu=True`` when there is no CUDA and checks that
  accelerate really sees all N processes;
- N processes with several threads each oversubscribe the cores (4-6x slower): one
  thread per process unless ``OMP_NUM_THREADS`` says otherwise;
- ``accelerate launch --cpu --num_processes 2`` silently starts one process: use torchrun;
- a process that exits with the gloo group still alive can abort at interpreter exit
  ("terminate called without an active exception", SIGABRT): call :func:`shutdown` last.

The helpers work with or without an Accelerator: they use ``torch.distributed`` when it
is initialised and are identities in a single process.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from flowopd.errors import UserError, unknown

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "setup_accelerator",
    "mixed_precision_for",
    "is_main_process",
    "rank",
    "world_size",
    "gather_cat",
    "gather_shards",
    "shard_indices",
    "broadcast_object",
    "barrier",
    "init_processes",
    "shutdown",
]

log = logging.getLogger("flowopd")
T = TypeVar("T")

_MIXED = {
    "no": "no",
    "float32": "no",
    "fp32": "no",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
}


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 in a single process, RANK before init under torchrun)."""
    if _dist_ready():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes (1 in a single process, WORLD_SIZE before init under torchrun)."""
    if _dist_ready():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0: the process that logs, prints and writes checkpoints."""
    return rank() == 0


def mixed_precision_for(dtype: str) -> str:
    """accelerate's mixed-precision name for a dtype name: 'bfloat16' -> 'bf16', 'float32' -> 'no'."""
    if dtype not in _MIXED:
        raise unknown("mixed precision", dtype, _MIXED)
    return _MIXED[dtype]


def setup_accelerator(
    cpu: bool | None = None, mixed_precision: str = "no", **kwargs: Any
) -> Accelerator:
    """An ``accelerate.Accelerator`` that is correct under torchrun on CPU-only machines.

    cpu: force CPU; None = CPU exactly when CUDA is unavailable.
    mixed_precision: 'no' | 'bf16' | 'fp16' (or a dtype name such as 'bfloat16').
    kwargs: passed to ``Accelerator`` (e.g. ``gradient_accumulation_steps``).
    """
    from accelerate import Accelerator  # lazy: importing accelerate costs ~1 s

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    has_cuda = torch.cuda.is_available()
    if cpu is None:
        cpu = not has_cuda
    elif not cpu and not has_cuda and launched > 1:
        # Accelerator(cpu=False) here would run unsynchronised copies of the run.
        log.warning("no CUDA device: using cpu=True so the %d processes train together", launched)
        cpu = True
    if cpu and launched > 1:
        # one thread per process unless the user chose otherwise (oversubscription is 4-6x slower)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision_for(mixed_precision), **kwargs
    )
    if accelerator.num_processes != launched:
        raise UserError(
            f"launched {launched} processes but accelerate sees {accelerator.num_processes}; "
            "launch with torchrun --nproc_per_node=N (not 'accelerate launch --cpu')"
        )
    return accelerator


def gather_cat(tensor: Tensor) -> Tensor:
    """All processes' ``tensor`` concatenated along dim 0, in rank order: (W * B, ...).

    Every process must pass a tensor of the same shape and dtype (checked: a mismatch
    raises ValueError on every process instead of hanging). No gradient flows back. With
    :func:`shard_indices` shards, the result is in the global order. A 0-d tensor
    gives a (W,) tensor.
    """
    if not _dist_ready() or dist.get_world_size() == 1:
        return tensor.detach().reshape(1) if tensor.dim() == 0 else tensor.detach()
    t = tensor.detach().contiguous()
    home = t.device  # the result comes back here
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        # NCCL moves CUDA tensors only: rewards and advantages live on the CPU
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    is_bool = t.dtype == torch.bool
    if is_bool:  # gloo has no bool collectives
        t = t.to(torch.uint8)
    world = dist.get_world_size()
    # (ndim, *shape, dtype code), padded so every process sends the same length
    sig = torch.full((10,), -1, dtype=torch.int64, device=t.device)
    sig[0] = t.dim()
    if t.dim() > 8:
        raise ValueError("gather_cat supports at most 8 dimensions")
    sig[1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    sig[9] = _dtype_code(t.dtype)
    sigs = [torch.empty_like(sig) for _ in range(world)]
    dist.all_gather(sigs, sig)
    if any(not torch.equal(s, sigs[0]) for s in sigs):
        shapes = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in sigs]
        raise ValueError(
            f"gather_cat needs the same shape and dtype on every process, got {shapes}"
        )
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    out = torch.stack(parts) if t.dim() == 0 else torch.cat(parts, 0)
    out = out.to(home)
    return out.bool() if is_bool else out


def _dtype_code(dtype: torch.dtype) -> int:
    return sum(map(ord, str(dtype)))  # any stable per-dtype number does


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The contiguous block of ``range(n)`` that process ``rank`` of ``world`` handles.

    Blocks are in rank order and differ in size by at most one (the first ``n % world``
    ranks take one more), so ``gather_cat`` of per-shard results restores the order of
    ``range(n)`` when ``world`` divides ``n``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def gather_shards(local: Tensor, n: int) -> Tensor:
    """Per-item results of ``shard_indices`` shards, gathered in the global order: (n, ...).

    local: this process's results for its shard of ``range(n)``, (len(shard), ...); shards
    may differ in size by one (or be empty when n < W), which ``gather_cat`` alone cannot
    take: each is padded to the largest size, gathered, and the padding dropped. Identity
    (a detached copy) in a single process.
    """
    world, me = world_size(), rank()
    sizes = [len(shard_indices(n, r, world)) for r in range(world)]
    if local.shape[0] != sizes[me]:
        raise ValueError(f"process {me} holds {local.shape[0]} results for a shard of {sizes[me]}")
    if world == 1 or not _dist_ready():
        return local.detach()
    width = max(sizes)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: sizes[me]] = local.detach()
    blocks = gather_cat(padded).reshape(world, width, *local.shape[1:])
    return torch.cat([blocks[r, : sizes[r]] for r in range(world)])


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as held by process ``src`` (any picklable object); identity in one process."""
    if not _dist_ready() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def init_processes() -> None:
    """Join the launched processes' group now (accelerate's ``PartialState``: gloo on CPU,
    NCCL on GPUs), for work that needs collectives before any stage builds an Accelerator,
    e.g. a pipeline resumed after its training stages. No-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _dist_ready():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if _dist_ready() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down (after a barrier) so the process exits cleanly."""
    if _dist_ready():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
