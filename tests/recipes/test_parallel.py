"""recipes/parallel.py: stages in their own processes take over a finished stage's threads."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flowopd.recipes.parallel import THREADS_FILE, StageJob, _follow_threads, train_in_processes


def _stage(job: StageJob, threads: int) -> float:
    """A stand-in stage (spawned child): 'fast' ends at once; 'slow' records the thread
    counts it is given until it sees 2, as a training stage would after each epoch."""
    seen = [threads]
    if job.name == "slow":
        deadline = time.time() + 60
        while seen[-1] != 2 and time.time() < deadline:
            time.sleep(0.05)
            seen.append(int((job.run_dir / THREADS_FILE).read_text()))
    (job.run_dir / "seen.txt").write_text(" ".join(map(str, seen)))
    return 0.0


def test_finished_stage_threads_go_to_the_running_one(tmp_path):
    jobs = [StageJob(n, "nft", "", (), tmp_path / n, 1) for n in ("fast", "slow")]
    seconds = train_in_processes(jobs, 2, 1, log=lambda _: None, every=0.1, run=_stage)
    assert set(seconds) == {"fast", "slow"}
    seen = (tmp_path / "slow" / "seen.txt").read_text().split()
    assert seen[0] == "1" and seen[-1] == "2"  # started on 1 thread, then given the 2nd
    assert (tmp_path / "fast" / "seen.txt").read_text() == "1"
    assert not any(p.name.startswith(THREADS_FILE) for p in tmp_path.rglob("*"))  # cleaned


def test_queued_stages_keep_their_share(tmp_path):
    # 3 stages on 2 processes: the first to end frees a slot for the queued one, not threads
    jobs = [StageJob(n, "nft", "", (), tmp_path / n, 1) for n in ("fast", "fast2", "slow")]
    jobs[1] = StageJob("fast", "nft", "", (), tmp_path / "fast2", 1)
    train_in_processes(jobs, 2, 1, log=lambda _: None, every=0.1, run=_stage)
    assert (tmp_path / "slow" / "seen.txt").read_text().split()[-1] == "2"  # after both ended


def test_epoch_hook_sets_torch_threads(tmp_path: Path, capsys):
    before = torch.get_num_threads()
    try:
        (tmp_path / THREADS_FILE).write_text("3")
        hook = _follow_threads(tmp_path / THREADS_FILE)
        hook(4)
        assert torch.get_num_threads() == 3
        assert "epoch 4: now 3 threads" in capsys.readouterr().out
        (tmp_path / THREADS_FILE).write_text("")  # half-written or missing: left as it is
        hook(5)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
