"""Packaged presets: every preset YAML is in the built wheel, and from a directory outside
the repository (the wheel's own files on the path) ``flowopd presets`` lists them,
``flowopd demo --help`` works and ``--config NAME`` resolves to a preset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flowopd.cli import main
from flowopd.errors import UserError
from flowopd.presets import PRESETS_DIR, list_presets, preset_path, resolve_config
from tests.conftest import REPO

FILES = sorted(
    p.relative_to(PRESETS_DIR).with_suffix("").as_posix() for p in PRESETS_DIR.rglob("*.yaml")
)
NAMES = [n for n in FILES if not n.rsplit("/", 1)[-1].startswith("_")]  # _x.yaml: shared parts


def test_every_preset_has_a_one_line_purpose():
    presets = list_presets()
    assert [p.name for p in presets] == NAMES and "toy/grpo_geneval" in NAMES
    for p in presets:
        assert p.purpose and "\n" not in p.purpose and len(p.purpose) < 140, p


@pytest.mark.parametrize(
    "given", ["toy/grpo_geneval", "toy/grpo_geneval.yaml", "configs/toy/grpo_geneval.yaml"]
)
def test_names_resolve_to_the_packaged_file(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name must come from the package
    assert Path(resolve_config(given)) == PRESETS_DIR / "toy" / "grpo_geneval.yaml"


def test_an_existing_file_wins_and_unknown_names_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "grpo_geneval.yaml").write_text("{}\n")
    assert resolve_config("toy/grpo_geneval.yaml") == "toy/grpo_geneval.yaml"
    assert resolve_config(None) is None
    assert preset_path("../pyproject") is None
    with pytest.raises(UserError, match="did you mean 'toy/grpo_ocr'.*flowopd presets"):
        resolve_config("toy/grpo_ocrr")


@pytest.mark.parametrize("preset", ["toy/flow_opd", "toy/demo"])
def test_the_pipeline_presets_find_their_stage_presets(tmp_path, monkeypatch, preset):
    from flowopd.config import load_config
    from flowopd.config.pipeline import PipelineConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(PipelineConfig, resolve_config(preset), [])
    stages = [t.config for t in cfg.teachers] + [cfg.opd.config]
    stages += [cfg.mix.config] if cfg.mix.config else []
    for config in stages:
        assert Path(resolve_config(config)).is_relative_to(PRESETS_DIR), config


def test_repo_configs_is_the_packaged_folder():
    """The checkout's configs/ (documented paths) is the package's folder, not a copy."""
    assert (REPO / "configs").resolve() == PRESETS_DIR


def test_presets_command_lists_and_prints(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in NAMES)
    assert main(["presets", "toy/opd"]) == 0
    assert capsys.readouterr().out == (PRESETS_DIR / "toy" / "opd.yaml").read_text()
    assert main(["presets", "toy/nope"]) == 2


def test_a_printed_preset_that_extends_is_self_contained(capsys, tmp_path):
    """``flowopd presets toy/grpo_ocr`` prints a copy that loads alone, anywhere, to the
    same config as the preset (whose shared part lies in toy/_grpo.yaml)."""
    from flowopd.config import dump_config, load_config
    from flowopd.config.grpo import GRPOConfig

    assert main(["presets", "toy/grpo_ocr"]) == 0
    copy = tmp_path / "mine.yaml"
    copy.write_text(capsys.readouterr().out)
    assert "extends" not in copy.read_text().split("(its `extends:`")[1]
    preset = load_config(GRPOConfig, PRESETS_DIR / "toy" / "grpo_ocr.yaml", validate=False)
    assert preset.train.epochs == 80 and preset.sample.sde_window_range == (0, 6)
    assert dump_config(load_config(GRPOConfig, copy, validate=False)) == dump_config(preset)


@pytest.fixture(scope="module")
def wheel_root(tmp_path_factory) -> Path:
    """The built wheel, unpacked: built offline from a copy of the project's sources (so
    the checkout gets no build/ folder), with the installed setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "project"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(
        REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "license" not in run.stderr.lower(), run.stderr  # the SPDX form: no deprecation
    (whl,) = (tmp / "dist").glob("*.whl")
    root = tmp / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(root)
    return root


def test_every_preset_is_in_the_wheel(wheel_root):
    shipped = sorted(
        p.relative_to(wheel_root / "flowopd" / "configs").with_suffix("").as_posix()
        for p in (wheel_root / "flowopd" / "configs").rglob("*.yaml")
    )
    assert shipped == FILES  # the shared parts presets extend included
    meta = next(wheel_root.glob("flowopd-*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in meta.read_text()


def _flowopd(wheel_root: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(wheel_root)}  # the wheel's flowopd, not the checkout's
    return subprocess.run(
        [sys.executable, "-m", "flowopd", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip


def test_the_wheel_runs_its_presets_outside_the_repository(wheel_root, tmp_path):
    where = _flowopd(wheel_root, tmp_path, "presets")
    assert where.returncode == 0, where.stderr
    assert all(n in where.stdout for n in NAMES)
    demo = _flowopd(wheel_root, tmp_path, "demo", "--help")
    assert demo.returncode == 0 and "runs/demo" in demo.stdout, demo.stderr
    check = _flowopd(
        wheel_root, tmp_path, "train", "grpo", "--config", "toy/grpo_geneval", "--print-config"
    )
    assert check.returncode == 0, check.stderr
    assert "runs/toy/grpo_geneval" in check.stdout
    origin = subprocess.run(
        [sys.executable, "-c", "import flowopd; print(flowopd.__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(wheel_root)}, capture_output=True, text=True,
    )  # fmt: skip
    assert origin.stdout.strip().startswith(str(wheel_root))
