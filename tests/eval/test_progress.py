"""Progress bars on the long phases: evaluation (a bar per benchmark, one tick per batch)
and pretraining (one tick per step). Silent off a terminal; shown when stderr is one."""

from __future__ import annotations

import dataclasses

import pytest

from flowopd.eval.benchmarks import EvalSettings, evaluate
from flowopd.models.sd3 import SD3Model
from flowopd.recipes.pretrain import EMBEDDED_ARCH, PretrainConfig, pretrain


def _force_tty(monkeypatch, on: bool) -> None:
    monkeypatch.delenv("FLOWOPD_NO_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: on, raising=False)


@pytest.mark.parametrize("tty", [False, True])
def test_evaluation_shows_a_bar_only_on_a_terminal(tty, tiny_pixel_dir, capsys, monkeypatch):
    model = SD3Model.from_pretrained(tiny_pixel_dir)
    settings = EvalSettings(n=2, images_per_prompt=2, steps=2, batch_size=2)
    capsys.readouterr()
    _force_tty(monkeypatch, tty)
    evaluate(model, "toy-geneval", settings)
    err = capsys.readouterr().err
    assert ("eval toy-geneval (4 images, 2 batches)" in err) is tty, err


@pytest.mark.parametrize("tty", [False, True])
def test_pretraining_shows_a_bar_only_on_a_terminal(tty, tmp_path, capsys, monkeypatch):
    arch = dataclasses.replace(EMBEDDED_ARCH, num_layers=1)
    cfg = PretrainConfig(out=str(tmp_path / "m"), steps=2, batch_size=4, warmup=1, arch=arch)
    _force_tty(monkeypatch, tty)
    pretrain(cfg, log=lambda msg: None)
    err = capsys.readouterr().err
    assert ("pretrain" in err) is tty, err
