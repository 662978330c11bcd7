"""HTTP/1.1 hardening end to end: a real proxy process, real sockets, scripted backends, curl.

The in-memory conversations (tests/unit/test_h1_conversations.py) cover each rule and its
variants; these show the same rules hold over the kernel's sockets: answers arrive (no reset
swallows them), backend connections are really closed, and the counters say so.
"""

from __future__ import annotations

import asyncio
import re
import subprocess

from tests.helpers import catch_all, start_raw_backend, wait_for


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class RecordingBackend:
    """A raw backend: records each connection's bytes and whether it saw the proxy close."""

    def __init__(self, answer: bytes | None = None, after_head: bytes | None = None) -> None:
        self.answer = answer  # sent once the request's head arrived (None: never answer)
        self.after_head = after_head
        self.received: list[bytearray] = []
        self.closed_by_proxy = 0

    async def start(self) -> str:
        self.server, port = await start_raw_backend(self.serve)
        return f"http://127.0.0.1:{port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray()
        self.received.append(data)
        answered = False
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                self.closed_by_proxy += 1
                break
            data += chunk
            if not answered and b"\r\n\r\n" in data and self.answer is not None:
                answered = True
                writer.write(self.answer)
        writer.close()


async def test_broken_chunked_body_gets_400_and_the_backend_connection_is_closed(proxy_factory):
    """RFC 9112 §7.1 (issue 9 item 4): a chunk size of `zz` after the head was forwarded: the
    client gets 400, the backend's connection is closed (not left waiting for the rest of the
    body), the proxy counts it, and no connection stays open."""
    backend = RecordingBackend()
    proxy = await proxy_factory(catch_all(await backend.start()))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await wait_for(lambda: backend.received and b"abc" in backend.received[0], 10, "head upstream")
    writer.write(b"zz\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    writer.close()
    await wait_for(lambda: backend.closed_by_proxy == 1, 10, "the backend connection closed")
    text = proxy.metrics()
    assert metric(text, "meshproxy_http_protocol_errors_total", entrypoint="web", code="400") == 1
    await wait_for(
        lambda: metric(proxy.metrics(), "traefik_open_connections", entrypoint="web") == 0,
        10,
        "no open connection",
    )


async def test_silent_backend_gets_504_after_response_header_timeout(proxy_factory):
    """Issue 9 item 6: a backend that never answers is given up on with 504 (Traefik's
    responseHeaderTimeout; on by default here) and its connection is closed."""
    backend = RecordingBackend(answer=None)
    proxy = await proxy_factory(
        catch_all(await backend.start()),
        extra_flags=["--serversTransport.forwardingTimeouts.responseHeaderTimeout=1s"],
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert head.startswith(b"HTTP/1.1 504 ")
    writer.close()
    await wait_for(lambda: backend.closed_by_proxy == 1, 10, "the backend connection closed")


async def test_refused_heads_are_answered_over_real_sockets_not_reset(proxy_factory):
    """RFC 9112 §9.6: after an error answer the proxy shuts its write side and drains the
    client's remaining bytes, so the answer is read even while the client is still sending
    a 2 MB header (a plain close would send a reset and lose it)."""
    backend = RecordingBackend(answer=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    proxy = await proxy_factory(catch_all(await backend.start()))
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (2 << 20) + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 431 ")
        writer.close()
    assert backend.received == []


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30
    )


async def test_early_hints_reach_curl(proxy_factory):
    """RFC 8297, RFC 9110 §15.2 (issue 9 item 15): curl sees the backend's 103 before its
    200."""
    backend = RecordingBackend(
        answer=b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    proxy = await proxy_factory(catch_all(await backend.start()))
    result = await asyncio.to_thread(curl, "-v", f"http://127.0.0.1:{proxy.port}/")
    assert result.stdout == "ok"
    assert "< HTTP/1.1 103 Early Hints" in result.stderr
    assert re.search(r"< Link: </style.css>; rel=preload", result.stderr)


async def test_backend_refusing_an_upload_stops_curl_before_it_sends_the_body(
    proxy_factory, tmp_path
):
    """RFC 9110 §10.1.1 (issue 9 item 16): Expect reaches the backend, whose 413 reaches curl
    while curl waits for 100: the 1 MB body is never sent, so the backend never gets it."""
    backend = RecordingBackend(
        answer=b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"
    )
    proxy = await proxy_factory(catch_all(await backend.start()))
    body = tmp_path / "body"
    body.write_bytes(b"x" * (1 << 20))
    result = await asyncio.to_thread(
        curl,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "15",
        "--data-binary",
        f"@{body}",
        f"http://127.0.0.1:{proxy.port}/upload",
    )
    assert result.stdout == "413"
    head, _, rest = bytes(backend.received[0]).partition(b"\r\n\r\n")
    assert b"\r\nexpect: 100-continue" in head.lower()
    assert len(rest) < 1 << 20  # curl stopped: at most what it sent before the answer came


async def test_head_limits_are_configured_per_entrypoint(proxy_factory):
    """Issue 9 item 12: Traefik's `http.maxHeaderBytes` and meshproxy's
    `http.maxRequestTargetBytes` set the 431 and 414 limits of an entrypoint."""
    backend = RecordingBackend(answer=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    proxy = await proxy_factory(
        catch_all(await backend.start()),
        extra_flags=[
            "--entryPoints.web.http.maxHeaderBytes=4096",
            "--entryPoints.web.http.maxRequestTargetBytes=1024",
        ],
    )

    async def status(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(raw)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        writer.close()
        return answer.split(b" ")[1]

    assert await status(b"GET /" + b"a" * 900 + b" HTTP/1.1\r\nHost: a\r\n\r\n") == b"200"
    assert await status(b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\nHost: a\r\n\r\n") == b"414"
    assert await status(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"b" * 5000 + b"\r\n\r\n") == b"431"
    assert len(backend.received) == 1
