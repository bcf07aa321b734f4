"""gradient_snr: hand-computed values and recovery of a known SNR from synthetic gradients."""

from __future__ import annotations

import pytest
import torch

from flowopd.eval.gradient_snr import gradient_snr, gradient_snr_stderr, update_cosine


def test_hand_computed():
    # g = (1, 0), (3, 0): mean (2, 0); tr = (1 + 1) / 1 = 2; mu2 = 4 - 2 / 2 = 3; s = 1.5
    assert gradient_snr(torch.tensor([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(1.5)
    # zero-mean pair: mean 0, tr = (1 + 1) / 1 = 2, mu2 = 0 - 1 = -1 -> s = -0.5
    assert gradient_snr(torch.tensor([[1.0], [-1.0]])) == pytest.approx(-0.5)
    assert update_cosine(1.5, 1) == pytest.approx((1.5 / 2.5) ** 0.5)
    assert update_cosine(-0.1, 100) == 0.0


def test_recovers_known_snr_and_cosine():
    # mu with ||mu||^2 = 1, isotropic noise with tr(Sigma) = P * sigma^2 = 100 -> s = 0.01
    gen = torch.Generator().manual_seed(0)
    p, n = 1000, 4000
    mu = torch.randn(p, generator=gen)
    mu /= mu.norm()
    g = mu + torch.randn(n, p, generator=gen) * (100.0 / p) ** 0.5
    s = gradient_snr(g)
    assert s == pytest.approx(0.01, rel=0.2)
    # an update of 100 groups: SNR 1, cosine with mu about sqrt(1 / 2)
    cos = torch.nn.functional.cosine_similarity(g.view(40, 100, p).mean(1), mu[None], dim=1)
    assert float(cos.mean()) == pytest.approx(update_cosine(0.01, 100), abs=0.05)
    # the bootstrap error matches the spread of estimates over independent batches of 400
    se = gradient_snr_stderr(g[:400])
    spread = torch.tensor([gradient_snr(g[i : i + 400]) for i in range(0, n, 400)]).std()
    assert se == pytest.approx(float(spread), rel=0.5)


def test_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        gradient_snr(torch.ones(1, 3))
    with pytest.raises(ValueError, match="all equal"):
        gradient_snr(torch.ones(4, 3))
