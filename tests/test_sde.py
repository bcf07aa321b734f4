"""Analytic tests of the flow-matching SDE math (METHODS.md §1, §3)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowopd import sde


@pytest.mark.parametrize("n", [1, 10, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_timesteps_match_diffusers(n, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ours = sde.timesteps(n, shift)
    assert ours.shape == (n + 1,)
    assert ours[0] == 1.0 and ours[-1] == 0.0
    torch.testing.assert_close(ours, sched.sigmas, atol=0, rtol=0)


def test_timesteps_hand_values():
    # shift 1, 1 step: [1, 0]. shift 3 at s = 0.5: 3*0.5 / (1 + 2*0.5) = 0.75
    assert sde.timesteps(1, 1.0).tolist() == [1.0, 0.0]
    assert sde.shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def _xv(b=3, shape=(2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)


def test_ode_step_is_euler():
    x, v = _xv()
    # x' = x + v * (0.6 - 0.8) = x - 0.2 v
    torch.testing.assert_close(sde.ode_step(v, x, 0.8, 0.6), x - 0.2 * v)


@pytest.mark.parametrize("step", [sde.sde_step, sde.cps_step])
def test_noise_level_zero_is_ode(step):
    x, v = _xv()
    out = step(v, x, 0.7, 0.5, 0.0, sigma_max=0.95, noise=torch.randn_like(x))
    torch.testing.assert_close(out.prev_sample, sde.ode_step(v, x, 0.7, 0.5), atol=1e-6, rtol=0)


def test_sde_step_hand_computed_scalar():
    # sigma = 0.5, sigma' = 0.4, a = 0.7: std = 0.7 * sqrt(0.5/0.5) = 0.7, dt = -0.1
    # mean = x (1 + 0.49 * -0.1 / 1) + v (1 + 0.49 * 0.5 / 1) * -0.1
    #      = 0.951 x - 0.1245 v
    x, v = torch.full((1, 1), 2.0), torch.full((1, 1), 1.0)
    out = sde.sde_step(v, x, 0.5, 0.4, 0.7, sigma_max=0.9, noise=torch.zeros(1, 1))
    assert out.std.item() == pytest.approx(0.7)
    assert out.mean.item() == pytest.approx(0.951 * 2 - 0.1245, abs=1e-6)
    # x' = mean (zero noise): log N(mean; mean, (0.7 sqrt(0.1))^2) = -log(0.7 sqrt(0.1)) - log sqrt(2 pi)
    expected = -math.log(0.7 * math.sqrt(0.1)) - 0.5 * math.log(2 * math.pi)
    assert out.log_prob.item() == pytest.approx(expected, abs=1e-6)


def test_sigma_one_uses_sigma_max():
    x, v = _xv()
    out = sde.sde_step(v, x, 1.0, 0.9, 0.7, sigma_max=0.96, noise=torch.zeros_like(x))
    # std = 0.7 * sqrt(1 / (1 - 0.96)) = 0.7 * 5 = 3.5
    assert out.std.item() == pytest.approx(3.5, rel=1e-5)
    assert torch.isfinite(out.log_prob).all()


def test_log_prob_matches_torch_normal():
    x, v = _xv()
    noise = torch.randn_like(x)
    sigma, sigma_next = 0.8, 0.65
    out = sde.sde_step(v, x, sigma, sigma_next, 0.7, sigma_max=0.97, noise=noise)
    scale = out.std * math.sqrt(sigma - sigma_next)
    ref = torch.distributions.Normal(out.mean, scale).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("step", [sde.sde_step, sde.cps_step])
def test_rescoring_reproduces_log_prob_exactly(step):
    x, v = _xv()
    sig = torch.tensor([0.9, 0.5, 0.2])  # per-sample sigmas
    sig_next = torch.tensor([0.8, 0.3, 0.0])
    first = step(v, x, sig, sig_next, 0.7, sigma_max=0.97)
    again = step(v, x, sig, sig_next, 0.7, sigma_max=0.97, prev_sample=first.prev_sample)
    ratio = torch.exp(again.log_prob - first.log_prob)
    assert torch.equal(again.log_prob, first.log_prob)
    assert torch.equal(ratio, torch.ones(3))


def test_per_sample_sigmas_equal_scalar_calls():
    x, v = _xv()
    noise = torch.randn_like(x)
    sig, sig_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.1])
    batched = sde.sde_step(v, x, sig, sig_next, 0.7, sigma_max=0.97, noise=noise)
    for i in range(3):
        one = sde.sde_step(
            v[i : i + 1], x[i : i + 1], float(sig[i]), float(sig_next[i]), 0.7,
            sigma_max=0.97, noise=noise[i : i + 1],
        )  # fmt: skip
        torch.testing.assert_close(batched.prev_sample[i : i + 1], one.prev_sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob)


def test_gradient_flows_through_mean_not_sample():
    x, v = _xv()
    v = v.requires_grad_()
    out = sde.sde_step(v, x, 0.6, 0.5, 0.7, sigma_max=0.97, prev_sample=x.clone())
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def _gaussian_velocity(mu: float, s: float):
    """Exact velocity E[eps - x0 | x_t = x] for data x0 ~ N(mu, s^2) on x_t = (1-t) x0 + t eps.

    m_t = (1-t) mu, var_t = (1-t)^2 s^2 + t^2, Cov(x_t, eps) = t, Cov(x_t, x0) = (1-t) s^2
    => v(x, t) = (t - (1-t) s^2) / var_t * (x - m_t) - mu
    """

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        var_t = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var_t * (x - (1 - t) * mu) - mu

    return v


@pytest.mark.parametrize("kind", ["ode", "sde"])
def test_marginal_preservation_on_gaussian_data(kind):
    mu, s = 1.5, 0.5
    v = _gaussian_velocity(mu, s)
    g = torch.Generator().manual_seed(0)
    n, steps = 200_000, 400
    sig = sde.timesteps(steps, shift=1.0)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64).float()
    for i in range(steps):
        a, b = float(sig[i]), float(sig[i + 1])
        if kind == "ode":
            x = sde.ode_step(v(x, a), x, a, b)
        else:
            noise = torch.randn(x.shape, generator=g)
            x = sde.sde_step(
                v(x, a), x, a, b, 0.7, sigma_max=float(sig[1]), noise=noise
            ).prev_sample
    assert x.mean().item() == pytest.approx(mu, rel=0.02)
    assert x.var().item() == pytest.approx(s**2, rel=0.02)


def test_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g)
    va, vb = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    sigma, sigma_next = 0.7, 0.55
    a = sde.sde_step(va, x, sigma, sigma_next, 0.7, sigma_max=0.97)
    exact = sde.gaussian_step_kl(a.mean, sde.sde_step(vb, x, sigma, sigma_next, 0.7, sigma_max=0.97).mean, a.std, dt=sigma_next - sigma)  # fmt: skip
    # Monte-Carlo: E_{x' ~ p_a}[log p_a(x') - log p_b(x')], per-element mean like log_prob
    mc = torch.zeros(2)
    reps = 4000
    for _ in range(reps):
        pa = sde.sde_step(va, x, sigma, sigma_next, 0.7, sigma_max=0.97, generator=g)
        pb = sde.sde_step(vb, x, sigma, sigma_next, 0.7, sigma_max=0.97, prev_sample=pa.prev_sample)
        mc += pa.log_prob - pb.log_prob
    mc /= reps
    torch.testing.assert_close(mc, exact, rtol=0.03, atol=1e-3)


def test_kl_public_and_exact_forms_differ_by_dt():
    ma, mb = torch.ones(2, 3), torch.zeros(2, 3)
    # public: 1 / (2 * 0.5^2) = 2; exact with dt = -0.1: 2 / 0.1 = 20
    torch.testing.assert_close(sde.gaussian_step_kl(ma, mb, 0.5), torch.full((2,), 2.0))
    torch.testing.assert_close(sde.gaussian_step_kl(ma, mb, 0.5, dt=-0.1), torch.full((2,), 20.0))


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.96), (0.8, 0.7), (0.3, 0.1), (0.05, 0.0)])
def test_opd_weight_times_velocity_gap_is_exact_kl(sigma, sigma_next):
    x, v_s = _xv(seed=2)
    _, v_t = _xv(seed=3)
    sigma_max = 0.96
    a = sde.sde_step(v_s, x, sigma, sigma_next, 0.7, sigma_max=sigma_max)
    b = sde.sde_step(v_t, x, sigma, sigma_next, 0.7, sigma_max=sigma_max)
    exact = sde.gaussian_step_kl(a.mean, b.mean, a.std, dt=sigma_next - sigma)
    w = sde.opd_weight(sigma, sigma_next, 0.7, sigma_max)
    via_weight = w * ((v_s - v_t) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(via_weight, exact, rtol=1e-4, atol=0)


def test_opd_weight_per_sample_tensor():
    sig, sig_next = torch.tensor([0.8, 0.3]), torch.tensor([0.7, 0.1])
    w = sde.opd_weight(sig, sig_next, 0.7, 0.96)
    assert w.shape == (2,)
    assert w[0].item() == pytest.approx(sde.opd_weight(0.8, 0.7, 0.7, 0.96).item())


def test_cps_hand_computed():
    # sigma = 0.5, sigma' = 0.4, a = 1/3: std = 0.4 sin(pi/6) = 0.2
    # x0_hat = x - 0.5 v, x1_hat = x + 0.5 v; mean = 0.6 x0_hat + sqrt(0.16 - 0.04) x1_hat
    x, v = torch.full((1, 1), 1.0), torch.full((1, 1), 2.0)
    out = sde.cps_step(v, x, 0.5, 0.4, 1 / 3, noise=torch.ones(1, 1))
    mean = 0.6 * 0.0 + math.sqrt(0.12) * 2.0
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)
    assert out.prev_sample.item() == pytest.approx(mean + 0.2, abs=1e-6)
    assert out.log_prob.item() == pytest.approx(-(0.2**2), abs=1e-6)
