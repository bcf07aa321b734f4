"""Rollout collection with reward scoring overlapped with sampling."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch

from flowopd.recipes.common import collect_rollouts, submit_reward
from flowopd.rewards.toy import toy_quality_reward
from flowopd.world.prompts import make_records

KW = dict(num_steps=3, kind="sde", noise_level=0.7, guidance_scale=4.5, seed=0, epoch=0)


def test_batchwise_scores_equal_scoring_the_whole_epoch(tiny_model):
    records = make_records("geneval", "train", 3, seed=0)
    calls: list[tuple[int, str]] = []

    def reward(images, prompts, metadata):
        calls.append((len(prompts), threading.current_thread().name))
        return toy_quality_reward(images, prompts, metadata)

    ro = collect_rollouts(
        tiny_model, records, 0, 4, batch_size=5, reward=reward, overlap=True, **KW
    )
    # 12 samples in batches of 5, 5, 2, each scored off the main thread as it was decoded
    assert [n for n, _ in calls] == [5, 5, 2]
    assert all(name.startswith("flowopd-reward") for _, name in calls)
    whole = toy_quality_reward(ro.images, ro.prompts, ro.records)
    assert ro.rewards.shape == (12,) and ro.rewards.dtype == torch.float32
    torch.testing.assert_close(ro.rewards, whole)
    assert ro.score_seconds >= 0.0
    # on the CPU the default scores each batch in line (same scores, no thread)
    calls.clear()
    inline = collect_rollouts(tiny_model, records, 0, 4, batch_size=5, reward=reward, **KW)
    assert [n for n, _ in calls] == [5, 5, 2]
    assert all(name == threading.main_thread().name for _, name in calls)
    torch.testing.assert_close(inline.rewards, ro.rewards)
    # without a reward nothing is scored
    assert collect_rollouts(tiny_model, records, 0, 4, batch_size=5, **KW).rewards is None


def test_reward_with_its_own_submit_is_used():
    class Pooled:
        submitted = 0

        def __call__(self, images, prompts, metadata):  # pragma: no cover - must not be used
            raise AssertionError("the blocking call was used instead of submit")

        def submit(self, images, prompts, metadata):
            self.submitted += 1
            fut: Future = Future()
            fut.set_result(torch.full((len(prompts),), 0.5))
            return fut

    r = Pooled()
    out = submit_reward(r, torch.zeros(2, 3, 8, 8), ["a", "b"], [{}, {}]).result()
    assert r.submitted == 1 and out.tolist() == [0.5, 0.5]


def test_wrong_number_of_scores_is_reported(tiny_model):
    records = make_records("geneval", "train", 1, seed=0)
    with pytest.raises(ValueError, match="scores for 2 samples"):
        collect_rollouts(
            tiny_model, records, 0, 2, batch_size=2, reward=lambda i, p, m: torch.zeros(1), **KW
        )
