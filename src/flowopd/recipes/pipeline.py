"""The Flow-OPD experiment as one idempotent command (METHODS.md §3):

  1. teachers: one single-reward LoRA per task (Flow-GRPO, CRD, DiffusionNFT or AWM:
     ``teachers[].algo``);
  2. GRPO-Mix: the multi-reward baseline;
  3. cold start: merge the teachers' LoRAs (or SFT on their samples);
  4. Flow-OPD: on-policy distillation into the student with MAR (and without, optionally);
  5. evaluate every model on every benchmark;
  6. report: table.json, claims.json (the paper's claims checked on the table), reward
     curves, image grids, index.html.

With ``seeds`` set, ``run_seeds`` runs all of it once per seed (``out/seed_<s>/``) and
reports mean +- std over the seeds in ``out/report/``.

Each stage writes into its own folder under ``out``; a stage whose result is already
there is skipped, so rerunning the command after an interruption continues where it
stopped (training stages themselves resume from their last checkpoint).

Every stage's config is loaded and checked for the process count first (``check_stages``).
Data-parallel (``processes: N``, or under torchrun) every process runs every stage and
evaluation together; only rank 0 prints and writes the merge, metrics and report.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flowopd.config import load_config
from flowopd.config.pipeline import PipelineConfig, StageConfig
from flowopd.engine import distributed as dist
from flowopd.errors import UserError
from flowopd.presets import resolve_config

LORA_FILE = "pytorch_lora_weights.safetensors"


def _load(cls, config: str, overrides: list[str]):
    """A stage's config: a file, or a packaged preset (``configs/toy/opd.yaml``, ``toy/opd``)."""
    return load_config(cls, resolve_config(config), overrides)


def _done(run_dir: Path) -> bool:
    return (run_dir / "lora" / LORA_FILE).is_file()


def _stage_overrides(
    cfg: PipelineConfig, stage: StageConfig, run_dir: Path, budget: str
) -> list[str]:
    """The stage's own overrides, then the pipeline's: model, seed, output, no in-run eval."""
    extra = list(stage.overrides)
    extra += [
        f"model.path={cfg.model}",
        f"train.seed={cfg.seed}",
        f"output.dir={run_dir}",
        "output.resume=true",
        "eval.every=0",
        "eval.benchmarks=[]",  # the pipeline evaluates every model the same way at the end
    ]
    if budget == "demo":
        extra += cfg.demo_overrides
    return extra


def run_seeds(cfg: PipelineConfig, *, budget: str = "full", log=print) -> list[dict]:
    """The pipeline once, or once per ``cfg.seeds`` entry (``out/seed_<s>/``, each a full
    idempotent pipeline with its own report) and then ``out/report/`` over the seeds:
    table.json rows hold the mean per column plus ``std`` and ``seeds`` (per-seed values);
    claims are checked on the means. Returns the report's rows."""
    log = _main_log(log)
    if not cfg.seeds:
        return run_pipeline(cfg, budget=budget, log=log)
    out = Path(cfg.out)
    per_seed: dict[int, list[dict]] = {}
    for seed in cfg.seeds:
        sub = copy.deepcopy(cfg)
        sub.seed, sub.seeds, sub.out = seed, [], str(out / f"seed_{seed}")
        log(f"[pipeline] seed {seed} -> {sub.out}")
        per_seed[seed] = run_pipeline(sub, budget=budget, log=log)
    rows = aggregate_seeds(per_seed, list(cfg.eval.benchmarks))
    if dist.is_main_process():
        write_seeds_report(cfg, rows, out)
    dist.barrier()
    return rows


def _main_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on the main process; silent on the others (every process runs the pipeline
    when launched data-parallel, and each would print every line)."""
    return log if dist.is_main_process() else (lambda *_: None)


def aggregate_seeds(per_seed: dict[int, list[dict]], columns: list[str]) -> list[dict]:
    """Rows of several seeds -> one row per model: the mean of each column (and of the
    average), ``std`` (sample std, 0 for one seed), ``se`` (the standard error of the
    mean: ``std / sqrt(S)`` over S >= 2 seeds, which holds training and evaluation noise;
    for one seed that seed's evaluation ``se``) and ``seeds`` ({seed: {col: value}})."""
    models: list[str] = []
    for rows in per_seed.values():
        models += [r["model"] for r in rows if r["model"] not in models]
    out = []
    for m in models:
        row: dict = {"model": m}
        std: dict = {}
        seeds: dict = {}
        for col in [*columns, "average"]:
            vals = []
            for seed, rows in per_seed.items():
                v = next((r.get(col) for r in rows if r["model"] == m), None)
                seeds.setdefault(str(seed), {})[col] = v
                if v is not None:
                    vals.append(float(v))
            row[col] = round(statistics.fmean(vals), 4) if vals else None
            std[col] = (
                round(statistics.stdev(vals), 4) if len(vals) > 1 else (0.0 if vals else None)
            )
        row["std"], row["seeds"] = std, seeds
        row["se"] = _mean_se(m, per_seed, [*columns, "average"], std)
        out.append(row)
    return out


def _mean_se(model: str, per_seed: dict[int, list[dict]], cols: list[str], std: dict) -> dict:
    n = len(per_seed)
    if n >= 2:
        return {c: round(std[c] / n**0.5, 4) for c in cols if std.get(c) is not None}
    rows = next(iter(per_seed.values()), [])
    return dict(next((r.get("se") or {} for r in rows if r["model"] == model), {}))


def write_seeds_report(cfg: PipelineConfig, rows: list[dict], out: Path) -> None:
    """out/report/: table.json, claims.json, index.html with each seed's plots."""
    from flowopd.eval.claims import check_claims
    from flowopd.eval.html import write_html, write_table
    from flowopd.eval.report import write_json

    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    columns = list(cfg.eval.benchmarks)
    write_table(rep / "table.json", rows)
    claims = check_claims(rows, columns, **asdict(cfg.claims))
    write_json(rep / "claims.json", [c.to_dict() for c in claims])
    images: dict[str, Path] = {}
    for seed in cfg.seeds:
        for png, what in (("reward_curves.png", "training reward"), ("opd_kl.png", "OPD KL")):
            src = out / f"seed_{seed}" / "report" / png
            if src.is_file():
                dst = rep / f"seed_{seed}_{png}"
                shutil.copyfile(src, dst)
                images[f"seed {seed}: {what}"] = dst
    notes = (
        f"mean +- standard error (std / sqrt(seeds)) over seeds {cfg.seeds}; each seed's own report: "
        f"seed_<s>/report/index.html\n\nclaims (on the means):\n"
        + "\n".join(c.line() for c in claims)
    )
    title = f"Flow-OPD on the embedded world, {len(cfg.seeds)} seeds"
    write_html(rep / "index.html", title, rows, columns, images, notes)


@dataclass
class _Stages:
    """The pipeline's trained stages: each stage's model and curve, and its training time."""

    out: Path
    log: Callable[[str], None]
    models: dict[str, Path | None] = field(default_factory=lambda: {"base": None})
    curves: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def train(self, name: str, run_dir: Path, train, *, curve: bool = True) -> None:
        """Run ``train()`` unless ``run_dir`` holds a finished run; its ``lora`` is the
        stage's model and (with ``curve``) its ``log.jsonl`` the stage's curve."""
        if _done(run_dir):
            self.log(f"[pipeline] {name}: done already ({run_dir})")
        else:
            self.log(f"[pipeline] {name}: training -> {run_dir}")
            t0 = time.time()
            train()
            self.timings[name] = round(time.time() - t0, 1)
        if curve:
            self.models[name] = run_dir / "lora"
            self.curves[name] = run_dir / "log.jsonl"


def run_pipeline(cfg: PipelineConfig, *, budget: str = "full", log=print) -> list[dict]:
    """Run (or finish) every stage; returns the report's table rows."""
    from flowopd.config.grpo import GRPOConfig
    from flowopd.config.opd import OPDConfig
    from flowopd.recipes.grpo import train_grpo
    from flowopd.recipes.opd import train_opd

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if budget == "demo":
        cfg.eval.n = cfg.demo_eval_n
    check_stages(cfg, budget, dist.world_size())
    dist.init_processes()  # launched data-parallel: every stage and evaluation runs on all
    stages = _Stages(out, _main_log(log))

    # 1. teachers: one per task, each by its own single-reward method (teachers[].algo)
    _train_teachers(cfg, stages, budget)

    # 2. the GRPO-Mix baseline
    if cfg.mix.config:
        run_dir = out / "grpo_mix"
        over = _stage_overrides(cfg, cfg.mix, run_dir, budget)
        stages.train(
            "grpo-mix", run_dir, lambda: train_grpo(_load(GRPOConfig, cfg.mix.config, over))
        )

    # 3. cold start of the student
    teachers = [(t.task, out / "teachers" / t.task / "lora") for t in cfg.teachers]
    init = _cold_start(cfg, stages, teachers, budget)

    # 4. Flow-OPD (and the MAR-off ablation)
    variants = [("flow-opd", "flow_opd", [])]
    if cfg.mar_ablation:
        variants.append(("flow-opd (no MAR)", "flow_opd_no_mar", ["opd.mar_lambda=0"]))
    for label, folder, extra in variants:
        run_dir = out / folder
        over = _stage_overrides(cfg, cfg.opd, run_dir, budget) + [
            _teachers_override(teachers),
            f"opd.init={init}",
            *extra,
        ]
        stages.train(
            label,
            run_dir,
            lambda over=over: train_opd(_load(OPDConfig, cfg.opd.config, over)),
        )

    # 5. evaluate every model the same way
    results = evaluate_models(cfg, stages.models, out / "eval", log=log)

    # 6. report
    return write_report(cfg, results, stages.models, stages.curves, out, stages.timings)


def check_stages(cfg: PipelineConfig, budget: str, processes: int) -> None:
    """Load every stage's config with its overrides and check that its epoch splits over
    ``processes``: a bad stage config is a one-line error before the first stage trains,
    not when its stage starts (the distillation ~10 minutes into the demo). The teachers'
    and cold start's LoRAs do not exist yet: an empty stand-in takes their place."""
    from flowopd.algos import config_class
    from flowopd.config.grpo import GRPOConfig
    from flowopd.config.opd import OPDConfig
    from flowopd.config.sft import SFTConfig

    out = Path(cfg.out)
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = Path(tmp) / "lora"
        stand_in.mkdir()
        (stand_in / LORA_FILE).touch()
        teachers = [(t.task, stand_in) for t in cfg.teachers]
        checks = [
            (f"teacher:{t.task}", config_class(t.algo), t.config,
             _stage_overrides(cfg, t, out / t.task, budget))
            for t in cfg.teachers
        ]  # fmt: skip
        if cfg.mix.config:
            over = _stage_overrides(cfg, cfg.mix, out, budget)
            checks.append(("grpo-mix", GRPOConfig, cfg.mix.config, over))
        if cfg.cold_start.method == "sft":
            over = _stage_overrides(cfg, cfg.cold_start.sft, out, budget)
            over.append(_teachers_override(teachers, "sft"))
            checks.append(("cold-start", SFTConfig, cfg.cold_start.sft.config, over))
        over = _stage_overrides(cfg, cfg.opd, out, budget)
        over += [_teachers_override(teachers), f"opd.init={stand_in}"]
        checks.append(("flow-opd", OPDConfig, cfg.opd.config, over))
        for name, cls, config, overrides in checks:
            try:
                _load(cls, config, overrides).check_distributed(processes)
            except UserError as e:
                on = f" on {processes} processes" if processes > 1 else ""
                raise UserError(f"stage {name} ({config}){on}: {e}") from None


def _train_teachers(cfg: PipelineConfig, stages: _Stages, budget: str) -> None:
    """Train each teacher (``teachers[].algo``), one after another, or ``teacher_jobs`` at
    once in their own processes, each with an equal share of this process's threads."""
    import torch

    from flowopd.algos import config_class, recipe
    from flowopd.recipes.parallel import SideTask, StageJob, train_in_processes

    jobs = []
    for t in cfg.teachers:
        run_dir = stages.out / "teachers" / t.task
        over = _stage_overrides(cfg, t, run_dir, budget)
        name = f"teacher:{t.task}"
        if cfg.teacher_jobs == 1 or _done(run_dir):
            stages.train(
                name, run_dir,
                lambda t=t, over=over: recipe(t.algo)(_load(config_class(t.algo), t.config, over)),
            )  # fmt: skip
            continue
        epochs = _load(config_class(t.algo), t.config, over).train.epochs  # checked up front
        jobs.append(StageJob(name, t.algo, t.config, tuple(over), run_dir, epochs))
        stages.models[name], stages.curves[name] = run_dir / "lora", run_dir / "log.jsonl"
    if jobs:
        processes = min(cfg.teacher_jobs, len(jobs))
        threads = max(1, torch.get_num_threads() // processes)
        # the base's and finished teachers' evaluations fill the slots of teachers that end
        # first (cached in OUT/eval for step 5), instead of running after every stage
        eval_dir = stages.out / "eval"
        base = SideTask("eval base", _evaluate_one, (cfg, "base", None, eval_dir))

        def after(job: StageJob) -> SideTask:
            lora = job.run_dir / "lora"
            return SideTask(f"eval {job.name}", _evaluate_one, (cfg, job.name, lora, eval_dir))

        stages.timings.update(
            train_in_processes(jobs, processes, threads, log=stages.log, side=[base], after=after)
        )


def _evaluate_one(cfg: PipelineConfig, name: str, lora: Path | None, eval_dir: Path) -> None:
    """Child process: ``evaluate_models`` for one model, its console in
    ``eval_dir/<name>/console.log``."""
    from flowopd.recipes.parallel import console_to

    with console_to(eval_dir / _slug(name) / "console.log"):
        evaluate_models(cfg, {name: lora}, eval_dir)


def _cold_start(
    cfg: PipelineConfig, stages: _Stages, teachers: list[tuple[str, Path]], budget: str
) -> str:
    """The student's initial LoRA (``opd.init``): the teachers merged, an SFT run on their
    samples, or '' (a fresh LoRA)."""
    cs, run_dir = cfg.cold_start, stages.out / "cold_start"
    if cs.method == "merge":
        if _done(run_dir):
            stages.log(f"[pipeline] cold-start: done already ({run_dir})")
        else:
            from flowopd.models.merge import merge_loras

            stages.log(f"[pipeline] cold start: merge ({cs.merge_method}) -> {run_dir / 'lora'}")
            if dist.is_main_process():
                merge_loras(
                    [str(p) for _, p in teachers], out=run_dir / "lora", method=cs.merge_method
                )
            dist.barrier()
    elif cs.method == "sft":
        from flowopd.config.sft import SFTConfig
        from flowopd.recipes.sft import train_sft

        over = _stage_overrides(cfg, cs.sft, run_dir, budget) + [
            _teachers_override(teachers, "sft")
        ]
        stages.train(
            "cold-start",
            run_dir,
            lambda: train_sft(_load(SFTConfig, cs.sft.config, over)),
            curve=False,
        )
    else:
        return ""
    stages.models["cold-start"] = run_dir / "lora"
    return str(run_dir / "lora")


def _teachers_override(teachers: list[tuple[str, Path]], section: str = "opd") -> str:
    items = ", ".join(
        f"{{path: '{p}', tasks: [{task}], name: teacher_{task}}}" for task, p in teachers
    )
    return f"{section}.teachers=[{items}]"


def _slug(name: str) -> str:
    return name.replace(":", "_").replace(" ", "_").replace("(", "").replace(")", "")


def evaluate_models(
    cfg: PipelineConfig, models: dict[str, Path | None], eval_dir: Path, log=print
) -> dict:
    """metrics.json of each model (cached in eval_dir/<model>/), evaluated on one base model."""
    from flowopd.engine.logging import library_log_to, quiet_libraries
    from flowopd.eval.benchmarks import EvalSettings, evaluate
    from flowopd.eval.report import format_table, save_grid, write_json
    from flowopd.models import load_model
    from flowopd.paths import resolve_model_path

    quiet_libraries()
    settings = EvalSettings(
        steps=cfg.eval.steps, guidance_scale=cfg.eval.guidance_scale, n=cfg.eval.n,
        seed=cfg.eval.seed, batch_size=cfg.eval.batch_size,
    )  # fmt: skip
    results: dict[str, dict] = {}
    model = None
    for name, lora in models.items():
        d = eval_dir / _slug(name)
        metrics_file, key_file = d / "metrics.json", d / "settings.json"
        key = {"benchmarks": list(cfg.eval.benchmarks), **settings.__dict__, "adapters": None}
        lora_stamp = (lora / LORA_FILE).stat().st_mtime if lora is not None else 0
        key["lora_mtime"] = lora_stamp  # a retrained stage invalidates its evaluation
        cached = (
            metrics_file.is_file()
            and key_file.is_file()
            and json.loads(key_file.read_text()) == key
        )
        if dist.broadcast_object(cached):  # every process evaluates, or none
            results[name] = json.loads(metrics_file.read_text())
            continue
        if model is None:
            library_log_to(eval_dir)  # library warnings of the evaluations: eval/library.log
            model = load_model(resolve_model_path(cfg.model))
        adapter = None
        if lora is not None:
            adapter = _slug(name)
            model.load_adapter(str(lora), adapter)
        model.set_adapter(adapter)
        t0 = time.time()
        res = evaluate(model, cfg.eval.benchmarks, settings)
        if dist.is_main_process():  # the metrics are gathered: the same on every process
            import torch

            images = [im[:16] for im in res.images.values()]
            captions = sum((res.prompts[k][:16] for k in res.images), [])
            save_grid(d / "grid.png", torch.cat(images), captions)
            write_json(metrics_file, res.metrics)
            write_json(key_file, key)
        results[name] = res.metrics
        log(f"[pipeline] eval {name} ({time.time() - t0:.0f}s)\n{format_table(res.metrics)}")
    return results


def write_report(
    cfg: PipelineConfig,
    results: dict,
    models: dict,
    curves: dict[str, Path],
    out: Path,
    timings: dict,
) -> list[dict]:
    from flowopd.eval.claims import check_claims
    from flowopd.eval.html import plot_curves, read_log, table_rows, write_html, write_table
    from flowopd.eval.report import write_json

    rep = out / "report"
    columns = [b for b in cfg.eval.benchmarks]
    rows = table_rows(results, columns)
    method = {f"teacher:{t.task}": t.algo for t in cfg.teachers}
    for row in rows:  # which method made each teacher
        if row["model"] in method:
            row["method"] = method[row["model"]]
    if not dist.is_main_process():
        return rows
    rep.mkdir(parents=True, exist_ok=True)
    write_table(rep / "table.json", rows)
    claims = check_claims(rows, columns, **asdict(cfg.claims))
    write_json(rep / "claims.json", [c.to_dict() for c in claims])
    reward_curves = {}
    kl_curves = {}
    for name, path in curves.items():
        recs = read_log(path)
        if name.startswith("flow-opd"):
            kl_curves[name] = [(r["epoch"], r["kl"]) for r in recs if r.get("kl") is not None]
        else:  # GRPO-Mix alternates datasets (rewards on different scales): one series each
            for r in recs:
                if "reward_mean" in r:
                    series = f"{name} ({r['dataset']})" if r.get("dataset") else name
                    point = (r.get("images", r["epoch"]), r["reward_mean"])
                    reward_curves.setdefault(series, []).append(point)
    images: dict[str, Path] = {}
    if reward_curves:
        plot_curves(
            rep / "reward_curves.png",
            reward_curves,
            xlabel="sampled images",
            ylabel="training reward",
            title="GRPO teachers and GRPO-Mix",
        )
        images["training reward vs sampled images"] = rep / "reward_curves.png"
    if kl_curves:
        plot_curves(
            rep / "opd_kl.png",
            kl_curves,
            xlabel="epoch",
            ylabel="mean KL to routed teacher",
            title="Flow-OPD distillation",
        )
        images["Flow-OPD: KL to the routed teachers"] = rep / "opd_kl.png"
    for name in models:
        grid = out / "eval" / _slug(name) / "grid.png"
        if grid.is_file():
            dst = rep / f"grid_{_slug(name)}.png"
            shutil.copyfile(grid, dst)
            images[f"samples: {name}"] = dst
    made_by = ", ".join(f"teacher:{t.task} by {t.algo}" for t in cfg.teachers)
    notes = f"teachers: {made_by}\n\nclaims:\n" + "\n".join(c.line() for c in claims)
    if timings:
        notes += "\n\nstage times (s): " + json.dumps(timings)
    write_html(rep / "index.html", "Flow-OPD on the embedded world", rows, columns, images, notes)
    return rows
