"""What every recipe shares, written once: processes, checkpoints, EMA, logging, NaN guard.

distributed: accelerate setup that avoids the CPU/torchrun traps; gather/shard/broadcast
checkpoint:  atomic ``checkpoints/step-N`` directories and bitwise-exact RNG state
ema:         EMA of the LoRA weights (Flow-GRPO schedule) with a swap-in context manager
logging:     log.jsonl + TensorBoard + one human line per epoch; progress bars
guard:       skip non-finite optimizer steps, abort after N in a row
"""

from flowopd.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flowopd.engine.distributed import (
    barrier,
    broadcast_object,
    gather_cat,
    is_main_process,
    mixed_precision_for,
    rank,
    setup_accelerator,
    shard_indices,
    shutdown,
    world_size,
)
from flowopd.engine.ema import EMA, flowgrpo_decay
from flowopd.engine.guard import NonFiniteGuard, TrainingDiverged
from flowopd.engine.logging import RunLogger, format_stats, progress

__all__ = [
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "barrier",
    "broadcast_object",
    "gather_cat",
    "is_main_process",
    "mixed_precision_for",
    "rank",
    "setup_accelerator",
    "shard_indices",
    "shutdown",
    "world_size",
    "EMA",
    "flowgrpo_decay",
    "NonFiniteGuard",
    "TrainingDiverged",
    "RunLogger",
    "format_stats",
    "progress",
]
