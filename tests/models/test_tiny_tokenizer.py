"""The offline CLIP BPE tokenizer: listed words are single tokens, world prompts fit."""

from __future__ import annotations

from flowopd.models.tiny import DEFAULT_WORDS, clip_tokenizer
from flowopd.recipes.pretrain import EMBEDDED_ARCH
from flowopd.world.prompts import make_records


def test_every_listed_word_is_one_token():
    # "red" adds the merge (r, e); built naively, "green" then splits as g re e n</w>.
    tok = clip_tokenizer()
    for word in DEFAULT_WORDS:
        ids = tok(word).input_ids  # <|startoftext|> word <|endoftext|>
        assert tok.convert_ids_to_tokens(ids)[1:-1] == [word + "</w>"], word


def test_unlisted_text_falls_back_to_bytes():
    tok = clip_tokenizer()
    assert tok.convert_ids_to_tokens(tok("7x").input_ids)[1:-1] == ["7</w>", "x</w>"]
    # digits are split one by one by CLIP's pre-tokenizer; letters run through BPE
    assert tok.decode(tok("zebra 42").input_ids, skip_special_tokens=True) == "zebra 4 2"


def test_world_prompts_fit_the_embedded_text_encoder_without_truncation():
    # A truncated prompt loses its second object: the model cannot learn what it never sees.
    tok = clip_tokenizer(max_length=EMBEDDED_ARCH.clip_max_length)
    longest = 0
    for task in ("geneval", "ocr"):
        for rec in make_records(task, "train", 2000, seed=0):
            longest = max(longest, len(tok(rec["prompt"], truncation=False).input_ids))
    assert longest <= EMBEDDED_ARCH.clip_max_length
    # the longest GenEval template is 10 words + 2 special tokens
    assert longest == 12
