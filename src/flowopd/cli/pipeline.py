"""``flowopd pipeline CONFIG``: teachers -> GRPO-Mix -> cold start -> Flow-OPD -> eval -> report."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run the whole Flow-OPD experiment (idempotent)")
    p.add_argument("config", help="pipeline YAML or preset, e.g. toy/flow_opd")
    p.add_argument("--out", default=None, help="output directory (same as out=DIR)")
    p.add_argument("--budget", default="full", choices=["full", "demo"],
                   help="demo: add the config's demo_overrides to every training stage")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import time
    from dataclasses import asdict

    from flowopd.config import load_config
    from flowopd.config.pipeline import PipelineConfig
    from flowopd.engine.distributed import is_main_process, shutdown
    from flowopd.engine.launch import flowopd_command, launch_local, launched
    from flowopd.eval.claims import check_claims
    from flowopd.presets import resolve_config
    from flowopd.recipes.pipeline import check_stages, run_seeds

    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load_config(PipelineConfig, resolve_config(args.config), overrides)
    processes = _local_processes(cfg.processes)
    if processes > 1 and not launched():
        check_stages(cfg, args.budget, processes)  # one line, before any process starts
        print(f"[pipeline] {processes} processes, data-parallel, on this machine", flush=True)
        cmd = flowopd_command("pipeline", args.config, "--budget", args.budget, *overrides)
        return launch_local(cmd, processes)
    t0 = time.time()
    try:
        rows = run_seeds(cfg, budget=args.budget)
    finally:
        shutdown()
    if not is_main_process():
        return 0
    cols = [*cfg.eval.benchmarks, "average"]
    seeds = f" (mean +- std over seeds {cfg.seeds})" if cfg.seeds else ""
    print(f"\n{'model':<22}" + "".join(f"{c:>18}" for c in cols) + seeds)
    for r in rows:
        cells = []
        for c in cols:
            v, e = r.get(c), (r.get("std") or {}).get(c)
            txt = "-" if v is None else f"{v:.3f}" if e is None else f"{v:.3f} +- {e:.3f}"
            cells.append(f"{txt:>18}")
        print(f"{r['model']:<22}" + "".join(cells))
    claims = check_claims(rows, cfg.eval.benchmarks, **asdict(cfg.claims))
    print("\nclaims:\n" + "\n".join(c.line() for c in claims))
    print(f"\nreport: {cfg.out}/report/index.html  ({(time.time() - t0) / 60:.1f} min)")
    return 0


def _local_processes(wanted: int) -> int:
    """``processes`` as this machine can run it: one per core, and one per GPU on a GPU
    machine (each process takes the device of its local rank)."""
    import os

    import torch

    cap, what = os.cpu_count() or 1, "cores"
    if torch.cuda.is_available():
        cap, what = min(cap, torch.cuda.device_count()), "GPUs"
    if wanted > cap:
        print(f"[pipeline] processes={wanted}: this machine has {cap} {what}; {cap} process(es)")
    return min(wanted, cap)
