"""Connection sniffing: classify an accepted connection from its first bytes, then hand the
connection, those bytes included, to the protocol that speaks it.

The model is hypercorn's protocol wrapper and Traefik's `router/tcp` entrypoint handler: the
first protocol on every connection of an HTTP entrypoint is a `SniffingProtocol`; it reads
until it can tell, and replays what it read to the chosen protocol after `set_protocol`, so
the chosen protocol sees an ordinary connection. What it tells apart (first match wins):

- a TLS record (first byte 0x16, RFC 8446 §5.1: a handshake record; the ClientHello) — handed
  with the bytes read to the `tls` hook (SNI routing, passthrough, termination); without one
  the connection is closed;
- the HTTP/2 connection preface (RFC 9113 §3.4, prior knowledge) — handed to the `http2`
  protocol; without one the proxy sends its own preface (an empty SETTINGS) and GOAWAY with
  HTTP_1_1_REQUIRED (RFC 9113 §7), written by the h2 library, then closes; never a 400;
- anything else: HTTP/1.1.

A connection that sends nothing for `peek_timeout` seconds is closed, and so is one that sends
a partial HTTP/2 preface and stops (the entrypoint's sweep checks both, once a second). A TCP
route on the entrypoint takes connections before any sniffing (see daemon), so
server-speaks-first protocols work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors

log = logging.getLogger("meshproxy.sniff")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TLS_HANDSHAKE = 0x16

HTTP1 = "http/1.1"
HTTP2 = "h2c"
TLS = "tls"


def classify(data: bytes) -> str | None:
    """The protocol `data` (the first bytes of a connection) starts, or None if more bytes
    are needed to tell."""
    if not data:
        return None
    if data[0] == TLS_HANDSHAKE:
        return TLS
    if data[:1] == b"P":
        head = data[: len(H2_PREFACE)]
        if H2_PREFACE.startswith(head):
            return HTTP2 if len(head) == len(H2_PREFACE) else None
    return HTTP1


def h2_refusal() -> bytes:
    """The server preface and a GOAWAY(HTTP_1_1_REQUIRED): what an HTTP/2 client gets while
    the proxy does not speak HTTP/2 (RFC 9113 §3.4, §7)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    conn.close_connection(error_code=h2.errors.ErrorCodes.HTTP_1_1_REQUIRED)
    return conn.data_to_send()


class SniffingProtocol(asyncio.Protocol):
    """The first protocol of a connection: reads until `classify` decides, then hands over.

    `http1` makes the HTTP/1.1 protocol for this connection; `registry` is the set the
    entrypoint sweeps for `check_timeout`; `on_open(+1/-1)` counts the connection as open
    while it is being sniffed (the protocol it goes to counts it from then on).
    """

    __slots__ = (
        "_buffer",
        "_counted",
        "_http1",
        "_http2",
        "_on_open",
        "_registry",
        "_tls",
        "started",
        "transport",
    )

    def __init__(
        self,
        http1: Callable[[], asyncio.Protocol],
        registry: set[SniffingProtocol],
        on_open: Callable[[int], None] | None = None,
        http2: Callable[[], asyncio.Protocol] | None = None,
        tls: Callable[[asyncio.Transport, bytes], None] | None = None,
    ) -> None:
        self._http1 = http1
        self._http2 = http2  # an HTTP/2 server connection; None: refused (see h2_refusal)
        # Takes over a TLS connection with the bytes read so far; None: closed.
        self._tls = tls
        self._registry = registry
        self._on_open = on_open
        self._counted = False
        self._buffer = b""
        self.transport: asyncio.Transport | None = None
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.started = time.perf_counter()
        self._registry.add(self)
        if self._on_open is not None:
            self._on_open(1)
            self._counted = True

    def data_received(self, data: bytes) -> None:
        buffered = self._buffer + data if self._buffer else data
        kind = classify(buffered)
        if kind is None:
            self._buffer = buffered
            return
        self._buffer = b""
        self._registry.discard(self)
        self._uncount()
        transport = self.transport
        assert transport is not None
        if kind == HTTP1 or (kind == HTTP2 and self._http2 is not None):
            protocol = self._http1() if kind == HTTP1 else self._http2()  # type: ignore[misc]
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            protocol.data_received(buffered)
        elif kind == TLS and self._tls is not None:
            self._tls(transport, buffered)
        elif kind == HTTP2:
            log.debug(
                "HTTP/2 prior knowledge from %s: refused", transport.get_extra_info("peername")
            )
            transport.write(h2_refusal())
            transport.close()
        else:
            log.debug(
                "TLS from %s on a plain HTTP entrypoint", transport.get_extra_info("peername")
            )
            transport.close()

    def eof_received(self) -> bool | None:
        return None  # closed before the protocol was known: nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        self._uncount()

    def _uncount(self) -> None:
        if self._counted and self._on_open is not None:
            self._counted = False
            self._on_open(-1)

    def check_timeout(self, now: float, peek_timeout: float) -> None:
        """Close the connection if it has not shown its protocol within `peek_timeout`
        seconds (`now` on the perf_counter clock)."""
        if peek_timeout > 0 and now - self.started > peek_timeout and self.transport is not None:
            self._registry.discard(self)
            self.transport.close()
