"""SFT cold start: routed teachers' samples, then flow matching on a fresh student LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd.config import load_config
from flowopd.config.sft import SFTConfig
from flowopd.errors import UserError
from tests.recipes._teachers import make_teacher_loras, write_mixed_prompts


@pytest.fixture(scope="module")
def setup(tiny_pixel_dir, tmp_path_factory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("sft")
    return make_teacher_loras(tiny_pixel_dir, root / "teachers"), write_mixed_prompts(
        root / "mixed.jsonl", 4
    )


def _yaml(tmp: Path, model: Path, teachers: dict[str, Path], prompts: Path) -> Path:
    """8 prompts x 2 teacher images (6 ODE steps), minibatch 4: 4 optimizer steps/epoch."""
    cfg = tmp / "sft.yaml"
    cfg.write_text(
        f"""
model: {{path: {model}, dtype: float32, resolution: null, guidance_scale: 4.5,
        lora: {{rank: 4, alpha: 8}}}}
data: {{train: {prompts}}}
sft:
  teachers:
    - {{path: {teachers["geneval"]}, tasks: [geneval]}}
    - {{path: {teachers["ocr"]}, tasks: [ocr]}}
sample: {{num_prompts: 8, images_per_prompt: 2, num_steps: 6, batch_size: 16}}
train: {{epochs: 6, batch_size: 4, lr: 1.0e-2, seed: 3, ema: false}}
eval: {{every: 0}}
output: {{dir: {tmp / "run"}, checkpoint_every: 3}}
"""
    )
    return cfg


def test_sft_fits_the_teachers_samples(tmp_path, tiny_pixel_dir, setup):
    from flowopd.recipes.sft import train_sft

    teachers, prompts = setup
    cfg = load_config(SFTConfig, _yaml(tmp_path, tiny_pixel_dir, teachers, prompts))
    run = train_sft(cfg)
    probe = [h["probe_loss"] for h in run.history]  # fixed images, t and eps every epoch
    loss = [h["loss"] for h in run.history]
    # at lr ~ 0 the probe stays at its first value (2.70); learning lowers it steadily
    assert probe[-1] < probe[0] - 0.05, probe
    assert sum(loss[-2:]) < sum(loss[:2]), loss
    assert run.history[-1]["opt_steps"] == 6 * 4
    out = tmp_path / "run"
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert (out / "sft_data" / "rank-0.safetensors").is_file()
    # the teachers are gone after sampling: only the student is left on the model
    assert run.model.adapter_names == ["student"]

    # resume from the epoch-3 checkpoint with the cached samples: the same final weights
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "lora")
    again = train_sft(load_config(SFTConfig, _yaml(tmp_path, tiny_pixel_dir, teachers, prompts),
                                  ["output.resume=true"]))  # fmt: skip
    assert [h["epoch"] for h in again.history] == [3, 4, 5]
    assert again.model.adapter_names == ["student"]  # samples came from the cache
    lora2 = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(lora[k], lora2[k]) for k in lora)


def test_sft_teacher_samples_are_routed(tiny_pixel_dir, setup):
    from flowopd.config.opd import TeacherConfig
    from flowopd.models.sd3 import SD3Model
    from flowopd.recipes.sft import teacher_samples
    from flowopd.recipes.teachers import load_teachers
    from flowopd.sampling import sample

    teachers, _ = setup
    model = SD3Model.from_pretrained(str(tiny_pixel_dir))
    ts = load_teachers(model, [TeacherConfig(path=str(teachers[t]), tasks=[t])
                               for t in ("geneval", "ocr")])  # fmt: skip
    recs = [{"prompt": "a photo of a circle", "task": "geneval"},
            {"prompt": 'a sign that says "ab"', "task": "ocr"}]  # fmt: skip
    x0, cond = teacher_samples(model, recs, ts.adapters_for(recs), first=5, images_per_prompt=2,
                               num_steps=3, guidance_scale=4.5, batch_size=3, seed=0)  # fmt: skip
    assert x0.shape == (4, *model.latent_shape()) and len(cond) == 4
    # row 2 = prompt 1, image 0: the OCR teacher alone, from the same noise, gives it
    from flowopd.rollouts import seed_for

    gen = torch.Generator().manual_seed(seed_for(0, "sft", 5 + 1, 0))
    with model.adapter_active("teacher_ocr"):
        ref = sample(model, [recs[1]["prompt"]], 3, kind="ode", guidance_scale=4.5,
                     generator=[gen], decode=False).latents  # fmt: skip
    torch.testing.assert_close(x0[2:3], ref, atol=1e-5, rtol=1e-5)


def test_sft_config_errors(tmp_path, tiny_pixel_dir, setup):
    teachers, prompts = setup
    cfg = _yaml(tmp_path, tiny_pixel_dir, teachers, prompts)
    with pytest.raises(UserError, match="train.batch_size=3 must divide"):
        load_config(SFTConfig, cfg, ["train.batch_size=3"])
    with pytest.raises(UserError, match="sft.teachers is empty"):
        load_config(SFTConfig, cfg, ["sft.teachers=[]"])
