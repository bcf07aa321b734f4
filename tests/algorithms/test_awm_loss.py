"""AWM: log-likelihood weightings, advantage-weighted loss by hand, gradient signs, KLs."""

from __future__ import annotations

import math

import pytest
import torch

from flowopd.algorithms.awm import awm_log_prob, awm_loss, ema_kl_decay, velocity_kl

# Two images of two elements:
#   image 1: v = [1, 3], u = [0, 1] -> d = v - u = [1, 2],  mse = (1 + 4) / 2 = 2.5, t = 0.5
#   image 2: v = [0, 2], u = [1, 1] -> d = [-1, 1],         mse = (1 + 1) / 2 = 1,   t = 1
V = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
U = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
T = torch.tensor([0.5, 1.0])


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        ("uniform", [-2.5, -1.0]),
        ("t", [-1.25, -1.0]),  # -t mse
        ("t2", [-0.625, -1.0]),  # -t^2 mse
        # -t (sqrt(mse + 1e-10) - 1e-5): -0.5 (1.5811388 - 1e-5), -(1 - 1e-5)
        ("huber", [-0.7905644, -0.99999]),
        # -t ((mse + 1e-10)^0.25 - 1e-2.5) / 0.25: -2 (1.2574334 - 0.0031623), -4 (1 - 0.0031623)
        ("ghuber", [-2.5085423, -3.9873509]),
    ],
)
def test_log_prob_weightings_by_hand(weighting, expected):
    got = awm_log_prob(V, U, T, weighting=weighting)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_on_policy_loss_and_gradient_by_hand():
    # A = [2.5, -10] -> clip(., -5, 5) = [2.5, -5] -> / 5 * 1 = A' = [0.5, -1]
    # on policy rho = 1: L = mean(-A') = (-0.5 + 1) / 2 = 0.25, whatever the errors
    v = V.clone().requires_grad_(True)
    log_prob = awm_log_prob(v, U, weighting="uniform")
    loss, stats = awm_loss(log_prob, torch.tensor([2.5, -10.0]))
    assert loss.item() == pytest.approx(0.25)
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0
    assert stats["log_prob_mean"] == pytest.approx(-1.75)  # -(2.5 + 1) / 2
    assert stats["kl"] == 0.0 and stats["ema_kl"] == 0.0
    loss.backward()
    # dL/dlogp_i = -A'_i / B = [-0.25, 0.5];  dlogp_i/dv_i = -2 d_i / D = -d_i
    #   image 1: -0.25 * -[1, 2] = [0.25, 0.5]     (descent: towards u, A > 0)
    #   image 2:  0.5 * -[-1, 1] = [0.5, -0.5]     (descent: away from u, A < 0)
    torch.testing.assert_close(v.grad, torch.tensor([[0.25, 0.5], [0.5, -0.5]]))


def test_ghuber_gradient_weight():
    # image 1 alone, A = 5 -> A' = 1: dL/dv = -1 * dlogp/dv = t (mse + d)^(p - 1) * 2 d / D
    #   = 0.5 * 2.5^-0.75 * [1, 2] = 0.2514867 * [1, 2]
    v = V[:1].clone().requires_grad_(True)
    awm_loss(awm_log_prob(v, U[:1], 0.5), torch.tensor([5.0]))[0].backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.2514867, 0.5029734]]))


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "huber", "ghuber"])
@pytest.mark.parametrize(("adv", "closer"), [(1.0, True), (-1.0, False)])
def test_one_step_moves_toward_or_away_from_the_target(weighting, adv, closer):
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(1, 4, 2, 2, generator=g)
    u = torch.randn(1, 4, 2, 2, generator=g)
    v = v0.clone().requires_grad_(True)
    awm_loss(awm_log_prob(v, u, 0.7, weighting=weighting), torch.tensor([adv]))[0].backward()
    before = (v0 - u).norm().item()
    after = (v0 - 0.01 * v.grad - u).norm().item()
    assert (after < before) == closer
    assert abs(after - before) > 1e-5
    # A = 0: no push either way
    v_zero = v0.clone().requires_grad_(True)
    awm_loss(awm_log_prob(v_zero, u, 0.7, weighting=weighting), torch.zeros(1))[0].backward()
    assert v_zero.grad.abs().max().item() == 0.0


def test_gradient_is_advantage_weighted_flow_matching():
    # uniform weighting, on policy: grad L = grad mean_i A'_i mse_i
    g = torch.Generator().manual_seed(2)
    v0, u = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    adv = torch.tensor([6.0, 1.0, -2.0, -0.5])  # A' = [1, 0.2, -0.4, -0.1]
    v = v0.clone().requires_grad_(True)
    awm_loss(awm_log_prob(v, u, weighting="uniform"), adv)[0].backward()
    ref = v0.clone().requires_grad_(True)
    a = torch.tensor([1.0, 0.2, -0.4, -0.1])
    (a * ((ref - u) ** 2).mean(dim=(1, 2, 3))).mean().backward()
    torch.testing.assert_close(v.grad, ref.grad)


def test_off_policy_ratio_and_clip():
    # A' = [0.5, -1]; old log-probs make rho = [1.5, 0.5]
    lp = torch.tensor([-2.5, -1.0], requires_grad=True)
    old = lp.detach() - torch.tensor([math.log(1.5), math.log(0.5)])
    adv = torch.tensor([2.5, -5.0])
    # clip 0.2: -A' rho = [-0.75, 0.5], -A' clip(rho, 0.8, 1.2) = [-0.6, 0.8]
    #   max = [-0.6, 0.8] -> L = 0.1, both on the clipped branch: no gradient
    loss, stats = awm_loss(lp, adv, old, clip_range=0.2)
    assert loss.item() == pytest.approx(0.1)
    assert stats["clip_fraction"] == 1.0 and stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.zeros(2))
    # the published clip 1: rho in [0, 2] is never clipped: L = (-0.75 + 0.5) / 2 = -0.125
    lp.grad = None
    loss1, stats1 = awm_loss(lp, adv, old)
    assert loss1.item() == pytest.approx(-0.125) and stats1["clip_fraction"] == 0.0
    loss1.backward()
    # dL/dlogp = -A' rho / B = [-0.5 * 1.5, 1 * 0.5] / 2 = [-0.375, 0.25]
    torch.testing.assert_close(lp.grad, torch.tensor([-0.375, 0.25]))


def test_advantage_normalisation():
    lp = torch.zeros(2)
    adv = torch.tensor([10.0, -2.5])  # clip 5 -> [5, -2.5]
    # A' = [1, -0.5]: L = -mean = -0.25;  adv_max None: [5, -2.5] -> -1.25;  adv_max 2: -0.5
    assert awm_loss(lp, adv)[0].item() == pytest.approx(-0.25)
    assert awm_loss(lp, adv, adv_max=None)[0].item() == pytest.approx(-1.25)
    assert awm_loss(lp, adv, adv_max=2.0)[0].item() == pytest.approx(-0.5)
    # adv_clip 2: [2, -2] / 2 = [1, -1] -> 0
    assert awm_loss(lp, adv, adv_clip=2.0)[0].item() == pytest.approx(0.0)


def test_velocity_kl_forms():
    # gap 0.1 everywhere -> mean square 0.01
    v = torch.zeros(2, 1, 2, 2, requires_grad=True)
    ref = torch.full((2, 1, 2, 2), 0.1, requires_grad=True)
    torch.testing.assert_close(velocity_kl(v, ref), torch.full((2,), 0.01))
    # elbo, t = [0.5, 0.995]: s^2 = 0.49 * 0.5 / 0.5 = 0.49 -> 0.01 / 0.98 = 0.0102041
    #   t = 0.995 -> 1 - min(t, 0.99) = 0.01: s^2 = 0.49 * 0.995 / 0.01 = 48.755
    #   -> 0.01 / 97.51 = 1.025536e-4
    got = velocity_kl(v, ref, torch.tensor([0.5, 0.995]), weighting="elbo")
    torch.testing.assert_close(got, torch.tensor([0.0102041, 1.025536e-4]))
    velocity_kl(v, ref).sum().backward()
    assert ref.grad is None  # the reference is a constant
    torch.testing.assert_close(v.grad, torch.full((2, 1, 2, 2), -0.05))  # 2 * (-0.1) / 4


def test_kl_terms_in_the_loss():
    lp = torch.zeros(2)
    adv = torch.tensor([5.0, -5.0])  # A' = [1, -1]: policy loss 0 on policy
    kl = torch.tensor([1.0, 3.0], requires_grad=True)
    ema_kl = torch.tensor([0.2, 0.4], requires_grad=True)
    # 0 + 1e-3 * 2 + 1 * 0.3 = 0.302
    loss, stats = awm_loss(lp, adv, kl=kl, kl_beta=1e-3, ema_kl=ema_kl, ema_kl_beta=1.0)
    assert loss.item() == pytest.approx(0.302)
    assert stats["kl"] == pytest.approx(2.0) and stats["ema_kl"] == pytest.approx(0.3)
    assert stats["policy_loss"] == pytest.approx(0.0)
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.tensor([5e-4, 5e-4]))
    torch.testing.assert_close(ema_kl.grad, torch.tensor([0.5, 0.5]))
    # the EMA KL works without the reference KL (the public code nests it under kl beta > 0)
    loss_ema, _ = awm_loss(lp, adv, ema_kl=ema_kl, ema_kl_beta=1.0)
    assert loss_ema.item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="ema_kl"):
        awm_loss(lp, adv, ema_kl_beta=1.0)
    with pytest.raises(ValueError, match="kl"):
        awm_loss(lp, adv, kl_beta=1e-3)


@pytest.mark.parametrize(("step", "decay"), [(0, 0.0), (100, 0.1), (300, 0.3), (10_000, 0.3)])
def test_ema_kl_decay_published_schedule(step, decay):
    assert ema_kl_decay(step) == pytest.approx(decay)


def test_bad_inputs():
    with pytest.raises(ValueError, match="weighting"):
        awm_log_prob(V, U, T, weighting="Uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        awm_log_prob(V, U)  # ghuber needs t
    awm_log_prob(V, U, weighting="uniform")  # uniform does not
    with pytest.raises(ValueError, match="sigma"):
        awm_log_prob(V, U, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="ghuber_power"):
        awm_log_prob(V, U, T, ghuber_power=0.0)
    with pytest.raises(ValueError, match="shape"):
        awm_log_prob(V, U[:1], T)
    with pytest.raises(ValueError, match="shape"):
        awm_loss(torch.zeros(2), torch.zeros(2, 1))  # (B, 1) would broadcast to (B, B)
    with pytest.raises(ValueError, match="adv_clip"):
        awm_loss(torch.zeros(2), torch.zeros(2), adv_clip=0.0)
    with pytest.raises(ValueError, match="kl must have shape"):
        awm_loss(torch.zeros(2), torch.zeros(2), kl=torch.zeros(3), kl_beta=1.0)
    with pytest.raises(ValueError, match="sigma"):
        velocity_kl(V, U, weighting="elbo")
    with pytest.raises(ValueError, match="weighting"):
        velocity_kl(V, U, weighting="ELBO")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        ema_kl_decay(-1)
