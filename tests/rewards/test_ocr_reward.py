"""The OCR reward on text rendered with PIL (real offline OCR), and the OCR prompt reader."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from flowopd.errors import UserError
from flowopd.rewards.ocr import extract_target, normalize, ocr_score, read_ocr_prompts

pytest.importorskip("rapidocr_onnxruntime")

FONT_PATHS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
]


def _font(size: int = 22):
    from PIL import ImageFont

    for p in FONT_PATHS:
        if Path(p).is_file():
            return ImageFont.truetype(p, size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default


def render(text: str, w: int = 256, h: int = 48) -> torch.Tensor:
    """Black text on white, (3, h, w) in [0, 1]."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).text((8, 10), text, font=_font(), fill="black")
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr():
    from flowopd.rewards import get_reward

    reward = get_reward("ocr", workers=2)
    yield reward
    reward.close()


# --- pure scoring rule -------------------------------------------------------------------------
def test_score_rule():
    assert extract_target('a sign "Hello World" and "second"') == "Hello World"
    assert extract_target("no quotes here") is None
    assert normalize(" Step  Goal\tAchieved ") == "stepgoalachieved"
    assert ocr_score("HELLO WORLD", "hello world") == 1.0
    assert ocr_score("big sale: hello world!!", "Hello World") == 1.0  # substring
    assert ocr_score("hellp world", "hello world") == pytest.approx(1 - 1 / 10)
    assert ocr_score("", "abc") == 0.0
    assert ocr_score("a completely different and long text", "abc") == 0.0  # clipped at 0
    assert ocr_score("ab", "abcd") == pytest.approx(0.5)  # two deletions of four


# --- real OCR on rendered text ------------------------------------------------------------------
def test_rendered_text_exact_one_wrong_blank_and_throughput(ocr, capsys):
    texts = ["Hello World", "Hellp World", "Open Late", "FLOWOPD 2025"]
    prompts = [
        'a neon sign that says "Hello World"',
        'a neon sign that says "Hello World"',  # one wrong character of ten (spaces dropped)
        'a shop window with "open late" painted on it',  # case and spaces ignored
        'a badge reading "FLOWOPD 2026"',  # one wrong digit of eleven
        'a blank page with "nothing" on it',
    ]
    images = torch.stack([render(t) for t in texts] + [torch.ones(3, 48, 256)])
    ocr(images[:2], prompts[:2], [{}, {}])  # warm-up: each worker thread builds its engine
    t0 = time.perf_counter()
    scores = ocr(images, prompts, [{}] * 5)
    dt = time.perf_counter() - t0
    expected = [1.0, 1 - 1 / 10, 1.0, 1 - 1 / 11, 0.0]
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)
    with capsys.disabled():
        print(
            f"\n[ocr throughput] rapidocr, {ocr.workers} workers, 256x48 images: "
            f"{len(images) / dt:.1f} images/s ({dt / len(images) * 1e3:.0f} ms/image)"
        )


def test_submit_returns_future_and_matches_call(ocr):
    images = torch.stack([render("Open Late"), render("Hello World")])
    prompts = ['"open late"', '"goodbye"']
    fut = ocr.submit(images, prompts, [{}, {}])
    assert isinstance(fut, Future)
    images.zero_()  # the caller may reuse its buffer: the images were copied at submit time
    got = fut.result(timeout=60)
    assert got[0] == 1.0 and got[1] < 0.5
    assert ocr.submit(images[:0], [], []).result().shape == (0,)


def test_prompt_without_quotes_scores_zero(ocr):
    assert ocr(render("Hello World")[None], ["hello world, no quotes"], [{}]).tolist() == [0.0]


def test_bad_backend_and_missing_tesseract():
    from flowopd.rewards.ocr import OcrReward

    with pytest.raises(UserError, match="did you mean 'tesseract'"):
        OcrReward(backend="tesseract2")
    try:
        import shutil

        import pytesseract  # noqa: F401

        have = shutil.which("tesseract") is not None
    except ImportError:
        have = False
    if have:
        reward = OcrReward(backend="tesseract", workers=1)
        assert reward(render("Hello World")[None], ['"hello world"'], [{}]).shape == (1,)
        reward.close()
    else:
        with pytest.raises(UserError, match="tesseract"):
            OcrReward(backend="tesseract")


# --- the real prompt file -----------------------------------------------------------------------
def test_read_every_ocr_prompt(shared_data):
    rows = read_ocr_prompts(shared_data / "ocr" / "test.txt")
    assert len(rows) == 1018
    assert rows[0]["target"] == "Spring Collection 2024"
    assert all(r["target"] and r["prompt"].count('"') >= 2 for r in rows)
    assert all(f'"{r["target"]}"' in r["prompt"] for r in rows)
    assert {r["task"] for r in rows} == {"ocr"}


def test_reader_errors(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text('ok "yes"\n\nno target here\n')
    with pytest.raises(UserError, match=r"p.txt:3: no quoted target"):
        read_ocr_prompts(p)
    with pytest.raises(UserError, match="not found"):
        read_ocr_prompts(tmp_path / "missing.txt")
