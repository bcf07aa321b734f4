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
