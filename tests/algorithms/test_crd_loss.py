"""CRD: implicit reward, centered loss and its invariances, adaptive KL, EMA schedules."""

from __future__ import annotations

import pytest
import torch

from flowopd.algorithms.crd import crd_kl, crd_loss, ema_decays, implicit_reward

# One image, u = 0. v_theta = [1, -1, 3, -3]: mean sq = (1 + 1 + 9 + 9) / 4 = 5,
#   w_theta = mean|.| = (1 + 1 + 3 + 3) / 4 = 2.   v_old = [2, 2, 2, 2]: mean sq 4, w_old 2.
V_THETA = torch.tensor([[1.0, -1.0, 3.0, -3.0]])
V_OLD = torch.full((1, 4), 2.0)
U = torch.zeros(1, 4)


def test_implicit_reward_by_hand():
    # plain:    l = -(5 - 4) = -1 (the policy fits worse than old: negative)
    torch.testing.assert_close(
        implicit_reward(V_THETA, V_OLD, U, normalize="plain"), torch.tensor([-1.0])
    )
    # adaptive: l = -(5 / 2 - 4 / 2) = -0.5
    torch.testing.assert_close(implicit_reward(V_THETA, V_OLD, U), torch.tensor([-0.5]))
    # swapping the roles flips the sign
    torch.testing.assert_close(implicit_reward(V_OLD, V_THETA, U), torch.tensor([0.5]))


def test_implicit_reward_weights_are_detached():
    v = V_THETA.clone().requires_grad_(True)
    v_old = V_OLD.clone().requires_grad_(True)
    implicit_reward(v, v_old, U).sum().backward()
    # l = -mean(v^2) / w_theta + const with w_theta = 2 held fixed: dl/dv = -2 v / (4 * 2)
    #   = [-0.25, 0.25, -0.75, 0.75]   (a w with gradient would give [+0.0625, ...])
    torch.testing.assert_close(v.grad, torch.tensor([[-0.25, 0.25, -0.75, 0.75]]))
    assert v_old.grad is None  # the old snapshot is a constant


def test_implicit_reward_clamps_w():
    # a perfect fit has w = 0 -> clamped to 1e-5: finite, and the fit term is 0
    imp = implicit_reward(U.clone(), V_OLD, U)
    assert torch.isfinite(imp).all()
    torch.testing.assert_close(imp, torch.tensor([4.0 / 2.0]))


# Two prompts with ids 3 and 8, beta = 0.5:
#   l = [1, 3, 10, 14] -> group means 2, 12 -> l_c = [-1, 1, -2, 2], beta l_c = [-0.5, 0.5, -1, 1]
#   a = [0.2, 0.6, 0.5, 0.5] -> group means 0.4, 0.5 -> a_c = [-0.2, 0.2, 0, 0]
#   residual = beta l_c - a_c = [-0.3, 0.3, -1, 1]
#   L = (1 / 0.5) * (0.09 + 0.09 + 1 + 1) / 4 = 2 * 0.545 = 1.09
L_VALS = [1.0, 3.0, 10.0, 14.0]
A_VALS = [0.2, 0.6, 0.5, 0.5]
IDS = torch.tensor([3, 3, 8, 8])


def test_crd_loss_by_hand_and_gradient():
    imp = torch.tensor(L_VALS, requires_grad=True)
    loss, stats = crd_loss(imp, torch.tensor(A_VALS), IDS, beta=0.5)
    assert loss.item() == pytest.approx(1.09)
    assert stats["loss"] == pytest.approx(1.09)
    loss.backward()
    # dL/dl_i = (1 / beta) * 2 * residual_i * beta / N = residual_i / 2
    torch.testing.assert_close(imp.grad, torch.tensor([-0.15, 0.15, -0.5, 0.5]))


def test_centering_is_per_prompt_not_per_batch():
    # the two prompts have very different mean l (2 vs 12): centering over the batch
    # (all in one group) would see a residual of the group means and give a larger loss
    imp, a = torch.tensor(L_VALS), torch.tensor(A_VALS)
    per_prompt, _ = crd_loss(imp, a, IDS, beta=0.5)
    per_batch, _ = crd_loss(imp, a, torch.zeros(4, dtype=torch.long), beta=0.5)
    # batch: mean l = 7 -> beta l_c = [-3, -2, 1.5, 3.5]; mean a = 0.45 -> a_c = [-.25, .15, .05, .05]
    #   residual = [-2.75, -2.15, 1.45, 3.45] -> sum sq = 7.5625 + 4.6225 + 2.1025 + 11.9025 = 26.19
    #   L = 2 * 26.19 / 4 = 13.095
    assert per_batch.item() == pytest.approx(13.095)
    assert per_prompt.item() == pytest.approx(1.09)


def test_invariant_to_per_prompt_constants():
    imp, a = torch.tensor(L_VALS), torch.tensor(A_VALS)
    ref, _ = crd_loss(imp, a, IDS, beta=0.5)
    shift_l = torch.tensor([100.0, 100.0, -7.0, -7.0])  # log Z(c) per prompt
    shift_a = torch.tensor([0.3, 0.3, -0.2, -0.2])
    moved, _ = crd_loss(imp + shift_l, a + shift_a, IDS, beta=0.5)
    assert moved.item() == pytest.approx(ref.item(), rel=1e-5)
    # a constant that differs inside a prompt does change the loss
    broken, _ = crd_loss(imp + torch.tensor([1.0, 0.0, 0.0, 0.0]), a, IDS, beta=0.5)
    assert broken.item() != pytest.approx(ref.item(), rel=1e-3)


def test_interleaved_ids_and_singletons():
    # same batch, rows interleaved: the loss is a mean over images, order does not matter
    perm = torch.tensor([2, 0, 3, 1])
    imp, a = torch.tensor(L_VALS), torch.tensor(A_VALS)
    loss, _ = crd_loss(imp[perm], a[perm], IDS[perm], beta=0.5)
    assert loss.item() == pytest.approx(1.09)
    # a one-image prompt centers to zero: it adds nothing but counts in the mean
    # (0.09 + 0.09 + 1 + 1 + 0) / 5 * 2 = 0.872
    loss5, _ = crd_loss(
        torch.cat([imp, torch.tensor([42.0])]),
        torch.cat([a, torch.tensor([0.9])]),
        torch.tensor([3, 3, 8, 8, 99]),
        beta=0.5,
    )
    assert loss5.item() == pytest.approx(0.872)


def test_crd_kl_strength_interpolates():
    # gap^2 = mean((2 - 0)^2) = 4 for both images; beta_kl = 0.1 -> m = 1e-4 / 0.1 = 1e-3
    # a = [0, 1] -> c = [m, 1] = [0.001, 1]; L = 0.1 * (0.001 * 4 + 1 * 4) / 2 = 0.2002
    v = torch.full((2, 1, 2, 2), 2.0, requires_grad=True)
    base = torch.zeros(2, 1, 2, 2, requires_grad=True)
    loss, stats = crd_kl(v, base, torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(0.2002)
    assert stats["kl_strength_mean"] == pytest.approx(0.5005)
    assert stats["kl"] == pytest.approx(4.0)
    loss.backward()
    assert base.grad is None
    # per-image gradient scales with c: ratio of the two images' grads = 1e-3
    assert (v.grad[0] / v.grad[1]).flatten().tolist() == pytest.approx([1e-3] * 4)
    # explicit m: a = 0.5 -> c = 0.5 + 0.5 * 0.5 = 0.75; L = 0.1 * 0.75 * 4 = 0.3
    loss_m, _ = crd_kl(v[:1], base[:1], torch.tensor([0.5]), m=0.5)
    assert loss_m.item() == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("step", "sampler", "old"),
    [
        (0, 0.0, 0.25),
        (74, 0.0, 0.62),  # 0.25 + 0.005 * 74
        (75, 0.0, 0.625),
        (76, 0.0075, 0.63),
        (100, 0.1875, 0.75),  # 0.0075 * 25
        (150, 0.5625, 0.999),  # old: 0.25 + 0.75 = 1.0 -> capped
        (208, 0.9975, 0.999),  # 0.0075 * 133
        (209, 0.999, 0.999),  # 0.0075 * 134 = 1.005 -> capped
        (10_000, 0.999, 0.999),
    ],
)
def test_ema_decays_published_schedule(step, sampler, old):
    d = ema_decays(step)
    assert d.sampler == pytest.approx(sampler)
    assert d.old == pytest.approx(old)


def test_bad_inputs():
    with pytest.raises(ValueError, match="normalize"):
        implicit_reward(V_THETA, V_OLD, U, normalize="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        crd_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0, 0]), beta=0.0)
    with pytest.raises(ValueError, match="step"):
        ema_decays(-1)
