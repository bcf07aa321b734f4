"""CLIP-based preference rewards: PickScore, CLIP score, LAION aesthetic predictor.

All three load a transformers ``CLIPModel`` (+ tokenizer and image processor) from a local
directory or a hub id already in the Hugging Face cache; nothing is downloaded when offline
(``HF_HUB_OFFLINE=1``), and a missing model is one ``UserError`` saying what to do.

With unit-norm embeddings ``e_img = normalize(P_v(ViT(x)))``, ``e_txt = normalize(P_t(T(p)))``:

- ``pickscore``:  ``exp(logit_scale) * <e_img, e_txt> / 26``  (PickScore_v1, CLIP-H; /26 as
  Flow-GRPO, so rewards sit near 0.8-0.9).
- ``clip_score``: ``100 * <e_img, e_txt> / 30``  (CLIPScore with w = 100, /30 as Flow-GRPO; not
  clipped at 0).
- ``aesthetic``:  ``MLP(e_img)``, the LAION improved aesthetic predictor head (CLIP ViT-L/14,
  Linear 768-1024-128-64-16-1), raw score on a ~1-10 scale.

ImageReward and HPSv2 are not provided: their packages pull open_clip/timm (and torchvision,
which does not import beside torch 2.13) and fetch weights at load time. Serve them elsewhere
and point flowopd at the server with ``remote:URL``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowopd.errors import UserError
from flowopd.rewards.base import register_reward

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"


def hf_load(
    loader: Callable[..., Any],
    path: str | Path,
    what: str,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``loader(path, ...)`` (a ``from_pretrained``) with one clear ``UserError`` on failure.

    An existing local path is loaded with ``local_files_only=True``; a path-looking string that
    does not exist fails at once; anything else is a hub id, resolved from the cache when offline.
    """
    path = str(path)
    local = Path(path).expanduser()
    if local.exists():
        path, local_files_only = str(local), True
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"{what}: no such directory '{path}'")
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load {what} from '{path}': it is not a local directory and not in the Hugging "
            f"Face cache (downloads are off when HF_HUB_OFFLINE=1); pass a local directory, or "
            f"download it once with `hf download {path}` ({first})"
        ) from None


def to_pil(images: Tensor) -> list:
    """(B, 3, H, W) float in [0, 1] -> B PIL RGB images (uint8, rounded)."""
    from PIL import Image

    x = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]


class ClipEncoder:
    """A transformers CLIP model with its tokenizer and image processor.

    ``encode_images(list of PIL | (H, W, 3) uint8) -> (N, D)`` and ``encode_text(list[str]) ->
    (N, D)``, both unit-norm float32 on CPU. ``processor`` (tokenizer + image processor) defaults
    to ``model``; PickScore takes it from the CLIP-H repository.
    """

    def __init__(
        self,
        model: str | Path,
        processor: str | Path | None = None,
        device: str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        local_files_only: bool | None = None,
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        proc = processor or model
        self.model = hf_load(
            CLIPModel.from_pretrained, model, "CLIP model", local_files_only, dtype=dtype
        )
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = hf_load(
            AutoTokenizer.from_pretrained, proc, "CLIP tokenizer", local_files_only
        )
        self.image_processor = hf_load(
            AutoImageProcessor.from_pretrained, proc, "CLIP image processor", local_files_only
        )
        self.device, self.dtype = device, dtype
        self.max_length = min(
            int(getattr(self.tokenizer, "model_max_length", 77) or 77),
            self.model.config.text_config.max_position_embeddings,
        )

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)``, the learned inverse temperature (100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> Tensor:
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(
            pixel_values=pixels.to(self.device, self.dtype)
        ).pooler_output
        emb = self.model.visual_projection(pooled).float()
        return (emb / emb.norm(dim=-1, keepdim=True)).cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        pooled = self.model.text_model(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
        ).pooler_output
        emb = self.model.text_projection(pooled).float()
        return (emb / emb.norm(dim=-1, keepdim=True)).cpu()


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


class ClipSimilarityReward:
    """``scale * cos(e_img, e_txt) / divisor`` in chunks of ``batch_size``; (B,) float32.

    scale None means the model's own ``exp(logit_scale)`` (PickScore); CLIP score fixes 100.
    """

    def __init__(
        self, encoder: ClipEncoder, scale: float | None, divisor: float, batch_size: int = 32
    ) -> None:
        self.encoder, self.scale, self.divisor = encoder, scale, divisor
        self.batch_size = batch_size

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scale = self.encoder.logit_scale if self.scale is None else self.scale
        pil = to_pil(images)
        out = []
        for sl in _chunks(len(pil), self.batch_size):
            e_img = self.encoder.encode_images(pil[sl])  # (b, D)
            e_txt = self.encoder.encode_text(prompts[sl])  # (b, D)
            out.append(scale * (e_img * e_txt).sum(-1) / self.divisor)
        return torch.cat(out).float() if out else torch.zeros(0)


@register_reward("pickscore")
def make_pickscore(
    model: str = PICKSCORE_MODEL,
    processor: str = PICKSCORE_PROCESSOR,
    device: str = "cpu",
    batch_size: int = 32,
    divisor: float = 26.0,
) -> ClipSimilarityReward:
    """``pickscore`` reward: ``exp(logit_scale) * cos(image, prompt) / 26``."""
    enc = ClipEncoder(model, processor=processor, device=device)
    return ClipSimilarityReward(enc, scale=None, divisor=divisor, batch_size=batch_size)


@register_reward("clip_score")
def make_clip_score(
    model: str = CLIP_MODEL,
    processor: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    divisor: float = 30.0,
) -> ClipSimilarityReward:
    """``clip_score`` reward: ``100 * cos(image, prompt) / 30``."""
    enc = ClipEncoder(model, processor=processor, device=device)
    return ClipSimilarityReward(enc, scale=100.0, divisor=divisor, batch_size=batch_size)


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor MLP on a unit-norm CLIP image embedding (D -> 1).

    Layout (state-dict keys ``layers.{0,2,4,6,7}``): Linear(D, 1024), Dropout(0.2),
    Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1).
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: Tensor) -> Tensor:  # (B, D) -> (B,)
        return self.layers(emb).squeeze(-1)


def load_aesthetic_head(path: str | Path, dim: int) -> AestheticHead:
    """Load the head from ``.pth``/``.pt`` (tensors only) or ``.safetensors``; keys may be
    ``layers.N.*`` or bare ``N.*``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"aesthetic head not found: '{path}'; download the LAION improved-aesthetic-predictor "
            "weights (sac+logos+ava1-l14-linearMSE.pth) and pass head=PATH"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {(k if k.startswith("layers.") else f"layers.{k}"): v for k, v in state.items()}
    head = AestheticHead(dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"aesthetic head '{path}' does not fit the LAION MLP on {dim}-d CLIP embeddings: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return head.eval().requires_grad_(False)


class AestheticReward:
    """``MLP(e_img)``: LAION aesthetic score of each image (prompts unused); (B,) float32."""

    def __init__(self, encoder: ClipEncoder, head: AestheticHead, batch_size: int = 32) -> None:
        self.encoder, self.head, self.batch_size = encoder, head, batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        pil = to_pil(images)
        dev = next(self.head.parameters()).device
        out = [
            self.head(self.encoder.encode_images(pil[sl]).to(dev)).cpu()
            for sl in _chunks(len(pil), self.batch_size)
        ]
        return torch.cat(out).float() if out else torch.zeros(0)


@register_reward("aesthetic")
def make_aesthetic(
    head: str | None = None,
    clip_model: str = CLIP_MODEL,
    device: str = "cpu",
    batch_size: int = 32,
) -> AestheticReward:
    """``aesthetic`` reward: LAION aesthetic MLP ``head`` (a local file) on ``clip_model``."""
    if head is None:
        raise UserError(
            "the aesthetic reward needs head=PATH to the LAION improved-aesthetic-predictor MLP "
            "(sac+logos+ava1-l14-linearMSE.pth)"
        )
    enc = ClipEncoder(clip_model, device=device)
    dim = enc.model.config.projection_dim
    return AestheticReward(enc, load_aesthetic_head(head, dim).to(device), batch_size)
