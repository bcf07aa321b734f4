"""weighted_sum and route_by_task on stub rewards."""

from __future__ import annotations

import pytest
import torch

from flowopd.errors import UserError
from flowopd.rewards.base import register_reward
from flowopd.rewards.combine import route_by_task, weighted_sum


def mean_brightness(images, prompts, metadata):  # (B,)
    return images.mean(dim=(1, 2, 3))


def prompt_length(images, prompts, metadata):
    return torch.tensor([float(len(p)) for p in prompts])


@register_reward("_test_combine_const")
def _const(value: float = 1.0):
    return lambda images, prompts, metadata: torch.full((len(prompts),), value)


IMAGES = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.25, 0.5, 1.0)])
PROMPTS = ["a", "bb", "ccc", "dddd"]


def test_weighted_sum():
    r = weighted_sum({"b": 2.0, "l": -0.5}, rewards={"b": mean_brightness, "l": prompt_length})
    got = r(IMAGES, PROMPTS, [{}] * 4)
    # 2 * [0, .25, .5, 1] - 0.5 * [1, 2, 3, 4]
    assert got.tolist() == pytest.approx([-0.5, -0.5, -0.5, 0.0])
    assert got.dtype == torch.float32
    assert r.last_components["l"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_weighted_sum_by_registry_name_with_options():
    r = weighted_sum({"_test_combine_const": 3.0}, options={"_test_combine_const": {"value": 0.5}})
    assert r(IMAGES, PROMPTS, [{}] * 4).tolist() == [1.5] * 4
    with pytest.raises(UserError, match="unknown reward"):
        weighted_sum({"_test_combine_nope": 1.0})
    with pytest.raises(UserError):
        weighted_sum({})


def test_weighted_sum_checks_shapes():
    bad = weighted_sum({"x": 1.0}, rewards={"x": lambda i, p, m: torch.zeros(2)})
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(4,\)"):
        bad(IMAGES, PROMPTS, [{}] * 4)


def test_route_by_task_batches_once_per_task_and_keeps_order():
    calls = []

    def tagged(offset):
        def fn(images, prompts, metadata):
            calls.append((offset, len(prompts)))
            return mean_brightness(images, prompts, metadata) + offset

        return fn

    r = route_by_task({"ocr": tagged(10.0), "geneval": tagged(20.0)})
    meta = [{"task": "geneval"}, {"task": "ocr"}, {"task": "geneval"}, {"task": "ocr"}]
    got = r(IMAGES, PROMPTS, meta)
    assert got.tolist() == pytest.approx([20.0, 10.25, 20.5, 11.0])
    assert sorted(calls) == [(10.0, 2), (20.0, 2)]  # one call per task, on its sub-batch


def test_route_by_task_names_and_errors():
    r = route_by_task({"a": "_test_combine_const", "b": mean_brightness})
    assert r(IMAGES[:2], PROMPTS[:2], [{"task": "a"}, {"task": "b"}]).tolist() == [1.0, 0.25]
    with pytest.raises(UserError, match=r"no reward for task 'ocrr' \(did you mean 'ocr'\?\)"):
        route_by_task({"ocr": mean_brightness})(IMAGES[:1], ["x"], [{"task": "ocrr"}])
    with pytest.raises(UserError, match=r"no metadata\['task'\]"):
        route_by_task({"ocr": mean_brightness})(IMAGES[:1], ["x"], [{}])
    r = route_by_task({"x": mean_brightness}, key="kind")
    assert r(IMAGES[3:], ["x"], [{"kind": "x"}]).tolist() == [1.0]
