"""Independent training stages at once, one process each (the pipeline's teachers).

Each stage runs ``recipe(algo)(config)`` in a spawned process with ``threads`` torch threads
and its console in ``<run_dir>/console.log``; the parent prints every stage's progress
(epochs done, from its ``log.jsonl``) every ``every`` seconds. When a stage ends, the
stages still running share its threads: the parent writes each one's new count to
``<run_dir>/.threads`` and the stage takes it up after its next epoch. Side tasks (the
pipeline's evaluations of the base and of finished teachers) take a freed slot first:
they run while the other stages still train, instead of after them. For a single machine
without a launcher: under torchrun every process already trains every stage together.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SideTask", "StageJob", "console_to", "train_in_processes"]


@dataclass(frozen=True)
class StageJob:
    """One stage: its report name, algorithm, config file, overrides and output folder."""

    name: str
    algo: str
    config: str
    overrides: tuple[str, ...]
    run_dir: Path
    epochs: int


@dataclass(frozen=True)
class SideTask:
    """Work for a slot that a finished stage frees: ``fn(*args)`` in a child process
    (``fn`` a module-level function: the children are spawned)."""

    name: str
    fn: Callable[..., object]
    args: tuple = ()


THREADS_FILE = ".threads"


@contextlib.contextmanager
def console_to(path: Path) -> Iterator[None]:
    """stdout and stderr appended to ``path`` (a child's console), restored after: the
    pool's worker process may run another stage or side task next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _follow_threads(path: Path) -> Callable[[int], None]:
    """An epoch hook: set torch's threads to the count in ``path`` when it changed."""
    import torch

    def hook(epoch: int) -> None:
        try:
            n = int(path.read_text())
        except (OSError, ValueError):
            return
        if n >= 1 and n != torch.get_num_threads():
            torch.set_num_threads(n)
            print(f"[pipeline] epoch {epoch}: now {n} threads", flush=True)

    return hook


def _write_threads(run_dir: Path, threads: int) -> None:
    tmp = run_dir / f"{THREADS_FILE}.tmp"
    tmp.write_text(str(threads))
    tmp.replace(run_dir / THREADS_FILE)  # never read half-written


def _run_stage(job: StageJob, threads: int) -> float:
    """Child process: train ``job`` with ``threads`` threads (then the count the parent
    writes to ``run_dir/.threads``); returns its seconds."""
    import torch

    from flowopd.algos import config_class, recipe
    from flowopd.config import load_config
    from flowopd.engine.logging import EPOCH_HOOKS
    from flowopd.presets import resolve_config

    torch.set_num_threads(threads)
    hook = _follow_threads(job.run_dir / THREADS_FILE)
    EPOCH_HOOKS.append(hook)
    t0 = time.time()
    with console_to(job.run_dir / "console.log"):
        try:
            cfg = load_config(config_class(job.algo), resolve_config(job.config), job.overrides)
            recipe(job.algo)(cfg)
        finally:
            EPOCH_HOOKS.remove(hook)
    return time.time() - t0


def _run_side(task: SideTask, threads: int) -> float:
    """Child process: ``task.fn(*task.args)`` with ``threads`` threads; returns its seconds."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.time()
    task.fn(*task.args)
    return time.time() - t0


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["epoch"] + 1 if lines else 0


def train_in_processes(
    jobs: Sequence[StageJob],
    processes: int,
    threads: int,
    log: Callable[[str], None] = print,
    every: float = 30.0,
    run: Callable[[StageJob, int], float] = _run_stage,
    side: Sequence[SideTask] = (),
    after: Callable[[StageJob], SideTask | None] | None = None,
) -> dict[str, float]:
    """Train ``jobs`` with at most ``processes`` at once, ``threads`` threads each; returns
    ``{name: seconds}``. ``side`` tasks, and ``after(job)`` for each job that ends while
    others still train, queue for the next free slot (one thread share each). Once every
    job and side task has started, the ``processes * threads`` threads are shared among
    the jobs still running as others end. ``run(job, threads)`` trains one job in a child
    process (a module-level function: the children are spawned).

    A stage that fails re-raises its error here after the others finish; a side task that
    fails is logged and skipped (its work is redone later by whoever needs it)."""
    ctx = mp.get_context("spawn")  # no forked torch state in the children
    seconds: dict[str, float] = {}
    total, waiting = processes * threads, len(jobs) + len(side) - processes
    for j in jobs:
        j.run_dir.mkdir(parents=True, exist_ok=True)
        _write_threads(j.run_dir, threads)
    with ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
        running: dict[Future, StageJob] = {pool.submit(run, j, threads): j for j in jobs}
        extra: dict[Future, SideTask] = {pool.submit(_run_side, t, threads): t for t in side}
        for j in jobs:
            log(f"[pipeline] {j.name}: training in its own process -> {j.run_dir}")
        while running or extra:
            done, _ = wait([*running, *extra], timeout=every, return_when=FIRST_COMPLETED)
            for fut in done:
                waiting -= 1
                if fut in extra:
                    task = extra.pop(fut)
                    try:
                        log(f"[pipeline] {task.name}: done in {fut.result():.0f}s")
                    except Exception as e:  # noqa: BLE001 - redone later, never fatal here
                        log(f"[pipeline] {task.name}: failed ({e}); left for later")
                    continue
                job = running.pop(fut)
                seconds[job.name] = round(fut.result(), 1)
                log(f"[pipeline] {job.name}: done in {seconds[job.name]:.0f}s")
                (job.run_dir / THREADS_FILE).unlink(missing_ok=True)
                task = after(job) if after is not None and running else None
                if task is not None:
                    extra[pool.submit(_run_side, task, threads)] = task
                    waiting += 1
                    log(f"[pipeline] {task.name}: in the freed slot")
            if done and running and waiting < 0:  # nothing left to start: share the threads
                busy = len(running) + len(extra)
                for i, j in enumerate(running.values()):
                    _write_threads(j.run_dir, total // busy + (i < total % busy))
            if running and not done:
                log("[pipeline] " + ", ".join(
                    f"{j.name} epoch {_epochs_done(j.run_dir)}/{j.epochs}" for j in running.values()
                ))  # fmt: skip
    return seconds
