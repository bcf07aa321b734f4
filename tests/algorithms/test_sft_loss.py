"""Supervised flow matching: loss by hand, forward process, training-time sampling."""

from __future__ import annotations

import pytest
import torch

from flowopd.algorithms.sft import add_noise, flow_matching_loss, sample_training_sigmas


def test_flow_matching_loss_by_hand():
    # u = noise - x0 = [3 - 1, 3 - 2] = [2, 1]; v_pred = [2, 3] -> err [0, 2] -> mse = 4 / 2 = 2
    v = torch.tensor([[2.0, 3.0]], requires_grad=True)
    loss, stats = flow_matching_loss(v, torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 3.0]]))
    assert loss.item() == pytest.approx(2.0) and stats["loss"] == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 2.0]]))  # 2 err / n


def test_target_is_the_time_derivative_of_the_path():
    # d/dt [(1 - t) x0 + t eps] = eps - x0: the exact velocity has zero loss
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    xt = add_noise(x0, eps, t)
    (dxt_dt,) = torch.autograd.grad(xt.sum(), t)
    torch.testing.assert_close(dxt_dt, (eps - x0).sum(dim=(1, 2, 3)))
    assert flow_matching_loss(eps - x0, x0, eps)[0].item() == 0.0
    # endpoints: t = 0 data, t = 1 noise
    torch.testing.assert_close(add_noise(x0, eps, 0.0), x0)
    torch.testing.assert_close(add_noise(x0, eps, 1.0), eps)


def test_sigmas_deterministic_and_in_range():
    a = sample_training_sigmas(1000, torch.Generator().manual_seed(3))
    b = sample_training_sigmas(1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == (1000,) and a.dtype == torch.float32
    assert (a > 0).all() and (a < 1).all()


def test_sigma_distributions():
    n = 20_000
    g = torch.Generator().manual_seed(0)
    u = sample_training_sigmas(n, g, kind="uniform", shift=1.0)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    ln = sample_training_sigmas(n, g, kind="logit_normal", shift=1.0)
    z = torch.logit(ln)  # logit of a logit-normal sample is N(0, 1)
    assert z.mean().item() == pytest.approx(0.0, abs=0.03)
    assert z.std().item() == pytest.approx(1.0, abs=0.03)
    # shift 3 maps the median 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75 (the shift is monotone)
    shifted = sample_training_sigmas(n, g)
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        sample_training_sigmas(4, kind="cosmap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2))
