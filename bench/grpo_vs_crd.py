"""GRPO vs CRD at equal sampling budget: training reward versus sampled images.

Runs ``flowopd train grpo`` and ``flowopd train crd`` on the same task, each for as many
epochs as fit in ``--budget-images`` sampled images (``images_per_epoch`` =
prompts_per_epoch x group_size of each config), then reads both runs' ``log.jsonl``
(per epoch: ``images``, cumulative sampled images, and ``reward_mean`` of the epoch's
rollouts) and writes

    OUT/grpo_vs_crd.json   the curves, each run's settings and a summary
    OUT/grpo_vs_crd.png    reward vs sampled images (left) and vs training seconds (right)

The training reward is measured on each method's own rollouts: GRPO's SDE samples with
CFG, CRD's (CFG-free, by default ODE) samples of its sampler snapshot. Each run's final
evaluation (the configs' ``eval.benchmarks``, same protocol for both) is copied into the
JSON when present; ``--no-eval`` skips it.

    python bench/grpo_vs_crd.py --budget-images 2560 --out runs/bench/grpo_vs_crd \\
        [--grpo-config configs/toy/grpo_geneval.yaml] [--crd-config configs/toy/crd_geneval.yaml] \\
        [--set model.path=DIR ...] [--grpo-set KEY=V ...] [--crd-set KEY=V ...]

``--plot-only`` re-reads existing runs under OUT without training; ``--resume`` continues
interrupted runs from their checkpoints (a larger budget extends them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ALGOS = ("grpo", "crd")


def _config_class(algo: str):
    if algo == "grpo":
        from flowopd.config.grpo import GRPOConfig

        return GRPOConfig
    from flowopd.config.crd import CRDConfig

    return CRDConfig


def plan(algo: str, config: str, overrides: list[str], budget: int) -> dict:
    """Epochs of ``algo`` that fit in ``budget`` sampled images, from its resolved config."""
    from flowopd.config import load_config

    # validated now, so a bad CRD config fails before the GRPO run, not after it
    cfg = load_config(_config_class(algo), config, overrides)
    per_epoch = cfg.images_per_epoch
    epochs = budget // per_epoch
    if epochs < 1:
        raise SystemExit(
            f"--budget-images {budget} is below one {algo} epoch ({per_epoch} images: "
            f"{cfg.sample.prompts_per_epoch} prompts x {cfg.sample.group_size})"
        )
    return {
        "config": str(config),
        "images_per_epoch": per_epoch,
        "epochs": epochs,
        "task": {"data": cfg.data.train, "reward": cfg.reward.name or str(cfg.reward.names())},
    }


def train(
    algo: str, config: str, overrides: list[str], out: Path, epochs: int, resume: bool
) -> float:
    """``flowopd train ALGO`` in a subprocess; returns its wall-clock seconds."""
    if (out / "log.jsonl").exists() and not resume:
        # a fresh run would append to the old log and mix two runs' curves
        raise SystemExit(
            f"{out} already holds a run: use another --out, --plot-only to re-plot it or "
            "--resume to continue it"
        )
    cmd = [sys.executable, "-m", "flowopd", "train", algo, "--config", config,
           *overrides, f"train.epochs={epochs}", f"output.dir={out}",
           *(["--resume"] if resume else [])]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{algo} run failed (exit {proc.returncode}); see its output above")
    return time.time() - t0


def read_curve(run_dir: Path, budget: int) -> dict:
    """Per-epoch curves from ``run_dir/log.jsonl`` (epochs within the budget only).

    images: cumulative sampled images; reward_mean / reward_std: of the epoch's rollouts;
    seconds: cumulative sample + score + train time (evaluation excluded).
    """
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"{log} not found: run without --plot-only first")
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    by_epoch = {r["epoch"]: r for r in records}  # a resumed run may repeat an epoch
    rows = [by_epoch[e] for e in sorted(by_epoch) if by_epoch[e]["images"] <= budget]
    step_s = [sum(r.get(k, 0.0) for k in ("time/sample", "time/score", "time/train")) for r in rows]
    evals = {k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("eval/")}
    return {
        "images": [r["images"] for r in rows],
        "reward_mean": [r["reward_mean"] for r in rows],
        "reward_std": [r["reward_std"] for r in rows],
        "seconds": np.cumsum(step_s).round(3).tolist(),
        "final_eval": evals,
    }


def summarize(curve: dict, tail: float = 0.2) -> dict:
    """First and final reward (mean over the last ``tail`` of the epochs), best epoch."""
    r = curve["reward_mean"]
    if not r:
        return {}
    k = max(1, math.ceil(len(r) * tail))
    return {
        "epochs": len(r),
        "images": curve["images"][-1],
        "reward_first": r[0],
        "reward_final": float(np.mean(r[-k:])),
        "reward_best": max(r),
        "train_seconds": curve["seconds"][-1],
    }


def images_to_reach(curve: dict, target: float, k: int = 8) -> int | None:
    """Sampled images at the first epoch whose trailing k-epoch mean reward is >= target
    (the issue's "reaches GRPO's final training reward"); None if it never does."""
    for i, v in enumerate(smooth(curve["reward_mean"], k)):
        if i + 1 >= min(k, len(curve["reward_mean"])) and v >= target:
            return int(curve["images"][i])
    return None


def machine() -> dict:
    """Where the numbers were measured (the recipes run on CUDA when there is one)."""
    import torch

    from flowopd.perf import machine_info

    return machine_info("cuda" if torch.cuda.is_available() else "cpu")


def smooth(y: list[float], k: int) -> np.ndarray:
    """Trailing moving average over k epochs (the first points average what exists)."""
    y = np.asarray(y, dtype=float)
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), k)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def plot(curves: dict[str, dict], path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"grpo": "tab:blue", "crd": "tab:red"}
    for algo, c in curves.items():
        if not c["images"]:
            continue
        k = max(1, len(c["images"]) // 10)
        for ax, x in zip(axes, (c["images"], c["seconds"]), strict=True):
            ax.plot(x, c["reward_mean"], color=colors[algo], alpha=0.25, lw=1)
            label = algo.upper() + (f" (moving average of {k} epochs)" if k > 1 else "")
            ax.plot(x, smooth(c["reward_mean"], k), color=colors[algo], lw=2, label=label)
    axes[0].set_xlabel("sampled images")
    axes[1].set_xlabel("training seconds (sample + score + train)")
    for ax in axes:
        ax.set_ylabel("training reward (epoch mean)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"GRPO vs CRD, budget {budget} sampled images")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grpo-config", default=str(REPO / "configs/toy/grpo_geneval.yaml"))
    p.add_argument("--crd-config", default=str(REPO / "configs/toy/crd_geneval.yaml"))
    p.add_argument("--budget-images", type=int, required=True, help="sampled images per method")
    p.add_argument("--out", default="runs/bench/grpo_vs_crd", help="output directory")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=V", help="overrides for both")
    p.add_argument("--grpo-set", nargs="*", default=[], metavar="KEY=V", help="GRPO overrides")
    p.add_argument("--crd-set", nargs="*", default=[], metavar="KEY=V", help="CRD overrides")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluations")
    p.add_argument("--plot-only", action="store_true", help="re-read OUT's runs, no training")
    p.add_argument("--resume", action="store_true", help="continue OUT's runs from checkpoints")
    args = p.parse_args(argv)

    out = Path(args.out)
    configs = {"grpo": args.grpo_config, "crd": args.crd_config}
    overrides = {
        a: [*args.set, *(args.grpo_set if a == "grpo" else args.crd_set)]
        + (["eval.benchmarks=[]"] if args.no_eval else [])
        for a in ALGOS
    }
    plans = {a: plan(a, configs[a], overrides[a], args.budget_images) for a in ALGOS}
    if plans["grpo"]["task"] != plans["crd"]["task"]:
        print(f"warning: the runs differ in task: {plans['grpo']['task']} vs "
              f"{plans['crd']['task']}", file=sys.stderr)  # fmt: skip
    for a in ALGOS:
        used = plans[a]["epochs"] * plans[a]["images_per_epoch"]
        print(f"{a}: {plans[a]['epochs']} epochs x {plans[a]['images_per_epoch']} images = {used}")
        if not args.plot_only:
            plans[a]["wall_seconds"] = round(
                train(a, configs[a], overrides[a], out / a, plans[a]["epochs"], args.resume), 1
            )
    curves = {a: read_curve(out / a, args.budget_images) for a in ALGOS}
    summary = {a: summarize(curves[a]) for a in ALGOS}
    if summary["grpo"]:
        target = summary["grpo"]["reward_final"]
        summary["crd"]["images_to_grpo_final"] = images_to_reach(curves["crd"], target)
    result = {
        "machine": machine(),
        "budget_images": args.budget_images,
        "runs": {a: {**plans[a], "out": str(out / a), "overrides": overrides[a]} for a in ALGOS},
        "curves": curves,
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".grpo_vs_crd.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "grpo_vs_crd.json")
    plot(curves, out / "grpo_vs_crd.png", args.budget_images)
    for a in ALGOS:
        print(a, json.dumps(result["summary"][a]))
    print(f"wrote {out / 'grpo_vs_crd.json'} and {out / 'grpo_vs_crd.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
