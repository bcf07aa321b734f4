"""Fixtures for recipe tests: a tiny pixel-space SD3 model directory, built once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flowopd.models.tiny import TinySD3Config

# 1 MMDiT layer of width 32, 32x32 RGB pixels (patch 4), two 1-layer CLIPs of width 16
TINY_PIXEL = TinySD3Config(
    sample_size=32, patch_size=4, in_channels=3, num_layers=1, attention_head_dim=8,
    num_attention_heads=4, clip_hidden=16, clip_layers=1, clip_max_length=16, t5=False, vae=False,
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory) -> Path:
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny_pixel"
    SD3Model(build_tiny_sd3_pipeline(TINY_PIXEL), max_sequence_length=1).save_pretrained(path)
    return path


def free_port() -> int:
    """A TCP port free now, for torchrun's rendezvous: a fixed port clashes when two test
    runs share the machine (the second run's ranks abort)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", FLOWOPD_NO_PROGRESS="1", PYTHONHASHSEED="0")
    return env


def run_cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m flowopd ARGS`` in a subprocess (one thread: results are reproducible)."""
    proc = subprocess.run(
        [sys.executable, "-m", "flowopd", *args], env=cli_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"flowopd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


def read_log(run: Path) -> list[dict]:
    """The records of a run's log.jsonl, one per epoch."""
    import json

    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def train_quietly(train, cfg):
    """``train(cfg)`` in this process with its console output swallowed; returns the ``Run``."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg)


def torchrun_cli(*args: str, nproc: int = 2, timeout: float = 300) -> None:
    """``python -m flowopd ARGS`` under torchrun with ``nproc`` processes; asserts success."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "flowopd", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- clean-rollout recipes (CRD, NFT, AWM): one small run, resume and 2-process checks ---------


def forward_run_yaml(tmp: Path, model: Path, algo: str, method: str) -> Path:
    """``tmp/ALGO.yaml``: 4 prompts x 4 images, 4 ODE steps, minibatches of 8 images, 2
    epochs, toy quality reward; ``method`` is the method section's YAML line."""
    cfg = tmp / f"{algo}.yaml"
    cfg.write_text(
        f"""
model: {{path: {model}, dtype: float32, resolution: null, lora: {{rank: 4, alpha: 8}}}}
data: {{train: "world:geneval"}}
reward: toy_quality
sample: {{num_steps: 4, eval_num_steps: 8, group_size: 4, prompts_per_epoch: 4, batch_size: 8}}
train: {{epochs: 2, batch_size: 8, optimizer_steps_per_epoch: 1, lr: 1.0e-3, seed: 3,
        ema_every: 1}}
{method}
eval: {{every: 0}}
output: {{dir: {tmp / "run"}, checkpoint_every: 1, keep_last: 0}}
"""
    )
    return cfg


def _lora(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def check_resume_is_bitwise(train, tmp: Path, model: Path, adapters, epochs: int, key: str):
    """``train(dir, model, **overrides) -> Run``: ``epochs`` epochs at once equal
    ``epochs - 1``, then a resumed last one, bit for bit (every adapter in ``adapters``, the
    saved LoRA and the last log record's ``key``)."""
    import torch

    a, b = tmp / "a", tmp / "b"
    a.mkdir(), b.mkdir()
    full = train(a, model, **{"train.epochs": str(epochs)}).model
    train(b, model, **{"train.epochs": str(epochs - 1)})  # "interrupted" before the last
    resumed = train(b, model, **{"train.epochs": str(epochs), "output.resume": "true"})
    assert [r["epoch"] for r in resumed.history] == [epochs - 1]
    for name in adapters:
        wa, wb = full.adapter_state_dict(name), resumed.model.adapter_state_dict(name)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    la, lb = _lora(a / "run"), _lora(b / "run")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert read_log(a / "run")[-1][key] == read_log(b / "run")[-1][key]


def check_two_processes_equal_one(train, yaml, tmp: Path, model: Path, algo: str, common: dict):
    """One minibatch per process: the process-averaged gradient of 2 x 8 images equals that
    of 16 images in one process: the reward, the clipped gradient norm (magnitudes, not
    just the signs Adam's first step keeps) and the weights (up to summation order)."""
    import torch

    one, two = tmp / "one", tmp / "two"
    one.mkdir(), two.mkdir()
    train(one, model, **common, **{"train.batch_size": "16"})
    overrides = [f"{k}={v}" for k, v in common.items()]
    torchrun_cli("train", algo, "--config", str(yaml(two, model)), *overrides,
                 "train.batch_size=8")  # fmt: skip
    first = [read_log(d / "run")[0] for d in (one, two)]
    assert first[0]["reward_mean"] == pytest.approx(first[1]["reward_mean"], abs=1e-6)
    assert first[0]["grad_norm"] == pytest.approx(first[1]["grad_norm"], rel=1e-4)
    w = [_lora(d / "run") for d in (one, two)]
    for k in w[0]:
        torch.testing.assert_close(w[0][k], w[1][k], atol=1e-5, rtol=1e-4)
    assert any(w[0][k].abs().sum() > 0 for k in w[0] if "lora_B" in k)
