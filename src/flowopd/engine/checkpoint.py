"""Atomic checkpoints and RNG state, so that a resumed run is bitwise identical.

Layout of ``OUT/checkpoints/step-N/``:

- ``tensors.safetensors``: every tensor of the state, keyed by its path in the state
  (``lora/transformer.x.lora_A.weight``, ``optimizer/state/0/exp_avg``, ...);
- ``state.pt``: the rest of the state (numbers, strings, lists, dicts with int keys such as
  an optimizer's ``state``) with each tensor replaced by a reference into the file above,
  saved with ``torch.save`` and read back with ``weights_only=True`` (no arbitrary pickles);
- ``meta.json``: step, time and the top-level keys, for people and tools.

A checkpoint is written into ``step-N.tmp-XXXX`` and renamed to ``step-N`` only once
complete (``os.replace`` of a directory is atomic on POSIX), so ``step-N`` either exists
whole or not at all; :func:`latest_checkpoint` never sees a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "rng_state",
    "set_rng_state",
]

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TENSORS = "tensors.safetensors"
_STATE = "state.pt"
_META = "meta.json"
_REF = "__tensor__"  # marker key of a tensor reference inside state.pt


# --------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write ``state`` to ``out_dir/checkpoints/step-{step}`` atomically; return that path.

    state: a mapping of anything ``torch.save(weights_only)`` can round-trip (tensors,
    numbers, strings, None, lists, tuples, dicts) such as ``{"lora": sd, "optimizer":
    opt.state_dict(), "ema": ema.state_dict(), "rng": rng_state(), "epoch": 3}``.
    Tensors are copied to CPU. An existing ``step-{step}`` is replaced.
    keep_last: keep only the newest ``keep_last`` checkpoints (None or 0: keep all).
    Call on the main process only.
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{int(step)}"
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"step-{int(step)}.tmp-", dir=root))
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(dict(state), "", tensors)
        save_file(tensors, str(tmp / _TENSORS))
        torch.save(skeleton, tmp / _STATE)
        meta = {"step": int(step), "time": time.time(), "keys": sorted(map(str, state))}
        (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")
        for name in (_TENSORS, _STATE, _META):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside
            # first; a crash in between leaves step-N.old-* (ignored) and the new tmp.
            old = root / f"{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old_step, path in list_checkpoints(out_dir)[:-keep_last]:
            if old_step != int(step):
                shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The state saved by :func:`save_checkpoint` from the directory ``path``."""
    path = Path(path)
    if not (path / _STATE).is_file():
        from flowopd.errors import UserError

        raise UserError(f"'{path}' is not a flowopd checkpoint (no {_STATE}); pass a step-N dir")
    tensors = load_file(str(path / _TENSORS), device=str(map_location))
    skeleton = torch.load(path / _STATE, map_location=map_location, weights_only=True)
    return _unflatten(skeleton, tensors)


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / _META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``out_dir/checkpoints/step-N``, or None when there is none."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _remove_stale_tmp(root: Path) -> None:
    # Leftovers of a crashed writer (only the main process writes checkpoints).
    for p in root.iterdir():
        if ".tmp-" in p.name or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; not possible on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors into ``tensors`` (keyed by path) and leave references behind."""
    if isinstance(obj, torch.Tensor):
        key = path or "_"
        if key in tensors:  # keys containing '/' could collide with nested paths
            key = f"{key}#{len(tensors)}"
        # a private contiguous CPU copy: safetensors refuses tensors that share storage
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_REF: key}
    if isinstance(obj, Mapping):
        return {k: _flatten(v, f"{path}/{k}" if path else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj))
    if isinstance(obj, np.ndarray):
        raise TypeError(f"checkpoint entry '{path}' is a numpy array; convert it to a tensor")
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            return tensors[obj[_REF]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unflatten(v, tensors) for v in obj)
    return obj


# --------------------------------------------------------------------------------------
# RNG state


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random generator's state: python ``random``, numpy's global, torch CPU, all
    CUDA devices (when CUDA is initialised), and the named ``generators`` (e.g. the
    sampler's noise generator). Checkpoint-safe: tensors, ints and lists only."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    # Only when CUDA is already in use: querying it would initialise CUDA as a side effect.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Restore what :func:`rng_state` captured (the named ``generators`` in place)."""
    py = state["python"]
    random.setstate(
        (py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"])
    )
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        # a resume on fewer/more GPUs restores the devices both runs have
        for i in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[i].cpu(), i)
    saved_gens = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved_gens:
            raise KeyError(f"no saved state for generator '{name}' (saved: {sorted(saved_gens)})")
        g.set_state(saved_gens[name].cpu())
