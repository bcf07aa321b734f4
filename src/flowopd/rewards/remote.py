"""Client for a reward served over HTTP by ``flowopd serve-reward`` (reward name ``remote:URL``).

Wire format (JSON only, never pickle)::

    POST {url}/score   Authorization: Bearer TOKEN   (when the server has a token)
    {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]}
    -> 200 {"scores": [float, ...]}      4xx/5xx {"error": "..."}

Images are sent as 8-bit RGB PNGs, so the server scores ``round(255 x) / 255`` of each pixel.
Connection failures, timeouts and 5xx/429 answers are retried with exponential backoff
(``backoff * 2**k`` seconds); when the server stays down, one ``UserError`` says where it was
expected and how to start it. A 4xx answer is the request's fault and is raised at once.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowopd.errors import UserError

TOKEN_ENV = "FLOWOPD_REWARD_TOKEN"


def encode_png(image: Tensor | np.ndarray) -> str:
    """One image, (3, H, W) float in [0, 1] or (H, W, 3) uint8, as a base64 PNG string."""
    from PIL import Image

    if isinstance(image, Tensor):
        arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(data: str) -> tuple[bytes, int, int]:
    """A base64 PNG string -> (its bytes, width, height), the size read from the IHDR chunk
    (bytes 16-24) without decoding anything. Raises ``ValueError`` when it is not a PNG."""
    if not isinstance(data, str):
        raise ValueError(f"image must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"image is not valid base64 ({e})") from None
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError("image is not a PNG")
    # signature (8) | IHDR length (4) | "IHDR" (4) | width (4) | height (4), big-endian
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise ValueError("image is not a readable PNG (no IHDR header)")
    width, height = struct.unpack(">II", raw[16:24])
    if width == 0 or height == 0:
        raise ValueError(f"image has an empty size {width}x{height}")
    return raw, width, height


def decode_png(data: str | tuple[bytes, int, int], max_pixels: int | None = None) -> Tensor:
    """A base64 PNG string (or ``png_header``'s result) -> (3, H, W) float32 in [0, 1].

    The pixel count ``width x height`` is checked against ``max_pixels`` (default: PIL's
    ``MAX_IMAGE_PIXELS``, ~89 M) from the header, before PIL allocates or inflates anything:
    a PNG of a few KB can declare 100,000 x 100,000 pixels of one colour. Raises
    ``ValueError`` on anything that is not a well-formed PNG within the limit.
    """
    from PIL import Image

    raw, width, height = png_header(data) if isinstance(data, str) else data
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and width * height > limit:
        raise ValueError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limit} pixels; send smaller images or raise the server's --max-pixels"
        )
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            if im.size != (width, height):  # one IHDR, so never; but never decode unchecked
                raise ValueError(f"PNG header says {width}x{height}, the decoder {im.size}")
            im.load()  # inflates at most width x height pixels (IHDR bounds the decoder)
            arr = np.asarray(im.convert("RGB"))
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types on corrupt data (and on its own bombs)
        raise ValueError(f"image is not a readable PNG ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


class RemoteReward:
    """A ``RewardFn`` that sends each batch to a reward server; (B,) float32.

    url: server base URL (``http://127.0.0.1:18085``); token: bearer token (default: the
    ``FLOWOPD_REWARD_TOKEN`` environment variable); batch_size: images per request;
    retries: attempts after the first; backoff: first wait in seconds, doubled each retry.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        batch_size: int = 64,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
    ) -> None:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"remote reward URL must start with http:// or https://, got {url!r}")
        self.url = url
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.batch_size, self.timeout = max(int(batch_size), 1), timeout
        self.retries, self.backoff = max(int(retries), 0), backoff

    def _post(self, payload: dict[str, Any]) -> list[float]:
        try:
            body = json.dumps(payload).encode()
        except (TypeError, ValueError) as e:
            raise UserError(f"remote reward: metadata must be plain JSON data ({e})") from None
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(f"{self.url}/score", data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    answer = json.loads(resp.read())
            except urllib.error.HTTPError as e:
                msg = _error_text(e)
                if e.code >= 500 or e.code == 429:
                    last = f"HTTP {e.code}: {msg}"
                    continue
                raise UserError(
                    f"reward server {self.url} rejected the request: HTTP {e.code}: {msg}"
                ) from None
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
                last = str(getattr(e, "reason", e))
                continue
            scores = answer.get("scores") if isinstance(answer, dict) else None
            if not isinstance(scores, list) or len(scores) != len(payload["images"]):
                raise UserError(
                    f"reward server {self.url} sent a malformed answer: {str(answer)[:200]}"
                )
            return [float(s) for s in scores]
        raise UserError(
            f"reward server {self.url} did not answer after {self.retries + 1} attempts "
            f"(last error: {last}); start it with `flowopd serve-reward NAME --port PORT` "
            "or fix the URL"
        )

    def health(self) -> dict:
        """``GET /health`` (one attempt); raises ``UserError`` when unreachable."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise UserError(f"reward server {self.url} is not reachable: {e}") from None

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        n = len(images)
        if len(prompts) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts")
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        scores: list[float] = []
        for s in range(0, n, self.batch_size):
            sl = slice(s, min(s + self.batch_size, n))
            payload = {
                "images": [encode_png(im) for im in images[sl]],
                "prompts": list(prompts[sl]),
                "metadata": metadata[sl],
            }
            scores += self._post(payload)
        return torch.tensor(scores, dtype=torch.float32)


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(e.read() or b"{}")
        return str(data.get("error", data)) if isinstance(data, dict) else str(data)
    except (json.JSONDecodeError, OSError, ValueError):
        return e.reason if isinstance(e.reason, str) else str(e)
