"""make_optimizer: AdamW, and the 8-bit request falling back with a clear warning."""

from __future__ import annotations

import pytest
import torch

from flowopd.engine import optim


def _params():
    return [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))]


def test_adamw_with_the_given_hyperparameters():
    opt = optim.make_optimizer(_params(), 3e-4, (0.9, 0.99), 1e-4)
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (3e-4, (0.9, 0.99), 1e-4)


def test_first_adamw_step_moves_each_weight_by_lr():
    # step 1: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (eps aside), plus decay
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = optim.make_optimizer([p], 0.1, weight_decay=0.0)
    p.grad = torch.tensor([0.5, -3.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]))


def test_eight_bit_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(optim, "bitsandbytes_available", lambda: False)
    with pytest.warns(UserWarning, match="bitsandbytes is not installed"):
        opt = optim.make_optimizer(_params(), 1e-3, eight_bit=True)
    assert type(opt) is torch.optim.AdamW


def test_eight_bit_needs_cuda_parameters(monkeypatch):
    monkeypatch.setattr(optim, "bitsandbytes_available", lambda: True)
    with pytest.warns(UserWarning, match="needs CUDA parameters"):
        opt = optim.make_optimizer(_params(), 1e-3, eight_bit=True)
    assert type(opt) is torch.optim.AdamW
