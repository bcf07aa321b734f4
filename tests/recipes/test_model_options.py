"""The run's ``model:`` switches reach the loaded backend (``engine.run.setup_run``)."""

from __future__ import annotations

import pytest

from flowopd.config import config_from_dict
from flowopd.config.grpo import GRPOConfig
from flowopd.errors import UserError


def _cfg(tmp_path, model_dir, **model) -> GRPOConfig:
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a red circle", "task": "x"}\n')
    return config_from_dict(
        GRPOConfig,
        {
            "model": {"path": str(model_dir), "dtype": "float32", **model},
            "data": {"train": str(train)},
            "reward": "toy_ocr",
            "sample": {"group_size": 2, "prompts_per_epoch": 1, "batch_size": 2},
            "train": {"optimizer_steps_per_epoch": 1},
            "output": {"dir": str(tmp_path / "run")},
        },
    )


@pytest.mark.parametrize(("msl", "tokens"), [(None, 16 + 1), (3, 16 + 3)])
def test_max_sequence_length_sets_the_t5_tokens(tmp_path, tiny_pixel_dir, msl, tokens):
    """SD3's prompt sequence is CLIP's 16 tokens (this tiny model's length) + the T5 part,
    zero-padded to max_sequence_length without a T5: the saved default is 1, the run's 3."""
    from flowopd.engine.run import setup_run

    run = setup_run(_cfg(tmp_path, tiny_pixel_dir, max_sequence_length=msl), adapter=None)
    assert run.model.encode_prompts(["a red circle"]).embeds.shape[1] == tokens


def test_max_sequence_length_must_be_positive(tmp_path, tiny_pixel_dir):
    with pytest.raises(UserError, match="model.max_sequence_length must be >= 1, got 0"):
        _cfg(tmp_path, tiny_pixel_dir, max_sequence_length=0)
