"""``flowopd estimate``: SD3.5-Medium by hub id (nothing downloaded) and a tiny local model
whose FLOP count is the hand count of tests/test_perf.py."""

from __future__ import annotations

import json

import pytest

from flowopd import perf
from flowopd.cli import main
from flowopd.config.sections import SD3_LORA_TARGETS
from flowopd.models.tiny import TinySD3Config
from tests.conftest import REPO
from tests.test_perf import HAND, HAND_FORWARD, N_IMG, N_TXT

SD35M = str(REPO / "configs" / "sd35m" / "grpo_geneval.yaml")
GiB = 1024**3


def _estimate(capsys, tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "est.json"
    assert main(["estimate", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_sd35m_geneval_on_h100(capsys, tmp_path):
    est, text = _estimate(capsys, tmp_path, "--config", SD35M, "--gpu", "h100")
    # 512 px: 1024 image + 77 + 256 text tokens; 2.44 TFLOPs per row + LoRA r=32
    assert (est["image_tokens"], est["text_tokens"], est["rows_per_image"]) == (1024, 333, 2)
    assert est["flops"]["forward_per_row_base"] == 2_442_642_604_032
    assert est["params"] == 2_243_171_520
    assert all(v > 0 for v in est["time_s"].values())
    assert 60 < est["epoch_seconds"] < 3600
    # the published batch (24 trajectories x CFG = 48 rows per backward) keeps ~100 GiB of
    # activations: the estimate says it does not fit and names the fixes
    assert est["memory"]["activations"] > 80 * GiB
    assert "exceeds the 80 GiB" in text and "gradient_checkpointing" in text
    assert "peak" in text and "sampling" in text and "training" in text


def test_sd35m_geneval_fits_with_checkpointing(capsys, tmp_path):
    est, _ = _estimate(
        capsys, tmp_path, "--config", SD35M, "--gpu", "h100", "--gpus", "8",
        "model.gradient_checkpointing=true",
    )  # fmt: skip
    assert 10 * GiB < est["memory"]["peak"] < 80 * GiB
    assert est["flops"]["train_per_row_recompute"] > 0
    # 8 processes share the 48 prompts: ~1/8 of the single-GPU epoch
    one, _ = _estimate(capsys, tmp_path, "--config", SD35M, "--gpu", "h100",
                       "model.gradient_checkpointing=true")  # fmt: skip
    assert est["epoch_seconds"] == pytest.approx(one["epoch_seconds"] / 8, rel=0.01)


def test_slower_gpu_is_slower(capsys, tmp_path):
    h100, _ = _estimate(capsys, tmp_path, "--config", SD35M, "--gpu", "h100")
    a100, _ = _estimate(capsys, tmp_path, "--config", SD35M, "--gpu", "a100")
    ratio = a100["time_s"]["training"] / h100["time_s"]["training"]
    assert ratio == pytest.approx(989 / 312)


def test_indivisible_gpus_is_user_error(capsys):
    assert main(["estimate", "--config", SD35M, "--gpus", "5"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_tiny_local_model_matches_the_hand_count(capsys, tmp_path):
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline

    # the HAND architecture as a saved pipeline: 4 x 4 latents (tiny VAE, x2) = 8 px,
    # 8 CLIP tokens + 4 T5 tokens = N_TXT
    cfg = TinySD3Config(
        sample_size=4, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, dual_attention_layers=(0,), qk_norm="rms_norm", clip_hidden=16,
        clip_max_length=8,
    )  # fmt: skip
    path = tmp_path / "tiny"
    SD3Model(build_tiny_sd3_pipeline(cfg), max_sequence_length=4).save_pretrained(path)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        f"model: {{path: {path}, dtype: float32, lora: {{rank: 4, alpha: 4}}}}\n"
        "data: {train: 'world:geneval'}\nreward: toy_geneval\n"
        "sample: {num_steps: 4, group_size: 2, prompts_per_epoch: 2, batch_size: 2}\n"
    )
    est, text = _estimate(capsys, tmp_path, "--config", str(yaml), "--gpu", "cpu")
    assert (est["image_tokens"], est["text_tokens"]) == (N_IMG, N_TXT)
    assert est["flops"]["forward_per_row_base"] == HAND_FORWARD == 772_096
    lora = perf.forward_flops(HAND, N_IMG, N_TXT, lora_rank=4, lora_targets=SD3_LORA_TARGETS)
    assert est["flops"]["forward_per_row"] == lora
    assert est["params"] == perf.transformer_params(HAND)
    # text encoders and VAE sizes come from the safetensors headers of the directory
    assert est["memory"]["text_encoders"] > 0 and est["memory"]["vae"] > 0
    assert "GFLOP/s measured" in text


def test_estimate_follows_model_resolution(capsys, tmp_path):
    """model.resolution sets the estimate's sequence: SD3.5-M at 1024 px has (1024/8/2)^2 =
    4096 image tokens, 4x the 1024 of 512 px; null means the native 1024 px."""
    at512, _ = _estimate(capsys, tmp_path, "--config", SD35M)
    at1024, _ = _estimate(capsys, tmp_path, "--config", SD35M, "model.resolution=1024")
    native, _ = _estimate(capsys, tmp_path, "--config", SD35M, "model.resolution=null")
    assert (at512["resolution"], at512["image_tokens"]) == (512, 1024)
    assert (at1024["resolution"], at1024["image_tokens"]) == (1024, 4096)
    assert native["image_tokens"] == 4096
    assert at1024["flops"]["forward_per_row"] > 4 * at512["flops"]["forward_per_row"]


def test_split_cfg_forward_halves_the_backward_rows(capsys, tmp_path):
    """model.cfg_forward=split with train.cfg_grad=cond: per trained row and step, one
    forward without autograd for v_u instead of a second forward + backward; activations
    for B rows instead of 2B. cfg_grad=both gets no saving."""
    batched, _ = _estimate(capsys, tmp_path, "--config", SD35M, "--gpu", "h100")
    split, _ = _estimate(
        capsys, tmp_path, "--config", SD35M, "--gpu", "h100", "model.cfg_forward=split"
    )
    both, _ = _estimate(
        capsys, tmp_path, "--config", SD35M, "--gpu", "h100", "model.cfg_forward=split",
        "train.cfg_grad=both",
    )  # fmt: skip
    f = batched["flops"]
    rows = 48 * 24 * 9  # 1152 images x 9 trained steps, one CFG pair each
    tf = perf.train_step_flops(
        perf.SD35_MEDIUM, 1024, 333, lora_rank=32, lora_targets=SD3_LORA_TARGETS
    )  # forward + backward + the attention kernel's recomputed scores
    saved = rows * (tf.hardware - f["forward_per_row"])
    assert f["training_per_epoch"] - split["flops"]["training_per_epoch"] == saved
    assert split["memory"]["activations"] * 2 == pytest.approx(
        batched["memory"]["activations"], rel=1e-6
    )
    assert split["flops"]["sampling_per_epoch"] == f["sampling_per_epoch"]
    assert both["flops"]["training_per_epoch"] == f["training_per_epoch"]
    # SD3.5-M at 512 px: policy 2 x (5.26 T) -> 2.47 T + 5.26 T per pair, + the KL
    # reference 2 x 2.44 T either way: the training phase drops to ~0.82x
    ratio = split["time_s"]["training"] / batched["time_s"]["training"]
    assert 0.80 < ratio < 0.84


@pytest.mark.parametrize(
    ("preset", "times", "base_rows", "adapter_rows"),
    [
        ("nft_geneval", 9, 1, 1),  # 9 of 10 grid times; KL base + old snapshot, CFG-free
        ("awm_geneval", None, 1, 1),  # the preset's times_used; KL base + EMA snapshot
        ("crd_ocr", None, 2, 1),  # old snapshot (CFG-free) + the base anchor's CFG pair
    ],
)
def test_forward_process_methods_cost_their_times_and_frozen_forwards(
    capsys, tmp_path, preset, times, base_rows, adapter_rows
):
    """CRD / NFT / AWM train every clean sample at ``times_used`` grid times, each a policy
    forward + backward plus the method's frozen forwards (``perf.reference_rows``):
    training = images x times x (F_train + base_rows x F_base + adapter_rows x F_fwd)."""
    from flowopd.algos import config_class
    from flowopd.config.loader import load_config
    from flowopd.config.times import training_times_of

    path = REPO / "configs" / "sd35m" / f"{preset}.yaml"
    cfg = load_config(config_class(preset.split("_")[0]), str(path), validate=False)
    est, _ = _estimate(capsys, tmp_path, "--config", str(path), "--gpu", "h100")
    used = training_times_of(cfg).times_used
    assert times is None or used == times
    assert cfg.model.guidance_scale == 1.0  # one row per image: no CFG pair
    assert perf.reference_rows(cfg) == (base_rows, adapter_rows)
    f = est["flops"]
    images = cfg.layout.prompts_per_epoch * cfg.layout.group_size
    tf = perf.train_step_flops(
        perf.SD35_MEDIUM,
        est["image_tokens"],
        est["text_tokens"],
        lora_rank=cfg.model.lora.rank,
        lora_targets=SD3_LORA_TARGETS,
    ).hardware  # forward + backward + the attention kernel's recomputed scores
    per_row = tf + base_rows * f["forward_per_row_base"] + adapter_rows * f["forward_per_row"]
    assert f["training_per_epoch"] == cfg.layout.inner_epochs * images * used * per_row


def test_opd_costs_its_teachers_and_the_mar_anchor(capsys, tmp_path):
    """Flow-OPD: per trained row one routed-teacher forward and, with MAR on, one anchor
    forward (x 2 under CFG; the preset's anchor is a LoRA, '' = the base); mar_lambda=0
    drops exactly the anchor's cost."""
    from flowopd.config.loader import load_config
    from flowopd.config.opd import OPDConfig

    path = str(REPO / "configs" / "sd35m" / "opd.yaml")
    cfg = load_config(OPDConfig, path, validate=False)
    on, _ = _estimate(capsys, tmp_path, "--config", path, "--gpu", "h100")
    off, _ = _estimate(capsys, tmp_path, "--config", path, "--gpu", "h100", "opd.mar_lambda=0")
    rows = 2 if cfg.model.guidance_scale > 1 else 1
    assert cfg.opd.anchor and perf.reference_rows(cfg) == (0, 2 * rows)
    cfg.opd.anchor = ""
    assert perf.reference_rows(cfg) == (rows, rows)
    assert perf.reference_rows(cfg, cfg_pairs=False) == (1, 1)  # FLUX: one row a forward
    images = cfg.layout.prompts_per_epoch * cfg.layout.group_size
    anchor = cfg.layout.inner_epochs * images * cfg.trained_steps * rows
    saved = on["flops"]["training_per_epoch"] - off["flops"]["training_per_epoch"]
    assert saved == anchor * on["flops"]["forward_per_row"]


FLUX1DEV = str(REPO / "configs" / "flux1dev" / "grpo_geneval.yaml")


def test_flux1dev_geneval_by_hub_id(capsys, tmp_path):
    """FLUX.1-dev from its hub id, nothing downloaded: 19 + 38 blocks (11.9 B parameters),
    LoRA r=64 on Flow-GRPO's FLUX targets, 512 px -> (512/8/2)^2 = 1024 packed image tokens
    + 512 T5 tokens, one row per image (guidance embedding, no CFG pair)."""
    est, text = _estimate(capsys, tmp_path, "--config", FLUX1DEV, "--gpu", "h100", "--gpus", "8")
    assert est["params"] == 11_901_408_320 == perf.transformer_params(perf.FLUX1_DEV)
    assert est["lora_params"] == 179_306_496
    assert (est["image_tokens"], est["text_tokens"], est["rows_per_image"]) == (1024, 512, 1)
    assert "memory per process:" in text and "lora+grads+adamw+ema" in text
    mem = est["memory"]
    assert mem["transformer"] == 11_901_408_320 * 2  # bf16, no positional table
    assert mem["text_encoders"] == (123_060_480 + 4_762_310_656) * 4
    assert mem["lora+grads+adamw+ema"] == 179_306_496 * (4 + 4 + 8 + 4)
    assert 40 * GiB < mem["peak"] < 80 * GiB  # Flow-GRPO's micro-batch of 3 fits an H100
    assert "guidance is an embedding" in text


def test_tiny_flux_counts_match_torch_and_peft():
    """FLUX FLOPs (forward, LoRA forward, LoRA train step) equal torch's FlopCounterMode on a
    tiny FLUX transformer, and the LoRA parameter count equals peft's."""
    import torch

    from flowopd.lora_targets import FLUX_TARGETS
    from flowopd.models.flux import FluxModel
    from flowopd.models.tiny_flux import build_tiny_flux_pipeline

    m = FluxModel(build_tiny_flux_pipeline(), max_sequence_length=4, native_resolution=16)
    arch = perf.FluxArch.from_config(dict(m.transformer.config))
    assert perf.transformer_params(arch) == sum(p.numel() for p in m.transformer.parameters())
    m.add_adapter("p", rank=4, alpha=4)
    m.set_adapter("p", trainable=True)
    assert perf.lora_params(arch, 4, FLUX_TARGETS) == sum(
        p.numel() for p in m.adapter_parameters("p")
    )
    x, cond = torch.randn(1, 4, 8, 8), m.encode_prompts(["a red circle"])
    n_img, n_txt = 16, cond.embeds.shape[1]
    lora = {"lora_rank": 4, "lora_targets": FLUX_TARGETS}
    with torch.no_grad():
        with m.adapters_disabled():
            base = perf.measure_flops(lambda: m.velocity(x, 0.5, cond, guidance_scale=3.5))
        fwd = perf.measure_flops(lambda: m.velocity(x, 0.5, cond, guidance_scale=3.5))
        for p in m.adapter_parameters("p"):
            p.normal_()  # B != 0: every LoRA factor gets a gradient
    assert base == perf.forward_flops(arch, n_img, n_txt)
    assert fwd == perf.forward_flops(arch, n_img, n_txt, **lora)
    train = perf.measure_flops(
        lambda: m.velocity(x, 0.5, cond, guidance_scale=3.5).sum().backward()
    )
    assert train == perf.train_step_flops(arch, n_img, n_txt, **lora).hardware


def test_full_finetune_shards_the_trained_state_over_processes(capsys, tmp_path):
    # model.finetune=full: float32 weights + grads + AdamW + EMA (20 B/param) and the
    # frozen bf16 reference, divided over the FSDP processes (~1/N per process)
    args = ["--config", SD35M, "model.finetune=full", "--gpu", "h100"]
    est = {n: _estimate(capsys, tmp_path, *args, "--gpus", str(n)) for n in (1, 2, 8)}
    text = est[8][1]
    assert "memory per process:" in text and "trained state shard" in text
    n = est[1][0]["params"]
    shard = {g: e["memory"]["trained state shard"] for g, (e, _) in est.items()}
    assert shard[1] == pytest.approx(20 * n, rel=0.05)  # + the unsharded position buffer
    for g in (2, 8):
        assert shard[g] == pytest.approx(shard[1] / g, rel=0.15)
        ref = est[g][0]["memory"]["reference shard"]
        assert ref < est[1][0]["memory"]["reference shard"]
    assert est[8][0]["memory"]["peak"] < est[1][0]["memory"]["peak"]
    assert "lora+grads+adamw+ema" not in est[8][0]["memory"]
    # no KL term: no frozen copy
    e0, _ = _estimate(capsys, tmp_path, *args, "--gpus", "8", "grpo.beta_kl=0")
    assert e0["memory"]["reference shard"] == 0
    # full fine-tuning also computes the weight gradients: a dearer training step
    lora, _ = _estimate(capsys, tmp_path, "--config", SD35M, "--gpu", "h100", "--gpus", "8")
    assert est[8][0]["flops"]["train_per_row_model"] > lora["flops"]["train_per_row_model"]


def test_flux1dev_fewer_t5_tokens_cost_less(capsys, tmp_path):
    """model.max_sequence_length=128 (Flow-GRPO's text length) replaces FluxPipeline's 512
    T5 tokens: 1024 + 128 tokens per row, so each training step costs less."""
    full, _ = _estimate(capsys, tmp_path, "--config", FLUX1DEV, "--gpu", "h100", "--gpus", "8")
    short, _ = _estimate(
        capsys, tmp_path, "--config", FLUX1DEV, "--gpu", "h100", "--gpus", "8",
        "model.max_sequence_length=128",
    )  # fmt: skip
    assert (full["text_tokens"], short["text_tokens"]) == (512, 128)
    assert set(full["time_s"]) >= {"training"}
    assert short["time_s"]["training"] < 0.9 * full["time_s"]["training"]


def test_the_method_of_a_config_that_extends_is_found(capsys, tmp_path):
    """A file that extends the CRD preset names no crd: section itself; the estimate finds
    the method in the file it extends (else it would load it as GRPO and fail)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        f"extends: {REPO / 'configs' / 'toy' / 'crd_geneval.yaml'}\ntrain: {{epochs: 3}}\n"
    )
    est, _ = _estimate(capsys, tmp_path, "--config", str(mine), "--gpu", "h100")
    assert any(n.startswith("'crd'") for n in est["notes"]), est["notes"]
