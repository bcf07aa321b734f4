"""Merge cold start: the two merges on hand-made tensors, and merged LoRA directories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowopd.errors import UserError
from flowopd.models.merge import lora_delta, merge_ab_mean, merge_delta, merge_loras, read_lora
from tests.recipes._teachers import make_teacher_loras

# Two rank-1 LoRAs on a (2, 3) weight, scale 1:
#   teacher 1: A1 = [[1, 0, 0]], B1 = [[1], [0]]  ->  dW1 = [[1, 0, 0], [0, 0, 0]]
#   teacher 2: A2 = [[0, 1, 0]], B2 = [[0], [2]]  ->  dW2 = [[0, 0, 0], [0, 2, 0]]
A1, B1 = torch.tensor([[1.0, 0, 0]]), torch.tensor([[1.0], [0]])
A2, B2 = torch.tensor([[0.0, 1, 0]]), torch.tensor([[0.0], [2]])
AVG = torch.tensor([[0.5, 0, 0], [0, 1, 0]])  # (dW1 + dW2) / 2


def test_ab_mean_averages_a_and_b_separately():
    a, b = merge_ab_mean([A1, A2], [B1, B2])
    assert a.tolist() == [[0.5, 0.5, 0.0]] and b.tolist() == [[0.5], [1.0]]
    # its delta B A = [[.25, .25, 0], [.5, .5, 0]]: cross terms, not the average
    assert (b @ a).tolist() == [[0.25, 0.25, 0.0], [0.5, 0.5, 0.0]]
    a, b = merge_ab_mean([A1, A2], [B1, B2], weights=[3, 1])  # normalised to 3/4, 1/4
    assert a.tolist() == [[0.75, 0.25, 0.0]] and b.tolist() == [[0.75], [0.5]]


def test_delta_merge_is_exact_when_the_rank_suffices():
    a, b, err = merge_delta([A1, A2], [B1, B2], [1.0, 1.0], rank=2)  # 2 = sum of ranks
    torch.testing.assert_close(b @ a, AVG, atol=1e-6, rtol=0)
    assert err < 1e-12 and a.shape == (2, 3) and b.shape == (2, 2)
    # singular values (1, 0.5) are split evenly: B and A carry sqrt(s) each
    torch.testing.assert_close(b.norm(dim=0), torch.tensor([1.0, math.sqrt(0.5)]))
    torch.testing.assert_close(a.norm(dim=1), torch.tensor([1.0, math.sqrt(0.5)]))


def test_delta_merge_truncates_to_the_rank_with_the_svd_error():
    a, b, err = merge_delta([A1, A2], [B1, B2], [1.0, 1.0], rank=1)
    # keeps the singular value 1 (the e2 e2^T part), drops 0.5: err = 0.5 / sqrt(1.25)
    torch.testing.assert_close(b @ a, torch.tensor([[0.0, 0, 0], [0, 1, 0]]), atol=1e-6, rtol=0)
    assert err == pytest.approx(0.5 / math.sqrt(1.25))
    # rank above min(out, in) = 2: zero padding, still exact
    a, b, err = merge_delta([A1, A2], [B1, B2], [1.0, 1.0], rank=4)
    assert a.shape == (4, 3) and b.shape == (2, 4) and err < 1e-12
    assert a[2:].abs().max() == 0 and b[:, 2:].abs().max() == 0


def test_ab_mean_differs_from_delta_and_scales_enter_delta():
    a, b = merge_ab_mean([A1, A2], [B1, B2])
    assert not torch.allclose(b @ a, AVG)
    a, b, _ = merge_delta([A1, A2], [B1, B2], [2.0, 0.5], rank=2)  # s1 = 2, s2 = 0.5
    torch.testing.assert_close(b @ a, torch.tensor([[1.0, 0, 0], [0, 0.5, 0]]), atol=1e-6, rtol=0)
    assert lora_delta(A2, B2, 0.5).tolist() == [[0.0, 0, 0], [0, 1, 0]]


def test_sum_merge_keeps_each_teachers_whole_delta():
    # task arithmetic: dW1 + dW2 (not normalised), exact at rank 2 = the sum of the ranks
    a, b, err = merge_delta([A1, A2], [B1, B2], [1.0, 1.0], rank=2, normalise=False)
    torch.testing.assert_close(b @ a, 2 * AVG, atol=1e-6, rtol=0)
    assert err < 1e-12
    a, b, _ = merge_delta([A1, A2], [B1, B2], [1.0, 1.0], 2, weights=[1.0, 0.5], normalise=False)
    torch.testing.assert_close(b @ a, torch.tensor([[1.0, 0, 0], [0, 1, 0]]), atol=1e-6, rtol=0)


# -- directories ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teachers(tiny_pixel_dir, tmp_path_factory) -> dict[str, Path]:
    return make_teacher_loras(tiny_pixel_dir, tmp_path_factory.mktemp("teachers"))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_merge_cli_writes_a_lora_that_loads_everywhere(tmp_path, tiny_pixel_dir, teachers,
                                                       capsys):  # fmt: skip
    from flowopd.cli import main
    from flowopd.models.sd3 import SD3Model

    out = tmp_path / "merged"
    t = [str(teachers["geneval"]), str(teachers["ocr"])]
    assert main(["merge", "--teachers", *t, "--method", "delta", "--rank", "8",
                 "--out", str(out)]) == 0  # fmt: skip
    line = capsys.readouterr().out
    assert "delta merge of 2 teachers, rank 8" in line and "mean" in line and "max" in line
    report = json.loads((out / "merge.json").read_text())
    assert report["rank"] == 8 and report["alpha"] == 8 and report["layers"] == 7
    assert report["rel_error"]["max"] < 1e-6  # rank 8 = 4 + 4: exact

    # loads with load_adapter; its effective delta is the exact average, layer by layer
    model = SD3Model.from_pretrained(str(tiny_pixel_dir))
    model.load_adapter(str(out), "merged")
    for i, p in enumerate(t):
        model.load_adapter(p, f"t{i}")
    from flowopd.models.adapters import lora_layers

    checked = 0
    for layer in lora_layers(model.transformer):

        def delta(name, layer=layer):
            return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight

        assert layer.scaling["merged"] == 1.0
        torch.testing.assert_close(delta("merged"), (delta("t0") + delta("t1")) / 2,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
        checked += 1
    assert checked == 7

    # and into a stock diffusers pipeline, giving the same velocity as our model
    model.set_adapter("merged")
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts(["a photo of a circle", 'a sign that says "ab"'])
    ours = model.velocity(x, 0.5, cond)
    stock = SD3Model.from_pretrained(str(tiny_pixel_dir)).pipe
    stock.load_lora_weights(str(out))
    with torch.no_grad():
        ref = stock.transformer(hidden_states=x, timestep=torch.full((2,), 500.0),
                                encoder_hidden_states=cond.embeds,
                                pooled_projections=cond.pooled, return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with model.adapters_disabled():
        assert (model.velocity(x, 0.5, cond) - ours).abs().max() > 1e-3


def test_ab_mean_dir_keeps_the_teachers_config(tmp_path, teachers):
    from flowopd.models.merge import write_lora

    t = [str(teachers["geneval"]), str(teachers["ocr"])]
    merged, report = merge_loras(t, method="ab_mean")
    write_lora(tmp_path / "ab", merged)
    back = read_lora(tmp_path / "ab")
    assert back.config["r"] == 4 and back.config["lora_alpha"] == 8
    one, two = read_lora(t[0]), read_lora(t[1])
    for m, (a, b) in back.modules.items():
        torch.testing.assert_close(a, (one.modules[m][0] + two.modules[m][0]) / 2)
        torch.testing.assert_close(b, (one.modules[m][1] + two.modules[m][1]) / 2)
    assert 0.1 < report.mean_error < 1  # random teachers: far from the average delta
    _, delta4 = merge_loras(t, method="delta")  # rank 4 < 8: truncated, but the best rank 4
    assert delta4.rank == 4 and 0 < delta4.mean_error < report.mean_error
    # sum: rank 4 + 4 = 8 by default, exactly twice the exact average
    summed, rep = merge_loras(t, method="sum")
    avg, _ = merge_loras(t, method="delta", rank=8)
    assert rep.rank == 8 and rep.weights == [1.0, 1.0] and rep.max_error < 1e-6
    for m, (a, b) in summed.modules.items():
        ma, mb = avg.modules[m]
        torch.testing.assert_close(b.double() @ a.double(), 2 * (mb.double() @ ma.double()),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip


def test_merge_errors(teachers, tmp_path):
    t = [str(teachers["geneval"]), str(teachers["ocr"])]
    with pytest.raises(UserError, match="2 weights for 1 teachers|1 weights for 2 teachers"):
        merge_loras(t, weights=[1.0])
    with pytest.raises(UserError, match="keeps the teachers' rank"):
        merge_loras(t, method="ab_mean", rank=8)
    with pytest.raises(UserError, match="not found"):
        merge_loras([str(tmp_path / "nope")])
    with pytest.raises(UserError, match="unknown merge method"):
        merge_loras(t, method="svd")
