"""Serve any registered reward over HTTP with the standard library (``flowopd serve-reward``).

Endpoints (JSON in and out, never pickle; images as base64 PNG, see ``remote.py``)::

    GET  /health  -> 200 {"status": "ok", "reward": NAME, "max_batch": N, "max_bytes": B,
                          "max_pixels": P, "max_request_pixels": Q}
    POST /score   {"images": [...], "prompts": [...], "metadata": [...]?} -> 200 {"scores": [...]}

Safety: binds loopback by default; optional bearer token (constant-time compare); the body
must declare a ``Content-Length`` of at most ``max_bytes`` (checked before reading); at most
``max_batch`` images, ``max_pixels`` pixels per image and ``max_request_pixels`` in all, read
from every PNG's header before any image is decoded (a PNG of a few KB can declare billions of
pixels); sockets time out. Every malformed, oversized or unauthenticated request gets a 4xx
``{"error": ...}`` and the server keeps serving; a reward that raises gets a 500 (a
``UserError`` from the reward, e.g. bad metadata, a 400). At most ``max_threads`` connections
are handled at once (each holds at most one request body and its decoded images); the next
waits up to ``queue_timeout`` seconds for a free handler, then gets a 503 that clients retry.
Reward calls are serialised by a lock (models are rarely thread-safe). One log line a request::

    127.0.0.1 POST /score 200 n=8 12.3ms
    127.0.0.1 POST /score 401 n=- 0.1ms missing or wrong bearer token
    127.0.0.1 - - 503 n=- 10000.2ms server busy: 8 connections in progress
"""

from __future__ import annotations

import hmac
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

import torch

from flowopd.errors import UserError
from flowopd.rewards.base import RewardFn
from flowopd.rewards.remote import decode_png, png_header


class RequestError(Exception):
    """A request the server rejects with ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RewardServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` holding the reward and the limits (see module docstring)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        reward: RewardFn,
        name: str = "reward",
        token: str | None = None,
        max_batch: int = 64,
        max_bytes: int = 64 * 2**20,
        max_pixels: int = 4096 * 4096,
        max_request_pixels: int | None = None,
        max_threads: int = 8,
        queue_timeout: float = 10.0,
        timeout: float = 30.0,
        log: TextIO | Callable[[str], None] | None = None,
    ) -> None:
        # default: 64 images of 1024 x 1024 (805 MB as float32 RGB), or one of max_pixels
        if max_request_pixels is None:
            max_request_pixels = max(max_pixels, 64 * 2**20)
        limits = {"--max-batch": max_batch, "--max-bytes": max_bytes, "--max-pixels": max_pixels,
                  "--max-request-pixels": max_request_pixels, "--max-threads": max_threads}  # fmt: skip
        for flag, value in limits.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} must be an integer >= 1, got {value!r}")
        if not queue_timeout >= 0 or not timeout > 0:  # NaN fails both
            raise UserError(f"timeouts must be positive, got {queue_timeout} and {timeout}")
        self.reward, self.name, self.token = reward, name, token or None
        self.max_batch, self.max_bytes, self.max_pixels = max_batch, max_bytes, max_pixels
        self.max_request_pixels = max_request_pixels
        self.max_threads, self.queue_timeout = max_threads, queue_timeout
        self.timeout_s = timeout
        self.reward_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._log = log if log is not None else sys.stderr
        self._slots = threading.BoundedSemaphore(max_threads)
        self._closing = threading.Event()
        self.request_queue_size = max(16, 2 * max_threads)  # listen backlog while all are busy
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def log_line(self, line: str) -> None:
        with self._log_lock:
            if callable(self._log):
                self._log(line)
            else:
                self._log.write(line + "\n")
                self._log.flush()

    def score(self, payload: Any) -> list[float]:
        """Validate a /score payload, decode the images, call the reward (400 on bad input)."""
        if not isinstance(payload, dict):
            raise RequestError(400, "body must be a JSON object with 'images' and 'prompts'")
        images, prompts = payload.get("images"), payload.get("prompts")
        metadata = payload.get("metadata")
        if not isinstance(images, list) or not images:
            raise RequestError(400, "'images' must be a non-empty list of base64 PNG strings")
        if len(images) > self.max_batch:
            raise RequestError(413, f"{len(images)} images exceed the limit of {self.max_batch}")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "'prompts' must be a list of strings")
        if len(prompts) != len(images):
            raise RequestError(400, f"{len(images)} images but {len(prompts)} prompts")
        if metadata is None:
            metadata = [{} for _ in images]
        if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
            raise RequestError(400, "'metadata' must be a list of JSON objects")
        if len(metadata) != len(images):
            raise RequestError(400, f"{len(images)} images but {len(metadata)} metadata records")
        headers = self._check_sizes(images)
        tensors = []
        for i, header in enumerate(headers):
            try:
                tensors.append(decode_png(header, self.max_pixels))
            except ValueError as e:
                raise RequestError(400, f"images[{i}]: {e}") from None
        batch = torch.stack(tensors)  # (B, 3, H, W)
        with self.reward_lock:
            try:
                scores = self.reward(batch, prompts, metadata)
            except UserError as e:
                raise RequestError(400, f"reward rejected the batch: {e}") from None
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        if len(scores) != len(images):
            raise RequestError(
                500, f"reward returned {len(scores)} scores for {len(images)} images"
            )
        return scores.tolist()

    def _check_sizes(self, images: list) -> list[tuple[bytes, int, int]]:
        """Every PNG's header (no pixel decoded yet): one size for all, within the limits."""
        headers = []
        for i, data in enumerate(images):
            try:
                headers.append(png_header(data))
            except ValueError as e:
                raise RequestError(400, f"images[{i}]: {e}") from None
            _, w, h = headers[-1]
            if w * h > self.max_pixels:
                raise RequestError(
                    413, f"images[{i}]: {w}x{h} = {w * h} pixels exceeds the limit of "
                    f"{self.max_pixels} per image (--max-pixels); send smaller images",
                )  # fmt: skip
        if len({(w, h) for _, w, h in headers}) != 1:
            raise RequestError(400, "all images of a request must have the same size")
        total = sum(w * h for _, w, h in headers)
        if total > self.max_request_pixels:
            raise RequestError(
                413, f"{len(images)} images of {total} pixels in all exceed the limit of "
                f"{self.max_request_pixels} per request (--max-request-pixels); send fewer",
            )  # fmt: skip
        return headers

    # -- bounded handler threads ------------------------------------------------------------
    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Start a handler thread when one of ``max_threads`` slots is free (waiting up to
        ``queue_timeout`` seconds, while new connections queue in the listen backlog);
        otherwise answer 503 (clients retry 5xx) and close."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.queue_timeout
        while not self._slots.acquire(timeout=0.05):
            if self._closing.is_set() or time.monotonic() >= deadline:
                self._refuse_busy(request, client_address, t0)
                return
        try:
            super().process_request(request, client_address)  # the thread releases the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket, client_address: Any, t0: float) -> None:
        msg = f"server busy: {self.max_threads} connections in progress; retry later"
        body = json.dumps({"error": msg}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        ms = (time.perf_counter() - t0) * 1e3
        self.log_line(f"{client_address[0]} - - 503 n=- {ms:.1f}ms {msg}")
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
            _linger(request, seconds=0.5)  # let the client read it before the close
        except OSError:
            pass
        self.shutdown_request(request)

    def shutdown(self) -> None:
        self._closing.set()  # a connection waiting for a slot is refused at once
        super().shutdown()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"
    server_version = "flowopd-reward"
    # Answer unparseable request lines with a status line and headers too (the stdlib default,
    # HTTP/0.9, sends a bare body that clients cannot read as an error).
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # socket timeout: a stalled client frees its thread
        super().setup()

    def version_string(self) -> str:
        return self.server_version

    # The base class logs through log_message; we write our own single line per request.
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _finish(self, status: int, body: dict, n: int | None, t0: float, note: str = "") -> None:
        """Log the request's one line, then send the JSON answer (logged first, so the line
        exists by the time the client has its answer)."""
        data = json.dumps(body).encode()
        ms = (time.perf_counter() - t0) * 1e3
        path = str(self.path).split("?")[0][:100]
        note = " ".join(note.split())  # one line, whatever the message holds
        self.server.log_line(
            f"{self.client_address[0]} {self.command} {path} {status} "
            f"n={'-' if n is None else n} {ms:.1f}ms{' ' + note if note else ''}"
        )
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client went away; nothing more to do

    def _error(self, status: int, message: str, t0: float, n: int | None = None) -> None:
        self._finish(status, {"error": message}, n, t0, message)

    def do_GET(self) -> None:
        t0 = time.perf_counter()
        if self.path.split("?")[0] != "/health":
            return self._error(
                404, f"no such endpoint {self.path[:100]!r}; use /health or /score", t0
            )
        self._finish(
            200,
            {
                "status": "ok",
                "reward": self.server.name,
                "max_batch": self.server.max_batch,
                "max_bytes": self.server.max_bytes,
                "max_pixels": self.server.max_pixels,
                "max_request_pixels": self.server.max_request_pixels,
            },
            None,
            t0,
        )

    def do_POST(self) -> None:
        t0 = time.perf_counter()
        n = None
        try:
            if self.path.split("?")[0] != "/score":
                self.close_connection = True  # body left unread
                raise RequestError(404, f"no such endpoint {self.path[:100]!r}; POST to /score")
            if self.server.token is not None:
                auth = self.headers.get("Authorization", "")
                expected = f"Bearer {self.server.token}"
                if not hmac.compare_digest(auth.encode(), expected.encode()):
                    self.close_connection = True
                    raise RequestError(401, "missing or wrong bearer token")
            body = self._read_body()
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"body is not valid JSON ({e})") from None
            if isinstance(payload, dict) and isinstance(payload.get("images"), list):
                n = len(payload["images"])
            scores = self.server.score(payload)
        except RequestError as e:
            return self._error(e.status, str(e).splitlines()[0][:300], t0, n)
        except TimeoutError:
            self.close_connection = True
            return self._error(408, "timed out reading the request body", t0, n)
        except Exception as e:  # the reward itself failed: answer, log, keep serving
            return self._error(500, f"reward failed: {type(e).__name__}: {e}"[:300], t0, n)
        self._finish(200, {"scores": scores}, n, t0)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length required")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length[:40]!r}") from None
        if size < 0:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {size}")
        if size > self.server.max_bytes:
            self.close_connection = True  # never read it
            raise RequestError(
                413, f"body of {size} bytes exceeds the limit of {self.server.max_bytes}"
            )
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            raise RequestError(400, f"body ended after {len(body)} of {size} bytes")
        return body

    def _not_allowed(self) -> None:
        self.close_connection = True
        message = f"method {self.command} not allowed; GET /health or POST /score"
        self._error(405, message, time.perf_counter())

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the base class while parsing (bad request line, headers too long,
        unknown method): JSON like ours, one log line, connection closed."""
        self.close_connection = True
        for attr in ("command", "path"):
            if not getattr(self, attr, None):
                setattr(self, attr, "-")
        self._error(code, message or "bad request", time.perf_counter())

    def finish(self) -> None:
        """Lingering close: when we answered without reading a body (401, 411, 413, ...), stop
        sending and drain what the client still sends for a moment, so it reads our answer
        instead of a connection reset."""
        try:
            super().finish()
        finally:
            if self.close_connection:
                _linger(self.connection)


def _linger(conn: socket.socket, seconds: float = 2.0, limit: int = 256 * 2**20) -> None:
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.2)
        deadline, drained = time.monotonic() + seconds, 0
        while time.monotonic() < deadline and drained < limit:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


def make_server(
    reward: RewardFn,
    name: str = "reward",
    host: str = "127.0.0.1",
    port: int = 18085,
    **limits: Any,
) -> RewardServer:
    """Bind (port 0 picks a free one) without serving; call ``serve_forever()`` on the result."""
    try:
        return RewardServer((host, port), reward, name=name, **limits)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve_in_thread(server: RewardServer) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread (tests, notebooks); stop with
    ``server.shutdown(); server.server_close()``."""
    t = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},  # shutdown() returns within 50 ms
        name="flowopd-reward-server",
        daemon=True,
    )
    t.start()
    return t
