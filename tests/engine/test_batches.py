"""The shared minibatch loop: the same draws and optimizer-step boundaries as the loop
the recipes wrote out before (randperm per inner epoch, consecutive cuts)."""

from __future__ import annotations

import torch

from flowopd.engine.batches import minibatches


def _written_out(n: int, mb: int, acc: int, inner: int, gen: torch.Generator) -> list:
    out = []
    for k in range(inner):
        order = torch.randperm(n, generator=gen)
        batches = [order[i : i + mb] for i in range(0, n, mb)]
        for b, rows in enumerate(batches):
            out.append((k, b, rows.tolist(), (b + 1) % acc == 0 or b + 1 == len(batches)))
    return out


def test_minibatches_reproduce_the_written_out_loop():
    got = [
        (m.inner, m.index, m.rows.tolist(), m.step)
        for m in minibatches(
            10, 3, torch.Generator().manual_seed(7), accumulation=2, inner_epochs=2
        )
    ]
    assert got == _written_out(10, 3, 2, 2, torch.Generator().manual_seed(7))
    assert [s for *_, s in got] == [False, True, False, True] * 2  # last of a pass steps


def test_draws_inside_a_minibatch_keep_their_place():
    # SFT draws t and eps from the shuffle generator inside the loop: the next pass's
    # permutation must come after them, as in the written-out loop
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = []
    for m in minibatches(6, 4, g1, inner_epochs=2):
        a.append((m.rows.tolist(), torch.rand(1, generator=g1).item()))
    b = []
    for _ in range(2):
        order = torch.randperm(6, generator=g2)
        for rows in (order[:4], order[4:]):
            b.append((rows.tolist(), torch.rand(1, generator=g2).item()))
    assert a == b


def test_split_replaces_the_cut():
    calls = []

    def split(gen):
        calls.append(1)
        return [torch.tensor([0, 1]), torch.tensor([2, 3])]

    got = [
        m.rows.tolist() for m in minibatches(2, 1, torch.Generator(), inner_epochs=3, split=split)
    ]
    assert got == [[0, 1], [2, 3]] * 3 and len(calls) == 3
