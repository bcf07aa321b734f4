"""The flux backend against diffusers' own FluxPipeline (tiny, in memory, offline)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flowopd import sde
from flowopd.errors import UserError
from flowopd.models import BASE, load_model
from flowopd.models.flux import FluxModel, pack_latents, unpack_latents
from flowopd.models.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline
from flowopd.sampling import sample
from tests.models._lora import check_saved_lora_matches_stock
from tests.models._lora import randomize_adapter as _randomize

PROMPTS = ["a photo of a red circle", 'a sign that says "47"']
MSL = 8  # T5 tokens


@pytest.fixture(scope="module")
def flux_pipe():
    """A tiny guidance-distilled FLUX pipeline (16 px, 8 x 8 x 4 latents); never mutated."""
    return build_tiny_flux_pipeline()


@pytest.fixture
def flux(flux_pipe):
    return FluxModel(copy.deepcopy(flux_pipe), max_sequence_length=MSL, native_resolution=16)


def _stock(pipe, steps, w, seed=0, output_type="latent", res=16):
    """FluxPipeline's output for PROMPTS; latents come back unpacked (B, C, h, w)."""
    out = pipe(
        PROMPTS, num_inference_steps=steps, guidance_scale=w, height=res, width=res,
        generator=torch.Generator().manual_seed(seed), output_type=output_type,
        max_sequence_length=MSL,
    ).images  # fmt: skip
    if output_type == "latent":
        out = pipe._unpack_latents(out, res, res, pipe.vae_scale_factor)
    return out


def test_ode_sampler_matches_stock_flux_pipeline(flux, flux_pipe):
    """Same noise (drawn unpacked, as FluxPipeline draws it before packing), same
    resolution-shifted sigmas, same guidance embedding: latents and images agree."""
    out = sample(flux, PROMPTS, 6, kind="ode", guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    ref = _stock(flux_pipe, 6, 3.5)
    assert out.latents.shape == ref.shape == (2, 4, 8, 8)
    assert (out.latents - ref).abs().max().item() < 1e-5
    img = _stock(flux_pipe, 6, 3.5, output_type="pt")
    assert out.images.shape == img.shape == (2, 3, 16, 16)
    assert (out.images - img).abs().max().item() < 1e-4
    # the guidance value really reaches the network (an embedding, not a CFG mix)
    other = sample(flux, PROMPTS, 6, kind="ode", guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0)).latents  # fmt: skip
    assert (other - out.latents).abs().max().item() > 1e-3
    assert (other - _stock(flux_pipe, 6, 1.0)).abs().max().item() < 1e-5


def test_schedule_is_the_pipeline_schedule_at_each_resolution(flux, flux_pipe):
    """FluxPipeline's sigmas: linspace(1, 1/N, N) shifted by exp(mu(tokens)), then 0; mu
    grows with the token count, so 32 px is shifted more than 16 px."""
    _stock(flux_pipe, 5, 3.5, res=32)  # leaves its 32 px schedule in the scheduler
    assert torch.equal(flux.schedule(5, 32), flux_pipe.scheduler.sigmas.float())
    s16, s32 = flux.schedule(5, 16), flux.schedule(5, 32)
    assert s16[0] == 1 and s16[-1] == 0 and len(s16) == 6
    assert (s32[1:-1] > s16[1:-1]).all()
    # at a fixed resolution that is SD3's shift formula with shift = exp(mu)
    base = torch.linspace(1.0, 1 / 5, 5, dtype=torch.float64).float()
    torch.testing.assert_close(s16[:-1], sde.shift_sigmas(base, flux.shift))
    assert flux.shift == pytest.approx(math.exp(0.5 - 0.65 * 240 / 3840))  # 16 tokens


def test_pack_unpack_is_flux_pipelines_packing(flux_pipe):
    x = torch.randn(3, 4, 8, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 12, 16)
    assert torch.equal(tokens, flux_pipe._pack_latents(x, 3, 4, 8, 6))
    assert torch.equal(unpack_latents(tokens, 8, 6), x)


def test_guidance_is_one_forward_and_cfg_grad_has_no_effect(flux):
    """One transformer call of B rows with guidance = w (float32, per row); cfg_grad
    'cond' and 'both' give the same value and the same LoRA gradient."""
    flux.add_adapter("policy", rank=4, alpha=8)
    flux.set_adapter("policy", trainable=True)
    _randomize(flux, "policy", 3)
    x = torch.randn(2, *flux.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = flux.encode_prompts(PROMPTS)
    calls = []
    hook = flux.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append((kw["hidden_states"].shape, kw["guidance"])),
        with_kwargs=True,
    )
    grads = {}
    for mode in ("cond", "both"):
        v = flux.velocity(x, 0.7, cond, guidance_scale=3.5, cfg_grad=mode)
        grads[mode] = torch.autograd.grad((v**2).sum(), flux.adapter_parameters("policy"))
        grads[mode + "_v"] = v.detach()
    hook.remove()
    assert len(calls) == 2 and calls[0][0] == (2, 16, 16)  # B rows of 16 packed tokens
    assert calls[0][1].dtype == torch.float32 and calls[0][1].tolist() == [3.5, 3.5]
    assert torch.equal(grads["cond_v"], grads["both_v"])
    assert all(torch.equal(a, b) for a, b in zip(grads["cond"], grads["both"], strict=True))
    with pytest.raises(UserError, match="cfg_grad"):
        flux.velocity(x, 0.7, cond, cfg_grad="uncond")


def test_schnell_ignores_the_guidance_scale():
    pipe = build_tiny_flux_pipeline(TinyFluxConfig(guidance_embeds=False))
    model = FluxModel(pipe, max_sequence_length=MSL, native_resolution=16)
    x = torch.randn(2, *model.latent_shape())
    cond = model.encode_prompts(PROMPTS)
    assert torch.equal(model.velocity(x, 0.5, cond, guidance_scale=1.0),
                       model.velocity(x, 0.5, cond, guidance_scale=7.0))  # fmt: skip


def test_sde_step_rescores_to_ratio_one(flux):
    out = sample(flux, PROMPTS, 5, kind="sde", guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(3))  # fmt: skip
    tr = out.trajectory
    assert tr.latents.shape == (2, 6, 4, 8, 8) and tr.stochastic.all()
    cond = flux.encode_prompts(PROMPTS)
    for i in range(5):
        s, s_next = float(tr.sigmas[i]), float(tr.sigmas[i + 1])
        v = flux.velocity(tr.latents[:, i], s, cond, guidance_scale=3.5)
        step = sde.sde_step(v, tr.latents[:, i], s, s_next, 0.7, sigma_max=float(tr.sigmas[1]),
                            prev_sample=tr.latents[:, i + 1])  # fmt: skip
        ratio = torch.exp(step.log_prob - tr.log_probs[:, i])
        assert (ratio - 1).abs().max().item() < 1e-6


def test_reference_and_teachers_are_the_same_forward_with_adapters_switched(flux):
    """GRPO's KL reference = adapters off; OPD's teachers = per-sample routed LoRAs; both
    the same single forward at the same guidance embedding as the policy."""
    for i, name in enumerate(["policy", "geneval", "ocr"]):
        flux.add_adapter(name, rank=4, alpha=4)
        _randomize(flux, name, i + 1)
    flux.set_adapter("policy", trainable=True)
    x = torch.randn(4, *flux.latent_shape(), generator=torch.Generator().manual_seed(1))
    cond = flux.encode_prompts(PROMPTS * 2)
    with torch.no_grad():
        policy = flux.velocity(x, 0.6, cond, guidance_scale=3.5)
        with flux.adapters_disabled():
            ref = flux.velocity(x, 0.6, cond, guidance_scale=3.5)
        with flux.adapter_active(None):
            assert torch.equal(flux.velocity(x, 0.6, cond, guidance_scale=3.5), ref)
        assert (policy - ref).abs().max() > 1e-3
        routes = ["geneval", "ocr", BASE, "ocr"]
        mixed = flux.velocity(x, 0.6, cond, guidance_scale=3.5, adapters=routes)
        for i, name in enumerate(routes):
            with flux.adapter_active(None if name == BASE else name):
                single = flux.velocity(x[i : i + 1], 0.6, cond[i], guidance_scale=3.5)
            torch.testing.assert_close(mixed[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_saved_lora_loads_into_stock_flux_pipeline_and_matches(flux, flux_pipe, tmp_path):
    flux.add_adapter("student", rank=4, alpha=8)
    flux.set_adapter("student")
    _randomize(flux, "student", 7)
    names = {n for n, _ in flux.transformer.named_parameters() if "lora_A.student" in n}
    # Flow-GRPO's FLUX targets: double-block attention + MLPs, single-block q/k/v
    assert any("single_transformer_blocks.0.attn.to_q" in n for n in names)
    assert any("transformer_blocks.0.ff_context.net.2" in n for n in names)
    assert not any("proj_mlp" in n or "single_transformer_blocks.0.proj_out" in n for n in names)
    check_saved_lora_matches_stock(
        flux, flux_pipe, lambda pipe: _stock(pipe, 4, 3.5),
        lambda pipe: FluxModel(pipe, max_sequence_length=MSL, native_resolution=16),
        PROMPTS, 4, 3.5, tmp_path,
    )  # fmt: skip


def test_save_reload_and_backend_mismatch_errors(flux, tmp_path, tiny_pipe):
    from flowopd.models.sd3 import SD3Model

    flux.save_pretrained(tmp_path / "flux")
    again = load_model(str(tmp_path / "flux"), backend="flux")
    assert again.default_resolution == 16 and again.max_sequence_length == MSL
    assert again.default_guidance_scale == 3.5
    a = sample(flux, PROMPTS, 2, kind="ode", generator=torch.Generator().manual_seed(0))
    b = sample(again, PROMPTS, 2, kind="ode", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(UserError, match="FLUX pipeline.*model.backend=flux"):
        load_model(str(tmp_path / "flux"))  # the sd3 default
    with pytest.raises(UserError, match="FLUX pipeline.*model.backend=flux"):
        load_model("black-forest-labs/FLUX.1-dev")  # known id: refused before any download
    SD3Model(tiny_pipe, max_sequence_length=8).save_pretrained(tmp_path / "sd3")
    with pytest.raises(UserError, match="StableDiffusion3Pipeline.*model.backend=sd3"):
        load_model(str(tmp_path / "sd3"), backend="flux")


def test_latent_shape_and_vae_roundtrip(flux):
    assert flux.latent_shape(32) == (4, 16, 16)
    with pytest.raises(UserError, match="multiple of 4"):
        flux.latent_shape(18)
    z = torch.randn(2, *flux.latent_shape())
    images = flux.decode(z)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert flux.encode_images(images).shape == z.shape
