"""Shared fixtures: one tiny in-memory SD3 pipeline per session (no network, no weights)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLOWOPD_NO_PROGRESS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_pipe():
    """A 2-layer SD3 pipeline (tiny CLIP x2 + T5 + VAE), random weights; never mutate it."""
    from flowopd.models.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline()


@pytest.fixture
def tiny_model(tiny_pipe):
    """A fresh ``SD3Model`` over a deep copy of the session pipeline (adapters are per test)."""
    from flowopd.models.sd3 import SD3Model

    return SD3Model(copy.deepcopy(tiny_pipe), max_sequence_length=8)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"../shared/data not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
