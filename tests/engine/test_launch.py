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


def test_a_terminated_launcher_stops_its_processes(tmp_path):
    """SIGTERM to the launching process (e.g. `kill`) must not leave its ranks running."""
    import os
    import signal
    import subprocess

    child = (
        "import os, pathlib, time; "
        f"pathlib.Path(r'{tmp_path}', os.environ['RANK']).write_text(str(os.getpid())); "
        "time.sleep(60)"
    )
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import sys; from flowopd.engine.launch import launch_local; "
        f"sys.exit(launch_local([sys.executable, '-c', {child!r}], 2))"
    )])  # fmt: skip
    deadline = time.time() + 30

    def written() -> list[str]:  # each rank's pid, once its file holds it
        return [t for t in (p.read_text() for p in tmp_path.iterdir()) if t]

    while len(written()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(t) for t in written()]
    assert len(pids) == 2
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=20) == 143
    for pid in pids:  # reaped by the launcher: no such process any more
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, pid
