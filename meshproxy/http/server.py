"""HTTP/1.1 server side: an asyncio Protocol driving httptools (llhttp).

Turns bytes into `Request`/`Exchange` objects, hands each exchange to the entrypoint's handler,
and frames the response back onto the wire. Pipelined requests are queued and answered in
order. It knows nothing of routing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

from meshproxy.http.exchange import Exchange
from meshproxy.http.forwarding import (
    SERVER_NAME,
    UNTRUSTED_DROP,
    connection_tokens,
)
from meshproxy.http.request import Request
from meshproxy.http.status import reason_phrase

log = logging.getLogger("meshproxy.http")

_CHUNK_END = b"0\r\n\r\n"
_CRLF = b"\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Request headers that change how the message is framed, forwarded or labelled in metrics:
# noted while parsing, so the common request (none of them) skips a second pass.
_NOTED = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"connection",
        b"content-type",
        b"accept",
    )
)


@dataclass
class EntryPointSettings:
    name: str
    port: int
    trusted_networks: list[Any] = field(default_factory=list)
    insecure_forwarded: bool = False
    max_header_bytes: int = 1 << 20
    idle_timeout: float = 180.0
    read_timeout: float = 60.0


class HTTPEntryPoint:
    """Shared state of one HTTP entrypoint: its settings, its open connections, its handler."""

    def __init__(
        self,
        settings: EntryPointSettings,
        handler: Callable[[Exchange], None],
        on_open: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.connections: set[H1ServerConnection] = set()
        self.on_open = on_open or (lambda delta: None)
        self.port_bytes = str(settings.port).encode()

    def is_trusted(self, ip: str) -> bool:
        if self.settings.insecure_forwarded:
            return True
        if not self.settings.trusted_networks:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self.settings.trusted_networks)

    def protocol_factory(self) -> H1ServerConnection:
        return H1ServerConnection(self)

    def sweep(self, now: float) -> None:
        """Close idle keep-alive connections and clients that dribble their headers."""
        idle = self.settings.idle_timeout
        read = self.settings.read_timeout
        for conn in list(self.connections):
            conn.check_timeouts(now, idle, read)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()


class _HeaderTooLarge(Exception):
    pass


class H1ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_chunked",
        "_chunked_request",
        "_client_paused",
        "_closing",
        "_error_after_current",
        "_header_bytes",
        "_headers",
        "_host",
        "_message_started_at",
        "_pending_head",
        "_perf_start",
        "_receiving",
        "_special",
        "_trusted",
        "_url",
        "_write_paused",
        "_xf_seen",
        "client_ip",
        "client_port",
        "current",
        "entry",
        "idle_since",
        "loop",
        "parser",
        "pipeline",
        "transport",
    )

    def __init__(self, entry: HTTPEntryPoint) -> None:
        self.entry = entry
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self._receiving: Exchange | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._host = b""
        self._xf_seen = 0
        self._special = False
        self._chunked_request = False
        self._trusted = False
        self._closing = False
        self._client_paused = False
        self._write_paused = False
        self._chunked = False
        self._pending_head = b""
        self._error_after_current: int | None = None
        self._message_started_at: float | None = None
        self._perf_start = 0.0
        self.idle_since = 0.0
        self.client_ip = ""
        self.client_port = 0

    # -- connection lifecycle -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
            if self.client_ip.startswith("::ffff:") and "." in self.client_ip:
                self.client_ip = self.client_ip[7:]
        self._trusted = self.entry.is_trusted(self.client_ip)
        self.idle_since = self.loop.time()
        self.entry.connections.add(self)
        self.entry.on_open(1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.entry.connections.discard(self)
        self.entry.on_open(-1)
        for ex in (self.current, *self.pipeline):
            if ex is not None and not ex.finished:
                ex.client_gone = True
                upstream = ex.upstream
                if upstream is not None:
                    upstream.client_gone()
        self.pipeline.clear()

    def close(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def check_timeouts(self, now: float, idle: float, read: float) -> None:
        if self._closing:
            return
        if self.current is None:
            started = self._message_started_at
            if started is not None:
                if read > 0 and now - started > read:
                    self.close()
            elif idle > 0 and now - self.idle_since > idle:
                self.close()

    # -- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closing or self._error_after_current is not None:
            return
        try:
            self.parser.feed_data(data)
        except _HeaderTooLarge:
            self._protocol_error(431)
        except httptools.HttpParserUpgrade:
            self._protocol_error(501)
        except httptools.HttpParserError as exc:
            too_large = isinstance(exc.__context__, _HeaderTooLarge) or isinstance(
                exc.__cause__, _HeaderTooLarge
            )
            self._protocol_error(431 if too_large else 400)

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._host = b""
        self._xf_seen = 0
        self._special = False
        self._chunked_request = False
        self._message_started_at = self.loop.time()
        self._perf_start = time.perf_counter()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.entry.settings.max_header_bytes:
            raise _HeaderTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.entry.settings.max_header_bytes:
            raise _HeaderTooLarge
        name = name.lower()
        if name == b"host":
            if self._host:
                raise httptools.HttpParserError("duplicate Host header")
            self._host = value
        elif name in _NOTED:
            self._special = True
            if name == b"transfer-encoding":
                self._chunked_request = True
        elif name in UNTRUSTED_DROP:
            if not self._trusted:
                return
            if name == b"x-forwarded-proto":
                self._xf_seen |= 1
            elif name == b"x-forwarded-host":
                self._xf_seen |= 2
            elif name == b"x-forwarded-port":
                self._xf_seen |= 4
            elif name == b"x-real-ip":
                self._xf_seen |= 8
            elif name == b"x-forwarded-for":
                self._xf_seen |= 16
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method().decode("latin-1")
        if not self._host and version == "1.1":
            raise httptools.HttpParserError("missing Host header")
        headers = self._headers
        try:
            request = Request(
                method, self._url, headers, self._host, self.client_ip, self.client_port, version
            )
        except ValueError:
            raise httptools.HttpParserError("invalid request target") from None
        request.keep_alive = parser.should_keep_alive()
        # Traefik's entrypoint sets these before routing, so rules can match on them.
        seen = self._xf_seen
        if not seen & 1:
            headers.append((b"x-forwarded-proto", b"http"))
        if not seen & 2 and self._host:
            headers.append((b"x-forwarded-host", self._host))
        if not seen & 4:
            port = request.port
            headers.append((b"x-forwarded-port", port.encode() if port else self.entry.port_bytes))
        headers.append((b"x-forwarded-server", SERVER_NAME))
        if not seen & 8:
            headers.append((b"x-real-ip", self.client_ip.encode()))
        request.forwarded_for = bool(seen & 16)
        has_body = self._chunked_request
        if self._special:
            for name, value in headers:
                if name == b"content-length":
                    request.content_length = int(value)
                    has_body = has_body or request.content_length > 0
                elif name == b"expect" and value.lower() == b"100-continue":
                    request.expect_continue = True
                elif name == b"connection":
                    request.connection_tokens |= frozenset(connection_tokens(value))
        ex = Exchange(self, request, self.entry.settings.name, self._perf_start, has_body)
        if not self._special:
            ex.protocol = "http"  # no Content-Type or Accept that could make it grpc or sse
        self._message_started_at = None
        self._receiving = ex
        if self._closing:
            return
        if self.current is None:
            self._start(ex)
        else:
            self.pipeline.append(ex)

    def on_body(self, body: bytes) -> None:
        ex = self._receiving
        if ex is not None:
            ex.on_request_body(body)

    def on_message_complete(self) -> None:
        ex = self._receiving
        if ex is not None:
            self._receiving = None
            ex.on_request_end()

    def _protocol_error(self, status: int) -> None:
        if self.current is None:
            self._write_error_and_close(status)
        else:
            self._error_after_current = status
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _write_error_and_close(self, status: int) -> None:
        body = b"%d %s" % (status, reason_phrase(status))
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason_phrase(status), len(body), body)
        )
        self.close()

    # -- exchange scheduling ------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        self.current = ex
        if ex.has_body and not ex.body_complete:
            # Let the parser finish this data first: a local answer (404, 503) to a small body
            # then finds the body read, and the connection can stay open.
            self.loop.call_soon(self._handle, ex)
        else:
            self._handle(ex)

    def _handle(self, ex: Exchange) -> None:
        if ex.client_gone:
            return
        self.entry.handler(ex)  # calls exchange_done(ex) when it is over

    def exchange_done(self, ex: Exchange) -> None:
        if not ex.finished:
            if not ex.response_started and not self._closing:
                ex.respond(500, b"Internal Server Error")
            else:
                self.abort(ex)
                return
        self.current = None
        if self._closing:
            return
        if self._error_after_current is not None:
            self._write_error_and_close(self._error_after_current)
            return
        if not ex.request.keep_alive or not ex.body_complete:
            self.close()
            return
        self.idle_since = self.loop.time()
        if self.pipeline:
            self._start(self.pipeline.popleft())

    # -- Sink: writing the response -----------------------------------------------------

    def write_continue(self, ex: Exchange) -> None:
        if ex.request.http_version == "1.1" and not ex.response_started and not self._closing:
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]

    def write_head(
        self,
        ex: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        no_body: bool,
    ) -> None:
        if self._closing:
            return
        request = ex.request
        keep_alive = request.keep_alive and self._error_after_current is None
        chunked = False
        if not no_body and content_length is None:
            if request.http_version == "1.1":
                chunked = True
            else:
                keep_alive = False
        if not ex.body_complete:
            keep_alive = False  # the rest of the request body would be read as a new request
        request.keep_alive = keep_alive
        lines = [name + b": " + value + _CRLF for name, value in headers]
        if chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        elif request.http_version == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        self._chunked = chunked
        # Held back so head and body leave in one write (one syscall) when the body is small.
        self._pending_head = b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(lines))

    def write_body(self, ex: Exchange, chunk: bytes) -> None:
        if self._closing or not chunk:
            return
        head = self._pending_head
        transport = self.transport
        if head:
            self._pending_head = b""
            if self._chunked:
                transport.writelines((head, b"%x\r\n" % len(chunk), chunk, _CRLF))  # type: ignore[union-attr]
            elif len(chunk) <= 16384:
                transport.write(head + chunk)  # type: ignore[union-attr]
            else:
                transport.writelines((head, chunk))  # type: ignore[union-attr]
            return
        if self._chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))  # type: ignore[union-attr]
        else:
            transport.write(chunk)  # type: ignore[union-attr]

    def write_end(self, ex: Exchange) -> None:
        if self._closing:
            return
        head = self._pending_head
        if head:
            self._pending_head = b""
            self.transport.write(head + _CHUNK_END if self._chunked else head)  # type: ignore[union-attr]
        elif self._chunked:
            self.transport.write(_CHUNK_END)  # type: ignore[union-attr]
        self._chunked = False

    def flush(self) -> None:
        """Send a held-back response head now (the upstream read ended without body bytes)."""
        head = self._pending_head
        if head and not self._closing:
            self._pending_head = b""
            self.transport.write(head)  # type: ignore[union-attr]

    def abort(self, ex: Exchange) -> None:
        ex.finished = True
        if self.transport is not None:
            self._closing = True
            self.transport.abort()

    def pause_client(self) -> None:
        if not self._client_paused and self.transport is not None and not self._closing:
            self._client_paused = True
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self._client_paused and self.transport is not None and not self._closing:
            self._client_paused = False
            self.transport.resume_reading()

    # -- flow control: a slow client slows the upstream ----------------------------------

    def pause_writing(self) -> None:
        self._write_paused = True
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()
