"""PickScore / CLIP score / aesthetic on a tiny random CLIP saved to disk (no downloads)."""

from __future__ import annotations

import math

import pytest
import torch

from flowopd.errors import UserError
from flowopd.rewards import get_reward

PROMPTS = [
    "a red circle",
    "two blue squares",
    "a photo of a cat",
    "a sign that says hello",
    "a dog",
]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A 1-layer CLIP (hidden 32, 32 px images, projection 16) with a real BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from flowopd.models.tiny import clip_tokenizer

    tok = clip_tokenizer()
    vocab = tok.get_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            **ids,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
        ),  # fmt: skip
        projection_dim=16,
        logit_scale_init_value=math.log(50.0),  # exp = 50, so the scale is visible in tests
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def _images(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 40, 48, generator=g)


def _reference_logits(path, images, prompts):
    """``CLIPModel.forward``'s ``logits_per_image`` diagonal = exp(logit_scale) * cos."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from flowopd.rewards.preference import to_pil

    model = CLIPModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)(prompts, padding=True, return_tensors="pt")
    pix = AutoImageProcessor.from_pretrained(path)(images=to_pil(images), return_tensors="pt")
    with torch.no_grad():
        out = model(**tok, pixel_values=pix["pixel_values"])
        scale = float(model.logit_scale.exp())
    return out.logits_per_image.diagonal(), scale


def test_pickscore_and_clip_score_scaling(tiny_clip):
    images = _images()
    logits, scale = _reference_logits(tiny_clip, images, PROMPTS)
    assert scale == pytest.approx(50.0)
    cos = logits / scale
    pick = get_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip))(
        images, PROMPTS, [{}] * 5
    )
    clip = get_reward("clip_score", model=str(tiny_clip))(images, PROMPTS, [{}] * 5)
    for s in (pick, clip):
        assert s.shape == (5,) and s.dtype == torch.float32
    # PickScore: exp(logit_scale) * cos / 26 (the model's own scale: 50 here)
    torch.testing.assert_close(pick, 50.0 * cos / 26, atol=1e-5, rtol=1e-5)
    # CLIP score: 100 * cos / 30 whatever the model's logit scale
    torch.testing.assert_close(clip, 100.0 * cos / 30, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pick, clip)


def test_batching_does_not_change_scores(tiny_clip):
    images = _images(seed=1)
    whole = get_reward("clip_score", model=str(tiny_clip), batch_size=8)(images, PROMPTS, [{}] * 5)
    chunked = get_reward("clip_score", model=str(tiny_clip), batch_size=2)(
        images, PROMPTS, [{}] * 5
    )
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=1e-5)
    # and each image's score does not depend on its neighbours
    one = get_reward("clip_score", model=str(tiny_clip))(images[3:4], PROMPTS[3:4], [{}])
    torch.testing.assert_close(one, whole[3:4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_head(tiny_clip, tmp_path, fmt):
    from flowopd.rewards.preference import AestheticHead, ClipEncoder, to_pil

    torch.manual_seed(1)
    head = AestheticHead(16)
    state = head.state_dict()
    path = tmp_path / f"head.{fmt}"
    if fmt == "pth":
        torch.save(state, path)  # keys "layers.N.weight", as the LAION checkpoint
    else:
        from safetensors.torch import save_file

        save_file({k.removeprefix("layers."): v for k, v in state.items()}, str(path))  # bare keys
    reward = get_reward("aesthetic", head=str(path), clip_model=str(tiny_clip), batch_size=2)
    images = _images()
    got = reward(images, PROMPTS, [{}] * 5)
    emb = ClipEncoder(tiny_clip).encode_images(to_pil(images))
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)  # unit-norm input to the MLP
    with torch.no_grad():
        expected = head.eval()(emb)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_errors(tiny_clip, tmp_path):
    from flowopd.rewards.preference import AestheticHead

    with pytest.raises(UserError, match="head=PATH"):
        get_reward("aesthetic", clip_model=str(tiny_clip))
    with pytest.raises(UserError, match="not found"):
        get_reward("aesthetic", head=str(tmp_path / "none.pth"), clip_model=str(tiny_clip))
    wrong = tmp_path / "wrong.pth"
    torch.save(AestheticHead(768).state_dict(), wrong)  # a ViT-L head on a 16-d CLIP
    with pytest.raises(UserError, match="does not fit"):
        get_reward("aesthetic", head=str(wrong), clip_model=str(tiny_clip))


def test_missing_models_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        get_reward("pickscore", model=str(tmp_path / "missing"))
    # a hub id that is not cached, with downloads off (conftest sets HF_HUB_OFFLINE=1)
    with pytest.raises(UserError, match="cannot load CLIP model"):
        get_reward("clip_score", model="nonexistent-org-flowopd/no-such-clip")


def test_clip_color_classifier_on_tiny_clip(tiny_clip):
    import numpy as np

    from flowopd.rewards.geneval import COLORS, ClipColorClassifier

    clf = ClipColorClassifier(str(tiny_clip), batch_size=2)
    w = clf.class_weights("car")
    assert w.shape == (10, 16)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(10))
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    boxes = np.array([[0, 0, 20, 20], [10, 5, 48, 40], [2, 2, 30, 30]], dtype=float)
    masks = np.zeros((3, 40, 48), dtype=bool)
    masks[:, 5:15, 5:15] = True
    out = clf.classify(img, boxes, masks, "car")
    assert len(out) == 3 and set(out) <= set(COLORS)
    assert clf.classify(img, boxes, None, "car") == clf.classify(img, boxes, None, "car")
