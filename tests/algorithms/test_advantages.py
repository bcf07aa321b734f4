"""Group advantages, group masks and CRD targets on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from flowopd.algorithms.advantages import (
    advantage_stats,
    crd_targets,
    group_advantages,
    group_mean,
    nonzero_group_mask,
)


def test_two_groups_global_std_by_hand():
    # rewards [1, 2, 3, 4], prompts [0, 0, 1, 1]
    # group means 1.5 and 3.5 -> centered [-0.5, 0.5, -0.5, 0.5]
    # global population std: mean 2.5, deviations (-1.5, -0.5, 0.5, 1.5)
    #   var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std = sqrt(1.25) = 1.1180340
    # A = +-0.5 / (1.1180340 + 1e-4) = +-0.4471740
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1]))
    a = 0.5 / (math.sqrt(1.25) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-a, a, -a, a]))
    assert adv.dtype == torch.float32


def test_two_groups_group_std_by_hand():
    # same batch, std within each group: population std of {1, 2} = 0.5
    # A = +-0.5 / (0.5 + 1e-4) = +-0.9998000
    adv = group_advantages(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1]), std="group"
    )
    a = 0.5 / 0.5001
    torch.testing.assert_close(adv, torch.tensor([-a, a, -a, a]))


def test_non_contiguous_interleaved_ids():
    # ids 7 and -3 interleaved: group 7 = {1, 3} (mean 2), group -3 = {2, 4} (mean 3)
    # centered [-1, -1, 1, 1]; global std sqrt(1.25) -> A = +-1 / 1.1181340 = +-0.8943480
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([7, -3, 7, -3]))
    a = 1.0 / (math.sqrt(1.25) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-a, -a, a, a]))


def test_permutation_equivariant():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g)
    ids = torch.tensor([5, 9, 2] * 4)
    perm = torch.randperm(12, generator=g)
    for std in ("global", "group"):
        a = group_advantages(r, ids, std=std)
        torch.testing.assert_close(group_advantages(r[perm], ids[perm], std=std), a[perm])


def test_clip_at_five():
    # one group of 36: a single 1 among zeros, p = 1/36
    # population std = sqrt(p (1 - p)) = sqrt(35) / 36
    # A(one)  = (1 - p) / std = sqrt((1 - p) / p) = sqrt(35) = 5.916 -> clipped to 5
    # A(zero) = -p / std = -1 / sqrt(35) = -0.1690309 (eps shifts the 4th digit)
    r = torch.zeros(36)
    r[0] = 1.0
    adv = group_advantages(r, torch.zeros(36, dtype=torch.long))
    assert adv[0].item() == 5.0
    torch.testing.assert_close(adv[1:], torch.full((35,), -1 / math.sqrt(35)), rtol=1e-3, atol=0)
    unclipped = group_advantages(r, torch.zeros(36, dtype=torch.long), clip=None)
    assert unclipped[0].item() == pytest.approx(math.sqrt(35), rel=1e-3)


def test_constant_group_is_exactly_zero_and_masked():
    # (0.1 + 0.1 + 0.1) / 3 = 0.10000000000000002 in float64: a naive r - mean leaves
    # a residue; constant groups must give exactly 0 so that the mask drops them.
    r = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.7, 0.3], dtype=torch.float64)
    ids = torch.tensor([4, 4, 4, 1, 1, 1])
    for std in ("global", "group"):
        adv = group_advantages(r, ids, std=std)
        assert torch.all(adv[:3] == 0)
        assert torch.all(adv[3:] != 0)
        mask = nonzero_group_mask(adv, ids)
        assert mask.tolist() == [False, False, False, True, True, True]


def test_single_image_group_has_zero_advantage():
    adv = group_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert adv[0].item() == 0.0
    assert nonzero_group_mask(adv, torch.tensor([0, 1, 1])).tolist() == [False, True, True]


def test_mask_keeps_whole_group_with_one_nonzero_and_accepts_per_step_adv():
    # group 2 has a single non-zero entry (at step 1 of image 1): the whole group stays
    adv = torch.tensor([[0.0, 0.0], [0.0, 0.3], [0.0, 0.0], [0.0, 0.0]])  # (N, T)
    ids = torch.tensor([2, 2, 5, 5])
    assert nonzero_group_mask(adv, ids).tolist() == [True, True, False, False]
    assert nonzero_group_mask(adv, ids, atol=0.5).tolist() == [False] * 4


def test_group_mean_broadcasts_and_is_differentiable():
    x = torch.tensor([1.0, 2.0, 3.0, 5.0], requires_grad=True)
    m = group_mean(x, torch.tensor([10, 20, 10, 20]))
    # group 10 = {1, 3} -> 2, group 20 = {2, 5} -> 3.5
    torch.testing.assert_close(m, torch.tensor([2.0, 3.5, 2.0, 3.5]))
    m.sum().backward()
    # each element appears in 2 outputs of its group with weight 1/2 -> grad 1
    torch.testing.assert_close(x.grad, torch.ones(4))


def test_stats():
    r = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.7, 0.3])
    ids = torch.tensor([4, 4, 4, 1, 1, 1])
    adv = group_advantages(r, ids)
    s = advantage_stats(r, ids, adv)
    assert s["zero_std_group_frac"] == 0.5  # one of the two prompts is constant
    assert s["num_groups"] == 2.0
    assert s["reward_mean"] == pytest.approx(1.5 / 6)
    assert all(isinstance(v, float) for v in s.values())


def test_crd_targets_by_hand():
    # clip(A, -5, 5) / 10 + 0.5: -7 -> 0, -5 -> 0, 0 -> 0.5, 2.5 -> 0.75, 5 -> 1, 9 -> 1
    a = crd_targets(torch.tensor([-7.0, -5.0, 0.0, 2.5, 5.0, 9.0]))
    torch.testing.assert_close(a, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_bad_inputs():
    r = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="std"):
        group_advantages(r, torch.tensor([0, 0]), std="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer"):
        group_advantages(r, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(r, torch.tensor([0, 0, 1]))
