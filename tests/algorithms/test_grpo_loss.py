"""Flow-GRPO clipped loss and reference KL on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from flowopd.algorithms.grpo import grpo_loss, reference_kl
from flowopd.sde import gaussian_step_kl

# Five samples covering every branch of max(-A rho, -A clip(rho, 0.8, 1.2)), eps = 0.2:
#   rho   A    -A rho   -A clip(rho)   max    branch
#   1.1   2    -2.2     -2.2           -2.2   inside the clip: gradient flows
#   1.5   2    -3.0     -2.4           -2.4   clipped (A > 0, rho too high): no gradient
#   1.5  -1     1.5      1.2            1.5   unclipped (pessimistic): gradient flows
#   0.5   2    -1.0     -1.6           -1.0   unclipped (pessimistic): gradient flows
#   0.5  -1     0.5      0.8            0.8   clipped (A < 0, rho too low): no gradient
# mean = (-2.2 - 2.4 + 1.5 - 1.0 + 0.8) / 5 = -3.3 / 5 = -0.66
RHO = [1.1, 1.5, 1.5, 0.5, 0.5]
ADV = [2.0, 2.0, -1.0, 2.0, -1.0]


def _inputs():
    log_prob = torch.tensor([math.log(r) for r in RHO], requires_grad=True)
    old = torch.zeros(5, requires_grad=True)  # must be treated as data
    return log_prob, old, torch.tensor(ADV)


def test_loss_value_all_branches():
    log_prob, old, adv = _inputs()
    loss, stats = grpo_loss(log_prob, old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.66, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(-0.66, abs=1e-6)
    assert stats["loss"] == pytest.approx(-0.66, abs=1e-6)
    # |rho - 1| > 0.2 for all but the first: 4 / 5
    assert stats["clip_fraction"] == pytest.approx(0.8)
    # (1.1 + 1.5 + 1.5 + 0.5 + 0.5) / 5 = 1.02
    assert stats["ratio_mean"] == pytest.approx(1.02, abs=1e-6)
    # 0.5 * mean(log^2 rho) = 0.5 * (0.0090840 + 2 * 0.1644020 + 2 * 0.4804530) / 5 = 0.1298794
    assert stats["approx_kl"] == pytest.approx(0.1298794, abs=1e-6)
    assert stats["kl"] == 0.0
    assert all(isinstance(v, float) for v in stats.values())


def test_gradient_zero_on_clipped_branches():
    log_prob, old, adv = _inputs()
    loss, _ = grpo_loss(log_prob, old, adv, clip_range=0.2)
    loss.backward()
    # d/dlogp_i of -A_i rho_i / 5 = -A_i rho_i / 5 on unclipped branches, 0 on clipped ones:
    # [-2 * 1.1 / 5, 0, 1 * 1.5 / 5, -2 * 0.5 / 5, 0] = [-0.44, 0, 0.3, -0.2, 0]
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.44, 0.0, 0.3, -0.2, 0.0]))
    assert old.grad is None  # old log-probs are detached


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    # ratio 1 (first inner step): loss = mean(-A) = -(1 - 2 + 4) / 3 = -1
    lp = torch.tensor([-0.3, 0.2, 1.0])
    loss, stats = grpo_loss(lp, lp.clone(), torch.tensor([1.0, -2.0, 4.0]))
    assert loss.item() == pytest.approx(-1.0)
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == 1.0


def test_default_clip_range_is_1e4():
    # log-ratio 2e-4 -> rho - 1 ~ 2e-4 > 1e-4: clipped with the default eps
    lp = torch.full((4,), 2e-4)
    _, stats = grpo_loss(lp, torch.zeros(4), torch.ones(4))
    assert stats["clip_fraction"] == 1.0
    _, stats = grpo_loss(lp, torch.zeros(4), torch.ones(4), clip_range=1e-3)
    assert stats["clip_fraction"] == 0.0


def test_kl_term():
    lp = torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])  # policy loss at rho = 1: mean(-A) = 0
    kl = torch.tensor([1.0, 3.0], requires_grad=True)
    loss, stats = grpo_loss(lp, lp, adv, kl=kl, beta=0.04)
    # 0 + 0.04 * (1 + 3) / 2 = 0.08
    assert loss.item() == pytest.approx(0.08)
    assert stats["kl"] == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.tensor([0.02, 0.02]))  # beta / B
    # beta = 0: KL logged, not in the loss
    loss0, stats0 = grpo_loss(lp, lp, adv, kl=kl, beta=0.0)
    assert loss0.item() == 0.0 and stats0["kl"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="kl"):
        grpo_loss(lp, lp, adv, beta=0.04)


def test_shape_mismatch_is_refused():
    # (B, 1) against (B,) would silently broadcast to (B, B)
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(torch.zeros(3, 1), torch.zeros(3), torch.ones(3))


def test_reference_kl_forms():
    # dmean = 0.1 everywhere, std = 0.5: public form 0.01 / (2 * 0.25) = 0.02,
    # exact form with dt = -0.1: 0.02 / 0.1 = 0.2
    m_theta = torch.zeros(2, 1, 2, 2)
    m_ref = torch.full((2, 1, 2, 2), 0.1)
    torch.testing.assert_close(reference_kl(m_theta, m_ref, 0.5), torch.full((2,), 0.02))
    torch.testing.assert_close(
        reference_kl(m_theta, m_ref, 0.5, -0.1, exact=True), torch.full((2,), 0.2)
    )
    # dt is ignored by the (default) public form
    torch.testing.assert_close(reference_kl(m_theta, m_ref, 0.5, -0.1), torch.full((2,), 0.02))
    with pytest.raises(ValueError, match="dt"):
        reference_kl(m_theta, m_ref, 0.5, exact=True)


def test_reference_kl_wraps_gaussian_step_kl_with_per_sample_std():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    std, dt = torch.tensor([0.3, 0.5, 0.9]), torch.tensor([-0.1, -0.05, -0.2])
    torch.testing.assert_close(
        reference_kl(a, b, std, dt, exact=True), gaussian_step_kl(a, b, std, dt)
    )
    torch.testing.assert_close(reference_kl(a, b, std), gaussian_step_kl(a, b, std))
