"""Checkpoints: atomic directories, keep-last-K, exact state and RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from flowopd.engine import checkpoint as ckpt
from flowopd.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, betas=(0.9, 0.999))
    lin(torch.randn(4, 3, generator=g)).sum().backward()
    opt.step()
    return {
        "lora": {"a.lora_A.weight": torch.randn(2, 3, generator=g, dtype=torch.bfloat16)},
        "optimizer": opt.state_dict(),  # int keys, tuples, 0-d 'step' tensors
        "counters": {"epoch": seed, "step": 2 * seed, "name": "run", "loss": 0.5, "none": None},
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # key types (int vs str) and order preserved
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact_and_optimizer_reloads(tmp_path):
    state = _state(1)
    path = save_checkpoint(tmp_path, 5, state)
    assert path == tmp_path / "checkpoints" / "step-5"
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    # the optimizer state goes back into a fresh optimizer unchanged
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    _assert_same(opt.state_dict()["state"], state["optimizer"]["state"])


def test_crash_mid_write_leaves_no_step_dir(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)  # fails after the tensors were written
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, _state(2))
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-1"]  # no step-2, no temporary leftovers
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-1"
    _assert_same(load_checkpoint(latest_checkpoint(tmp_path)), _state(1))


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    # what a killed process (no cleanup) leaves behind
    stale = tmp_path / "checkpoints" / "step-9.tmp-abc"
    stale.mkdir()
    (stale / "tensors.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-1"
    save_checkpoint(tmp_path, 2, _state(2))
    assert not stale.exists()


def test_keep_last_and_overwrite(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    save_checkpoint(tmp_path, 4, _state(40), keep_last=2)  # same step again replaces it
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert load_checkpoint(latest_checkpoint(tmp_path))["counters"]["epoch"] == 40


def _draws(gen: torch.Generator) -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
        torch.randn(2, generator=gen).tolist(),
    )


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()
    save_checkpoint(tmp_path, 1, {"rng": rng_state({"noise": gen})})
    expected = _draws(gen)
    # scramble everything, then restore from disk
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    gen2 = torch.Generator().manual_seed(99)
    set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"], {"noise": gen2})
    assert _draws(gen2) == expected


def test_set_rng_state_unknown_generator():
    with pytest.raises(KeyError, match="no saved state for generator 'other'"):
        set_rng_state(rng_state(), {"other": torch.Generator()})


def test_load_rejects_non_checkpoint(tmp_path):
    from flowopd.errors import UserError

    with pytest.raises(UserError, match="not a flowopd checkpoint"):
        load_checkpoint(tmp_path)
