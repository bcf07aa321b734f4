"""Run several ``flowopd train ...`` jobs at once and summarise their logs in one file.

Made for a short GPU lease (or a many-core machine): every job gets the same wall-clock
budget and ``--threads`` CPU threads, runs to its end or is stopped with SIGINT at the
budget, and the summary (training reward per 10 epochs, every evaluation row) goes to
``OUT/summary.txt``, with each job's output and ``log.jsonl`` in ``OUT/logs.tar.gz``.

Jobs file: one job per line, ``NAME ARGS...`` where ARGS are ``flowopd`` arguments
(``output.dir`` is added, under ``--work``); blank lines and ``#`` comments are skipped::

    g_full train grpo --config configs/toy/grpo_geneval.yaml sample.sde_window_size=10 sample.sde_window_range=[0,10]
    c_kl03 train crd --config configs/toy/crd_geneval.yaml crd.beta_kl=0.03

    python scripts/parallel_runs.py jobs.txt OUT --budget 530 --threads 1
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def read_jobs(path: Path) -> list[tuple[str, str]]:
    """(name, flowopd arguments) per non-blank, non-comment line; names must be unique."""
    jobs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, args = line.partition(" ")
        if not args.strip():
            raise SystemExit(f"{path}: job '{name}' has no arguments")
        jobs.append((name, args.strip()))
    names = [n for n, _ in jobs]
    if len(set(names)) != len(names):
        raise SystemExit(
            f"{path}: job names repeat: {sorted(n for n in names if names.count(n) > 1)}"
        )
    return jobs


def summarize(name: str, args: str, log: Path, rc: int | None, block: int = 10) -> list[str]:
    """Lines for one job: reward means per ``block`` epochs, seconds per epoch, eval rows."""
    lines = [f"== {name}: {args}  rc={rc}"]
    if not log.is_file():
        return lines + ["   no log.jsonl (see the job's output in logs.tar.gz)"]
    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    if not recs:
        return lines + ["   empty log.jsonl"]
    r = [x.get("reward_mean", math.nan) for x in recs]
    means = [sum(r[i : i + block]) / len(r[i : i + block]) for i in range(0, len(r), block)]
    secs = sum(x.get(k, 0.0) for x in recs for k in ("time/sample", "time/score", "time/train"))
    lines.append(f"   reward per {block} epochs: " + " ".join(f"{m:.3f}" for m in means))
    lines.append(f"   epochs {len(recs)}, {secs / len(recs):.2f} s/epoch (sample+score+train)")
    for x in recs:
        ev = {k[5:]: v for k, v in x.items() if k.startswith("eval/") and k.count("/") == 1}
        if ev:
            row = " ".join(f"{k}={v:.3f}" for k, v in sorted(ev.items()))
            lines.append(f"   epoch {x['epoch'] + 1}: {row}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from flowopd.cli import OneLineParser
    from flowopd.cli.common import number

    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jobs", type=Path, help="jobs file: NAME ARGS... per line")
    p.add_argument("out", type=Path, help="where summary.txt and logs.tar.gz go")
    p.add_argument(
        "--budget",
        type=number(float, 0, lo_open=True),
        required=True,
        help="seconds per job (SIGINT after)",
    )
    p.add_argument("--threads", type=number(int, 1), default=1, help="OMP/MKL threads per job")
    p.add_argument("--work", type=Path, default=Path("runs/parallel"), help="jobs' output dirs")
    args = p.parse_args(argv)

    jobs = read_jobs(args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", FLOWOPD_NO_PROGRESS="1")
    env.update(PYTHONUNBUFFERED="1")
    t0 = time.time()
    procs = {}
    for name, a in jobs:
        cmd = [sys.executable, "-m", "flowopd", *shlex.split(a), f"output.dir={args.work / name}"]
        with open(args.work / f"{name}.log", "w") as f:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = t0 + args.budget
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.send_signal(2)  # SIGINT: the recipe stops between epochs' writes
    for proc in procs.values():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lines = [f"{len(jobs)} jobs, {args.threads} thread(s) each, wall {time.time() - t0:.0f} s"]
    for name, a in jobs:
        lines += summarize(name, a, args.work / name / "log.jsonl", procs[name].returncode)
    text = "\n".join(lines) + "\n"
    tmp = args.out / ".summary.txt.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.out / "summary.txt")
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tf:
        for name, _ in jobs:
            tf.add(args.work / f"{name}.log", arcname=f"{name}.log")
            log = args.work / name / "log.jsonl"
            if log.is_file():
                tf.add(log, arcname=f"{name}.jsonl")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
