"""OCR reward: does the image show the text quoted in the prompt? Fully offline.

Target ``t`` = the text between the first pair of double quotes in the prompt. The engine reads
every text line of the image; the lines are joined, lowercased and stripped of spaces into
``s`` (``t`` is normalised the same way). Then (METHODS §6, as in Flow-GRPO)::

    reward = 1                                      if t is a substring of s
           = max(1 - edit_distance(s, t) / len(t), 0)  otherwise

with the Levenshtein distance from ``rapidfuzz``. A prompt without a quoted target scores 0.

Backends: ``rapidocr`` (default; PP-OCR detection + recognition ONNX models shipped inside the
``rapidocr_onnxruntime`` wheel, nothing downloaded) and ``tesseract`` (``pytesseract`` plus the
Debian ``tesseract-ocr`` binary). Scoring runs on a thread pool (ONNX Runtime and Tesseract
release the GIL), so ``OcrReward.submit`` returns a ``Future`` and the caller can keep sampling
while the batch is read.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowopd.errors import UserError
from flowopd.rewards.base import register_reward

_QUOTED = re.compile(r'"([^"]*)"')


def extract_target(prompt: str) -> str | None:
    """The text between the first pair of double quotes, or None when there is no pair.

    >>> extract_target('a sign that says "Hello World" in neon')
    'Hello World'
    """
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


def normalize(text: str) -> str:
    """Lowercase and remove all whitespace: ``"Step Goal" -> "stepgoal"``."""
    return "".join(text.split()).lower()


def ocr_score(read: str, target: str) -> float:
    """``1`` if ``normalize(target)`` occurs in ``normalize(read)``, else
    ``max(1 - levenshtein(read, target) / len(target), 0)`` on the normalised strings.

    >>> ocr_score("HELLO world!", "hello world")
    1.0
    >>> ocr_score("hellp", "hello")   # one substitution in five characters
    0.8
    """
    from rapidfuzz.distance import Levenshtein

    t, s = normalize(target), normalize(read)
    if not t:
        return 0.0
    if t in s:
        return 1.0
    return max(1.0 - Levenshtein.distance(s, t) / len(t), 0.0)


def read_ocr_prompts(path: str | Path) -> list[dict]:
    """Read an OCR prompt file (one prompt a line, target in the first double quotes).

    Returns one record a non-empty line: ``{"prompt", "target", "task": "ocr"}``. A line without a
    quoted target is a ``UserError`` naming the line, since it could never score above 0.
    """
    from flowopd.data.text import read_text_lines

    path = Path(path)
    records = []
    for lineno, line in enumerate(read_text_lines(path, "OCR prompt file"), 1):
        prompt = line.strip()
        if not prompt:
            continue
        target = extract_target(prompt)
        if target is None or not normalize(target):
            raise UserError(f"{path}:{lineno}: no quoted target text in {prompt[:80]!r}")
        records.append({"prompt": prompt, "target": target, "task": "ocr"})
    return records


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounded like PNG saving does."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# Engines: (H, W, 3) uint8 RGB -> the text read, lines joined in reading order.
# ---------------------------------------------------------------------------------------------
Engine = Callable[[np.ndarray], str]


def _rapidocr_engine(min_confidence: float = 0.0, **kwargs) -> Engine:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise UserError(
            "the 'rapidocr' OCR backend needs rapidocr_onnxruntime: pip install 'flowopd[ocr]'"
        ) from e
    # One ONNX thread per engine: the parallelism comes from the worker pool (no oversubscription).
    kwargs.setdefault("intra_op_num_threads", 1)
    kwargs.setdefault("inter_op_num_threads", 1)
    # PaddleOCR's defaults, as Flow-GRPO ran it: detection input capped at 960 px on the long
    # side (rapidocr's own default *upscales* the short side to 736 px: 10x slower on small
    # images), no angle classifier (generated text is upright).
    kwargs.setdefault("det_limit_type", "max")
    kwargs.setdefault("det_limit_side_len", 960)
    kwargs.setdefault("use_cls", False)
    engine = RapidOCR(**kwargs)

    def read(image: np.ndarray) -> str:
        # RapidOCR expects BGR like OpenCV.
        result, _ = engine(np.ascontiguousarray(image[..., ::-1]))
        if not result:
            return ""
        return "".join(text for _box, text, conf in result if float(conf) >= min_confidence)

    return read


def _tesseract_engine(min_confidence: float = 0.0, config: str = "--psm 6") -> Engine:
    try:
        import pytesseract
    except ImportError as e:
        raise UserError(
            "the 'tesseract' OCR backend needs pytesseract (pip install pytesseract) and the "
            "tesseract binary (apt-get install tesseract-ocr)"
        ) from e
    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        raise UserError(
            "the 'tesseract' OCR backend needs the tesseract binary on PATH: "
            "apt-get install tesseract-ocr (or use backend='rapidocr')"
        )
    from PIL import Image

    def read(image: np.ndarray) -> str:
        if min_confidence <= 0:
            return pytesseract.image_to_string(Image.fromarray(image), config=config)
        data = pytesseract.image_to_data(
            Image.fromarray(image), config=config, output_type=pytesseract.Output.DICT
        )
        return "".join(
            w
            for w, c in zip(data["text"], data["conf"], strict=True)
            if w.strip() and float(c) >= min_confidence
        )

    return read


ENGINES: dict[str, Callable[..., Engine]] = {
    "rapidocr": _rapidocr_engine,
    "tesseract": _tesseract_engine,
}


class OcrReward:
    """The OCR reward over a pool of ``workers`` threads, one engine per thread.

    ``reward(images, prompts, metadata) -> Tensor[B]`` blocks; ``submit(...)`` returns a
    ``Future`` resolving to the same tensor, so scoring overlaps with whatever the caller does
    next. Images are copied to uint8 at submit time, so the caller may reuse its tensor.
    """

    def __init__(
        self,
        backend: str = "rapidocr",
        workers: int = 2,
        min_confidence: float = 0.0,
        **engine_options,
    ) -> None:
        if backend not in ENGINES:
            from flowopd.errors import unknown

            raise unknown("OCR backend", backend, ENGINES)
        if workers < 1:
            raise UserError(f"OCR workers must be >= 1, got {workers}")
        self.backend = backend
        self.workers = workers
        self._make_engine = lambda: ENGINES[backend](
            min_confidence=min_confidence, **engine_options
        )
        self._local = threading.local()
        # Build one engine now so a missing backend fails at construction, not in a worker.
        self._local.engine = self._make_engine()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowopd-ocr")

    def _engine(self) -> Engine:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = self._make_engine()
        return engine

    def read_text(self, image: np.ndarray) -> str:
        """The text read from one (H, W, 3) uint8 RGB image (in the calling thread)."""
        return self._engine()(image)

    def _score_one(self, image: np.ndarray, prompt: str) -> float:
        target = extract_target(prompt)
        if target is None:
            return 0.0
        return ocr_score(self.read_text(image), target)

    def submit(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> Future[Tensor]:
        """Start scoring; the Future resolves to a (B,) float32 tensor of rewards in [0, 1]."""
        arrays = to_uint8_hwc(images)  # (B, H, W, 3)
        if len(arrays) != len(prompts):
            raise ValueError(f"{len(arrays)} images but {len(prompts)} prompts")
        parts = [
            self._pool.submit(self._score_one, a, p) for a, p in zip(arrays, prompts, strict=True)
        ]
        return _gather(parts)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return self.submit(images, prompts, metadata).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _gather(parts: list[Future[float]]) -> Future[Tensor]:
    """One Future for a list of per-image Futures (resolves once all are done)."""
    out: Future[Tensor] = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def done(_f: Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] or out.done():
                return
        errors = [f.exception() for f in parts if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
        else:
            out.set_result(torch.tensor([f.result() for f in parts], dtype=torch.float32))

    if not parts:
        out.set_result(torch.zeros(0, dtype=torch.float32))
    for f in parts:
        f.add_done_callback(done)
    return out


@register_reward("ocr")
def make_ocr(
    backend: str = "rapidocr", workers: int = 2, min_confidence: float = 0.0, **engine_options
) -> OcrReward:
    """``ocr`` reward: ``max(1 - edit_distance/len(target), 0)``, 1 on a substring match.

    backend: ``rapidocr`` (default, offline) or ``tesseract``; workers: thread-pool size;
    min_confidence: drop text lines the engine is less sure of (0 keeps all, as Flow-GRPO).
    """
    return OcrReward(
        backend=backend, workers=workers, min_confidence=min_confidence, **engine_options
    )
