"""The one-machine launcher: torchrun's environment per rank, exit status, stopping on failure."""

from __future__ import annotations

import sys
import time

from flowopd.engine.launch import child_env, launch_local


def test_child_env_gives_each_rank_torchruns_variables(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = child_env(1, 2, 29555, threads=3)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (
        "1", "1", "2", "2",
    )  # fmt: skip
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29555")
    assert env["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    assert child_env(0, 2, 29555, threads=3)["OMP_NUM_THREADS"] == "2"


def test_launch_local_runs_every_rank_and_returns_zero(tmp_path):
    script = (
        "import os, pathlib; r = os.environ['RANK']; "
        f"pathlib.Path(r'{tmp_path}', 'rank' + r).write_text(os.environ['WORLD_SIZE'])"
    )
    assert launch_local([sys.executable, "-c", script], 3) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1", "rank2"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {"3"}


def test_a_failing_rank_stops_the_others_and_its_status_is_returned():
    # rank 1 fails at once; rank 0 would wait a minute (as in a collective with a dead peer)
    script = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    t0 = time.time()
    assert launch_local([sys.executable, "-c", script], 2) == 3
    assert time.time() - t0 < 20
