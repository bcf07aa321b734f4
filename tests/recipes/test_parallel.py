"""recipes/parallel.py: stages in their own processes take over a finished stage's threads."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flowopd.recipes.parallel import (
    THREADS_FILE,
    SideTask,
    StageJob,
    _follow_threads,
    train_in_processes,
)


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
    marks = sorted(p.name for p in job.run_dir.parent.glob("mark_*"))
    (job.run_dir / "marks_at_end.txt").write_text(" ".join(marks))
    return 0.0


def _mark(path: Path) -> None:
    """A stand-in side task (an evaluation): leaves a file."""
    time.sleep(0.2)
    path.write_text("done")


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


def test_side_tasks_take_the_freed_slot_before_the_threads(tmp_path):
    """The base's evaluation waits for a free slot, the finished stage's evaluation follows
    it, both while 'slow' still trains; only then does 'slow' get the second thread. The
    stage that ends last gets no side task (nothing else is running)."""
    jobs = [StageJob(n, "nft", "", (), tmp_path / n, 1) for n in ("fast", "slow")]
    log: list[str] = []
    train_in_processes(
        jobs, 2, 1, log=log.append, every=0.1, run=_stage,
        side=[SideTask("eval base", _mark, (tmp_path / "mark_base",))],
        after=lambda job: SideTask(f"eval {job.name}", _mark, (tmp_path / f"mark_{job.name}",)),
    )  # fmt: skip
    assert (tmp_path / "slow" / "seen.txt").read_text().split()[-1] == "2"
    assert (tmp_path / "slow" / "marks_at_end.txt").read_text() == "mark_base mark_fast"
    assert not (tmp_path / "mark_slow").exists()
    assert "[pipeline] eval fast: in the freed slot" in log


def test_a_failing_side_task_is_logged_not_raised(tmp_path):
    jobs = [StageJob(n, "nft", "", (), tmp_path / n, 1) for n in ("fast", "slow")]
    log: list[str] = []
    bad = SideTask("eval base", _mark, (tmp_path / "no" / "such" / "dir",))
    train_in_processes(jobs, 2, 1, log=log.append, every=0.1, run=_stage, side=[bad])
    assert any(line.startswith("[pipeline] eval base: failed") for line in log)
    assert (tmp_path / "slow" / "seen.txt").read_text().split()[-1] == "2"


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


def test_a_stage_leaves_its_worker_as_it_found_it(tmp_path, monkeypatch):
    """The pool reuses a stage's worker process for a side task: the stage's console file
    must not stay the worker's stderr once closed (an evaluation failed on it, "I/O
    operation on closed file"), and its thread-following hook must go."""
    import sys

    import flowopd.algos
    import flowopd.config
    import flowopd.presets
    from flowopd.engine.logging import EPOCH_HOOKS
    from flowopd.recipes.parallel import _run_stage

    def fake_recipe(cfg):
        print("to the console log", file=sys.stderr)

    monkeypatch.setattr(flowopd.algos, "recipe", lambda algo: fake_recipe)
    monkeypatch.setattr(flowopd.algos, "config_class", lambda algo: None)
    monkeypatch.setattr(flowopd.config, "load_config", lambda *a: None)
    monkeypatch.setattr(flowopd.presets, "resolve_config", lambda c: c)
    stderr, hooks, threads = sys.stderr, list(EPOCH_HOOKS), torch.get_num_threads()
    try:
        _run_stage(StageJob("s", "nft", "", (), tmp_path / "s", 1), 1)
    finally:
        torch.set_num_threads(threads)
    assert sys.stderr is stderr and hooks == EPOCH_HOOKS
    assert "to the console log" in (tmp_path / "s" / "console.log").read_text()
