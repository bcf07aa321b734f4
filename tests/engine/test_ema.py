"""EMA of the LoRA weights: the Flow-GRPO schedule by hand, and exact swap/restore."""

from __future__ import annotations

import pytest
import torch

from flowopd.engine.ema import EMA, flowgrpo_decay


def test_flowgrpo_decay_values():
    d = flowgrpo_decay(0.9)
    assert d(1) == pytest.approx(2 / 11)
    assert d(8) == pytest.approx(9 / 18)  # 0.5
    assert d(16) == pytest.approx(17 / 26)
    assert d(79) < 0.9 and d(80) == pytest.approx(0.9) and d(1000) == 0.9  # cap from s = 80


def test_ema_updates_every_8_steps_by_hand():
    p = torch.tensor([0.0, 10.0])
    ema = EMA([p], decay=flowgrpo_decay(0.9), every=8)
    # the parameter takes values 1, 2, ..., 16 (first coordinate) after each step
    for s in range(1, 17):
        p[0] = float(s)
        p[1] = 10.0 + s
        used = ema.step()
        assert (used is not None) == (s % 8 == 0)
    # s = 8:  d = 9/18 = 0.5;    e = 0.5 * 0 + 0.5 * 8        = 4
    # s = 16: d = 17/26;         e = 17/26 * 4 + 9/26 * 16    = (68 + 144) / 26 = 8.1538...
    # second coordinate:         e8 = 0.5 * 10 + 0.5 * 18 = 14
    #                            e16 = 17/26 * 14 + 9/26 * 26 = (238 + 234) / 26 = 18.1538...
    expected = torch.tensor([212 / 26, 472 / 26])
    torch.testing.assert_close(ema.shadow[0], expected, rtol=0, atol=1e-6)
    assert ema.num_steps == 16


def test_constant_decay_every_step():
    p = torch.tensor([1.0])
    ema = EMA([p], decay=0.75)
    p.fill_(5.0)
    assert ema.step() == 0.75
    torch.testing.assert_close(ema.shadow[0], torch.tensor([2.0]))  # 0.75 * 1 + 0.25 * 5


def test_swapped_loads_ema_and_restores_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    params = list(lin.parameters())
    ema = EMA(params, decay=0.5)
    with torch.no_grad():
        for q in params:
            q.add_(torch.randn_like(q) * 1e-3)  # values that do not round-trip trivially
    ema.step()
    before = [q.detach().clone() for q in params]
    with ema.swapped():
        for q, e in zip(params, ema.shadow, strict=True):
            assert torch.equal(q, e)
        with torch.no_grad():
            params[0].mul_(3)  # evaluation must not leak into the trained weights
    for q, b in zip(params, before, strict=True):
        assert torch.equal(q, b)
    # also restored when the body raises
    with pytest.raises(RuntimeError), ema.swapped():
        raise RuntimeError("eval failed")
    assert all(torch.equal(q, b) for q, b in zip(params, before, strict=True))


def test_state_dict_round_trip_continues_identically():
    p = torch.tensor([0.0])
    a = EMA([p], every=2)
    for s in range(3):
        p.fill_(float(s + 1))
        a.step()
    b = EMA([p.clone()], every=2)
    b.load_state_dict(a.state_dict())
    b.params = [p]
    for s in range(3, 6):
        p.fill_(float(s + 1))
        a.step()
        b.step()
    assert torch.equal(a.shadow[0], b.shadow[0]) and a.num_steps == b.num_steps == 6
    with pytest.raises(ValueError, match="holds 1 tensors"):
        EMA([p, p]).load_state_dict(a.state_dict())
