"""Seconds per Flow-GRPO epoch, split into sampling / scoring / training.

Runs a few epochs of the toy GenEval preset on (a) the embedded model and (b) the tiny
in-memory SD3 test pipeline (2 layers, VAE, three text encoders), in one process, and
prints the median per-phase time of the epochs after the first (warm-up) with the machine.

    python bench/epoch_time.py [--epochs 3] [--json OUT] [--set KEY=VALUE ...]

``--set`` overrides the preset for both models, e.g. ``--set train.cfg_grad=both`` for the
training phase with gradients through both CFG branches (the default is ``cond``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLOWOPD_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]


def _run(model_path: str, out: Path, epochs: int, overrides: list[str]) -> dict:
    from flowopd.config import load_config
    from flowopd.config.grpo import GRPOConfig
    from flowopd.recipes.grpo import train_grpo

    cfg = load_config(
        GRPOConfig,
        REPO / "configs" / "toy" / "grpo_geneval.yaml",
        [f"model.path={model_path}", f"train.epochs={epochs}", f"output.dir={out}",
         "eval.every=0", "eval.benchmarks=[]", "output.checkpoint_every=0", *overrides],
    )  # fmt: skip
    run = train_grpo(cfg)
    hist = run.history[1:] or run.history
    phases = {
        k: statistics.median(h[f"time/{k}"] for h in hist) for k in ("sample", "score", "train")
    }
    phases["total"] = sum(phases.values())
    phases["images_per_epoch"] = cfg.images_per_epoch
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both runs (repeatable)")  # fmt: skip
    args = ap.parse_args()

    from flowopd.eval.report import write_json
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline
    from flowopd.paths import default_model
    from flowopd.perf import machine_info

    machine = machine_info("cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp) / "tiny_sd3"
        SD3Model(build_tiny_sd3_pipeline(), max_sequence_length=8).save_pretrained(tiny)
        for name, path in [("embedded", default_model()), ("tiny-sd3", str(tiny))]:
            results[name] = _run(path, Path(tmp) / name, args.epochs, args.set)
    print(
        f"machine: {machine['platform']}, {machine['cpu_count']} cores, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads)"
    )
    print(
        f"{'model':<10} {'images':>7} {'sample s':>9} {'score s':>8} {'train s':>8} {'total s':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<10} {r['images_per_epoch']:>7} {r['sample']:>9.2f} {r['score']:>8.2f} {r['train']:>8.2f} {r['total']:>8.2f}"
        )
    if args.json:
        write_json(args.json, {"machine": machine, "overrides": args.set, "results": results})


if __name__ == "__main__":
    main()
