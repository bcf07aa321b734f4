"""Flow-OPD: step KL against the SDE's Gaussian KL, the three loss modes, MAR."""

from __future__ import annotations

import math

import pytest
import torch

from flowopd.algorithms.opd import mar_loss, opd_loss, step_kl
from flowopd.sde import gaussian_step_kl, opd_weight, sde_step, timesteps

V_S = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)


def test_step_kl_by_hand():
    # mean((v_s - 0)^2) = (1 + 4 + 9 + 16) / 4 = 7.5; weight 0.2 -> 1.5
    kl = step_kl(V_S, torch.zeros_like(V_S), 0.2)
    torch.testing.assert_close(kl, torch.tensor([1.5]))
    # per-sample weights (B,): [0.2, 1.0] on two copies -> [1.5, 7.5]
    kl2 = step_kl(V_S.repeat(2, 1, 1, 1), torch.zeros(2, 1, 2, 2), torch.tensor([0.2, 1.0]))
    torch.testing.assert_close(kl2, torch.tensor([1.5, 7.5]))


def test_step_kl_detaches_teacher():
    v_s = V_S.clone().requires_grad_(True)
    v_t = torch.zeros_like(V_S, requires_grad=True)
    step_kl(v_s, v_t, 1.0).sum().backward()
    assert v_t.grad is None
    torch.testing.assert_close(v_s.grad, 2 * V_S / 4)  # d mean(v^2) / dv = 2 v / n


@pytest.mark.parametrize("i", [0, 2, 8])  # i = 0 is the sigma == 1 special case
def test_step_kl_with_opd_weight_equals_exact_gaussian_kl_of_sde_steps(i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(3, 4, 8, 8, generator=g)
    v_s, v_t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    sig = timesteps(10, 3.0)
    s, s_next, a, s_max = sig[i].item(), sig[i + 1].item(), 0.7, sig[1].item()
    out_s = sde_step(v_s, x, s, s_next, a, sigma_max=s_max, noise=noise)
    out_t = sde_step(v_t, x, s, s_next, a, sigma_max=s_max, noise=noise)
    exact = gaussian_step_kl(out_s.mean, out_t.mean, out_s.std, dt=s_next - s)
    ours = step_kl(v_s, v_t, opd_weight(s, s_next, a, s_max))
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=0)


def test_step_kl_per_sample_sigmas():
    # one sample per step of the schedule, (B,) sigmas through both paths
    g = torch.Generator().manual_seed(1)
    sig = timesteps(10, 3.0)
    s, s_next = sig[:9], sig[1:10]
    x, v_s, v_t = (torch.randn(9, 2, 4, 4, generator=g) for _ in range(3))
    out_s = sde_step(v_s, x, s, s_next, 0.7, sigma_max=sig[1].item())
    out_t = sde_step(v_t, x, s, s_next, 0.7, sigma_max=sig[1].item(), prev_sample=out_s.prev_sample)
    exact = gaussian_step_kl(out_s.mean, out_t.mean, out_s.std, dt=s_next - s)
    ours = step_kl(v_s, v_t, opd_weight(s, s_next, 0.7, sig[1].item()))
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=0)


def _graph(log_ratio: float = 0.0):
    """log_prob depends on p only, kl on q only: who gets a gradient shows what flows where.

    p = 0, log_prob = p * [1, 1] -> 0; old_log_prob = -log_ratio -> rho = exp(log_ratio)
    q = 0.5, kl = q^2 * [1, 2] = [0.25, 0.5], dkl/dq = 2 q [1, 2] = [1, 2]
    """
    p = torch.tensor(0.0, requires_grad=True)
    q = torch.tensor(0.5, requires_grad=True)
    log_prob = p * torch.ones(2)
    old = torch.full((2,), -log_ratio)
    kl = q**2 * torch.tensor([1.0, 2.0])
    return p, q, log_prob, old, kl


def test_ppo_gradient_flows_only_through_the_ratio():
    p, q, lp, old, kl = _graph()
    loss, stats = opd_loss(lp, old, kl, mode="ppo")
    # rho = 1: loss = mean(KL * rho) = (0.25 + 0.5) / 2 = 0.375
    assert loss.item() == pytest.approx(0.375)
    loss.backward()
    assert q.grad is None or q.grad.item() == 0.0
    # d/dp mean(KL rho) = mean(KL * rho * dlogp/dp) = (0.25 + 0.5) / 2 = 0.375
    assert p.grad.item() == pytest.approx(0.375)
    assert stats["kl"] == pytest.approx(0.375) and stats["reward"] == pytest.approx(-0.375)


def test_ppo_attached_regresses_kl_plus_ratio_term():
    p, q, lp, old, kl = _graph()
    loss, _ = opd_loss(lp, old, kl, mode="ppo_attached")
    assert loss.item() == pytest.approx(0.375)  # same value as ppo at rho = 1
    loss.backward()
    # gradient of KL * rho through A: mean(dkl/dq) * rho = (1 + 2) / 2 = 1.5
    assert q.grad.item() == pytest.approx(1.5)
    assert p.grad.item() == pytest.approx(0.375)  # plus the same ratio term as ppo


def test_gkd_is_pure_kl_regression():
    p, q, lp, old, kl = _graph()
    loss, stats = opd_loss(lp, old, kl, mode="gkd")
    assert loss.item() == pytest.approx(0.375)
    loss.backward()
    assert q.grad.item() == pytest.approx(1.5)
    assert p.grad is None  # no ratio
    assert "ratio_mean" not in stats
    loss_none, _ = opd_loss(None, None, kl.detach(), mode="gkd")  # log-probs not needed
    assert loss_none.item() == pytest.approx(0.375)


def test_below_clip_ppo_has_no_gradient_attached_keeps_the_regression():
    # rho = exp(-0.1) = 0.905 < 1 - 0.01: max(KL rho, KL (1 - eps)) picks KL * 0.99
    for mode, q_grad in (("ppo", 0.0), ("ppo_attached", 0.99 * 1.5)):
        p, q, lp, old, kl = _graph(log_ratio=-0.1)
        loss, stats = opd_loss(lp, old, kl, mode=mode, clip_range=0.01)
        # value: 0.99 * 0.375 = 0.37125
        assert loss.item() == pytest.approx(0.37125)
        assert stats["clip_fraction"] == 1.0
        loss.backward()
        assert p.grad.item() == 0.0  # the ratio gradient is clipped away in both modes
        assert (q.grad.item() if q.grad is not None else 0.0) == pytest.approx(q_grad)


def test_advantage_clip():
    # KL = [1, 7]: A = clip(-KL, -5, 5) = [-1, -5]; at rho = 1 the PPO loss is
    # mean(-A) = (1 + 5) / 2 = 3, gkd is unclipped: (1 + 7) / 2 = 4
    lp = torch.zeros(2)
    kl = torch.tensor([1.0, 7.0])
    for mode in ("ppo", "ppo_attached"):
        loss, stats = opd_loss(lp, lp, kl, mode=mode)
        assert loss.item() == pytest.approx(3.0)
        assert stats["kl_clip_fraction"] == 0.5
    assert opd_loss(lp, lp, kl, mode="gkd")[0].item() == pytest.approx(4.0)
    assert opd_loss(lp, lp, kl, mode="ppo", adv_clip=None)[0].item() == pytest.approx(4.0)


def test_attached_gets_no_regression_gradient_beyond_the_clip():
    # KL = q^2 * 24 = 6 > 5: the clamp's gradient is 0, only the ratio term remains
    q = torch.tensor(0.5, requires_grad=True)
    p = torch.tensor(0.0, requires_grad=True)
    loss, _ = opd_loss(
        p * torch.ones(1), torch.zeros(1), q**2 * torch.tensor([24.0]), mode="ppo_attached"
    )
    loss.backward()
    assert q.grad.item() == 0.0
    assert p.grad.item() == pytest.approx(5.0)  # -A rho with A = -5


def test_unknown_mode_and_missing_log_probs():
    with pytest.raises(ValueError, match="ppo, ppo_attached, gkd"):
        opd_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), mode="reinforce")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_prob"):
        opd_loss(None, None, torch.zeros(1), mode="ppo")


def test_mar_loss_by_hand():
    # lam * mean(w * mean((v_s - v_anchor)^2)) = 0.04 * 0.2 * 7.5 = 0.06
    v_s = V_S.clone().requires_grad_(True)
    anchor = torch.zeros_like(V_S, requires_grad=True)
    loss, stats = mar_loss(v_s, anchor, 0.2, 0.04)
    assert loss.item() == pytest.approx(0.06)
    assert stats["mar_kl"] == pytest.approx(1.5) and stats["mar_loss"] == pytest.approx(0.06)
    loss.backward()
    assert anchor.grad is None  # the anchor is frozen
    assert math.isclose(v_s.grad.abs().sum().item(), 0.04 * 0.2 * 2 * 10 / 4, rel_tol=1e-6)
