"""``flowopd check``: a shipped preset with real-format files passes in seconds and prints
its plan; every broken input is one line naming the problem and the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowopd.cli import main
from tests.conftest import REPO

SD35M = REPO / "configs" / "sd35m"


@pytest.fixture
def real_files(tmp_path, shared_data) -> dict[str, Path]:
    """A few lines of the published prompt files, in their own formats."""
    lines = (shared_data / "geneval" / "test_metadata.jsonl").read_text().splitlines()
    ocr = (shared_data / "ocr" / "test.txt").read_text().splitlines()
    files = {
        "train": tmp_path / "geneval_train.jsonl",
        "test": tmp_path / "geneval_test.jsonl",
        "ocr_txt": tmp_path / "ocr_test.txt",
        "ocr_jsonl": tmp_path / "ocr_train.jsonl",
    }
    files["train"].write_text("\n".join(lines[:60]) + "\n")
    files["test"].write_text("\n".join(lines[60:72]) + "\n")
    files["ocr_txt"].write_text("\n".join(ocr[:5]) + "\n")
    files["ocr_jsonl"].write_text(
        "".join(json.dumps({"prompt": p, "task": "ocr"}) + "\n" for p in ocr[:30])
    )
    return files


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and exactly one line on stderr; return it."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _grpo(real_files, *extra: str) -> list[str]:
    return ["check", "grpo", "--config", str(SD35M / "grpo_geneval.yaml"),
            f"data.train={real_files['train']}", f"data.test={real_files['test']}",
            *extra]  # fmt: skip


def test_check_grpo_geneval_preset_passes_fast_and_prints_the_plan(real_files):
    """The issue's done-when, as a user runs it: a fresh process, < 20 s on a CPU."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flowopd", *_grpo(real_files)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert seconds < 20, seconds
    out = proc.stdout
    # SD3.5-M at 512 px: 512 / 8 = 64 -> 16 x 64 x 64 latents, (64 / 2)^2 = 1024 tokens
    assert "512 px (model.resolution) -> latents 16x64x64, 1024 image tokens" in out
    assert "48 prompts x 24 images = 1152 images (1152 per process, 1 process(es))" in out
    assert "9 of 10 steps trained per trajectory" in out
    # 1152 / 24 = 48 minibatches, 2 optimizer steps -> 24 per step; 1000 epochs
    assert "minibatch 24, 24 per optimizer step, 2 optimizer step(s) per epoch x 1000" in out
    assert "every 60 epochs and after the last: 17 evaluation(s)" in out  # 60..960, 1000
    assert "data.train" in out and "60 prompts" in out
    assert "benchmark geneval  12 prompts from" in out
    assert "memory per process:" in out and "peak" in out and "time per epoch:" in out
    assert "1024 image + 333 text tokens" in out  # the estimate sees 512 px too


def test_check_splits_the_epoch_over_gpus(real_files, capsys):
    assert main([*_grpo(real_files), "--gpus", "8", "--no-estimate"]) == 0
    out = capsys.readouterr().out
    # 48 / 8 = 6 prompts x 24 = 144 images per process; 144 / 24 = 6 minibatches, 3 a step
    assert "(144 per process, 8 process(es))" in out and "6 micro-batch(es) of 24" in out
    assert "3 per optimizer step, 2 optimizer step(s) per epoch" in out
    err = _one_line_error(capsys, [*_grpo(real_files), "--gpus", "5"])
    assert "prompts_per_epoch=48 must be divisible by the number of processes (5)" in err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["eval.benchmarks=[genevl]"], "eval.benchmarks: unknown benchmark 'genevl'"),
        (["eval.benchmarks=[geneval=/nonexistent/meta.jsonl]"], "'/nonexistent/meta.jsonl') not found"),
        (["data.train=/nonexistent/train.jsonl"], "'/nonexistent/train.jsonl' not found"),
        (["model.resolution=520"], "model.resolution=520 must be a multiple of 16"),
        (["model.resolution=8192"], "more than the model's positional table (384)"),
        (["train.lr=nan"], "'train.lr' must be a finite number"),
        (["model.guidance_scale=inf"], "'model.guidance_scale' must be a finite number"),
        (["sample.noise_level=0"], "sample.noise_level=0 makes the 'sde' sampler deterministic"),
        (["sample.kind=cps", "sample.noise_level=1.5"], "a must lie in (0, 1]"),
        (["sample.kind=cps", "grpo.kl_form=exact"], "set grpo.kl_form=public with sample.kind=cps"),
        (["reward.options={geneval: {detectr: x}}"], "not an option of the 'geneval' reward (did you mean 'detector'?)"),
        (["reward.options={geneval: {detector: ./no/such/dir}}"], "reward.options.geneval.detector: './no/such/dir' not found"),
    ],
)  # fmt: skip
def test_check_rejects_bad_settings_in_one_line(real_files, capsys, extra, needle):
    err = _one_line_error(capsys, _grpo(real_files, *extra))
    assert needle in err, err


def test_bare_benchmark_needs_data_test(real_files, capsys):
    err = _one_line_error(capsys, _grpo(real_files, "data.test="))
    assert "benchmark 'geneval' needs its prompt file" in err and "data.test=PATH" in err


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
        ('{"prompt": "caf\xe9"}\n'.encode("latin-1"), "is not UTF-8 text"),
        (b'{"prompt": "a cat"\n', "not valid JSON"),
        (b"prompt,task\na cat,geneval\n", "not valid JSON"),
        (b"\n\n", "holds no prompts"),
    ],
)
def test_unreadable_prompt_files_name_the_file(real_files, tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    err = _one_line_error(capsys, _grpo(real_files, f"data.train={bad}"))
    assert needle in err and "bad.jsonl" in err, err


def test_prompt_records_must_fit_the_reward(real_files, tmp_path, capsys):
    # GenEval's reward needs GenEval metadata: a plain prompt record has no tag / include
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "a photo of a cat"}\n')
    err = _one_line_error(capsys, _grpo(real_files, f"data.train={plain}"))
    assert "data.train prompt 1" in err and "'tag'" in err
    # a broken benchmark file: the GenEval reader names file and line
    broken = tmp_path / "broken_test.jsonl"
    broken.write_text(real_files["test"].read_text().splitlines()[0] + "\n{oops\n")
    err = _one_line_error(capsys, _grpo(real_files, f"data.test={broken}"))
    assert "broken_test.jsonl:2" in err and "JSON" in err


def test_check_ocr_presets_read_the_published_txt(real_files, capsys):
    for preset, algo in (("grpo_ocr.yaml", "grpo"), ("crd_ocr.yaml", "crd")):
        argv = ["check", algo, "--config", str(SD35M / preset),
                f"data.train={real_files['ocr_jsonl']}", f"data.test={real_files['ocr_txt']}"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert re.search(r"benchmark ocr +5 prompts from", out) and "latents 16x64x64" in out
    no_target = real_files["ocr_jsonl"].parent / "no_target.jsonl"
    no_target.write_text('{"prompt": "a shop sign", "task": "ocr"}\n')
    argv = ["check", "grpo", "--config", str(SD35M / "grpo_ocr.yaml"),
            f"data.train={no_target}", f"data.test={real_files['ocr_txt']}"]  # fmt: skip
    assert "no target text for the ocr reward" in _one_line_error(capsys, argv)


def _lora(path: Path, name: str = "t.lora_A.weight", shape: tuple = (2, 2)) -> Path:
    """A minimal valid safetensors LoRA file: its header and one float32 tensor ``name``."""
    path.mkdir(parents=True)
    size = 4 * shape[0] * shape[1]
    header = json.dumps(
        {name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, size]}}
    ).encode()
    blob = len(header).to_bytes(8, "little") + header + bytes(size)
    (path / "pytorch_lora_weights.safetensors").write_bytes(blob)
    return path


def test_opd_preset_checks_its_teacher_adapters(real_files, tmp_path, capsys):
    geneval = tmp_path / "opd_geneval.jsonl"
    geneval.write_text(
        "".join(json.dumps({**json.loads(x), "task": "geneval"}) + "\n"
                for x in real_files["train"].read_text().splitlines())
    )  # fmt: skip
    pick = tmp_path / "pick.jsonl"
    pick.write_text(json.dumps({"prompt": "a red apple", "task": "pickscore"}) + "\n")
    loras = {n: _lora(tmp_path / n) for n in ("g", "o", "p", "init")}
    argv = ["check", "opd", "--config", str(SD35M / "opd.yaml"), "--no-estimate",
            f"data.datasets.0.path={geneval}", f"data.datasets.1.path={real_files['ocr_jsonl']}",
            f"data.datasets.2.path={pick}", f"data.test={real_files['test']}",
            f"eval.benchmarks=[geneval, ocr={real_files['ocr_txt']}]",
            f"opd.teachers.0.path={loras['g']}", f"opd.teachers.1.path={loras['o']}",
            f"opd.anchor={loras['p']}", f"opd.init={loras['init']}"]  # fmt: skip
    # the preset's teacher_pickscore still points at runs/sd35m_grpo_pickscore/lora
    err = _one_line_error(capsys, argv)
    assert (
        "teacher 'teacher_pickscore': LoRA 'runs/sd35m_grpo_pickscore/lora' does not exist" in err
    )
    assert "pass a LoRA directory" in err
    ok = [*argv, f"opd.teachers.2.path={loras['p']}"]
    assert main(ok) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "teacher teacher_ocr" in out and "(1 tensors) for ocr" in out
    # a teacher file that is not safetensors: one line naming the file
    (loras["o"] / "pytorch_lora_weights.safetensors").write_bytes(b"\xff" * 64)
    err = _one_line_error(capsys, ok)
    assert "teacher 'teacher_ocr'" in err and "not a readable safetensors file" in err
    # a prompt whose task has no teacher
    pick.write_text(json.dumps({"prompt": "a red apple", "task": "drawing"}) + "\n")
    (loras["o"] / "pytorch_lora_weights.safetensors").unlink()
    _lora(tmp_path / "o2")
    err = _one_line_error(capsys, [*ok, f"opd.teachers.1.path={tmp_path / 'o2'}"])
    assert "no teacher for task 'drawing'" in err and "add a teacher with tasks: [drawing]" in err


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x00\x01binary", "invalid YAML"),
        ("model:\n  path: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        (b"model: [unclosed\n", "invalid YAML at line"),
        (b"- a\n- b\n", "must hold a mapping of sections"),
        (b"sample:\n  noise_level: .nan\n", "'sample.noise_level' must be a finite number"),
        (b"train:\n  adv_clip: .inf\n", "'train.adv_clip' must be a finite number"),
    ],
)
def test_unreadable_config_files_are_one_line(tmp_path, capsys, content, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(content)
    err = _one_line_error(capsys, ["check", "grpo", "--config", str(cfg)])
    assert needle in err and "run.yaml" in err, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["check", "grpo", "--gpus", "0"], "argument --gpus: must be an integer >= 1, got '0'"),
        (["check", "grpo", "--mfu", "nan"], "argument --mfu: must be a number > 0 and <= 1"),
        (["estimate", "--config", "x.yaml", "--mfu", "inf"], "must be a number > 0 and <= 1"),
        (["sample", "--prompt", "a", "--out", "o", "--steps", "0"], "--steps: must be an integer >= 1"),
        (["sample", "--prompt", "a", "--out", "o", "--guidance", "nan"], "--guidance: must be a number >= 0"),
        (["sample", "--prompt", "a", "--out", "o", "--resolution", "-8"], "--resolution: must be an integer >= 8"),
        (["serve-reward", "ocr", "--port", "70000"], "--port: must be an integer >= 0 and <= 65535"),
        (["serve-reward", "ocr", "--max-bytes", "0"], "--max-bytes: must be an integer >= 1"),
        (["merge", "--teachers", "a", "--weights", "nan", "--out", "o"], "--weights: must be a number >= 0"),
        (["merge", "--teachers", "a", "--rank", "0", "--out", "o"], "--rank: must be an integer >= 1"),
        (["pretrain", "--out", "o", "--lr", "0"], "--lr: must be a number > 0"),
        (["pretrain", "--out", "o", "--ocr-fraction", "2"], "--ocr-fraction: must be a number >= 0 and <= 1"),
        (["world", "render", "--prompts", "p.jsonl", "--out", "o", "--scale", "0"], "--scale: must be an integer >= 1 and <= 64"),
    ],
)  # fmt: skip
def test_numeric_cli_options_are_range_checked(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_unreadable_files_across_commands_are_one_line(tmp_path, capsys, tiny_pixel_dir):
    bad_lora = tmp_path / "bad_lora"
    bad_lora.mkdir()
    (bad_lora / "pytorch_lora_weights.safetensors").write_bytes(b"\x93" * 100)
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01 binary")
    model = tmp_path / "broken_model"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "transformer" / "config.json").write_text("{not json")
    cases = [
        (["sample", "--model", str(tiny_pixel_dir), "--prompt", "a", "--steps", "1",
          "--lora", str(bad_lora), "--out", str(tmp_path / "s")], "is not a readable safetensors"),
        (["merge", "--teachers", str(bad_lora), str(bad_lora), "--out", str(tmp_path / "m")],
         "is not a readable safetensors"),
        (["eval", "--model", str(tiny_pixel_dir), "--benchmark", f"ocr={binary}", "--n", "1",
          "--steps", "1", "--out", str(tmp_path / "e")], "UTF-8"),
        (["eval", "--model", str(tiny_pixel_dir), "--benchmark", f"geneval={binary}", "--n", "1",
          "--steps", "1", "--out", str(tmp_path / "e")], "UTF-8"),
        (["estimate", "--config", str(SD35M / "grpo_ocr.yaml"), f"model.path={model}"],
         "config.json' is not valid JSON"),
    ]  # fmt: skip
    for argv, needle in cases:
        err = _one_line_error(capsys, argv)
        assert needle in err, (argv[0], err)


def test_train_runs_the_check_before_loading_anything(real_files, tmp_path, capsys):
    out = tmp_path / "run"
    broken = tmp_path / "broken_test.jsonl"
    broken.write_text("{oops\n")
    argv = ["train", "grpo", "--config", str(SD35M / "grpo_geneval.yaml"),
            f"data.train={real_files['train']}", f"data.test={broken}", f"output.dir={out}"]  # fmt: skip
    t0 = time.perf_counter()
    err = _one_line_error(capsys, argv)
    assert "broken_test.jsonl:1" in err and "JSON" in err
    assert time.perf_counter() - t0 < 20  # no model loads, no epoch runs
    assert not out.exists()  # nothing written


def test_check_sft_plan_on_a_local_model(tmp_path, capsys, tiny_pixel_dir):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"p{i}", "task": "ocr"}) + "\n"
                             for i in range(8)))  # fmt: skip
    lora = _lora(tmp_path / "teacher")
    argv = ["check", "sft", f"model.path={tiny_pixel_dir}", f"data.train={train}",
            f"sft.teachers=[{{path: {lora}, tasks: [ocr]}}]", "sample.num_prompts=8",
            "sample.images_per_prompt=2", "train.batch_size=4", "train.epochs=3",
            "model.resolution=32", "--gpus", "2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    # pixel space (VAE scale 1), patch 4: 32 px -> 3 x 32 x 32 latents, (32 / 4)^2 = 64 tokens
    assert "32 px (model.resolution) -> latents 3x32x32, 64 image tokens" in out
    # 8 prompts x 2 images / 2 processes = 8 per process; 8 / 4 = 2 steps x 3 epochs
    assert "8 prompts x 2 teacher images (8 per process, 2 process(es))" in out
    assert "2 optimizer step(s) per epoch x 3 epochs = 6" in out
    assert "teacher teacher_ocr" in out and "estimate: not available for 'sft'" in out
    err = _one_line_error(capsys, [*argv[:-2], "--gpus", "3"])
    assert "sample.num_prompts=8 must be divisible by the number of processes (3)" in err


def test_weights_status_local_cached_or_missing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from flowopd.preflight import weights_status

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / "models--org--detector" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert weights_status(str(tmp_path)) == "local"
    assert weights_status("org/detector") == "cached"
    assert weights_status("org/other") == "not in the local Hugging Face cache"


def test_uncached_hub_weights_are_warnings_cached_ones_are_not(
    real_files, tmp_path, capsys, monkeypatch
):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    (hub / "models--my-org--m2f" / "snapshots" / "x").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    argv = _grpo(real_files, "--no-estimate",
                 "reward.options={geneval: {detector: my-org/m2f, colors: hsv}}")  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "detector my-org/m2f (cached)" in out and "clip_model" not in out  # hsv: no CLIP
    assert "warning: model.path stabilityai/stable-diffusion-3.5-medium is not in the" in out
    assert "warning: geneval reward" not in out


def test_a_cached_hub_model_is_read_from_its_snapshot(real_files, tmp_path, capsys, monkeypatch,
                                                      tiny_pixel_dir):  # fmt: skip
    """A hub id outside perf.KNOWN_ARCHS, in the local cache: the plan and the estimate read
    its architecture from the snapshot (nothing downloaded)."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--my-org--tiny"
    snap = repo / "snapshots" / "abc123"
    (snap / "transformer").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for f in ("model_index.json", "transformer/config.json"):
        shutil.copy(tiny_pixel_dir / f, snap / f)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(_grpo(real_files, "model.path=my-org/tiny", "model.resolution=32")) == 0
    out = capsys.readouterr().out
    # the tiny pixel-space model: VAE scale 1, patch 4 -> 32 px = 3 x 32 x 32, 8^2 tokens
    assert "32 px (model.resolution) -> latents 3x32x32, 64 image tokens" in out
    assert "sequence     32 px: 64 image" in out  # the estimate used the same architecture
    assert "warning: model.path" not in out  # cached: nothing to download


@pytest.mark.parametrize(
    "name, shape, needle",
    [
        ("transformer.transformer_blocks.30.attn.to_q.lora_A.weight", (4, 1536),
         "adapts transformer block 30, but the model has 24"),
        ("transformer.transformer_blocks.3.attn.to_q.lora_A.weight", (32, 2432),
         "has width 2432 (transformer.transformer_blocks.3.attn.to_q.lora_A.weight), the model 1536"),
        ("transformer.transformer_blocks.3.attn.add_k_proj.lora_B.weight", (2432, 32),
         "has width 2432"),
    ],
)  # fmt: skip
def test_adapters_of_another_architecture_are_refused(real_files, tmp_path, capsys, name,
                                                      shape, needle):  # fmt: skip
    """SD3.5-M: 24 blocks of width 24 heads x 64 = 1536; SD3.5-Large's are 2432 wide."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "a dog", "task": "geneval"}) + "\n")
    good = _lora(tmp_path / "good", "transformer.transformer_blocks.23.attn.to_q.lora_A.weight",
                 (4, 1536))  # fmt: skip
    base = ["check", "sft", "model.path=stabilityai/stable-diffusion-3.5-medium",
            f"data.train={sft}", "sample.num_prompts=4", "train.batch_size=4"]  # fmt: skip
    assert main([*base, f"sft.teachers=[{{path: {good}, tasks: [geneval]}}]"]) == 0
    capsys.readouterr()
    bad = _lora(tmp_path / "bad", name, shape)
    err = _one_line_error(capsys, [*base, f"sft.teachers=[{{path: {bad}, tasks: [geneval]}}]"])
    assert "teacher 'teacher_geneval': LoRA" in err and needle in err, err


@pytest.mark.parametrize(
    "script, argv, needle",
    [
        ("pass_at_k", ["--noise", "nan"], "--noise: must be a number > 0"),
        ("pass_at_k", ["--steps", "0"], "--steps: must be an integer >= 1"),
        ("grad_snr", ["--guidance", "nan"], "--guidance: must be a number >= 0"),
        ("grad_snr", ["--group-size", "1"], "--group-size: must be an integer >= 2"),
        ("parallel_runs", ["jobs.txt", "out", "--budget", "inf"], "--budget: must be a number > 0"),
    ],
)  # fmt: skip
def test_script_numeric_options_are_range_checked(capsys, script, argv, needle):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script, REPO / "scripts" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err
