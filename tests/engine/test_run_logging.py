"""RunLogger: JSONL records, TensorBoard files, the human line; progress on/off."""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from flowopd.engine.logging import RunLogger, format_stats, progress


def test_log_writes_valid_jsonl_and_tensorboard(tmp_path):
    out = io.StringIO()
    with RunLogger(tmp_path, enabled=True, stream=out) as logger:
        logger.log(0, {"reward_mean": torch.tensor(0.41), "reward_std": np.float32(0.125)})
        logger.log(1, {"kl": float("nan"), "dataset": "ocr", "hist": [1, 2]})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)  # strict JSON: no NaN tokens
    assert first["epoch"] == 0 and abs(first["reward_mean"] - 0.41) < 1e-6
    assert second["kl"] is None and second["dataset"] == "ocr" and second["hist"] == [1, 2]
    assert "NaN" not in (tmp_path / "log.jsonl").read_text()
    assert any((tmp_path / "tensorboard").iterdir())
    printed = out.getvalue().splitlines()
    assert printed[0] == "epoch 0 | reward 0.41±0.12"


def test_disabled_logger_writes_nothing(tmp_path):
    out = io.StringIO()
    RunLogger(tmp_path / "run", enabled=False, stream=out).log(0, {"kl": 1.0})
    assert not (tmp_path / "run").exists() and out.getvalue() == ""


def test_format_stats_line():
    stats = {
        "reward_mean": 0.41,
        "reward_std": 0.12,
        "train/kl": 0.002,
        "clip_fraction": 0.05,
        "ratio_mean": 1.0,
        "zero_std_group_frac": 0.1,
        "time/sample": 12.1,
        "time/score": 0.8,
        "time/train": 9.7,
        "eval/geneval": 0.63,
    }
    assert format_stats(3, stats) == (
        "epoch 3 | reward 0.41±0.12 | kl 0.002 | clip 0.05 | ratio 1.000 | zero-std 0.10 | "
        "t sample 12.1s score 0.8s train 9.7s | eval geneval 0.630"
    )


def test_progress_disabled_off_tty(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.delenv("FLOWOPD_NO_PROGRESS", raising=False)
    assert progress(items, "x") is items  # pytest's stderr is not a TTY
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.setenv("FLOWOPD_NO_PROGRESS", "1")
    assert progress(items, "x") is items


def test_sample_shows_a_bar_over_the_denoising_steps_on_a_terminal(tiny_model, monkeypatch, capsys):
    from flowopd.sampling import sample

    monkeypatch.delenv("FLOWOPD_NO_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    g = torch.Generator().manual_seed(0)
    quiet = sample(tiny_model, ["a photo of a cat"] * 2, 3, kind="ode", generator=g)
    assert "sampling 2" not in capsys.readouterr().err  # off unless asked for
    g = torch.Generator().manual_seed(0)
    shown = sample(tiny_model, ["a photo of a cat"] * 2, 3, kind="ode", generator=g, progress=True)
    err = capsys.readouterr().err
    assert "sampling 2" in err and "/3 [" in err  # a bar over the 3 steps
    assert torch.equal(quiet.latents, shown.latents)  # the bar changes nothing
