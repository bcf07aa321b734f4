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
    from flowopd.engine.distributed import shutdown
    from flowopd.eval.claims import check_claims
    from flowopd.presets import resolve_config
    from flowopd.recipes.pipeline import run_seeds

    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load_config(PipelineConfig, resolve_config(args.config), overrides)
    t0 = time.time()
    try:
        rows = run_seeds(cfg, budget=args.budget)
    finally:
        shutdown()
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
