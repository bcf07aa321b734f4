"""NonFiniteGuard: skips bad steps, drops their grads, aborts after N in a row."""

from __future__ import annotations

import pytest
import torch

from flowopd.engine.guard import NonFiniteGuard, TrainingDiverged
from flowopd.errors import UserError


def _param(grad: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), grad)
    return p


def test_finite_step_passes():
    guard = NonFiniteGuard(3)
    p = _param(1.0)
    assert guard.check(torch.tensor(0.5), [p])
    assert p.grad is not None and guard.consecutive == 0


def test_skips_and_resets():
    guard = NonFiniteGuard(3)
    p = _param(float("nan"))
    assert not guard.check(torch.tensor(1.0), [p])  # non-finite grad
    assert p.grad is None  # dropped so it cannot leak into the next accumulation
    assert not guard.check(float("inf"), [_param(1.0)])  # non-finite loss
    assert guard.consecutive == 2
    assert guard.check(0.1, [_param(1.0)])  # a good step resets the count
    assert guard.consecutive == 0 and guard.total_skipped == 2


def test_aborts_after_n_in_a_row(caplog):
    guard = NonFiniteGuard(3)
    assert not guard.check(float("nan"), [])
    assert not guard.check(float("nan"), [])
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row") as e:
        guard.check(float("nan"), [])
    assert isinstance(e.value, UserError) and "lower train.lr" in str(e.value)
    assert sum("skipping the optimizer step" in r.message for r in caplog.records) == 3


def test_state_dict():
    guard = NonFiniteGuard(5)
    guard.check(float("nan"), [])
    other = NonFiniteGuard(5)
    other.load_state_dict(guard.state_dict())
    assert other.consecutive == 1 and other.total_skipped == 1
