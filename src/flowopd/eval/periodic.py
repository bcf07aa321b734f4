"""Evaluation inside a training run: when it is due, and the benchmarks with the EMA weights.

A recipe hands :func:`evaluate_when_due` to the engine's epoch end, which adds the
metrics to the epoch's record before it logs and checkpoints it::

    end_epoch(run, cfg, ts, logger, epoch, record, evaluate=evaluate_when_due)
"""

from __future__ import annotations

from contextlib import nullcontext

from flowopd.engine.run import Run, TrainState
from flowopd.eval.benchmarks import EvalSettings, evaluate, protocol_record
from flowopd.eval.report import save_grid, write_json

__all__ = ["eval_due", "evaluate_and_save", "evaluate_when_due"]


def eval_due(cfg, epoch: int) -> bool:
    """Evaluate every ``eval.every`` epochs, and after the last epoch when benchmarks are set."""
    last = epoch + 1 == cfg.train.epochs
    every = cfg.eval.every
    return bool(cfg.eval.benchmarks) and ((every and (epoch + 1) % every == 0) or last)


def evaluate_when_due(run: Run, cfg, ts: TrainState, epoch: int) -> dict[str, float]:
    """The flat eval metrics of ``epoch`` (with ``ts``'s EMA weights) when an evaluation is
    due (:func:`eval_due`), else ``{}``."""
    if not eval_due(cfg, epoch):
        return {}
    return evaluate_and_save(run, cfg, ts.ema, ts.params, epoch)


def evaluate_and_save(run: Run, cfg, ema, params, epoch: int) -> dict[str, float]:
    """Evaluate the benchmarks with the EMA weights on every process, each sampling and
    scoring its share of the images (scores gathered, so the metrics are the same on every
    process and no process waits at a barrier through the evaluation); the main process
    writes eval/. Returns the flat metrics for the log."""
    if not cfg.eval.benchmarks:
        return {}
    settings = EvalSettings(
        steps=cfg.sample.eval_num_steps,
        guidance_scale=cfg.model.guidance_scale,
        resolution=cfg.model.resolution,
        images_per_prompt=cfg.eval.images_per_prompt,
        n=cfg.eval.num_prompts,
        batch_size=cfg.eval.batch_size,
        # the eval scorers load the same local weights as the training rewards
        scorer_options=dict(getattr(getattr(cfg, "reward", None), "options", None) or {}),
    )
    was_training = run.model.transformer.training
    run.model.transformer.eval()
    with ema.swapped(params) if ema is not None else nullcontext():
        res = evaluate(run.model, cfg.eval.resolved_benchmarks(cfg.data.test), settings)
    run.model.transformer.train(was_training)
    if run.main:
        write_json(run.out / "eval" / "metrics.json", res.metrics)
        write_json(run.out / "eval" / f"epoch-{epoch + 1:04d}" / "metrics.json", res.metrics)
        write_json(run.out / "eval" / "protocol.json", protocol_record(res))
        save_grid(run.out / "eval" / "grid.png", *res.grid(48))
    flat = {}
    for bench, vals in res.metrics.items():
        for k, v in vals.items():
            flat[f"eval/{bench}" if k == "overall" else f"eval/{bench}/{k}"] = v
    return flat
