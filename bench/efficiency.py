"""Methods side by side at equal sampled images: evaluation score vs images and wall time.

For each task, method and seed, runs ``flowopd train METHOD --config toy/METHOD_TASK``
(or ``--config-dir``'s ``METHOD_TASK.yaml``) for as many epochs as fit in
``--budget-images`` sampled images, evaluating the policy on the task's own benchmark
(``toy-TASK``, ``--eval-prompts`` prompts) every ``--eval-every-images`` images and at the
end, then reads the evaluations from each run's ``log.jsonl`` and writes

    OUT/efficiency.json   every run's curve, the per-method means over seeds, the table
    OUT/efficiency.md     the table
    OUT/efficiency.png    evaluation score vs sampled images (left), vs seconds (right)

The table, per task and method: final score, mean over seeds +- its standard error (the
spread of the seeds, sqrt(var / n); with one seed, the evaluation's own standard error),
the images and seconds at which the mean curve first reaches Flow-GRPO's final mean score,
and those images as a fraction of Flow-GRPO's. Seconds are training seconds (sample +
score + train, evaluation excluded), cumulative.

Each method evaluates with its own preset's protocol (Flow-GRPO with CFG, the
forward-process methods CFG-free, as their papers do); the table names the guidance.

    python bench/efficiency.py --tasks geneval,ocr --methods grpo,crd,nft,awm \\
        --seeds 0,1,2 --budget-images 6400 --eval-every-images 640 --eval-prompts 300 \\
        --jobs 2 --out runs/bench/efficiency [--set KEY=V ...]

Runs already in OUT are continued from their checkpoints or, when finished, only re-read;
``--plot-only`` re-reads without training. ``--add FILE.json`` puts the runs of an earlier
result file (their recorded curves, for ``--tasks``) beside this one's: a method run later
joins the table of the others, and Flow-GRPO's final score, without re-running them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "grpo"  # the method whose final score the others must reach


@dataclass(frozen=True)
class Job:
    """One training run: ``method`` on ``task`` with ``seed``, ``epochs`` epochs of
    ``images_per_epoch`` images, evaluated every ``eval_every`` epochs."""

    task: str
    method: str
    seed: int
    config: str
    epochs: int
    images_per_epoch: int
    eval_every: int
    guidance: float
    overrides: tuple[str, ...]
    out: str


def config_class(method: str):
    """The config class ``flowopd train METHOD`` loads (its ALGOS registry)."""
    from flowopd import algos

    if method not in algos.ALGOS:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(algos.ALGOS)}")
    return algos.config_class(method)


def plan(args: argparse.Namespace, task: str, method: str, seed: int) -> Job:
    """The run of ``method`` on ``task``: epochs within the budget, eval cadence, overrides
    (validated now, so a bad config fails before hours of other runs)."""
    from flowopd.config import load_config
    from flowopd.presets import preset_path

    # a preset by its name (`flowopd train --config toy/nft_ocr`), so results name no path
    config = (
        str(Path(args.config_dir) / f"{method}_{task}.yaml")
        if args.config_dir
        else f"toy/{method}_{task}"
    )
    overrides = [*args.set, f"train.seed={seed}", f"eval.num_prompts={args.eval_prompts}",
                 f"eval.benchmarks=[toy-{task}]"]  # fmt: skip
    cfg = load_config(config_class(method), str(preset_path(config) or config), overrides)
    per_epoch = cfg.images_per_epoch
    epochs = args.budget_images // per_epoch
    if epochs < 1:
        raise SystemExit(f"--budget-images {args.budget_images} is below one {method} epoch "
                         f"({per_epoch} images)")  # fmt: skip
    every = max(1, args.eval_every_images // per_epoch)
    out = Path(args.out) / task / f"{method}_s{seed}"
    overrides += [f"train.epochs={epochs}", f"eval.every={every}", f"output.dir={out}"]
    return Job(task, method, seed, config, epochs, per_epoch, every,
               cfg.model.guidance_scale, tuple(overrides), str(out))  # fmt: skip


def finished(job: Job) -> bool:
    """True when the run's log holds its last epoch's evaluation."""
    curve = read_curve(Path(job.out), job.task)
    return bool(curve["epoch"]) and curve["epoch"][-1] == job.epochs - 1


def train(job: Job) -> float:
    """``flowopd train`` for ``job`` in a subprocess (one thread), continuing from its
    checkpoints when it has some; returns the wall seconds. Output goes to OUT/.../train.log."""
    if finished(job):
        return 0.0
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if (out / "checkpoints").is_dir() else []
    cmd = [sys.executable, "-m", "flowopd", "train", job.method, "--config", job.config,
           *job.overrides, *resume]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FLOWOPD_NO_PROGRESS": "1"}
    print(f"start {job.task} {job.method} seed {job.seed}: {job.epochs} epochs", flush=True)
    t0 = time.time()
    with open(out / "train.log", "a") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{job.method} on {job.task} seed {job.seed} failed "
                         f"(exit {proc.returncode}); see {out / 'train.log'}")  # fmt: skip
    seconds = time.time() - t0
    print(f"done  {job.task} {job.method} seed {job.seed} in {seconds / 60:.1f} min", flush=True)
    return seconds


def read_curve(run_dir: Path, task: str) -> dict[str, list]:
    """The run's ``toy-TASK`` evaluations from ``log.jsonl``: per evaluated epoch its ``epoch``,
    cumulative sampled ``images``, cumulative training ``seconds`` (sample + score +
    train), the benchmark ``score`` and its standard error ``se``."""
    curve: dict[str, list] = {k: [] for k in ("epoch", "images", "seconds", "score", "se")}
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return curve
    by_epoch = {}
    for line in log.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_epoch[r["epoch"]] = r  # a resumed run may repeat an epoch: keep the last
    seconds = 0.0
    for e in sorted(by_epoch):
        r = by_epoch[e]
        seconds += sum(r.get(k, 0.0) for k in ("time/sample", "time/score", "time/train"))
        key = f"eval/toy-{task}"
        if key not in r:
            continue
        curve["epoch"].append(e)
        curve["images"].append(r["images"])
        curve["seconds"].append(round(seconds, 2))
        curve["score"].append(r[key])
        curve["se"].append(r.get(f"{key}/overall_se", float("nan")))
    return curve


def mean_curve(curves: list[dict[str, list]]) -> dict[str, list]:
    """Mean over seeds at the evaluation points all seeds share (same images).

    score: mean; se: std / sqrt(n) over seeds (ddof 1), or the one run's own se when n = 1;
    seconds: mean.
    """
    common = sorted(set.intersection(*(set(c["images"]) for c in curves))) if curves else []
    out: dict[str, list] = {"images": common, "seconds": [], "score": [], "se": [], "n": []}
    for img in common:
        rows = [{k: c[k][c["images"].index(img)] for k in ("seconds", "score", "se")}
                for c in curves]  # fmt: skip
        s = np.array([r["score"] for r in rows])
        se = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else rows[0]["se"]
        out["seconds"].append(float(np.mean([r["seconds"] for r in rows])))
        out["score"].append(float(s.mean()))
        out["se"].append(se)
        out["n"].append(len(s))
    return out


def first_reach(curve: dict[str, list], target: float) -> tuple[int | None, float | None]:
    """(images, seconds) of the first evaluation point whose score is >= target."""
    for img, sec, s in zip(curve["images"], curve["seconds"], curve["score"], strict=True):
        if s >= target:
            return img, sec
    return None, None


def table(means: dict[str, dict[str, dict]], guidance: dict[tuple[str, str], float]) -> list:
    """Per task and method: final mean +- se, and the images / seconds to reach the
    reference method's final mean (and the images' fraction of the reference's)."""
    rows = []
    for task, by_method in means.items():
        ref = by_method.get(REFERENCE)
        target = ref["score"][-1] if ref and ref["score"] else None
        ref_images = ref["images"][-1] if ref and ref["images"] else None
        for method, c in by_method.items():
            if not c["score"]:
                continue
            img, sec = first_reach(c, target) if target is not None else (None, None)
            rows.append({
                "task": task, "method": method, "guidance": guidance[(task, method)],
                "seeds": c["n"][-1], "final": c["score"][-1], "final_se": c["se"][-1],
                "images": c["images"][-1], "target": target, "images_to_target": img,
                "seconds_to_target": sec,
                "fraction_of_reference": img / ref_images if img and ref_images else None,
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], machine: dict) -> str:
    """The table as markdown, with the machine."""
    head = (f"| task | method | CFG | seeds | final score | images | images to {REFERENCE} "
            f"final | fraction | seconds to {REFERENCE} final |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    where = f"{machine['platform']}, {machine['cpu_count']} cores, 1 thread per run"
    lines = [f"Machine: {where}", "", head]
    for r in rows:
        reach = "not reached" if r["images_to_target"] is None else str(r["images_to_target"])
        if r["target"] is None:
            reach = f"no {REFERENCE} run"
        frac = "" if r["fraction_of_reference"] is None else f"{r['fraction_of_reference']:.2f}"
        sec = "" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}"
        lines.append(f"| {r['task']} | {r['method']} | {r['guidance']:g} | {r['seeds']} | "
                     f"{r['final']:.3f} ± {r['final_se']:.3f} | {r['images']} | {reach} | "
                     f"{frac} | {sec} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(means: dict[str, dict[str, dict]], path: Path) -> None:
    """Mean evaluation score (+- se band) vs sampled images and vs seconds, a row per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(means)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        for method, c in means[task].items():
            s, se = np.array(c["score"]), np.array(c["se"])
            for ax, x in zip(row, (c["images"], c["seconds"]), strict=True):
                (line,) = ax.plot(x, s, marker="o", lw=2, label=method)
                ax.fill_between(x, s - se, s + se, color=line.get_color(), alpha=0.15)
        row[0].set_xlabel("sampled images")
        row[1].set_xlabel("training seconds (sample + score + train)")
        for ax in row:
            ax.set_ylabel(f"toy-{task} (evaluation)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def added_runs(files: list[str], tasks: list[str]) -> list[tuple[Job, dict[str, list]]]:
    """The runs recorded in earlier efficiency.json ``files`` on ``tasks``, with their curves."""
    runs = []
    for f in files:
        for r in json.loads(Path(f).read_text())["runs"]:
            if r["task"] in tasks:
                fields = {k: r[k] for k in Job.__dataclass_fields__}
                runs.append((Job(**{**fields, "overrides": tuple(r["overrides"])}), r["curve"]))
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="geneval,ocr", help="comma list: geneval, ocr")
    p.add_argument("--methods", default="grpo,crd,nft,awm", help="comma list of train algos")
    p.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values")
    p.add_argument("--budget-images", type=int, default=6400, help="sampled images per run")
    p.add_argument("--eval-every-images", type=int, default=640)
    p.add_argument("--eval-prompts", type=int, default=300, help="prompts per evaluation")
    p.add_argument("--config-dir", default=None, help="METHOD_TASK.yaml files (default: presets)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=V", help="overrides for all runs")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--out", default="runs/bench/efficiency")
    p.add_argument("--plot-only", action="store_true", help="re-read OUT's runs, no training")
    p.add_argument("--add", nargs="*", default=[], metavar="FILE.json",
                   help="earlier efficiency.json files whose runs join the table")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flowopd.perf import machine_info

    tasks, methods = args.tasks.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [plan(args, t, m, s) for t in tasks for m in methods for s in seeds]
    wall = {}
    if not args.plot_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            wall = dict(zip(jobs, pool.map(train, jobs), strict=True))
    curves = {j: read_curve(Path(j.out), j.task) for j in jobs}
    for j, curve in added_runs(args.add, tasks):
        jobs.append(j)
        curves[j] = curve
        methods += [] if j.method in methods else [j.method]
    means = {t: {m: mean_curve([curves[j] for j in jobs if (j.task, j.method) == (t, m)])
                 for m in methods} for t in tasks}  # fmt: skip
    rows = table(means, {(j.task, j.method): j.guidance for j in jobs})
    machine = machine_info("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "plot_only"},
        "runs": [
            {**asdict(j), "wall_seconds": round(wall.get(j, 0.0), 1), "curve": curves[j]}
            for j in jobs
        ],  # fmt: skip
        "means": means,
        "table": rows,
    }
    write_atomic(out / "efficiency.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "efficiency.md", markdown(rows, machine))
    plot(means, out / "efficiency.png")
    print(markdown(rows, machine))
    print(f"wrote {out / 'efficiency.json'}, efficiency.md and efficiency.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
