"""EpochLayout: derived counts and the distributed checks, against hand-computed values."""

from __future__ import annotations

import pytest

from flowopd.config.crd import CRDConfig
from flowopd.config.grpo import GRPOConfig
from flowopd.config.layout import EpochLayout, divisors
from flowopd.errors import UserError


def _layout(**kw) -> EpochLayout:
    base = dict(
        prompts_per_epoch=48,
        group_size=24,
        sample_batch_size=12,
        train_batch_size=12,
        gradient_accumulation=None,
        steps_per_pass=2,
        inner_epochs=1,
    )
    return EpochLayout(**{**base, **kw})


def test_paper_layout_on_eight_processes():
    lay = _layout()
    # N = 48 / 8 x 24 = 144; 144 / 12 = 12 batches; a = 12 / 2 = 6; 12 / 6 x 1 = 2 steps
    assert lay.images_per_epoch == 1152
    assert lay.prompts_per_process(8) == 6 and lay.images_per_process(8) == 144
    assert lay.sampling_batches(8) == 12 and lay.minibatches_per_pass(8) == 12
    assert lay.gradient_accumulation_steps(8) == 6 and lay.optimizer_steps_per_epoch(8) == 2
    lay.check(8)


def test_given_accumulation_and_inner_epochs():
    lay = _layout(train_batch_size=8, gradient_accumulation=3, inner_epochs=2)
    # W=1: N = 1152, 1152 / 8 = 144 minibatches, 144 / 3 = 48 steps x 2 inner = 96
    assert lay.minibatches_per_pass(1) == 144
    assert lay.gradient_accumulation_steps(1) == 3 and lay.optimizer_steps_per_epoch(1) == 96
    lay.check(1)


@pytest.mark.parametrize(
    "kw, world, needle",
    [
        ({}, 5, "sample.prompts_per_epoch=48 must be divisible by the number of processes (5)"),
        ({}, 0, "world size must be >= 1"),
        ({"sample_batch_size": 7}, 8, "sample.batch_size=7 must divide"),
        ({"train_batch_size": 10}, 8, "train.batch_size=10) must divide"),
        ({"steps_per_pass": 5}, 8, "train.optimizer_steps_per_epoch=5 must divide"),
        ({"gradient_accumulation": 5}, 8, "train.gradient_accumulation=5 must divide"),
    ],
)
def test_checks_name_the_key(kw, world, needle):
    with pytest.raises(UserError) as e:
        _layout(**kw).check(world)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_prompts_suggestion_and_divisors():
    with pytest.raises(UserError, match="use 45 or 50"):
        _layout(prompts_per_epoch=47).check(5)
    assert divisors(144, limit=5) == "1, 2, 3, 4, 6, ..."
    assert divisors(6) == "1, 2, 3, 6"


def test_configs_share_the_layout():
    g, c = GRPOConfig(), CRDConfig()
    assert g.layout == EpochLayout.of(g.sample, g.train)
    assert c.layout == EpochLayout.of(c.sample, c.train)
    assert g.gradient_accumulation_steps(8) == g.layout.gradient_accumulation_steps(8)
    assert c.optimizer_steps_per_epoch(8) == c.layout.optimizer_steps_per_epoch(8)
