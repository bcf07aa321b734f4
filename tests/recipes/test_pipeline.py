"""The Flow-OPD pipeline end to end on the tiny pixel model, then rerun (idempotent)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.recipes.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


def _pipeline_yaml(tmp: Path, model: Path) -> Path:
    small = (
        "[train.epochs=1, sample.num_steps=4, 'sample.sde_window_range=[0, 4]', "
        "sample.prompts_per_epoch=4, sample.group_size=4, sample.batch_size=16, "
        "train.batch_size=16, train.optimizer_steps_per_epoch=1, model.lora.rank=4, model.lora.alpha=8]"
    )
    cfg = tmp / "pipeline.yaml"
    cfg.write_text(
        f"""
out: {tmp / "run"}
model: {model}
teachers:
  - {{task: geneval, config: {REPO}/configs/toy/grpo_geneval.yaml, overrides: {small}}}
  - {{task: ocr, config: {REPO}/configs/toy/grpo_ocr.yaml, overrides: {small}}}
mix: {{config: {REPO}/configs/toy/grpo_mix.yaml, overrides: {small}}}
cold_start: {{method: merge, merge_method: delta}}
opd: {{config: {REPO}/configs/toy/opd.yaml, overrides: {small}}}
eval: {{n: 6, steps: 3, batch_size: 12}}
"""
    )
    return cfg


def test_pipeline_runs_writes_report_and_skips_finished_stages(tmp_path, tiny_pixel_dir):
    cfg = _pipeline_yaml(tmp_path, tiny_pixel_dir)
    proc = run_cli("pipeline", str(cfg), timeout=600)
    out = tmp_path / "run"
    rows = json.loads((out / "report" / "table.json").read_text())
    names = [r["model"] for r in rows]
    assert names == ["base", "teacher:geneval", "teacher:ocr", "grpo-mix", "cold-start", "flow-opd"]
    for r in rows:
        assert set(r) == {"model", "toy-geneval", "toy-ocr", "toy-quality", "average"}
        vals = [r["toy-geneval"], r["toy-ocr"], r["toy-quality"]]
        assert abs(r["average"] - sum(vals) / 3) < 1e-3
    html = (out / "report" / "index.html").read_text()
    assert "flow-opd" in html and "data:image/png;base64" in html
    assert (out / "report" / "reward_curves.png").is_file()
    assert (out / "cold_start" / "lora" / "merge.json").is_file()
    assert "report:" in proc.stdout
    # rerun: every stage is found finished and skipped, the table is the same
    again = run_cli("pipeline", str(cfg), timeout=600)
    assert again.stdout.count("done already") == 5
    assert json.loads((out / "report" / "table.json").read_text()) == rows
