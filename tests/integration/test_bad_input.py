"""Malformed requests get the right 4xx, the connection closes, nothing reaches a backend."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import catch_all, raw_exchange


@pytest.fixture
async def proxied(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    return proxy, backend


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=[
        "garbage",
        "cl-and-te",
        "two-content-lengths",
        "space-before-colon",
        "no-host",
        "two-hosts",
        "bad-percent-encoding",
    ],
)
async def test_malformed_request_gets_400_and_is_never_forwarded(proxied, raw):
    proxy, backend = proxied
    answer = await raw_exchange(proxy.port, raw)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in answer.lower()
    assert backend.requests == []


async def test_oversized_headers_get_431(proxied):
    proxy, backend = proxied
    answer = await raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 << 20) + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert backend.requests == []


async def test_garbage_after_a_good_request_answers_it_then_400(proxied):
    proxy, backend = proxied
    answer = await raw_exchange(proxy.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"HTTP/1.1 400 Bad Request" in answer
    assert len(backend.requests) == 1


@pytest.mark.parametrize("partial", [b"GE", b"GET /slow HTTP/1.1\r\nHost: x\r\n"])
async def test_client_that_dribbles_its_head_is_closed_after_the_read_timeout(
    backends, proxy_factory, partial
):
    backend = await backends()
    proxy = await proxy_factory(
        catch_all(backend.url),
        extra_flags=["--entryPoints.web.transport.respondingTimeouts.readTimeout=1s"],
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(partial)
    await writer.drain()
    # The idle timeout is 180 s: a close well before that is the read timeout's doing.
    assert await asyncio.wait_for(reader.read(), 20) == b""
    writer.close()
    assert backend.requests == []
