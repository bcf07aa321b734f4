"""One machine, several processes: a ``flowopd`` command data-parallel without a launcher.

:func:`launch_local` starts ``processes`` copies of a command (``python -m flowopd ...``) with the
environment torchrun would give them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so accelerate joins them in one
process group (gloo on CPU, NCCL on GPUs), each with an equal share of the cores as its
torch threads. The children write to this console (only rank 0 prints); the first one
that fails stops the others, and its exit status is returned.

Why not torchrun itself: on a failure it adds an elastic-agent traceback to the child's
one-line error. Timings of the layouts on a machine: ``python bench/processes.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["child_env", "flowopd_command", "launch_local", "launched"]


def launched() -> bool:
    """True inside a multi-process launch (ours or torchrun's)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(
    rank: int, processes: int, port: int, threads: int, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of process ``rank`` of ``processes``: ``base`` (default: this
    process's) plus torchrun's variables."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
        LOCAL_WORLD_SIZE=str(processes), GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS") or str(threads),
    )  # fmt: skip
    return env


def flowopd_command(*args: str) -> list[str]:
    """``python -m flowopd ARGS`` with this interpreter."""
    return [sys.executable, "-m", "flowopd", *args]


def launch_local(
    cmd: list[str], processes: int, *, env: dict[str, str] | None = None, poll_s: float = 0.2
) -> int:
    """Run ``cmd`` as ``processes`` processes on this machine, ranks 0 .. processes - 1,
    in ``env`` (default: this process's environment) plus torchrun's variables.

    Each gets ``max(1, cores // processes)`` threads unless ``OMP_NUM_THREADS`` is set.
    Returns 0 when all succeed, else the first failure's exit status (the others are
    stopped: a process left waiting in a collective would hang for ever).
    """
    threads = max(1, (os.cpu_count() or 1) // processes)
    port = _free_port()
    procs = [
        subprocess.Popen(cmd, env=child_env(r, processes, port, threads, env))
        for r in range(processes)
    ]
    status = 0
    # a SIGTERM to this process (a scheduler, `kill`) stops the children too
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while None in [p.poll() for p in procs]:  # a list: poll every process each time
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                status = failed[0] if failed[0] > 0 else 128 - failed[0]
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:  # the children got the same SIGINT from the terminal
        status = 130
    finally:
        _stop(procs)
        signal.signal(signal.SIGTERM, previous)
    codes = [c if c >= 0 else 128 - c for c in (p.returncode for p in procs)]  # -9 -> 137
    return status or next((c for c in codes if c), 0)


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Stop the processes still running (SIGTERM, then SIGKILL after ``grace_s``)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
