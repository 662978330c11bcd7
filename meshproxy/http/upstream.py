"""HTTP/1.1 client side: pooled keep-alive connections to backend servers.

`UpstreamPool` is the HTTP/1.1 (http, https) implementation of `ServerPool`, the one interface
a load balancer sends through: `pool.send(ex, target, done)` serialises the request for the
server, sends it on an idle keep-alive connection or a new one, relays the response into the
exchange's sink, and calls `done` once: with None, or with the error that ended the try
(`UpstreamConnectError` and its subclasses mean no byte reached the backend: safe to retry).
An `UpstreamConnection` sends one request at a time and relays the response straight into the
sink (no buffering). Pools are kept per server origin and survive config reloads.

Interim responses (RFC 9110 §15.2) are relayed to the client as they come: 103 Early Hints and
the like, and the backend's own `100 Continue` for a request that carried `Expect:
100-continue` (forwarded to the backend, §10.1.1). The proxy answers 100 on the backend's
behalf only when the backend is known to speak HTTP/1.0, or has not answered within
`expect_continue_timeout` (Go's transport waits 1 s too). A 101 is not an interim response: it
ends the exchange with a 502 unless the request was an upgrade: then the backend must switch
to the protocol asked for (and, for WebSocket, prove it read the key: RFC 6455 §4.1), else 502;
after a valid 101 the connection leaves the pool and both sides become a byte pipe.

Timeouts: `response_header_timeout` runs from the moment the whole request has been sent (as
Go's transport) until the final response head; an exchange's `deadline` (a gRPC call's
grpc-timeout) bounds the whole exchange, before the head (504) or after it (abort); a backend
that stops sending its body is the client connection's stall timeout's job (see http.server).
Both are checked by the pool's sweep (once a second) over its busy connections, not by a timer
per request: a uvloop timer costs ~5 µs to arm and cancel, half of the proxy's whole
per-request budget.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final, Protocol

import httptools
from wsproto.utilities import generate_accept_token

from meshproxy.http.errors import (
    ClientGone,
    ResponseAborted,
    UpstreamError,
    UpstreamResponseTimeout,
)
from meshproxy.http.exchange import Exchange
from meshproxy.http.fields import HeaderBlock, MalformedFields, response_fields
from meshproxy.http.forwarding import HOP_BY_HOP, connection_tokens, trailer_lines
from meshproxy.observability.log_limit import LIMIT, held_back

log = logging.getLogger("meshproxy.upstream")

_CHUNK_END: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"


@dataclass(frozen=True)
class TransportSettings:
    """One Traefik serversTransport, resolved: forwardingTimeouts (seconds), pool size and TLS
    to the server. Hashable (pools are keyed by it); built by meshproxy.http.transports, which
    also makes the one SSLContext per distinct TLS setup (`client_context`)."""

    dial_timeout: float = 30.0
    # Traefik's default is 0 (wait forever); a mesh proxy must not hold a client forever on a
    # hung pod, so 60 s as HAProxy's and nginx's defaults. "0s" in the config disables it.
    response_header_timeout: float = 60.0
    expect_continue_timeout: float = 1.0
    idle_conn_timeout: float = 90.0
    max_idle_per_host: int = 200
    insecure_skip_verify: bool = False
    server_name: str | None = None  # SNI and the name the certificate must carry
    root_cas: tuple[str, ...] = ()  # PEM texts (files already read); empty: system CAs
    certificates: tuple[tuple[str, str], ...] = ()  # client (certificate, key) PEM texts
    min_version: str = ""  # Go's names ("VersionTLS12"); "": TLS 1.2, as Go's client
    max_version: str = ""  # "": the highest both sides speak
    cipher_suites: tuple[str, ...] = ()  # Go's names; (): OpenSSL's defaults
    peer_cert_uri: str = ""  # the server certificate must carry this URI SAN (no name check)
    disable_http2: bool = False
    read_idle_timeout: float = 0.0  # HTTP/2: PING after this long without a frame; 0: never
    ping_timeout: float = 15.0  # HTTP/2: the connection is closed if the PING is unanswered


DoneCallback = Callable[[BaseException | None], None]

# The largest response head (status line, interim responses and fields) read from a backend,
# as Go's transport bounds it (MaxResponseHeaderBytes); past it the response is a 502.
MAX_RESPONSE_HEAD_BYTES = 1 << 20

_CHUNKED_TE: Final = b"transfer-encoding: chunked\r\n\r\n"
_SKIP_ALWAYS: Final = HOP_BY_HOP | {b"host", b"x-forwarded-for"}
# An HTTP/1.0 server ignores Expect; the proxy answers 100 itself instead (RFC 9110 §10.1.1).
_SKIP_FOR_HTTP10: Final = _SKIP_ALWAYS | {b"expect"}
_DIALS: set[asyncio.Future[None]] = set()  # the loop keeps only weak references to tasks
# Methods whose requests have content (RFC 9110 §8.6): one sent without a body says so with
# Content-Length: 0, as Go's transport (and so Traefik) does, so no server waits for a body.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_EMPTY_BODY: Final = b"content-length: 0\r\n"
_METHOD_BYTES: Final = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")}


class ServerPool(Protocol):
    """Sends exchanges to one server, whatever protocol it speaks (one implementation per
    scheme: HTTP/1.1 here, h2c later); kept across reloads while the server is configured."""

    busy: set[Any]  # connections (or streams) serving an exchange now: swept for timeouts

    def send(self, ex: Exchange, target: ServerTarget, done: DoneCallback) -> None: ...

    def sweep(self, now: float) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class ServerTarget:
    """One server of a loadBalancer, as a request to it is written."""

    url: str
    pool: ServerPool  # the pool for the server's scheme (http/https: UpstreamPool; h2c: ...)
    host_header: bytes  # host[:port] of the server, used when passHostHeader is false
    path_prefix: bytes = b""  # with preservePath
    pass_host_header: bool = True


def build_request_head(
    ex: Exchange, target: ServerTarget, http10: bool = False
) -> tuple[bytes, bool]:
    """Serialize the HTTP/1.1 request head for `target` (`http10`: the server is known to
    answer in HTTP/1.0); returns (head, body is chunked)."""
    request = ex.request
    path = target.path_prefix + request.target if target.path_prefix else request.target
    verbatim = request.verbatim
    pass_host_header = target.pass_host_header
    empty_body = (
        not ex.has_body and request.content_length is None and request.method in _BODY_METHODS
    )
    if verbatim is not None and pass_host_header:
        # the client's own lines (its Host among them) and X-Forwarded-*: nothing to rebuild
        method = _METHOD_BYTES.get(request.method) or request.method.encode()
        # one join: a %-format parses its template on every call (~0.15 us more)
        end = _EMPTY_BODY + _CRLF if empty_body else _CRLF
        return b"".join((method, b" ", path, b" HTTP/1.1\r\n", verbatim, end)), False
    # An empty Host (allowed without an authority, RFC 9112 §3.2) becomes the server's own, as
    # Go's transport writes it (and so Traefik).
    host = request.host_header if pass_host_header and request.host_header else target.host_header
    skip = _SKIP_FOR_HTTP10 if http10 else _SKIP_ALWAYS
    if request.connection_tokens:
        skip = skip | request.connection_tokens
    headers = request.headers
    lines = [name + b": " + value + _CRLF for name, value in headers if name not in skip]
    if request.append_client_ip:
        client = request.client_ip.encode()
        if request.forwarded_for:  # a trusted client sent X-Forwarded-For: append to it
            xff = b", ".join(value for name, value in headers if name == b"x-forwarded-for")
            client = xff + b", " + client
        lines.append(b"x-forwarded-for: " + client + _CRLF)
    elif request.forwarded_for:
        lines.extend(
            b"x-forwarded-for: " + v + _CRLF for n, v in headers if n == b"x-forwarded-for"
        )
    if request.te_trailers:
        lines.append(b"te: trailers\r\n")  # this hop carries trailers too (RFC 9110 §10.1.4)
    if request.upgrade is not None:
        # The one hop-by-hop pair a proxy carries on (RFC 9110 §7.8): the backend may switch.
        lines.append(b"connection: Upgrade\r\nupgrade: " + request.upgrade + _CRLF)
    chunked = ex.has_body and request.content_length is None
    if empty_body:
        lines.append(_EMPTY_BODY)
    return b"".join(
        (
            request.method.encode(),
            b" ",
            path,
            b" HTTP/1.1\r\nhost: ",
            host,
            _CRLF,
            *lines,
            _CHUNKED_TE if chunked else _CRLF,
        )
    ), chunked


class EarlyEOF(Exception):
    """The connection ended before any response byte: the request may be replayed."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_chunked_body",
        "_continue_timer",
        "_fresh_parser",
        "_got_response_bytes",
        "_head",
        "_head_start",
        "_header_timeout",
        "_on_done",
        "_reading_paused",
        "_replay_head",
        "_response_complete",
        "_response_headers_done",
        "_sent_at",
        "_status",
        "_switching",
        "_trailer_parser",
        "_until_close",
        "closed",
        "ex",
        "idle_since",
        "keep_alive",
        "loop",
        "parser",
        "pool",
        "request_sent",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._header_timeout = pool.settings.response_header_timeout
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.ex: Exchange | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self._on_done: DoneCallback | None = None
        self._head = b""  # the response bytes read until its head is complete
        self._head_start = 0  # where the head being parsed begins (after 1xx interim heads)
        self._status = 0
        self._chunked_body = False
        self._switching: list[tuple[bytes, bytes]] | None = None
        self._trailer_parser = False  # the parser reports trailer fields  # a valid 101's fields
        self._replay_head = b""  # the head to send again after a stale keep-alive, if any
        self._sent_at = 0.0  # loop time the request was all sent, while awaiting the head
        self._continue_timer: asyncio.TimerHandle | None = None
        self._got_response_bytes = False
        self._response_headers_done = False
        self._response_complete = False
        self._until_close = False
        self._fresh_parser = False
        self._reading_paused = False
        self.request_sent = False
        self.keep_alive = False
        self.idle_since = 0.0

    # -- connection lifecycle -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = None  # it holds our bound callbacks: a cycle the GC would have to find
        self.pool.forget(self)
        self.pool.busy.discard(self)
        ex = self.ex
        if ex is None or self._response_complete:
            return
        if self._response_headers_done and self._until_close:
            self._complete()  # close-delimited body ends with the connection
            return
        if isinstance(exc, ssl.SSLError):
            # A TLS alert read after the request went out: under TLS 1.3 a server refusing
            # our (missing) client certificate says so only now (RFC 8446 §4.4.2.4).
            _log_tls_alert(self.pool, exc)
            self._fail(UpstreamError(f"backend TLS alert: {exc.reason or exc}"))
            return
        if self._response_headers_done:
            self._fail(ResponseAborted("backend closed the connection mid-response"))
        elif not self._got_response_bytes:
            self._fail(EarlyEOF())
        else:
            self._fail(UpstreamError("backend closed the connection before a full response head"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- one request --------------------------------------------------------------------

    def start(
        self,
        ex: Exchange,
        head: bytes,
        chunked_body: bool,
        on_done: DoneCallback,
        reused: bool = False,
    ) -> None:
        """Send the request head; the body follows as the client sends it. `on_done` is called
        once: with None when the response is complete, or with the exception that ended it.
        On a `reused` keep-alive connection that the server closed while idle (EOF before any
        response byte), a bodiless request is sent again once on a new connection, as Go's
        transport does; `on_done` then reports that try."""
        if ex.client_gone:
            # The client went away while this request waited (a dial, a middleware's delay):
            # nothing has been written, so the connection stays good for the next one.
            if not self.closed:
                self.pool.release(self)
            on_done(ClientGone())
            return
        self.ex = ex
        self._on_done = on_done
        wants_trailers = ex.request.te_trailers
        if self.parser is None or wants_trailers != self._trailer_parser:
            # Reused across keep-alive responses; replaced after a bodiless HEAD/204/304.
            # Trailers are read only for a client that accepts them (TE: trailers): llhttp
            # reports them through on_header, which costs a call per field of every head.
            self._trailer_parser = wants_trailers
            self.parser = httptools.HttpResponseParser(
                _TrailerReader(self) if wants_trailers else self
            )
        self._head = b""
        self._head_start = 0
        self._status = 0
        self._got_response_bytes = False
        self._response_headers_done = False
        self._response_complete = False
        self._until_close = False
        self.request_sent = not ex.has_body
        self._chunked_body = chunked_body
        self._replay_head = head if reused and not ex.has_body else b""
        ex.upstream = self
        self.transport.write(head)  # type: ignore[union-attr]
        if ex.has_body:
            if ex.request.expect_continue and not ex.body_complete:
                if self.pool.http10:  # it will not answer 100 (RFC 9110 §10.1.1)
                    ex.sink.write_continue(ex)
                else:
                    self._continue_timer = self.loop.call_later(
                        self.pool.settings.expect_continue_timeout, self._continue_anyway
                    )
            ex.attach_body_target(self)
        else:
            self._sent_at = self.loop.time()
        self.pool.busy.add(self)
        if self._reading_paused:
            self.resume_reading()

    def send_body(self, chunk: bytes) -> None:
        if self.closed:
            return
        if self._chunked_body:
            self.transport.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))  # type: ignore[union-attr]
        else:
            self.transport.write(chunk)  # type: ignore[union-attr]

    def end_body(self) -> None:
        if self.closed:
            return
        if self._chunked_body:
            ex = self.ex
            trailers = ex.request_trailers if ex is not None else None
            self.transport.write(trailer_lines(trailers) if trailers else _CHUNK_END)  # type: ignore[union-attr]
        self.request_sent = True
        if self._response_complete:
            self._finish_connection()
        elif not self._response_headers_done:
            self._sent_at = self.loop.time()

    def _continue_anyway(self) -> None:
        self._continue_timer = None
        ex = self.ex
        if ex is not None and not self._response_headers_done:
            ex.sink.write_continue(ex)

    def check_timeout(self, now: float) -> None:
        """Give up on a backend that has not sent a response head `response_header_timeout`
        seconds after the request was sent (`now` on the loop's clock): 504, closed. Also on an
        exchange past its `deadline` (perf_counter time; the smaller of the two wins), checked
        at the sweep's pace (once a second)."""
        sent_at = self._sent_at
        timeout = self._header_timeout
        if sent_at and timeout > 0 and now - sent_at > timeout and not self._response_headers_done:
            self._fail(UpstreamResponseTimeout("no response headers in time"))
            self.close()
            return
        ex = self.ex
        if ex is not None and ex.deadline and perf_counter() >= ex.deadline:
            # The call's own deadline (gRPC's grpc-timeout, set by dispatch) passed first: as
            # a response timeout before the head (504, DEADLINE_EXCEEDED to a gRPC client),
            # an abort after it (a gRPC client gets a DEADLINE_EXCEEDED trailer where its
            # protocol can carry one: http.grpc.abort_trailers).
            if self._response_headers_done:
                self._fail(ResponseAborted("the call's deadline passed mid-response"))
            else:
                self._fail(UpstreamResponseTimeout("the call's deadline passed"))
            self.close()

    def client_gone(self) -> None:
        """The client went away: this connection's state is unknown, drop it. Also after a
        complete response, if the request body was not all sent: its framing is broken."""
        if not self._response_complete:
            self._fail(ClientGone())
            self.close()
        elif not self.request_sent and self.ex is not None:
            self.keep_alive = False
            self._finish_connection()

    # -- response parsing ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.ex is None:
            self.close()  # bytes on an idle connection: the backend misbehaves
            return
        self._got_response_bytes = True
        if not self._response_headers_done:
            self._head += data
            if len(self._head) > MAX_RESPONSE_HEAD_BYTES:
                # A head that never ends must not grow in memory: 502, connection closed.
                self._fail(UpstreamError("response head larger than 1 MiB"))
                self.close()
                return
        sink = self.ex.sink
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
            if not self._response_complete:
                sink.flush(self.ex)  # a head without body bytes yet: send it now
        except httptools.HttpParserUpgrade as upgrade:  # one name per handler: mypyc types
            if self._switching is None:  # a name once (`exc` below would be this class)
                self._fail(UpstreamError("backend switched protocols unasked"))
                self.close()
                return
            self._switch(data[upgrade.args[0] :] if upgrade.args else b"")
        except (httptools.HttpParserError, MalformedFields) as exc:
            if self._response_headers_done:
                self._fail(ResponseAborted(f"invalid response body: {exc}"))
            else:
                self._fail(UpstreamError(f"invalid response from backend: {exc}"))
            self.close()

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()  # type: ignore[union-attr]
        head = self._head
        line_end = head.find(_CRLF, self._head_start)
        head_end = head.find(b"\r\n\r\n", line_end)
        if line_end < 0 or head_end < 0:
            raise MalformedFields("response head not found")
        ex = self.ex
        assert ex is not None
        if self._continue_timer is not None:
            self._continue_timer.cancel()
            self._continue_timer = None
        if ex.request.expect_continue and parser.get_http_version() == "1.0":  # type: ignore[union-attr]
            self.pool.http10 = True
        if status == 101:
            self._switching = switched_fields(ex, head[line_end + 2 : head_end + 2])
            self._status = 101  # llhttp reports the message complete, then the upgrade
            return
        if 100 <= status < 200:
            self._head_start = head_end + 4  # interim response: the final one follows
            self._status = status
            interim, _, _ = response_fields(head[line_end + 1 : head_end + 2], False)
            ex.sink.write_interim(ex, status, interim)
            return
        self._head = b""
        self._sent_at = 0.0
        self._status = status
        self._response_headers_done = True
        self.keep_alive = parser.should_keep_alive()  # type: ignore[union-attr]
        # hop-by-hop fields stop here, so the client side can write the rest as they are
        fields, content_length, chunked = response_fields(head[line_end + 1 : head_end + 2])
        no_body = ex.request.method == "HEAD" or status in (204, 304)
        if no_body:
            self._fresh_parser = True
        if not no_body and content_length is None and not chunked:
            self._until_close = True
            self.keep_alive = False
        ex.start_response(status, fields, content_length, no_body)
        if no_body:
            self._complete()

    def _switch(self, leftover: bytes) -> None:
        """The backend switched protocols: this connection leaves the pool for good and, with
        the client's, becomes a byte pipe (the sink relays the 101 and builds it)."""
        ex = self.ex
        headers = self._switching
        assert ex is not None and headers is not None and self.transport is not None
        self._switching = None
        self._response_complete = True
        self._sent_at = 0.0
        self.closed = True  # never reused: it speaks another protocol now
        self.pool.busy.discard(self)
        self.ex = None
        ex.upstream = None
        ex.body_target = None
        on_done = self._on_done
        self._on_done = None
        ex.sink.switch_protocols(ex, headers, self.transport, leftover, None)
        if on_done is not None:
            on_done(None)

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is not None and not self._response_complete and not ex.swallowed_status:
            ex.response_bytes += len(body)
            ex.sink.write_body(ex, body)  # Exchange.send_body, without the extra call

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200 or self._response_complete:
            return
        self._complete()

    def _complete(self) -> None:
        self._response_complete = True
        ex = self.ex
        if ex is not None and not ex.swallowed_status:
            ex.finished = True  # Exchange.end_response, without the extra call
            ex.sink.write_end(ex)
        on_done = self._on_done
        if on_done is not None:
            self._on_done = None
            on_done(None)
        if not self.request_sent:
            # Answered before the whole request body was sent (a 413, a 401 to an Expect):
            # the client connection closes after this response, and this one cannot be
            # reused with a request half-sent.
            self.keep_alive = False
        self._finish_connection()

    def _finish_connection(self) -> None:
        ex = self.ex
        self.ex = None
        self.pool.busy.discard(self)
        if self._fresh_parser:
            self.parser = None
            self._fresh_parser = False
        if ex is not None:
            ex.upstream = None
            ex.body_target = None
        if self._reading_paused:
            self.resume_reading()
        if self.keep_alive and self.request_sent and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def _fail(self, exc: Exception) -> None:
        self._sent_at = 0.0
        self.pool.busy.discard(self)
        if self._continue_timer is not None:
            self._continue_timer.cancel()
            self._continue_timer = None
        self._response_complete = True
        ex = self.ex
        self.ex = None
        if ex is not None:
            ex.upstream = None
            ex.detach_body_target()
        on_done = self._on_done
        if on_done is not None:
            self._on_done = None
            head = self._replay_head
            self._replay_head = b""
            if type(exc) is not EarlyEOF:
                on_done(exc)
            elif head and ex is not None and not ex.response_started:
                self.pool._dial(ex, head, self._chunked_body, on_done)  # the one replay
            else:
                on_done(UpstreamError("backend closed the connection without answering"))
        if not self.closed:
            self.close()

    # -- flow control -------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.sink.pause_request_body(ex)

    def resume_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.sink.resume_request_body(ex)


class UpstreamPool:
    """Idle keep-alive connections to one server origin."""

    def __init__(self, scheme: str, host: str, port: int, settings: TransportSettings) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.settings = settings
        self.idle: list[UpstreamConnection] = []
        self.busy: set[UpstreamConnection] = set()  # serving an exchange: swept for timeouts
        self.http10 = False  # the server answered in HTTP/1.0: it will not send 100 Continue
        self.ssl: ssl.SSLContext | None = None
        if scheme == "https":
            from meshproxy.http.transports import client_context  # it imports this module

            self.ssl = client_context(settings)  # shared by every pool of this transport

    def send(self, ex: Exchange, target: ServerTarget, done: DoneCallback) -> None:
        """Send `ex` to this server (see the module docstring). On an idle keep-alive
        connection (the common case) this is all callbacks; a dial runs in a Task."""
        ex.server_url = target.url  # the access log's ServiceURL
        head, chunked = build_request_head(ex, target, self.http10)
        conn = self.take_idle()
        if conn is None:
            self._dial(ex, head, chunked, done)
            return
        conn.start(ex, head, chunked, done, True)

    def _dial(self, ex: Exchange, head: bytes, chunked: bool, done: DoneCallback) -> None:
        from meshproxy.http.dial import exchange_fresh  # dial.py imports this module

        task = asyncio.ensure_future(exchange_fresh(self, ex, head, chunked))
        _DIALS.add(task)
        task.add_done_callback(_Dialled(done).ended)

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still open, if any."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if len(self.idle) >= self.settings.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, now: float) -> None:
        """Time out busy connections (response head) and close idle ones past
        `idle_conn_timeout`; `now` on the loop's clock, seconds."""
        for conn in list(self.busy):
            conn.check_timeout(now)
        limit = self.settings.idle_conn_timeout
        if limit <= 0:
            return
        for conn in [c for c in self.idle if now - c.idle_since > limit]:
            self.forget(conn)
            conn.close()

    def close(self) -> None:
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


def switched_fields(ex: Exchange, block: bytes) -> list[tuple[bytes, bytes]]:
    """The fields to relay with a backend's 101, checked (RFC 9110 §7.8, §15.2.2): the request
    asked to upgrade, the backend switched to that protocol, and for WebSocket its
    Sec-WebSocket-Accept answers the client's key (RFC 6455 §4.1, §4.2.2). Raises
    MalformedFields (502) otherwise."""
    asked = ex.request.upgrade
    if asked is None:
        raise MalformedFields("101 Switching Protocols without an upgrade request")
    fields = HeaderBlock(block).pairs()
    listed = set(HOP_BY_HOP)
    switched = b""
    accept = b""
    for name, value in fields:
        if name == b"connection":
            listed.update(connection_tokens(value))
        elif name == b"upgrade":
            switched = value
        elif name == b"sec-websocket-accept":
            accept = value
    if switched.lower() != asked.lower():
        raise MalformedFields(f"backend switched to {switched!r}, {asked!r} was asked for")
    if asked.lower() == b"websocket":
        key = b""
        for name, value in ex.request.headers:
            if name == b"sec-websocket-key":
                key = value
        if not key or accept != generate_accept_token(key):
            raise MalformedFields("Sec-WebSocket-Accept does not answer the client's key")
    kept = [(name, value) for name, value in fields if name not in listed]
    kept.append((b"connection", b"Upgrade"))
    kept.append((b"upgrade", switched))
    return kept


class _TrailerReader:
    """The parser callbacks of a connection whose client accepts trailers: as the connection's
    own, plus `on_header`, which keeps the fields that follow a chunked body (RFC 9112
    §7.1.2) as the exchange's response trailers."""

    __slots__ = ("conn",)

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn

    def on_header(self, name: bytes, value: bytes) -> None:
        conn = self.conn
        ex = conn.ex
        if conn._response_headers_done and ex is not None:
            if ex.response_trailers is None:
                ex.response_trailers = []
            ex.response_trailers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


def _log_tls_alert(pool: UpstreamPool, exc: ssl.SSLError) -> None:
    """The TLS error that ended an exchange, at ERROR, at most once per server per
    LogLimit interval (a refusing backend under load would write a line per request)."""
    held = LIMIT.allow(str(exc), (pool.host, pool.port))
    if held is not None:
        log.error(
            "backend %s://%s:%d: TLS error after the request was sent: %s%s",
            pool.scheme,
            pool.host,
            pool.port,
            exc,
            held_back(held),
        )


class _Dialled:
    """Ends a try that had to dial first: the task's outcome goes to `done`."""

    __slots__ = ("done_callback",)

    def __init__(self, done: DoneCallback) -> None:
        self.done_callback = done

    def ended(self, task: asyncio.Future[None]) -> None:
        _DIALS.discard(task)
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        self.done_callback(exc)
