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
    nft_small = (
        "[train.epochs=1, sample.num_steps=4, sample.prompts_per_epoch=4, sample.group_size=4, "
        "sample.batch_size=16, train.batch_size=16, train.optimizer_steps_per_epoch=1, "
        "nft.num_times=4, nft.times_per_batch=2, model.lora.rank=4, model.lora.alpha=8]"
    )
    cfg = tmp / "pipeline.yaml"
    cfg.write_text(
        f"""
out: {tmp / "run"}
model: {model}
teachers:
  - {{task: geneval, algo: nft, config: toy/nft_geneval, overrides: {nft_small}}}
  - {{task: ocr, config: {REPO}/configs/toy/grpo_ocr.yaml, overrides: {small}}}
mix: {{config: {REPO}/configs/toy/grpo_mix.yaml, overrides: {small}}}
cold_start: {{method: merge, merge_method: delta}}
opd: {{config: {REPO}/configs/toy/opd.yaml, overrides: {small}}}
eval: {{n: 6, steps: 3, batch_size: 12}}
claims: {{gain: 0.15}}
teacher_jobs: 2
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
    # the report marks which method made each teacher (a DiffusionNFT and a GRPO one here)
    assert [r.get("method") for r in rows[1:3]] == ["nft", "grpo"]
    for r in rows:
        assert set(r) - {"method"} == {"model", "toy-geneval", "toy-ocr", "toy-quality",
                                       "average", "se"}  # fmt: skip
        # every column carries its evaluation standard error (metrics.json's overall_se)
        assert set(r["se"]) == {"toy-geneval", "toy-ocr", "toy-quality", "average"}
        vals = [r["toy-geneval"], r["toy-ocr"], r["toy-quality"]]
        assert abs(r["average"] - sum(vals) / 3) < 1e-3
    html = (out / "report" / "index.html").read_text()
    assert "flow-opd" in html and "data:image/png;base64" in html
    assert "teachers: teacher:geneval by nft, teacher:ocr by grpo" in html
    assert (out / "report" / "reward_curves.png").is_file()
    assert (out / "cold_start" / "lora" / "merge.json").is_file()
    # teacher_jobs=2: both teachers trained at once in their own processes, consoles apart
    assert "teacher:ocr: training in its own process" in proc.stdout
    assert "epoch 0 |" in (out / "teachers" / "ocr" / "console.log").read_text()
    # ... and the base's evaluation took the slot of the teacher that ended first (cached,
    # so step 5 does not evaluate it again)
    assert "[pipeline] eval base: done in" in proc.stdout
    assert "[pipeline] eval base (" not in proc.stdout
    assert (out / "eval" / "base" / "console.log").is_file()
    claims = json.loads((out / "report" / "claims.json").read_text())
    assert len(claims) == 8 and {c["passed"] for c in claims} <= {True, False, None}
    assert "(needs >= +0.15)" in claims[0]["detail"]  # the config's claims.gain
    assert "(needs >= +0.15)" in proc.stdout  # printed with the same bars
    assert claims[-1] == {"name": "MAR raises quality", "passed": None,
                          "detail": "no MAR-off row (mar_ablation=true)"}  # fmt: skip
    assert "[n/a ] MAR raises quality" in html and "claims:" in proc.stdout
    assert "report:" in proc.stdout
    # rerun: every stage is found finished and skipped, the table is the same
    again = run_cli("pipeline", str(cfg), timeout=600)
    assert again.stdout.count("done already") == 5
    assert json.loads((out / "report" / "table.json").read_text()) == rows


def test_processes_train_and_evaluate_every_stage_data_parallel(tmp_path, tiny_pixel_dir):
    """processes=2: the command starts 2 processes that run each stage and evaluation
    together (ranks print nothing twice, only rank 0 writes); a rerun finds it all done."""
    cfg = _pipeline_yaml(tmp_path, tiny_pixel_dir)
    # 16 images an epoch: 8 per process, one batch each
    text = cfg.read_text().replace(
        "sample.batch_size=16, train.batch_size=16", "sample.batch_size=8, train.batch_size=8"
    )
    cfg.write_text(text)
    over = ["processes=2", "teacher_jobs=1", "mix.config="]
    proc = run_cli("pipeline", str(cfg), *over, timeout=600)
    assert "[pipeline] 2 processes, data-parallel, on this machine" in proc.stdout
    for line in ("teacher:geneval: training ->", "cold start: merge", "flow-opd: training ->",
                 "eval base (", "report:"):  # fmt: skip
        assert proc.stdout.count(line) == 1, line
    out = tmp_path / "run"
    rows = json.loads((out / "report" / "table.json").read_text())
    assert [r["model"] for r in rows] == [
        "base", "teacher:geneval", "teacher:ocr", "cold-start", "flow-opd",
    ]  # fmt: skip
    # each stage sampled its 4 prompts x 4 images an epoch across both processes
    log = [json.loads(x) for x in (out / "teachers" / "ocr" / "log.jsonl").read_text().splitlines()]
    assert log[0]["num_groups"] == 4 and log[0]["images"] == 16
    assert not list(out.rglob("*.tmp"))  # nothing half-written by two writers
    again = run_cli("pipeline", str(cfg), *over, timeout=600)
    assert again.stdout.count("done already") == 4
    assert json.loads((out / "report" / "table.json").read_text()) == rows


def test_every_stage_config_is_checked_before_the_first_stage_trains(tmp_path):
    """check_stages loads each stage's config as the pipeline will (the LoRAs it makes
    stood in for) and checks its epoch splits over the processes."""
    import pytest

    from flowopd.config import load_config
    from flowopd.config.pipeline import PipelineConfig
    from flowopd.errors import UserError
    from flowopd.presets import resolve_config
    from flowopd.recipes.pipeline import check_stages

    def demo(*over: str) -> PipelineConfig:
        return load_config(PipelineConfig, resolve_config("toy/demo"), [f"out={tmp_path}", *over])

    check_stages(demo(), "full", 1)
    check_stages(demo(), "full", 2)  # the demo's processes: 2
    # the OPD stage's 64 images do not split into 2 optimizer steps of 32 on each of 2
    # processes: found now, not when the stage starts after the teachers
    bad = demo("opd.overrides=[train.batch_size=32]")
    check_stages(bad, "full", 1)
    with pytest.raises(UserError, match=r"^stage flow-opd \(configs/toy/opd.yaml\) on 2 "
                       r"processes: train.optimizer_steps_per_epoch=2 must divide"):  # fmt: skip
        check_stages(bad, "full", 2)
    with pytest.raises(UserError, match=r"^stage teacher:ocr .*unknown config key 'train.epoch'"):
        check_stages(demo("teachers.1.overrides=[train.epoch=3]"), "full", 1)
    # an SFT cold start is checked with the teachers it will sample from
    sft = tmp_path / "sft.yaml"
    sft.write_text("model: {path: embedded}\ndata: {train: 'world:geneval'}\n"
                   "sample: {num_prompts: 5, images_per_prompt: 2}\ntrain: {batch_size: 2}\n")  # fmt: skip
    with_sft = demo("cold_start.method=sft", f"cold_start.sft.config={sft}")
    check_stages(with_sft, "full", 1)
    with pytest.raises(
        UserError, match=r"^stage cold-start .* on 2 processes: sample.num_prompts=5"
    ):
        check_stages(with_sft, "full", 2)


def test_seeds_run_the_pipeline_per_seed_and_report_mean_and_std(tmp_path, monkeypatch, capsys):
    """seeds=[...]: one pipeline per seed in out/seed_<s>/, then out/report/ over the seeds
    (the stages themselves are replaced by a stub: the single-seed run is tested above)."""
    from flowopd.cli import main
    from flowopd.recipes import pipeline

    calls = []

    def fake_run(cfg, *, budget, log):
        calls.append((cfg.seed, cfg.out, cfg.seeds, budget))
        d = 0.1 * cfg.seed
        rows = [
            {"model": "base", "toy-geneval": 0.3, "toy-ocr": 0.6, "toy-quality": 0.9},
            {"model": "teacher:geneval", "toy-geneval": 0.5 + d, "toy-ocr": 0.6, "toy-quality": 0.9},
        ]  # fmt: skip
        for r in rows:
            r["average"] = round((r["toy-geneval"] + r["toy-ocr"] + r["toy-quality"]) / 3, 4)
        (Path(cfg.out) / "report").mkdir(parents=True)
        (Path(cfg.out) / "report" / "reward_curves.png").write_bytes(b"\x89PNG fake")
        return rows

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    cfg = _pipeline_yaml(tmp_path, tmp_path / "model")
    assert main(["pipeline", str(cfg), "seeds=[0, 1, 2]", "--budget", "demo"]) == 0
    out = tmp_path / "run"
    assert calls == [(s, str(out / f"seed_{s}"), [], "demo") for s in (0, 1, 2)]
    rows = json.loads((out / "report" / "table.json").read_text())
    teacher = rows[1]
    assert teacher["model"] == "teacher:geneval"
    assert teacher["toy-geneval"] == 0.6  # mean of 0.5, 0.6, 0.7
    assert abs(teacher["std"]["toy-geneval"] - 0.1) < 1e-9  # sample std of 0.5, 0.6, 0.7
    assert teacher["std"]["toy-ocr"] == 0.0
    assert teacher["seeds"]["2"]["toy-geneval"] == 0.7
    claims = {c["name"]: c for c in json.loads((out / "report" / "claims.json").read_text())}
    assert claims["seesaw, teacher:geneval"]["passed"] is True  # +0.30 over the base
    assert claims["flow-opd has the best average"]["passed"] is None
    html = (out / "report" / "index.html").read_text()
    assert abs(teacher["se"]["toy-geneval"] - 0.1 / 3**0.5) < 1e-4  # std / sqrt(3)
    assert "0.600 &plusmn; 0.058" in html and "seed 2: training reward" in html
    printed = capsys.readouterr().out
    assert "0.600 +- 0.100" in printed and "[PASS] seesaw, teacher:geneval" in printed
    # a repeated seed is a one-line user error
    assert main(["pipeline", str(cfg), "seeds=[1, 1]"]) == 2
    assert "seeds repeat a value" in capsys.readouterr().err
    # parallel teachers are for one machine: under torchrun every process trains each one
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pipeline", str(cfg)]) == 2
    assert "under torchrun set teacher_jobs=1" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["pipeline", str(cfg), "teacher_jobs=0"]) == 2
    assert "teacher_jobs must be >= 1, got 0" in capsys.readouterr().err
    assert main(["pipeline", str(cfg), "processes=2"]) == 2  # the preset has teacher_jobs: 2
    assert "set teacher_jobs=1" in capsys.readouterr().err
    assert main(["pipeline", str(cfg), "processes=0"]) == 2
    assert "processes must be >= 1, got 0" in capsys.readouterr().err


def test_teacher_algo_is_checked_before_anything_runs(tmp_path, tiny_pixel_dir):
    cfg = _pipeline_yaml(tmp_path, tiny_pixel_dir)
    cfg.write_text(cfg.read_text().replace("algo: nft", "algo: sft"))
    proc = run_cli("pipeline", str(cfg), check=False)
    assert proc.returncode == 2 and not (tmp_path / "run" / "teachers").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: teachers.0.algo='sft' cannot train a teacher; choose from grpo, crd, nft, awm"
    )
