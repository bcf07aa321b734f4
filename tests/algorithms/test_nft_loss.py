"""DiffusionNFT: implicit velocities, optimality probability, loss by hand, gradient signs."""

from __future__ import annotations

import pytest
import torch

from flowopd.algorithms.advantages import crd_targets
from flowopd.algorithms.crd import ema_decays
from flowopd.algorithms.nft import implicit_velocities, nft_loss, old_decay, optimality_probability

# Two images of two elements, beta = 0.5:
#   image 1: v_old = [0, 0], v_theta = [2, 0], u = [1, 1], r = 1
#       v+ = 0.5 * 0 + 0.5 * [2, 0] = [1, 0]        d+ = v+ - u = [0, -1]
#       v- = 1.5 * 0 - 0.5 * [2, 0] = [-1, 0]       d- = v- - u = [-2, -1]
#   image 2: v_old = [1, 1], v_theta = [1, 3], u = [0, 0], r = 0.25
#       v+ = 0.5 * [1, 1] + 0.5 * [1, 3] = [1, 2]   d+ = [1, 2]
#       v- = 1.5 * [1, 1] - 0.5 * [1, 3] = [1, 0]   d- = [1, 0]
BETA = 0.5
V_OLD = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
V_THETA = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
U = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
R = torch.tensor([1.0, 0.25])
SIGMA = torch.tensor([0.5, 1.0])
PAPER = {"normalize": "plain", "scale": 1.0, "divide_by_beta": False}


def test_implicit_velocities_by_hand():
    v = V_THETA.clone().requires_grad_(True)
    v_old = V_OLD.clone().requires_grad_(True)
    v_pos, v_neg = implicit_velocities(v, v_old, BETA)
    torch.testing.assert_close(v_pos, torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    torch.testing.assert_close(v_neg, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    # mirror images about v_old: v+ + v- = 2 v_old
    torch.testing.assert_close(v_pos + v_neg, 2 * V_OLD)
    (v_pos.sum() + 2 * v_neg.sum()).backward()
    # d/dv_theta: beta from v+, -beta from v-: 0.5 - 2 * 0.5 = -0.5 everywhere
    torch.testing.assert_close(v.grad, torch.full((2, 2), -0.5))
    assert v_old.grad is None  # the old snapshot is a constant


def test_optimality_probability():
    # r = clip(A, -5, 5) / 10 + 0.5
    adv = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 7.0])
    r = optimality_probability(adv)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(r, crd_targets(adv))  # the same map as CRD's targets
    # c = 1: 0.5 / 2 + 0.5 = 0.75
    assert optimality_probability(torch.tensor([0.5]), clip=1.0).item() == pytest.approx(0.75)


def test_paper_form_by_hand():
    # plain errors e = mean (v - u)^2:
    #   image 1: e+ = (0 + 1) / 2 = 0.5, e- = (4 + 1) / 2 = 2.5; r = 1    -> term 0.5
    #   image 2: e+ = (1 + 4) / 2 = 2.5, e- = (1 + 0) / 2 = 0.5; r = 0.25 -> 0.625 + 0.375 = 1
    #   L = (0.5 + 1) / 2 = 0.75
    v = V_THETA.clone().requires_grad_(True)
    loss, stats = nft_loss(v, V_OLD, U, R, beta=BETA, **PAPER)
    assert loss.item() == pytest.approx(0.75)
    assert stats["policy_loss"] == pytest.approx(0.75)
    assert stats["positive_loss"] == pytest.approx(1.5)  # (0.5 + 2.5) / 2
    assert stats["negative_loss"] == pytest.approx(1.5)  # (2.5 + 0.5) / 2
    assert stats["optimality_mean"] == pytest.approx(0.625)
    assert stats["old_deviation"] == pytest.approx(2.0)  # (4 + 0 + 0 + 4) / 4
    loss.backward()
    # dL/dv_theta_i = (1 / B) * (2 / D) * beta * [ r d+ - (1 - r) d- ],  B = D = 2 -> 0.25 [...]
    #   image 1: 0.25 * [0, -1]                              = [0, -0.25]
    #   image 2: 0.25 * (0.25 [1, 2] - 0.75 [1, 0]) = 0.25 [-0.5, 0.5] = [-0.125, 0.125]
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -0.25], [-0.125, 0.125]]))
    # the code's factor scale / beta = 5 / 0.5 = 10 on the same errors
    loss10, _ = nft_loss(V_THETA, V_OLD, U, R, beta=BETA, normalize="plain")
    assert loss10.item() == pytest.approx(7.5)


def test_adaptive_default_by_hand():
    # x0-space errors t d, self-normalised: e = t mean(d^2) / mean|d|, t = [0.5, 1]
    #   image 1 (t 0.5): e+ = 0.5 * 0.5 / 0.5 = 0.5;   e- = 0.5 * 2.5 / 1.5 = 5/6;  term 0.5
    #   image 2 (t 1):   e+ = 2.5 / 1.5 = 5/3;         e- = 0.5 / 0.5 = 1
    #                    term = 0.25 * 5/3 + 0.75 * 1 = 5/12 + 9/12 = 7/6
    #   L = (5 / 0.5) * (0.5 + 7/6) / 2 = 10 * 5/6 = 25/3
    v = V_THETA.clone().requires_grad_(True)
    loss, stats = nft_loss(v, V_OLD, U, R, SIGMA, beta=BETA)
    assert loss.item() == pytest.approx(25 / 3)
    assert stats["positive_loss"] == pytest.approx((0.5 + 5 / 3) / 2)
    assert stats["negative_loss"] == pytest.approx((5 / 6 + 1) / 2)
    loss.backward()
    # normalisers held fixed: de/dv = 2 t^2 d / (D w), w = t mean|d|; dv+-/dv_theta = +-beta
    #   image 1: w+ = 0.25 -> de+/dv+ = 2 * 0.25 d+ / (2 * 0.25) = d+ = [0, -1]
    #            dL/dv = 10 / 2 * 1 * 0.5 * [0, -1] = [0, -2.5]
    #   image 2: w+ = 1.5 -> de+/dv+ = d+ / 1.5 = [2/3, 4/3];  w- = 0.5 -> de-/dv- = 2 d- = [2, 0]
    #            dL/dv = 5 * (0.25 * 0.5 [2/3, 4/3] - 0.75 * 0.5 [2, 0]) = 5 [-2/3, 1/6]
    expected = torch.tensor([[0.0, -2.5], [-10 / 3, 5 / 6]])
    torch.testing.assert_close(v.grad, expected)  # a w with gradient would differ


def _adaptive_fm(v: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-image self-normalised x0-space FM error, normaliser detached: (B,)."""
    err = t.view(-1, 1, 1, 1) * (v - u)
    w = err.detach().abs().mean(dim=(1, 2, 3))
    return (err**2).mean(dim=(1, 2, 3)) / w


def test_first_step_is_advantage_weighted_flow_matching():
    # v_theta == v_old: v+ = v- = v_old, so the loss is (5 / beta) mean_i e_i whatever r,
    # and dL/dv_i = (5 / beta) (r - (1 - r)) beta de_i / B = 5 (2r - 1) de_i / B
    #             = clip(A_i, -5, 5) de_i / B     (as 5 (2r - 1) = clip(A, -5, 5))
    g = torch.Generator().manual_seed(0)
    v_old = torch.randn(3, 2, 2, 2, generator=g)
    u = torch.randn(3, 2, 2, 2, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    adv = torch.tensor([7.0, -1.5, 0.4])  # clip -> [5, -1.5, 0.4]
    for beta in (1.0, 0.1):
        v = v_old.clone().requires_grad_(True)
        loss, stats = nft_loss(v, v_old, u, optimality_probability(adv), t, beta=beta)
        loss.backward()
        ref = v_old.clone().requires_grad_(True)
        fm = _adaptive_fm(ref, u, t)
        assert loss.item() == pytest.approx(5 / beta * fm.mean().item(), rel=1e-5)
        (torch.tensor([5.0, -1.5, 0.4]) * fm).mean().backward()
        torch.testing.assert_close(v.grad, ref.grad)
        assert stats["old_deviation"] == 0.0
    # the paper's form: beta (2r - 1) times the plain FM gradient, r = [1, 0.35, 0.54]
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, u, optimality_probability(adv), beta=0.5, **PAPER)[0].backward()
    ref = v_old.clone().requires_grad_(True)
    fm = ((ref - u) ** 2).mean(dim=(1, 2, 3))
    (0.5 * torch.tensor([1.0, -0.3, 0.08]) * fm).mean().backward()
    torch.testing.assert_close(v.grad, ref.grad)


@pytest.mark.parametrize(("adv", "closer"), [(5.0, True), (-5.0, False)])
def test_one_step_moves_toward_or_away_from_the_target(adv, closer):
    # one image, first step (v_theta = v_old), r = 1 or 0: one SGD step on v_theta
    g = torch.Generator().manual_seed(1)
    v_old = torch.randn(1, 4, 2, 2, generator=g)
    u = torch.randn(1, 4, 2, 2, generator=g)
    v = v_old.clone().requires_grad_(True)
    r = optimality_probability(torch.tensor([adv]))
    loss, _ = nft_loss(v, v_old, u, r, 0.6)
    loss.backward()
    before = (v - u).norm().item()
    after = (v.detach() - 0.01 * v.grad - u).norm().item()
    assert (after < before) == closer
    assert abs(after - before) > 1e-4
    # r = 1/2 (A = 0): no push either way
    v0 = v_old.clone().requires_grad_(True)
    nft_loss(v0, v_old, u, torch.tensor([0.5]), 0.6)[0].backward()
    assert v0.grad.abs().max().item() == 0.0


def test_per_sample_minimiser():
    # plain loss: stationary at v_theta* = v_old + (2r - 1)(u - v_old) / beta
    #   r = 0.8, beta = 0.5: v* = [1, -1] + 0.6 [2, 4] / 0.5 = [1, -1] + [2.4, 4.8] = [3.4, 3.8]
    v_old = torch.tensor([[1.0, -1.0]])
    u = torch.tensor([[3.0, 3.0]])
    v = torch.tensor([[3.4, 3.8]], requires_grad=True)
    nft_loss(v, v_old, u, torch.tensor([0.8]), beta=0.5, **PAPER)[0].backward()
    torch.testing.assert_close(v.grad, torch.zeros(1, 2))
    # there v+ overshoots u: v+ = 0.5 [1, -1] + 0.5 [3.4, 3.8] = [2.2, 1.4] != u; with r = 1
    # and beta = 1 the minimiser is u itself (v+ = v_theta)
    v1 = u.clone().requires_grad_(True)
    nft_loss(v1, v_old, u, torch.tensor([1.0]), beta=1.0, **PAPER)[0].backward()
    torch.testing.assert_close(v1.grad, torch.zeros(1, 2))


def test_kl_term():
    kl = torch.tensor([2.0, 4.0], requires_grad=True)
    base, _ = nft_loss(V_THETA, V_OLD, U, R, beta=BETA, **PAPER)
    loss, stats = nft_loss(V_THETA, V_OLD, U, R, beta=BETA, kl=kl, kl_beta=1e-4, **PAPER)
    # 0.75 + 1e-4 * (2 + 4) / 2 = 0.7503
    assert loss.item() == pytest.approx(0.7503)
    assert base.item() == pytest.approx(0.75)
    assert stats["kl"] == pytest.approx(3.0)
    assert stats["policy_loss"] == pytest.approx(0.75)
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.tensor([5e-5, 5e-5]))  # kl_beta / B
    # kl_beta = 0: logged only
    loss0, stats0 = nft_loss(V_THETA, V_OLD, U, R, beta=BETA, kl=kl, **PAPER)
    assert loss0.item() == pytest.approx(0.75) and stats0["kl"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="kl"):
        nft_loss(V_THETA, V_OLD, U, R, beta=BETA, kl_beta=1e-4, **PAPER)
    with pytest.raises(ValueError, match="kl"):
        nft_loss(V_THETA, V_OLD, U, R, beta=BETA, kl=kl[:1], kl_beta=1e-4, **PAPER)


def test_adaptive_clamps_a_perfect_fit():
    # v+ == u (beta = 1, v_theta = u): the normaliser 0 is clamped to 1e-5, error stays 0
    loss, stats = nft_loss(U, V_OLD, U, torch.tensor([1.0, 1.0]), SIGMA)
    assert torch.isfinite(loss)
    assert stats["positive_loss"] == 0.0 and loss.item() == 0.0


@pytest.mark.parametrize(
    ("step", "default", "ocr"),
    [
        (0, 0.0, 0.0),
        (74, 0.074, 0.0),
        (76, 0.076, 0.0075),
        (100, 0.1, 0.1875),  # 0.0075 * 25
        (500, 0.5, 0.999),
        (5000, 0.5, 0.999),
    ],
)
def test_old_decay_published_schedules(step, default, ocr):
    assert old_decay(step) == pytest.approx(default)
    got = old_decay(step, warmup=75, rate=0.0075, max_decay=0.999)
    assert got == pytest.approx(ocr)
    assert got == pytest.approx(ema_decays(step).sampler)  # CRD's sampler schedule


def test_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        nft_loss(V_THETA, V_OLD, U, R, SIGMA, beta=0.0)
    with pytest.raises(ValueError, match="normalize"):
        nft_loss(V_THETA, V_OLD, U, R, SIGMA, normalize="x0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        nft_loss(V_THETA, V_OLD[:1], U, R, SIGMA)
    with pytest.raises(ValueError, match="r must have shape"):
        nft_loss(V_THETA, V_OLD, U, R[:, None], SIGMA)  # (B, 1) would broadcast to (B, B)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nft_loss(V_THETA, V_OLD, U, torch.tensor([2.0, -1.0]), SIGMA)  # raw advantages
    with pytest.raises(ValueError, match="sigma"):
        nft_loss(V_THETA, V_OLD, U, R)
    with pytest.raises(ValueError, match="sigma"):
        nft_loss(V_THETA, V_OLD, U, R, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="clip"):
        optimality_probability(torch.zeros(2), clip=0.0)
    with pytest.raises(ValueError, match="step"):
        old_decay(-1)
