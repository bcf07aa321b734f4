"""Seconds per training epoch on one machine: 1 process x T threads against N processes x 1.

Trains a few epochs of a toy preset (default: the demo's DiffusionNFT OCR teacher) on the
embedded model in each layout and prints the median seconds per epoch after the first
(warm-up), from the runs' log.jsonl, with the ratio to one 1-thread process:

    python bench/processes.py [--config toy/nft_ocr] [--epochs 6] [--cores 2] [--json OUT]

Layouts: one process with 1 thread, one with ``cores`` threads, ``cores`` processes with
one thread each (data-parallel, as ``processes: N`` in a pipeline config runs every stage).
Run it alone on the machine: every layout uses all ``cores``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

from flowopd.engine.launch import flowopd_command, launch_local


def _epoch_times(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    t = [r["time"] for r in recs if "time" in r and "epoch" in r]
    return [b - a for a, b in zip(t[:-1], t[1:], strict=True)]  # epoch k minus k-1: no warm-up


def _run(config: str, epochs: int, out: Path, threads: int, processes: int) -> float:
    cmd = flowopd_command(
        "train", config.split("/")[-1].split("_")[0], "--config", config,
        f"train.epochs={epochs}", f"output.dir={out}", "output.checkpoint_every=0",
        "eval.every=0", "eval.benchmarks=[]",
    )  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env["FLOWOPD_NO_PROGRESS"] = "1"
    if processes == 1:
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    elif launch_local(cmd, processes, env=env) != 0:
        raise SystemExit(f"{processes} processes failed")
    return statistics.median(_epoch_times(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="toy/nft_ocr", help="preset: toy/<algo>_<task>")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    layouts = [(1, 1), (args.cores, 1), (1, args.cores)]  # (threads, processes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (threads, processes) in enumerate(layouts):
            s = _run(args.config, args.epochs, Path(tmp) / str(i), threads, processes)
            rows.append({"processes": processes, "threads": threads, "s_per_epoch": round(s, 2)})
    base = rows[0]["s_per_epoch"]
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"{args.config}, {args.epochs} epochs (median after the first); {machine}\n")
    print("| processes | threads each | s / epoch | speed-up |\n|---|---|---|---|")
    for r in rows:
        r["speedup"] = round(base / r["s_per_epoch"], 2)
        print(
            f"| {r['processes']} | {r['threads']} | {r['s_per_epoch']:.2f} | {r['speedup']:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "config": args.config,
                                               "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
