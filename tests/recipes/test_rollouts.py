"""Rollout collection with reward scoring overlapped with sampling."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch

from flowopd.rewards.toy import toy_quality_reward
from flowopd.rollouts import collect_rollouts, submit_reward
from flowopd.sampling import SamplerSpec
from flowopd.world.prompts import make_records

SPEC = SamplerSpec(num_steps=3, kind="sde", noise_level=0.7, guidance_scale=4.5)
KW = dict(spec=SPEC, seed=0, epoch=0)


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


def test_same_initial_noise_shares_x_T_within_a_group_only(tiny_model):
    records = make_records("geneval", "train", 3, seed=0)
    kw = dict(KW, spec=SamplerSpec(num_steps=4))
    shared = collect_rollouts(
        tiny_model, records, 5, 4, batch_size=5, same_initial_noise=True, **kw
    )
    x_T = shared.trajectory.latents[:, 0].reshape(3, 4, -1)  # (prompts, G, C*h*w)
    for g in range(3):  # one x_T per prompt ...
        assert torch.equal(x_T[g], x_T[g, :1].expand_as(x_T[g]))
    assert not torch.equal(x_T[0, 0], x_T[1, 0])  # ... a different one per prompt
    # the SDE steps still differ per image, so the group's images differ
    final = shared.trajectory.latents[:, -1].reshape(3, 4, -1)
    assert (final[0, 1:] - final[0, :1]).abs().amax() > 1e-3
    # it depends on the global prompt index, not the batch: the same as a lone prompt
    alone = collect_rollouts(
        tiny_model, records[1:2], 6, 4, batch_size=3, same_initial_noise=True, **kw
    )
    torch.testing.assert_close(alone.trajectory.latents, shared.trajectory.latents[4:8])
    # off (Flow-GRPO): every image has its own x_T
    own = collect_rollouts(tiny_model, records, 5, 4, batch_size=5, **kw)
    assert not torch.equal(own.trajectory.latents[0, 0], own.trajectory.latents[1, 0])


def test_same_initial_noise_needs_a_stochastic_sampler():
    from flowopd.config.crd import CRDSampleConfig
    from flowopd.config.sections import SampleConfig
    from flowopd.errors import UserError

    SampleConfig(group_size=4, same_initial_noise=True).validate()  # sde: fine
    with pytest.raises(UserError, match="same_initial_noise=true needs stochastic steps"):
        SampleConfig(group_size=4, same_initial_noise=True, noise_level=0.0).validate()
    with pytest.raises(UserError, match="identical images per group"):
        CRDSampleConfig(group_size=4, same_initial_noise=True, kind="ode").validate()


def test_antithetic_pairs_mirror_the_step_noise(tiny_model):
    records = make_records("geneval", "train", 2, seed=0)
    ro = collect_rollouts(tiny_model, records, 0, 4, batch_size=3, antithetic=True, **KW)
    t = ro.trajectory
    for a in range(0, 8, 2):  # pairs (0, 1), (2, 3) of each group, across batch borders
        b = a + 1
        assert torch.equal(t.latents[a, 0], t.latents[b, 0])  # one x_T
        # same state -> same step mean; the next states lie mirrored around it
        torch.testing.assert_close(t.means[a, 0], t.means[b, 0])
        torch.testing.assert_close(
            t.latents[a, 1] + t.latents[b, 1], 2 * t.means[a, 0], atol=1e-5, rtol=0
        )
        assert (t.latents[a, 1] - t.latents[b, 1]).abs().amax() > 1e-2
        # a mirrored sample is an ordinary sample of the policy: its log-prob is the same
        torch.testing.assert_close(t.log_probs[a, 0], t.log_probs[b, 0])
    assert not torch.equal(t.latents[0, 0], t.latents[2, 0])  # pairs differ from each other


def test_antithetic_needs_an_even_group():
    from flowopd.config.sections import SampleConfig
    from flowopd.errors import UserError

    SampleConfig(group_size=4, antithetic=True).validate()
    with pytest.raises(UserError, match="group_size must be even, got 5"):
        SampleConfig(group_size=5, antithetic=True).validate()
