"""Per-epoch run logging: ``log.jsonl``, TensorBoard scalars, one human line; progress bars.

    logger = RunLogger(out_dir)                 # writes only on the main process
    logger.log(epoch, {"reward_mean": 0.41, "reward_std": 0.12, "kl": 0.002,
                       "time/sample": 12.1, "eval/geneval": 0.63})
    # epoch 3 | reward 0.41±0.12 | kl 0.002 | t sample 12.1s | eval geneval 0.630

``log.jsonl`` gets every stat (one JSON object per line, flushed and fsynced, so a killed
run loses at most the line being written); non-finite numbers are written as ``null`` to
keep the file valid JSON. TensorBoard gets every numeric stat under its own key.
The human line shows the stats it knows, found by the last component of their key
(``train/kl`` and ``kl`` both count): reward_mean/reward ± reward_std, kl,
clip_fraction, ratio_mean, zero_std_group_frac, every ``time/NAME`` (seconds) and every
``eval/NAME``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

from flowopd.engine.distributed import is_main_process

__all__ = [
    "EPOCH_HOOKS",
    "RunLogger",
    "format_stats",
    "library_log_to",
    "library_warnings",
    "progress",
]

log = logging.getLogger("flowopd")
# Library warnings a user cannot act on: never the console, only OUT/library.log of a run.
library_log = logging.getLogger("flowopd.library")
library_log.propagate = False
library_log.addHandler(logging.NullHandler())
LIBRARY_LOG = "library.log"
# Messages (their start) of those warnings. peft warns on every adapter after the first;
# several named adapters on one model (teachers, anchors, evaluated stages) is by design.
LIBRARY_NOISE: tuple[str, ...] = ("Already found a `peft_config`",)
T = TypeVar("T")

_warned_no_tensorboard = False
# Called with the epoch after every logged epoch, in the training thread (for instance by
# recipes/parallel.py to take over the threads of a finished stage).
EPOCH_HOOKS: list[Callable[[int], None]] = []

# (label, candidate key names (last component), format)
_LINE_FIELDS: list[tuple[str, tuple[str, ...], str]] = [
    ("kl", ("kl",), ".3g"),
    ("clip", ("clip_fraction", "clip_frac", "clipfrac"), ".2f"),
    ("ratio", ("ratio_mean", "ratio"), ".3f"),
    ("zero-std", ("zero_std_group_frac", "zero_std_frac"), ".2f"),
]


def _to_plain(value: Any) -> Any:
    """JSON-ready: tensors/numpy scalars -> numbers, non-finite -> None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # torch / numpy scalars and arrays
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _find(stats: Mapping[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        if isinstance(stats.get(name), (int, float)) and not isinstance(stats[name], bool):
            return float(stats[name])
    for name in names:
        for key, v in stats.items():
            if (
                key.rpartition("/")[2] == name
                and not key.startswith("eval/")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
            ):
                return float(v)
    return None


def format_stats(epoch: int, stats: Mapping[str, Any]) -> str:
    """``epoch 3 | reward 0.41±0.12 | kl 0.002 | clip 0.05 | ratio 1.000 | zero-std 0.10 |
    t sample 12.1s score 0.8s train 9.7s`` from the stats that are present."""
    stats = {k: _to_plain(v) for k, v in stats.items()}
    parts = [f"epoch {epoch}"]
    r = _find(stats, ("reward_mean", "reward"))
    if r is not None:
        s = _find(stats, ("reward_std",))
        parts.append(f"reward {r:.2f}" + (f"±{s:.2f}" if s is not None else ""))
    for label, names, fmt in _LINE_FIELDS:
        v = _find(stats, names)
        if v is not None:
            parts.append(f"{label} {v:{fmt}}")
    times = [
        (k.split("/", 1)[1], v)
        for k, v in stats.items()
        if k.startswith("time/") and isinstance(v, (int, float))
    ]
    if times:
        parts.append("t " + " ".join(f"{name} {v:.1f}s" for name, v in times))
    evals = [
        (k.split("/", 1)[1], v)
        for k, v in stats.items()
        if k.startswith("eval/")
        and k.count("/") == 1  # overall scores only; per-category ones stay in log.jsonl
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    ]
    if evals:
        parts.append("eval " + " ".join(f"{name} {v:.3f}" for name, v in evals))
    return " | ".join(parts)


def library_log_to(out_dir: str | os.PathLike) -> None:
    """Send library warnings (``library_warnings``) to ``out_dir/library.log`` from now on,
    in place of the previous run's file; the file is created at the first warning."""
    for h in [h for h in library_log.handlers if isinstance(h, logging.FileHandler)]:
        library_log.removeHandler(h)
        h.close()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(out_dir) / LIBRARY_LOG, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    library_log.addHandler(handler)


@contextmanager
def library_warnings(noise: tuple[str, ...] = LIBRARY_NOISE) -> Iterator[None]:
    """Inside, a warning whose message starts with one of ``noise`` goes to the library log
    (``library_log_to``), not stderr; every other warning shows as usual."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def route(message, category, filename, lineno, file=None, line=None):
            if str(message).startswith(noise):
                library_log.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = route
        yield


class RunLogger:
    """Appends one record per epoch to ``out_dir/log.jsonl``, ``out_dir/tensorboard/`` and
    prints one line. ``enabled`` defaults to :func:`is_main_process`; a disabled logger
    writes and prints nothing, so every process can call ``log`` unconditionally."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        enabled: bool | None = None,
        tensorboard: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = is_main_process() if enabled is None else enabled
        self.use_tensorboard = tensorboard
        self.stream = stream
        self._writer: Any = None  # SummaryWriter, created on first use
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            library_log_to(self.out_dir)

    @property
    def path(self) -> Path:
        return self.out_dir / "log.jsonl"

    def log(self, epoch: int, stats: Mapping[str, Any], step: int | None = None) -> None:
        """Record ``stats`` for ``epoch`` (TensorBoard x-axis: ``step``, default the epoch)."""
        if not self.enabled:
            return
        plain = {str(k): _to_plain(v) for k, v in stats.items()}
        record = {"epoch": epoch, "time": round(time.time(), 3), **plain}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._tensorboard(plain, epoch if step is None else step)
        print(format_stats(epoch, plain), file=self.stream or sys.stdout, flush=True)
        for hook in EPOCH_HOOKS:
            hook(epoch)

    def _tensorboard(self, stats: Mapping[str, Any], step: int) -> None:
        global _warned_no_tensorboard
        if not self.use_tensorboard:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # tensorboard missing or broken: the JSONL is enough
                if not _warned_no_tensorboard:
                    log.warning("tensorboard unavailable (%s); writing log.jsonl only", e)
                    _warned_no_tensorboard = True
                self.use_tensorboard = False
                return
            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def truncate_from(self, epoch: int) -> None:
        """Drop records of ``epoch`` and later (a resumed run redoes them; no duplicates)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch", -1) < epoch]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[T], desc: str | None = None, total: int | None = None
) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar, only on the main process, on a terminal, and
    unless ``FLOWOPD_NO_PROGRESS=1`` (logs and CI stay free of bar noise)."""
    if (
        not is_main_process()
        or os.environ.get("FLOWOPD_NO_PROGRESS", "") not in ("", "0")
        or not sys.stderr.isatty()
    ):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def quiet_libraries() -> None:
    """Silence diffusers/transformers info chatter (errors still print): set once per run
    by the CLI and by the run set-up (``engine.run.setup_run``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
