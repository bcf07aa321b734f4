"""Every shipped configs/sd35m and configs/flux1dev preset trains one epoch and evaluates,
through the CLI.

The presets run as shipped except for what a test machine cannot have: ``model.path``
points at a tiny SD3.5-M-shaped pipeline (dual-attention blocks, QK RMS-norm, three text
encoders, patch 2, 16 latent channels), the data paths at a few lines of the published
prompt files, the teachers / anchor / init at tiny LoRAs, the rewards' weights
(``reward.options``) at tiny random detectors and CLIPs, and the sizes shrink to 2 prompts
x 2 images, 16 px, one epoch with an evaluation after it. The flux1dev presets run the
same way on a tiny FLUX pipeline (``model.backend: flux``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from flowopd.cli import main
from tests.conftest import REPO
from tests.recipes import _sd35m as tiny

PRESETS = sorted((REPO / "configs" / "sd35m").glob("*.yaml"))
FLUX_PRESETS = sorted((REPO / "configs" / "flux1dev").glob("*.yaml"))
ALGOS = ("grpo", "opd", "crd", "nft", "awm", "sft")


@pytest.fixture(scope="session")
def sd35m_world(tmp_path_factory, shared_data):
    """The tiny model, scorers and prompt files every preset test shares (built once)."""
    root = tmp_path_factory.mktemp("sd35m")
    model = tiny.save_tiny_sd35m(root / "model")
    data = root / "data"
    data.mkdir()
    lines = {
        k: (shared_data / k / "test.txt").read_text().splitlines() for k in ("ocr", "drawbench")
    }
    files = {  # the published formats: GenEval metadata JSONL, OCR .txt, plain prompt .txt
        "geneval": tiny.geneval_jsonl(data / "geneval_train.jsonl", shared_data, 8),
        "ocr": tiny.write_lines(data / "ocr_train.txt", lines["ocr"][2:10]),
        "pickscore": tiny.write_lines(data / "pickscore_train.txt", lines["drawbench"][2:10]),
    }
    tests = {
        "geneval": tiny.geneval_jsonl(data / "geneval_test.jsonl", shared_data, 2),
        "ocr": tiny.write_lines(data / "ocr_test.txt", lines["ocr"][:2]),
        "pickscore": tiny.write_lines(data / "drawbench_test.txt", lines["drawbench"][:2]),
    }
    clip = tiny.save_tiny_clip(root / "clip")
    options = {
        "geneval": {"detector": str(tiny.save_tiny_mask2former(root / "m2f")),
                    "clip_model": str(clip)},
        "pickscore": {"model": str(clip), "processor": str(clip)},
        "ocr": {},
    }  # fmt: skip
    loras = {n: tiny.save_tiny_lora(model, root / "lora" / n, seed=i) for i, n in
             enumerate(("geneval", "ocr", "pickscore", "init"))}  # fmt: skip
    return dict(model=model, files=files, tests=tests, options=options, loras=loras)


def _overrides(algo: str, cfg, world: dict, out: Path) -> list[str]:
    """Only paths and sizes change (and the weights rewards need, as reward.options)."""
    ov = [f"model.path={world['model']}", "model.resolution=16", "model.dtype=float32",
          "train.epochs=1", "eval.every=1", f"output.dir={out}"]  # fmt: skip
    used: list[str] = []
    if cfg.data.datasets:
        for i, d in enumerate(cfg.data.datasets):
            ov.append(f"data.datasets.{i}.path={world['files'][d.reward]}")
            used.append(d.reward)
    else:
        ov.append(f"data.train={world['files'][cfg.reward.name]}")
    used += list(cfg.reward.names())
    benches = []
    for b in cfg.eval.benchmarks:  # 'geneval' scores data.test; 'geneval=PATH' its own file
        base, eq, _ = b.partition("=")
        benches.append(f"{base}={world['tests'][base]}" if eq else base)
        used.append(base)
    if any("=" in b for b in benches):
        ov.append(f"eval.benchmarks=[{', '.join(benches)}]")
    if benches:
        ov.append(f"data.test={world['tests'][benches[0].partition('=')[0]]}")
    opts = {n: world["options"][n] for n in dict.fromkeys(used) if world["options"].get(n)}
    ov.append(f"reward.options={json.dumps(opts)}")
    n_sets = max(1, len(cfg.data.datasets))
    prompts = 3 if n_sets == 3 else 2  # OPD mixes its three datasets in every epoch
    ov += ["sample.group_size=2", f"sample.prompts_per_epoch={prompts}", "sample.batch_size=2",
           f"train.batch_size={prompts}"]  # fmt: skip
    section = getattr(cfg, "opd", None)
    if section is not None:
        for i, t in enumerate(section.teachers):
            ov.append(f"opd.teachers.{i}.path={world['loras'][t.tasks[0]]}")
        if section.anchor:
            ov.append(f"opd.anchor={world['loras']['pickscore']}")
        if section.init:
            ov.append(f"opd.init={world['loras']['init']}")
    return ov


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A tiny guidance-distilled FLUX pipeline directory (native 16 px)."""
    from flowopd.models.flux import FluxModel
    from flowopd.models.tiny_flux import build_tiny_flux_pipeline

    path = tmp_path_factory.mktemp("flux1dev") / "model"
    FluxModel(
        build_tiny_flux_pipeline(), max_sequence_length=4, native_resolution=16
    ).save_pretrained(path)
    return path


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_trains_one_epoch_and_evaluates(preset, sd35m_world, tmp_path, capsys):
    _run_preset(preset, sd35m_world, tmp_path, capsys)


@pytest.mark.parametrize("preset", FLUX_PRESETS, ids=[p.stem for p in FLUX_PRESETS])
def test_flux1dev_preset_trains_one_epoch_and_evaluates(
    preset, sd35m_world, tiny_flux_dir, tmp_path, capsys
):
    _run_preset(preset, {**sd35m_world, "model": tiny_flux_dir}, tmp_path, capsys)
    assert "backend: flux" in (tmp_path / "run" / "config.yaml").read_text()


def _run_preset(preset: Path, world: dict, tmp_path: Path, capsys) -> None:
    """Train ``preset`` one epoch on ``world``'s tiny model / data and check its eval."""
    from flowopd.cli.train import ALGOS as RECIPES
    from flowopd.cli.train import _load
    from flowopd.config import load_config

    if importlib.util.find_spec("rapidocr_onnxruntime") is None:
        pytest.skip("the ocr reward needs rapidocr_onnxruntime (pip install 'flowopd[ocr]')")
    algo = preset.stem.split("_")[0]
    assert algo in ALGOS, f"{preset.name}: name a preset after its algorithm (grpo_*.yaml, ...)"
    cfg = load_config(_load(RECIPES[algo][0]), preset, validate=False)
    out = tmp_path / "run"
    args = ["train", algo, "--config", str(preset), *_overrides(algo, cfg, world, out)]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err[-2000:]

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    names = [b.partition("=")[0] for b in cfg.eval.benchmarks]
    assert sorted(metrics) == sorted(f"{n}={world['tests'][n]}" for n in names)
    for name, values in metrics.items():
        assert math.isfinite(values["overall"])
        if name.startswith(("geneval", "ocr")):  # accuracies (PickScore is a raw logit)
            assert 0.0 <= values["overall"] <= 1.0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    resolved = (out / "config.yaml").read_text()
    assert "resolution: 16" in resolved and "dtype: float32" in resolved
