"""The HTTP reward server and the ``remote:`` client, on loopback with a cheap stub reward."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from flowopd.errors import UserError
from flowopd.rewards import get_reward
from flowopd.rewards.base import register_reward
from flowopd.rewards.remote import RemoteReward, decode_png, encode_png
from flowopd.rewards.server import make_server, serve_in_thread

TOKEN = "s3cret-token"


def brightness_reward(images, prompts, metadata):
    """mean pixel + len(prompt) / 100 + metadata['bonus']: every input reaches the score."""
    base = images.mean(dim=(1, 2, 3))
    extra = torch.tensor(
        [len(p) / 100 + float(m.get("bonus", 0)) for p, m in zip(prompts, metadata, strict=True)]
    )
    return base + extra


@register_reward("_test_server_brightness")
def _make_brightness():
    return brightness_reward


def quantized(n=3, h=8, w=10, seed=0):
    """Images already on the 8-bit grid, so PNG transport is lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


class Server:
    def __init__(self, reward=brightness_reward, **limits):
        self.lines: list[str] = []
        self.server = make_server(
            reward, name="brightness", port=0, log=self.lines.append, **limits
        )
        self.thread = serve_in_thread(self.server)
        self.host, self.port = self.server.server_address[:2]
        self.url = self.server.url

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (json.loads(data) if data else None)
        finally:
            conn.close()

    def post(self, payload, token=TOKEN, raw=None, headers=None):
        h = {"Content-Type": "application/json", **(headers or {})}
        if token:
            h["Authorization"] = f"Bearer {token}"
        body = raw if raw is not None else json.dumps(payload).encode()
        return self.request("POST", "/score", body, h)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = Server(token=TOKEN, max_batch=4, max_bytes=200_000)
    yield s
    s.close()


def good_payload(n=2):
    images = quantized(n)
    return {
        "images": [encode_png(im) for im in images],
        "prompts": ["p" * (i + 1) for i in range(n)],
        "metadata": [{"bonus": i} for i in range(n)],
    }


def test_png_roundtrip_is_exact_on_the_8bit_grid():
    im = quantized(1)[0]
    torch.testing.assert_close(decode_png(encode_png(im)), im, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(base64.b64encode(b"GIF89a....").decode())
    with pytest.raises(ValueError, match="base64"):
        decode_png("not base64 !!!")


def test_health_and_scores_match_in_process(server):
    status, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["max_batch"] == 4
    images = quantized(7)  # more than max_batch: the client splits into requests of 4
    prompts = [f"prompt {i}" for i in range(7)]
    meta = [{"bonus": i / 10} for i in range(7)]
    expected = brightness_reward(images, prompts, meta)
    client = RemoteReward(server.url, token=TOKEN, batch_size=4)
    torch.testing.assert_close(client(images, prompts, meta), expected)
    via_registry = get_reward(f"remote:{server.url}", token=TOKEN, batch_size=4)
    torch.testing.assert_close(via_registry(images, prompts, meta), expected)
    assert client.health()["reward"] == "brightness"
    assert sum(" POST /score 200 " in line for line in server.lines) == 4


def test_token_from_environment(server, monkeypatch):
    monkeypatch.setenv("FLOWOPD_REWARD_TOKEN", TOKEN)
    assert RemoteReward(server.url)(quantized(1), ["x"], [{}]).shape == (1,)


BAD_REQUESTS = {
    "malformed json": (dict(raw=b"{not json"), 400),
    "not an object": (dict(payload=[1, 2, 3]), 400),
    "images not a list": (dict(payload={"images": "abc", "prompts": ["a"]}), 400),
    "empty images": (dict(payload={"images": [], "prompts": []}), 400),
    "prompt not a string": (dict(payload={**good_payload(1), "prompts": [3]}), 400),
    "length mismatch": (dict(payload={**good_payload(2), "prompts": ["a"]}), 400),
    "metadata not dicts": (dict(payload={**good_payload(1), "metadata": ["x"]}), 400),
    "bad base64": (dict(payload={**good_payload(1), "images": ["@@@"]}), 400),
    "jpeg not png": (dict(payload={**good_payload(1), "images": ["/9j/4AAQSkZJRgABAQ=="]}), 400),
    "image not a string": (dict(payload={**good_payload(1), "images": [[1, 2]]}), 400),
    "too many images": (dict(payload=good_payload(5)), 413),
    "oversized body": (dict(raw=b'{"images": "' + b"x" * 300_000 + b'"}'), 413),
    "missing token": (dict(payload=good_payload(1), token=None), 401),
    "wrong token": (dict(payload=good_payload(1), token="guess"), 401),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_4xx_and_server_keeps_serving(server, case):
    kwargs, status = BAD_REQUESTS[case]
    got, body = server.post(
        kwargs.get("payload"), token=kwargs.get("token", TOKEN), raw=kwargs.get("raw")
    )
    assert got == status and isinstance(body["error"], str) and body["error"]
    assert (
        server.lines[-1].startswith("127.0.0.1 POST /score ") and f" {status} " in server.lines[-1]
    )
    ok, body = server.post(good_payload(2))
    assert ok == 200 and len(body["scores"]) == 2


def test_other_rejections(server):
    assert server.request("GET", "/nope")[0] == 404
    assert server.request("GET", "/score")[0] == 404
    assert server.request("PUT", "/score", b"{}", {"Content-Length": "2"})[0] == 405
    # mixed sizes in one batch
    p = good_payload(1)
    other = encode_png(quantized(1, h=5, w=5)[0])
    assert (
        server.post(
            {**p, "images": p["images"] + [other], "prompts": ["a", "b"], "metadata": [{}, {}]}
        )[0]
        == 400
    )
    # garbage request line, then a body shorter than its Content-Length (client closes early)
    assert raw_exchange(server, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    short = (
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        + b'{"images":'
    )
    answer = raw_exchange(server, short, shut=True)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"body ended after 10 of 100 bytes" in answer
    assert server.request("GET", "/health")[0] == 200


def raw_exchange(server, data: bytes, shut: bool = False) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_stalled_client_times_out_and_server_keeps_serving():
    s = Server(timeout=0.3)
    try:
        stalled = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"images":'
        answer = raw_exchange(s, stalled)  # never sends the rest, never closes
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert " 408 " in s.lines[-1]
        assert s.post(good_payload(1), token=None)[0] == 200
    finally:
        s.close()


def test_reward_exceptions_are_500_and_user_errors_400():
    def flaky(images, prompts, metadata):
        if prompts[0] == "boom":
            raise RuntimeError("model exploded")
        if prompts[0] == "bad":
            raise UserError("no GenEval tag")
        return brightness_reward(images, prompts, metadata)

    s = Server(reward=flaky)
    try:
        p = good_payload(1)
        status, body = s.post({**p, "prompts": ["boom"]}, token=None)
        assert status == 500 and "model exploded" in body["error"]
        status, body = s.post({**p, "prompts": ["bad"]}, token=None)
        assert status == 400 and "no GenEval tag" in body["error"]
        assert s.post(p, token=None)[0] == 200
        with pytest.raises(UserError, match="rejected the request: HTTP 400"):
            RemoteReward(s.url)(quantized(1), ["bad"], [{}])
    finally:
        s.close()


def test_200_malformed_requests_one_log_line_each(server):
    before = len(server.lines)
    for i in range(200):
        kind = i % 4
        if kind == 0:
            status, _ = server.post(None, raw=b"{" * (i + 1))
        elif kind == 1:
            status, _ = server.post({"images": i, "prompts": []})
        elif kind == 2:
            status, _ = server.post(good_payload(1), token="wrong")
        else:
            status, _ = server.post({**good_payload(1), "images": ["AAAA"]})
        assert 400 <= status < 500
    assert len(server.lines) - before == 200
    assert all(" POST /score 4" in line for line in server.lines[before:])
    assert server.post(good_payload(2))[0] == 200
    assert len(server.lines) - before == 201


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_then_clear_error_when_nothing_listens():
    port = _free_port()
    client = RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.05, timeout=2)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"did not answer after 3 attempts.*flowopd serve-reward"):
        client(quantized(1), ["x"], [{}])
    assert time.perf_counter() - t0 >= 0.05 + 0.1  # backoff 0.05 then 0.1 s


def test_client_retries_until_server_comes_up():
    port = _free_port()
    holder = {}

    def start_late():
        time.sleep(0.3)
        holder["server"] = make_server(brightness_reward, port=port, log=lambda line: None)
        holder["server"].serve_forever()

    t = threading.Thread(target=start_late, daemon=True)
    t.start()
    try:
        client = RemoteReward(f"http://127.0.0.1:{port}", retries=6, backoff=0.1, timeout=5)
        images = quantized(2)
        torch.testing.assert_close(
            client(images, ["a", "b"], [{}, {}]), brightness_reward(images, ["a", "b"], [{}, {}])
        )
    finally:
        srv = holder.get("server")
        if srv:
            srv.shutdown()
            srv.server_close()


def test_bad_urls():
    with pytest.raises(UserError, match="http://"):
        get_reward("remote:localhost:1234")


def test_cli_serves_a_reward_in_a_subprocess(tmp_path):
    """``flowopd serve-reward NAME --import MODULE`` end to end, stopped with SIGTERM."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            from flowopd.rewards import register_reward

            @register_reward("my_brightness")
            def make(offset=0.0):
                return lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)) + offset
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "flowopd", "serve-reward", "my_brightness", "--import", "my_rewards",
           "--port", "0", "--token", TOKEN, "--max-batch", "2", "--option", "offset=0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving reward 'my_brightness' on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        images = quantized(3)
        got = RemoteReward(url, token=TOKEN, batch_size=2)(images, ["a", "b", "c"], [{}] * 3)
        torch.testing.assert_close(got, images.mean(dim=(1, 2, 3)) + 0.5)
        with pytest.raises(UserError, match="HTTP 413"):
            RemoteReward(url, token=TOKEN, batch_size=3)(images, ["a", "b", "c"], [{}] * 3)
        with pytest.raises(UserError, match="HTTP 401"):
            RemoteReward(url, token="nope")(images[:1], ["a"], [{}])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    log = proc.stderr.read()
    assert (
        log.count("POST /score 200") == 2 and "POST /score 413" in log and "POST /score 401" in log
    )


def test_cli_rejects_bad_options():
    from flowopd.cli import main

    assert main(["serve-reward", "_test_server_brightness", "--option", "novalue"]) == 2
    assert main(["serve-reward", "no_such_reward_xyz", "--port", "0"]) == 2
    for flag in ("--max-threads", "--max-pixels"):
        assert main(["serve-reward", "_test_server_brightness", "--port", "0", flag, "0"]) == 2


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height black pixels, built row by row so the
    test itself never holds the inflated image: 12000 x 12000 is ~18 KB on the wire, an
    18 MB zlib stream, and PIL would allocate 144 MB (mode "1") then 432 MB as RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_dimension_png_is_rejected_from_its_header_without_decoding(monkeypatch):
    from PIL import Image

    small = base64.b64encode(bomb_png(64, 64)).decode()
    assert decode_png(small, max_pixels=64 * 64).shape == (3, 64, 64)  # the builder is valid
    bomb = base64.b64encode(bomb_png(12000, 12000)).decode()
    assert len(bomb) < 40_000  # far under any byte limit
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    with pytest.raises(ValueError, match=r"12000x12000 = 144000000 pixels exceeds the limit"):
        decode_png(bomb, max_pixels=4096 * 4096)
    # without a limit PIL's own (MAX_IMAGE_PIXELS, ~89 M) applies, still from the header
    with pytest.raises(ValueError, match="exceeds the limit of 89478485"):
        decode_png(bomb)
    s = Server(max_pixels=4096 * 4096)
    try:
        status, body = s.post({"images": [bomb], "prompts": ["x"]}, token=None)
        assert status == 413
        assert body["error"] == (
            "images[0]: 12000x12000 = 144000000 pixels exceeds the limit of 16777216 per "
            "image (--max-pixels); send smaller images"
        )
        assert opened == []  # PIL never saw it: nothing was inflated or allocated
        # several images within the per-image limit can still exceed the request's total
        s.server.max_request_pixels = 3 * 8 * 10
        status, body = s.post(good_payload(4), token=None)
        assert status == 413 and "per request" in body["error"]
        assert opened == []
        s.server.max_request_pixels = 4 * 8 * 10
        assert s.post(good_payload(4), token=None)[0] == 200
        assert s.request("GET", "/health")[1]["max_pixels"] == 4096 * 4096
    finally:
        s.close()


def handler_threads() -> int:
    """Live connection-handler threads (socketserver names them after their target)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_handler_threads_are_bounded():
    """max_threads connections at once: a third waits for a free handler (served when one
    frees), or gets a 503 after queue_timeout; never a fourth thread."""
    s = Server(max_threads=2, queue_timeout=0.5, timeout=10)
    stalled = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"images":'
    held = [socket.create_connection((s.host, s.port), timeout=5) for _ in range(2)]
    try:
        for c in held:
            c.sendall(stalled)  # each holds a handler, waiting for the rest of its body
        time.sleep(0.3)
        assert handler_threads() == 2
        t0 = time.monotonic()
        status, body = s.post(good_payload(1), token=None)
        assert status == 503 and body["error"].startswith("server busy: 2 connections")
        assert 0.4 < time.monotonic() - t0 < 5
        assert " 503 " in s.lines[-1]
        assert handler_threads() == 2  # refused on the accept loop, no thread started
        # queued rather than refused when a handler frees within queue_timeout
        s.server.queue_timeout = 5.0
        answers = []
        post = lambda: answers.append(s.post(good_payload(1), token=None)[0])  # noqa: E731
        waiter = threading.Thread(target=post)
        waiter.start()
        time.sleep(0.3)
        assert answers == []  # waiting for a slot
        held[0].shutdown(socket.SHUT_WR)  # its handler answers 400 and frees the slot
        waiter.join(timeout=5)
        assert answers == [200]
    finally:
        for c in held:
            c.close()
        s.close()
