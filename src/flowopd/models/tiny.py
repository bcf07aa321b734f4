"""Tiny SD3 pipelines built in memory from configs, fully offline.

Used by the tests (a 1-second pipeline) and as the skeleton of the embedded default model.
The tokenizer is a real CLIP byte-level BPE tokenizer whose vocabulary is built
deterministically from a word list (every byte is a token, so any text tokenizes; the
listed words become single tokens), so nothing is downloaded and ids never change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Words that become single tokens. Anything else falls back to byte-level pieces.
_WORDS = """
a an the of and photo with that says sign left right above below
red green blue yellow purple orange black white pink brown gray
circle circles square squares triangle triangles cross crosses star stars
one two three four five six dog tree house word text image picture on in to is
"""
DEFAULT_WORDS: tuple[str, ...] = tuple(_WORDS.split())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE on one pre-token: repeatedly merge the lowest-ranked adjacent pair."""
    while len(word) > 1:
        pairs = set(zip(word[:-1], word[1:], strict=True))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out: list[str] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = tuple(out)
    return word


def clip_vocab(
    words: Sequence[str] = DEFAULT_WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A deterministic CLIP BPE vocabulary: 256 bytes, 256 end-of-word bytes, word merges.

    Merges build each word left to right (``c a t</w>`` -> ``ca t</w>`` -> ``cat</w>``).
    A merge added for one word can pre-empt another word's chain (``r e`` from "red"
    splits "green" into ``g re e n</w>``), so words are revisited until every listed word
    tokenizes to exactly one token, joining whatever pieces BPE leaves with new merges.
    Returns (vocab: token -> id, merges: list of pairs).
    """
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab_list)
    enc = _bytes_to_unicode()
    pretokens = []
    for word in dict.fromkeys(words):  # ordered, de-duplicated
        chars = [enc[b] for b in word.lower().encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        pretokens.append(tuple(chars))
    for _ in range(len(pretokens) + 1):  # each pass fixes every word it visits
        changed = False
        for chars in pretokens:
            pieces = _bpe(chars, ranks)
            if len(pieces) == 1:
                continue
            changed = True
            left = pieces[0]
            for nxt in pieces[1:]:
                pair = (left, nxt)
                left = left + nxt
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                if left not in seen:
                    seen.add(left)
                    vocab_list.append(left)
        if not changed:
            break
    else:  # pragma: no cover - a vocabulary that never settles is a bug in this function
        raise RuntimeError("clip_vocab: word merges did not converge")
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def clip_tokenizer(words: Sequence[str] = DEFAULT_WORDS, max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` over ``clip_vocab(words)``, padded with <|endoftext|>."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


def t5_tokenizer(words: Sequence[str] = DEFAULT_WORDS):
    """A tiny ``transformers.T5Tokenizer`` (unigram) over the word list plus single characters."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += ["▁" + w for w in dict.fromkeys(words)]
    pieces += [chr(c) for c in range(33, 127)] + ["▁"]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(dict.fromkeys(pieces))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@dataclass
class TinySD3Config:
    """Sizes of an in-memory SD3 pipeline. Defaults: the 1-second test pipeline."""

    sample_size: int = 8  # latent side (the transformer's sample_size)
    patch_size: int = 1
    in_channels: int = 4
    num_layers: int = 2
    attention_head_dim: int = 8
    num_attention_heads: int = 4
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    clip_hidden: int = 16  # each of the two CLIP encoders; joint dim = 2 * clip_hidden
    clip_layers: int = 2
    clip_max_length: int = 16
    t5: bool = True  # include a tiny T5 encoder (SD3's third text encoder)
    t5_max_length: int = 8
    vae: bool = True  # a tiny AutoencoderKL (x2 down-sampling); False = pixel space
    vae_blocks: int = 2  # VAE down-sampling blocks: scale 2^(vae_blocks - 1) (SD3: 4 -> x8)
    pos_embed_max_size: int | None = None  # None: max(sample_size / patch_size, 8)
    shift: float = 3.0
    words: tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)


def _tiny_transformer(cfg: TinySD3Config, joint: int):
    """The MMDiT of ``cfg`` (random weights from the current torch seed)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=joint,
        caption_projection_dim=cfg.attention_head_dim * cfg.num_attention_heads,
        pooled_projection_dim=joint,
        pos_embed_max_size=cfg.pos_embed_max_size or max(cfg.sample_size // cfg.patch_size, 8),
        dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm=cfg.qk_norm,
    ).eval()


def clip_text_config(tok, hidden: int, layers: int, max_length: int, **extra):
    """A tiny ``CLIPTextConfig`` over tokenizer ``tok`` (2 heads, MLP 2 x ``hidden``)."""
    from transformers import CLIPTextConfig

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        **extra,
    )


def t5_encoder(tokenizer, width: int, seed: int):
    """A one-layer ``T5EncoderModel`` of width ``width`` over ``tokenizer`` (torch seed
    ``seed``)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5_cfg = T5Config(
        vocab_size=len(tokenizer.get_vocab()),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(t5_cfg).eval()


def _tiny_clip_encoders(cfg: TinySD3Config, tok, seed: int) -> list:
    """The two CLIP text encoders (torch seeds ``seed + 1`` and ``seed + 2``)."""
    from transformers import CLIPTextModelWithProjection

    encoders = []
    for i in range(2):
        torch.manual_seed(seed + 1 + i)
        clip_cfg = clip_text_config(
            tok, cfg.clip_hidden, cfg.clip_layers, cfg.clip_max_length,
            projection_dim=cfg.clip_hidden,
        )  # fmt: skip
        encoders.append(CLIPTextModelWithProjection(clip_cfg).eval())
    return encoders


def _tiny_t5(cfg: TinySD3Config, joint: int, seed: int):
    """(T5 encoder, its tokenizer) of width ``joint`` (torch seed ``seed + 3``)."""
    tokenizer = t5_tokenizer(cfg.words)
    return t5_encoder(tokenizer, joint, seed + 3), tokenizer


def _tiny_vae(cfg: TinySD3Config, seed: int):
    """The VAE: ``vae_blocks`` blocks, ``2**(vae_blocks-1)`` x down-sampling (seed ``seed + 4``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 4)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * cfg.vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * cfg.vae_blocks,
        block_out_channels=(8,) * cfg.vae_blocks,
        latent_channels=cfg.in_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=cfg.sample_size * 2 ** (cfg.vae_blocks - 1),
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def build_tiny_sd3_pipeline(cfg: TinySD3Config | None = None, seed: int = 0):
    """A complete ``StableDiffusion3Pipeline`` with random weights, built offline.

    joint_attention_dim = 2 * clip_hidden (SD3 concatenates the two CLIP embeddings
    and pads them to the T5 width); pooled_projection_dim = 2 * clip projection dim.
    Each part draws its weights from its own torch seed (``seed`` .. ``seed + 4``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    cfg = cfg or TinySD3Config()
    joint = 2 * cfg.clip_hidden
    torch.manual_seed(seed)
    transformer = _tiny_transformer(cfg, joint)
    tok = clip_tokenizer(cfg.words, cfg.clip_max_length)
    encoders = _tiny_clip_encoders(cfg, tok, seed)
    text_encoder_3, tokenizer_3 = _tiny_t5(cfg, joint, seed) if cfg.t5 else (None, None)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
        vae=_tiny_vae(cfg, seed) if cfg.vae else None,
        text_encoder=encoders[0],
        tokenizer=tok,
        text_encoder_2=encoders[1],
        tokenizer_2=clip_tokenizer(cfg.words, cfg.clip_max_length),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
