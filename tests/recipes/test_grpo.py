"""Flow-GRPO recipe end to end on a tiny pixel-space SD3 model (seconds per run)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.conftest import cli_env, free_port, run_cli


def _config(tmp: Path, model: Path, **extra: str) -> list[str]:
    """A small GRPO run: 4 prompts x 4 images, 4 SDE steps, toy GenEval reward."""
    cfg = tmp / "grpo.yaml"
    cfg.write_text(
        f"""
model: {{path: {model}, dtype: float32, resolution: null, guidance_scale: 4.5,
        lora: {{rank: 4, alpha: 8}}}}
data: {{train: "world:geneval"}}
reward: toy_quality
sample: {{num_steps: 4, group_size: 4, prompts_per_epoch: 4, batch_size: 8}}
train: {{epochs: 2, optimizer_steps_per_epoch: 1, lr: 1.0e-3, seed: 3, ema_every: 1}}
eval: {{every: 0}}
output: {{dir: {tmp / "run"}, checkpoint_every: 1}}
"""
    )
    return ["train", "grpo", "--config", str(cfg), *[f"{k}={v}" for k, v in extra.items()]]


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_grpo_runs_and_writes_outputs(tmp_path, tiny_pixel_dir, tiny_pipe):
    run_cli(
        *_config(
            tmp_path,
            tiny_pixel_dir,
            **{
                "eval.every": "2",
                "eval.benchmarks": "[toy-geneval,toy-quality]",
                "eval.num_prompts": "6",
            },
        )
    )
    run = tmp_path / "run"
    log = _log(run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(r["reward_std"] > 0 for r in log)  # a real reward signal
    assert log[0]["images"] == 16
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"toy-geneval", "toy-quality"}
    assert "counting" in metrics["toy-geneval"] and 0 <= metrics["toy-quality"]["overall"] <= 1
    assert (run / "eval" / "grid.png").is_file() and (run / "config.yaml").is_file()
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_first_update_ratio_is_one_whichever_cfg_grad(tmp_path, tiny_pixel_dir):
    # one minibatch (all 16 images), no accumulation: the ratio of the first update is 1,
    # with gradients through the conditional CFG branch only (the default) or both, and
    # with the CFG pair batched (the default) or split in two forwards
    runs = {
        "default": {},
        "both": {"train.cfg_grad": "both"},
        "split": {"model.cfg_forward": "split"},
    }
    loras, logs = {}, {}
    for name, extra in runs.items():
        out = tmp_path / name
        out.mkdir()
        run_cli(*_config(out, tiny_pixel_dir, **{"train.epochs": "1", "train.batch_size": "16"}, **extra))  # fmt: skip
        logs[name] = rec = _log(out / "run")[0]
        assert abs(rec["ratio_mean"] - 1.0) < 1e-6
        assert rec["clip_fraction"] == 0.0
        loras[name] = load_file(out / "run" / "lora" / "pytorch_lora_weights.safetensors")
    resolved = (tmp_path / "default" / "run" / "config.yaml").read_text()
    assert "cfg_grad: cond" in resolved and "cfg_forward: batched" in resolved
    # same rollouts, same forward, another gradient: the adapters differ after one update
    assert any(not torch.equal(v, loras["both"][k]) for k, v in loras["default"].items())
    # split: the same rollouts, losses and gradient up to float round-off
    # (policy_loss and kl are ~0 before the first update: ratio 1, adapter B = 0)
    for key, tol in (
        ("reward_mean", 1e-6),
        ("grad_norm", 1e-4),
        ("policy_loss", 1e-7),
        ("kl", 1e-7),
    ):
        assert logs["split"][key] == pytest.approx(logs["default"][key], rel=tol, abs=tol), key
    assert logs["default"]["grad_norm"] > 0


def test_bad_config_is_one_line_error(tmp_path, tiny_pixel_dir):
    proc = run_cli(*_config(tmp_path, tiny_pixel_dir, **{"sample.group_size": "1"}), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "group_size must be >= 2" in proc.stderr
    proc = run_cli(*_config(tmp_path, tiny_pixel_dir, reward="toy_geneva"), check=False)
    assert proc.returncode == 2 and "did you mean 'toy_geneval'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path, tiny_pixel_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # 8 short epochs, checkpoint every epoch; killed right after the 2nd checkpoint appears,
    # i.e. inside epoch 2 with 6 epochs still to go (the poll is 10 ms; an epoch >= 50 ms)
    run_cli(*_config(a, tiny_pixel_dir, **{"train.epochs": "8"}))
    args = _config(b, tiny_pixel_dir, **{"train.epochs": "8"})
    proc = subprocess.Popen([sys.executable, "-m", "flowopd", *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    ckpt = b / "run" / "checkpoints" / "step-2"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "run" / "lora").exists()
    run_cli(*args, "--resume")
    log = _log(b / "run")
    assert [r["epoch"] for r in log] == list(range(8))  # redone epochs are not duplicated
    wa = load_file(a / "run" / "lora" / "pytorch_lora_weights.safetensors")
    wb = load_file(b / "run" / "lora" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tiny_pixel_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = {"train.epochs": "1", "train.ema": "false", "sample.batch_size": "8",
              # the end-of-run evaluation, 5 prompts x 3 images: shards of 8 and 7 images
              "eval.benchmarks": "[toy-geneval,toy-quality]", "eval.num_prompts": "5",
              "eval.images_per_prompt": "3"}  # fmt: skip
    run_cli(*_config(one, tiny_pixel_dir, **common, **{"train.batch_size": "16"}))
    args = _config(two, tiny_pixel_dir, **common, **{"train.batch_size": "8"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "flowopd", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = _log(one / "run")[0], _log(two / "run")[0]
    assert r1["reward_mean"] == pytest.approx(r2["reward_mean"], abs=1e-6)
    w1 = load_file(one / "run" / "lora" / "pytorch_lora_weights.safetensors")
    w2 = load_file(two / "run" / "lora" / "pytorch_lora_weights.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)  # float summation order
    assert any(w1[k].abs().sum() > 0 for k in w1 if "lora_B" in k)
    # every process evaluated its share; the gathered metrics match one process's (the
    # weights agree to float summation order, hence the tolerance)
    m1 = json.loads((one / "run" / "eval" / "metrics.json").read_text())
    m2 = json.loads((two / "run" / "eval" / "metrics.json").read_text())
    assert m1.keys() == m2.keys() == {"toy-geneval", "toy-quality"}
    for bench in m1:
        assert m1[bench] == pytest.approx(m2[bench], abs=1e-4)
    # ... each sampling its own share (counted where sampled), not rank 0 alone
    protocol = json.loads((two / "run" / "eval" / "protocol.json").read_text())
    assert protocol["toy-geneval"]["images"] == 15
    assert protocol["toy-geneval"]["images_per_process"] == [8, 7]
