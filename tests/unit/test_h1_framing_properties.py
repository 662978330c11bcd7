"""Property tests of HTTP/1.1 request framing (hypothesis), over in-memory transports.

Arbitrary request streams (well-formed heads and bodies, mutated, with garbage spliced in, cut
at arbitrary points) fed to the real server connection, router, balancer and upstream side.
Whatever arrives, the proxy must not raise out of `data_received`, must not hang (after the
read timeout every connection is closed or idle between requests), and must not leak (once
the client connection is gone, every upstream connection is closed or back in the pool with
no exchange attached). A bounded number of examples runs in CI; `bench/h1_framing_soak.py`
runs more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conversation import conversation

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

_methods = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"G\x00T"])
_targets = st.sampled_from(
    [
        b"/",
        b"/a?b=c",
        b"/a/../b",
        b"/%2e%2e/x",
        b"*",
        b"http://h/x",
        b"/#f",
        b"x",
        b"/" + b"a" * 300,
    ]
)
_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9"])
_field_names = st.sampled_from(
    [b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"X-A", b"Upgrade"]
)
_field_values = st.one_of(
    st.sampled_from(
        [b"a.test", b"chunked", b"xchunked", b"gzip, chunked", b"5", b"-1", b"0", b"100-continue"]
    ),
    st.sampled_from([b"close", b"keep-alive", b"upgrade", b"a@b", b" ", b"1" * 30]),
    st.binary(max_size=12),
)
_fields = st.lists(st.tuples(_field_names, _field_values), max_size=6)
_bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=40),
    st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"3\r\nab", b"0\r\n\r\n", b"hello"]),
)


@st.composite
def request_stream(draw: Any) -> list[bytes]:
    """Several requests back to back (pipelined), with garbage, cut into reads."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        line = b"%s %s %s\r\n" % (draw(_methods), draw(_targets), draw(_versions))
        head = line + b"".join(n + b": " + v + b"\r\n" for n, v in draw(_fields)) + b"\r\n"
        parts.append(head + draw(_bodies))
        if draw(st.booleans()):
            parts.append(draw(st.binary(max_size=16)))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    pieces, start = [], 0
    for cut in [*cuts, len(stream)]:
        pieces.append(stream[start:cut])
        start = cut
    return [p for p in pieces if p]


async def _drive(pieces: list[bytes]) -> None:
    conv = conversation()
    for _ in range(4):
        conv.add_upstream()
    for piece in pieces:
        if conv.client_transport.done:
            break
        conv.client.data_received(piece)  # must never raise
        await asyncio.sleep(0)
        for _ in range(10):  # the backend answers whatever it was sent, pipelined ones too
            pending = [
                (conn, transport)
                for conn, transport in conv.upstreams
                if conn.ex is not None and not transport.closed and transport.written
            ]
            if not pending:
                break
            for conn, transport in pending:
                transport.take()
                conn.data_received(OK)
        while len(conv.pool.idle) < 2:
            conv.add_upstream()
    # A stream llhttp itself cannot parse has been refused at once, not left to a timeout.
    if not parses(pieces):
        assert conv.client_transport.done, "malformed input left the connection open"
    # No hang: past the read timeout, nothing is left waiting on the client.
    conv.client.check_timeouts(time.perf_counter() + 1000, 180.0, 60.0)
    client = conv.client
    assert client_transport_settled(conv), "the connection is neither closed nor idle"
    # No leak: the client goes; every upstream connection is closed or clean in the pool.
    client.connection_lost(None)
    for conn, transport in conv.upstreams:
        assert transport.closed or (conn in conv.pool.idle and conn.ex is None), "held upstream"
    assert conv.entry.connections == set()


def parses(pieces: list[bytes]) -> bool:
    """Whether an independent llhttp parser (the proxy's leniency: any HTTP/1.x minor
    version) accepts the stream, upgrades excepted."""
    parser = httptools.HttpRequestParser(_Ignore())
    parser.set_dangerous_leniencies(lenient_version=True)
    try:
        for piece in pieces:
            parser.feed_data(piece)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return False
    return True


class _Ignore:
    pass


def client_transport_settled(conv: Any) -> bool:
    client = conv.client
    return conv.client_transport.done or (client.current is None and not client.pipeline)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_stream())
def test_arbitrary_request_streams_never_crash_hang_or_leak(pieces: list[bytes]) -> None:
    """RFC 9112 framing under arbitrary input: see the module docstring for the invariants."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_drive(pieces))
    finally:
        loop.close()
