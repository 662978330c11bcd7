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
from meshproxy.http.fields import Fields, field_lines
from meshproxy.http.forwarding import (
    HOP_BY_HOP,
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
_XF_ALL = 31
_METHOD_NAMES = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")}
# Status lines, built once: the reason phrase comes from the code, as in Go.
_STATUS_LINES = {c: b"HTTP/1.1 %d %s\r\n" % (c, reason_phrase(c)) for c in range(100, 1000)}
# What on_header must notice about a request field, by lower-case name: one dict lookup, and
# the common field (none of these) is just appended.
_XF_BITS = {  # trusted X-Forwarded-* fields the entrypoint then leaves as they are
    b"x-forwarded-proto": 1,
    b"x-forwarded-host": 2,
    b"x-forwarded-port": 4,
    b"x-real-ip": 8,
    b"x-forwarded-for": 16,
}
_HOST = 32  # the Host field
_NOTED = 64  # framing, forwarding or the metrics label depend on it: looked at again later
_CHUNKED = 128  # Transfer-Encoding: the body is chunked
_REWRITTEN = 256  # not forwarded as received (hop-by-hop, Expect, X-Forwarded-*)
_X_FORWARDED = 512  # dropped unless the client is trusted
_FIELD_KIND: dict[bytes, int] = {name: _X_FORWARDED | _REWRITTEN for name in UNTRUSTED_DROP}
_FIELD_KIND.update({name: bits | _X_FORWARDED | _REWRITTEN for name, bits in _XF_BITS.items()})
_FIELD_KIND.update({name: _REWRITTEN for name in HOP_BY_HOP})
_FIELD_KIND.update(
    {
        b"host": _HOST,
        b"content-length": _NOTED,
        b"content-type": _NOTED,
        b"accept": _NOTED,
        b"connection": _NOTED | _REWRITTEN,
        b"expect": _NOTED | _REWRITTEN,
        b"transfer-encoding": _NOTED | _CHUNKED | _REWRITTEN,
    }
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
    sanitize_path: bool = True  # http.sanitizePath: dot-segments and `//` removed (Request)


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

    def sweep(self) -> None:
        """Close idle keep-alive connections and clients that dribble their headers. Times
        are on the perf_counter clock, which the request path reads anyway."""
        now = time.perf_counter()
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
        "_between_messages",
        "_chunk",
        "_chunked",
        "_chunked_request",
        "_client_paused",
        "_closing",
        "_error_after_current",
        "_forwarded",
        "_head_in_chunk",
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
        "_verbatim",
        "_write_paused",
        "_xf_seen",
        "client_ip",
        "client_port",
        "current",
        "entry",
        "entry_name",
        "idle_since",
        "loop",
        "parser",
        "pipeline",
        "transport",
    )

    def __init__(self, entry: HTTPEntryPoint) -> None:
        self.entry = entry
        self.entry_name = entry.settings.name
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
        self._chunk = b""  # the bytes of the current read
        self._between_messages = True  # the parser is not inside a message
        self._head_in_chunk = False  # the current message's head began at the read's start
        self._verbatim = False  # no field of the current request needs rewriting
        self._forwarded: tuple[bytes, list[tuple[bytes, bytes]], bytes] | None = None
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
        self.idle_since = time.perf_counter()
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
        self._chunk = data
        self._head_in_chunk = between = self._between_messages  # a request starts at byte 0
        if between and self._message_started_at is None:
            self._message_started_at = time.perf_counter()  # the read timeout starts now
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
        self._head_in_chunk = False  # a head still incomplete will span several reads

    def on_url(self, url: bytes) -> None:
        if self._between_messages:
            # A request begins (llhttp reports its URL first). Done here rather than in an
            # on_message_begin callback: one call less per request.
            self._between_messages = False
            self._url = url
            self._headers = []
            self._header_bytes = 0
            self._host = b""
            self._xf_seen = 0
            self._special = False
            self._chunked_request = False
            self._verbatim = True
            started = self._message_started_at
            if started is None:  # pipelined: this request began inside an earlier read
                started = self._message_started_at = time.perf_counter()
            self._perf_start = started
        else:
            self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.entry.settings.max_header_bytes:
            raise _HeaderTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.entry.settings.max_header_bytes:
            raise _HeaderTooLarge
        name = name.lower()
        kind = _FIELD_KIND.get(name)
        if kind is not None:
            if kind & _REWRITTEN:
                self._verbatim = False
            if kind & _NOTED:
                self._special = True
                if kind & _CHUNKED:
                    self._chunked_request = True
            elif kind & _X_FORWARDED:
                if not self._trusted:
                    return
                self._xf_seen |= kind
            elif kind == _HOST:
                if self._host:
                    raise httptools.HttpParserError("duplicate Host header")
                self._host = value
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        # A head that began this read (the usual case) is read straight off the bytes: the
        # version from the request line, and maybe the fields to forward verbatim.
        chunk = self._chunk
        line_end = chunk.find(_CRLF) if self._head_in_chunk else -1
        self._head_in_chunk = False  # a pipelined request after this one starts mid-read
        if line_end > 0 and chunk[line_end - 1] == 49 and chunk[line_end - 3] == 49:
            version = "1.1"  # "1.1": llhttp checked the request line ends with HTTP/x.y
        else:
            version = parser.get_http_version()
        raw_method = parser.get_method()
        method = _METHOD_NAMES.get(raw_method) or raw_method.decode("latin-1")
        host = self._host
        if not host and version == "1.1":
            raise httptools.HttpParserError("missing Host header")
        headers = self._headers
        received = len(headers)
        try:
            request = Request(
                method, self._url, headers, host, self.client_ip, self.client_port, version
            )
        except ValueError:
            raise httptools.HttpParserError("invalid request target") from None
        request.keep_alive = parser.should_keep_alive()
        # Traefik's entrypoint sets these before routing, so rules can match on them.
        seen = self._xf_seen & _XF_ALL
        if seen:
            self._add_forwarded_fields(request, seen)
        else:
            cached = self._forwarded
            if cached is None or cached[0] != host:
                cached = self._forwarded = self._forwarded_fields(request)
            headers.extend(cached[1])
            if self._verbatim and line_end > 0 and host and request.host_header is host:
                request.verbatim = self._verbatim_fields(line_end, received, cached[2])
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
        ex = Exchange(self, request, self.entry_name, self._perf_start, has_body)
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

    def _forwarded_fields(self, request: Request) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        """The X-Forwarded-* fields this entrypoint adds for a client that sent none: the same
        for every request on a connection with the same Host, so built once and kept."""
        host = self._host
        fields = [(b"x-forwarded-proto", b"http")]
        if host:
            fields.append((b"x-forwarded-host", host))
        port = request.port
        fields.append((b"x-forwarded-port", port.encode() if port else self.entry.port_bytes))
        fields.append((b"x-forwarded-server", SERVER_NAME))
        fields.append((b"x-real-ip", self.client_ip.encode()))
        # X-Forwarded-For is written at forwarding time (it may be appended to); for the
        # verbatim block it is the client's address alone.
        lines = [name + b": " + value + _CRLF for name, value in fields]
        lines.append(b"x-forwarded-for: " + self.client_ip.encode() + _CRLF)
        return host, fields, b"".join(lines)

    def _add_forwarded_fields(self, request: Request, seen: int) -> None:
        """A trusted client sent some X-Forwarded-* fields: add only the missing ones."""
        headers = self._headers
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

    def _verbatim_fields(self, line_end: int, received: int, forwarded: bytes) -> bytes | None:
        """The client's header lines exactly as they arrived, plus the X-Forwarded-* lines:
        forwarded without rebuilding them (as HAProxy does) when none needs a rewrite. Only
        for a head that began this read: llhttp has checked its syntax (CRLF line ends, no
        folding, no space before a colon), so its lines are the fields it reported."""
        chunk = self._chunk
        head_end = chunk.find(b"\r\n\r\n", line_end)
        if head_end < line_end:
            return None
        block = chunk[line_end + 2 : head_end + 2]
        if block.count(_CRLF) != received:
            return None  # not the head the parser reported (leading empty lines, say)
        return block + forwarded

    def on_body(self, body: bytes) -> None:
        ex = self._receiving
        if ex is not None:
            ex.on_request_body(body)

    def on_message_complete(self) -> None:
        self._between_messages = True
        ex = self._receiving
        if ex is not None:
            self._receiving = None
            if ex.has_body:  # a bodiless exchange starts out complete
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
            self.entry.handler(ex)  # calls exchange_done(ex) when it is over

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
        self.idle_since = time.perf_counter()
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
        headers: Fields,
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
        fields = headers if type(headers) is bytes else field_lines(headers)
        if chunked:
            fields += b"transfer-encoding: chunked\r\n"
        if not keep_alive:
            fields += b"connection: close\r\n"
        elif request.http_version == "1.0":
            fields += b"connection: keep-alive\r\n"
        self._chunked = chunked
        # Held back so head and body leave in one write (one syscall) when the body is small.
        status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        self._pending_head = status_line + fields + _CRLF

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
