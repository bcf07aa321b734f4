"""Two real processes over gloo (torchrun): accelerate setup and the collective helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from flowopd.engine.distributed import (
    broadcast_object,
    gather_cat,
    is_main_process,
    mixed_precision_for,
    shard_indices,
)
from flowopd.errors import UserError

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from flowopd.engine.distributed import (
        broadcast_object, gather_cat, is_main_process, rank, setup_accelerator,
        shard_indices, shutdown, world_size,
    )
    from flowopd.engine.guard import NonFiniteGuard

    acc = setup_accelerator()
    r, w = rank(), world_size()
    out = {
        "rank": r, "world": w, "main": is_main_process(),
        "num_processes": acc.num_processes, "type": str(acc.distributed_type),
        "threads": torch.get_num_threads(),
    }
    # each rank scores its contiguous shard of 7 items; gather restores the global order
    idx = shard_indices(8, r, w)
    out["gathered"] = gather_cat(torch.tensor(idx, dtype=torch.float32) * 10).tolist()
    out["gathered_2d"] = gather_cat(torch.full((2, 3), r)).tolist()
    out["scalar"] = gather_cat(torch.tensor(r + 0.5)).tolist()
    out["bool"] = gather_cat(torch.tensor([r == 1])).tolist()
    try:
        gather_cat(torch.zeros(r + 1))
        out["mismatch"] = "no error"
    except ValueError as e:
        out["mismatch"] = str(e)
    out["broadcast"] = broadcast_object({"seed": 1234} if r == 0 else None)
    # a NaN on rank 1 only: both ranks must skip the step
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    out["guard"] = NonFiniteGuard(3).check(float("nan") if r == 1 else 0.0, [p])
    with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    shutdown()
    """
)


@pytest.mark.slow
def test_two_process_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, out in enumerate(res):
        assert out["rank"] == r and out["world"] == 2 and out["main"] == (r == 0)
        assert out["num_processes"] == 2 and "MULTI_CPU" in out["type"]
        assert out["threads"] == 1
        assert out["gathered"] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]
        assert out["gathered_2d"] == [[0] * 3, [0] * 3, [1] * 3, [1] * 3]
        assert out["scalar"] == [0.5, 1.5]
        assert out["bool"] == [False, True]
        assert "same shape and dtype" in out["mismatch"] and "[(1,), (2,)]" in out["mismatch"]
        assert out["broadcast"] == {"seed": 1234}
        assert out["guard"] is False


def test_single_process_helpers_are_identities():
    import torch

    t = torch.arange(3)
    assert torch.equal(gather_cat(t), t)
    assert gather_cat(torch.tensor(2.0)).tolist() == [2.0]
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert is_main_process()


def test_shard_indices_cover_range_in_order():
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard_indices(2, 2, 3) == []
    with pytest.raises(ValueError):
        shard_indices(4, 3, 3)


def test_mixed_precision_names():
    assert mixed_precision_for("bfloat16") == "bf16" and mixed_precision_for("float32") == "no"
    with pytest.raises(UserError, match="did you mean 'bf16'"):
        mixed_precision_for("bf61")
