"""HTTP/1.1 server side: an asyncio Protocol driving httptools (llhttp).

Turns bytes into `Request`/`Exchange` objects, hands each exchange to the entrypoint's handler,
and frames the response back onto the wire. Pipelined requests are queued and answered in
order. It knows nothing of routing.

What it refuses, before anything is forwarded (RFC 9112 unless said otherwise):
- a request line or field llhttp cannot parse, a missing or repeated Host: 400 (§3.2);
- a request-target that is not origin-, absolute- or asterisk-form, or has a fragment: 400
  (§3.2; CVE-2023-47106); a Host or absolute-form authority that is not
  `uri-host [":" port]` (§3.2, RFC 3986 §3.2.2): 400;
- a request-target longer than `max_target_bytes`: 414; a head whose request line and fields
  exceed `max_header_bytes`, however it is split over reads: 431;
- an HTTP major version other than 1: 505 (RFC 9110 §6.2; `HTTP/1.2` is served as 1.1);
- a transfer coding other than chunked: 501 (§6.1); chunked not final or applied twice, or any
  Transfer-Encoding in an HTTP/1.0 request: 400 (§6.1, §6.3);
- a body whose framing breaks mid-stream (bad chunk size, ...): 400 if no response has started,
  else the connection is cut; either way the exchange ends, its upstream connection is closed
  (never reused) and the client connection is closed (§7.1: the framing cannot be trusted).
Timeouts (checked by `HTTPEntryPoint.sweep` once a second): `read_timeout` for a whole request
(head and body), `idle_timeout` between requests and for an exchange that makes no progress in
either direction; the upstream side has its own (see http.upstream).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httptools

from meshproxy.http.exchange import Exchange
from meshproxy.http.fields import Fields, HeaderBlock, field_lines
from meshproxy.http.forwarding import (
    HOP_BY_HOP,
    SERVER_NAME,
    UNTRUSTED_DROP,
    connection_tokens,
    trailer_lines,
)
from meshproxy.http.request import Request
from meshproxy.http.status import reason_phrase
from meshproxy.l4.pipe import BytePipe, PipeEnd, PipeSettings, PipeStats
from meshproxy.l4.sniff import SniffingProtocol
from meshproxy.l4.websocket import WebSocketTunnel
from meshproxy.networks import NetworkSet

log = logging.getLogger("meshproxy.http")
# Final: a C static in compiled code, not a lookup of `time.perf_counter` per call
_perf_counter: Final = time.perf_counter

# Final: compiled code reads these as C constants, not from the module dict (a lookup each).
_CHUNK_END: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_XF_ALL: Final = 31
_METHOD_NAMES: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")}
# Status lines, built once: the reason phrase comes from the code, as in Go.
_STATUS_LINES: Final = {c: b"HTTP/1.1 %d %s\r\n" % (c, reason_phrase(c)) for c in range(100, 1000)}
# What on_header must notice about a request field, by lower-case name: one dict lookup, and
# the common field (none of these) is just appended.
_XF_BITS = {  # trusted X-Forwarded-* fields the entrypoint then leaves as they are
    b"x-forwarded-proto": 1,
    b"x-forwarded-host": 2,
    b"x-forwarded-port": 4,
    b"x-real-ip": 8,
    b"x-forwarded-for": 16,
}
_HOST: Final = 32  # the Host field
_NOTED: Final = 64  # framing, forwarding or the metrics label depend on it: looked at again later
_CHUNKED: Final = 128  # Transfer-Encoding: the body is chunked
_REWRITTEN: Final = 256  # not forwarded as received (hop-by-hop, Expect, X-Forwarded-*)
_X_FORWARDED: Final = 512  # dropped unless the client is trusted
_FIELD_KIND: Final[dict[bytes, int]] = {name: _X_FORWARDED | _REWRITTEN for name in UNTRUSTED_DROP}
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
        b"upgrade": _NOTED | _REWRITTEN,
        b"te": _NOTED | _REWRITTEN,
    }
)
# RFC 9110 §7.8: protocol = protocol-name ["/" protocol-version], both tokens.
_UPGRADE_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")
# Client bytes held while an upgrade request waits for the backend's answer (RFC 9110 §7.8:
# nothing of the new protocol may pass before the 101); reading pauses past this.
_TUNNEL_HOLD: Final = 64 * 1024


# Envoy's default head limit (60 KiB), not Go's 1 MiB: a mesh proxy has no business holding a
# megabyte per connection for a head, and Traefik's `maxHeaderBytes` still raises it.
DEFAULT_MAX_HEADER_BYTES = 60 * 1024
DEFAULT_MAX_TARGET_BYTES = 16 * 1024  # as HAProxy's default buffer; 414 past it
LINGER_SECONDS = 2.0  # how long an error answer's connection drains the client's bytes


class _Reject(Exception):
    """Refuse the request being parsed with `status` (raised from a parser callback)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# RFC 3986 §3.2.2 host (IP-literal, IPv4address or reg-name) and §3.2.3 port, as RFC 9112 §3.2
# asks of Host and of an absolute-form authority. No userinfo ("@"), no blanks, no "/".
_VALID_AUTHORITY = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
_AUTHORITIES: Final[dict[bytes, bool]] = {}  # memo: clients repeat the same few Host values


def valid_authority(value: bytes) -> bool:
    """Whether `value` is a valid `uri-host [":" port]` (RFC 3986 §3.2.2, RFC 9112 §3.2)."""
    known = _AUTHORITIES.get(value)
    if known is None:
        known = _VALID_AUTHORITY.fullmatch(value) is not None
        if len(_AUTHORITIES) >= 4096:
            _AUTHORITIES.clear()
        _AUTHORITIES[value] = known
    return known


def check_target(target: bytes, method: bytes) -> None:
    """Raise `_Reject(400)` unless `target` is a request-target form RFC 9112 §3.2 allows for
    `method` (origin-form, absolute-form with an http(s) scheme, asterisk-form for OPTIONS), and
    has no fragment (§3.2: a fragment is never sent; CVE-2023-47106 in Traefik)."""
    if target.find(b"#") >= 0:  # not `in`: on bytes it first raises and clears a TypeError
        raise _Reject(400)
    first = target[:1]
    if first == b"/":
        return
    if target == b"*" and method == b"OPTIONS":
        return
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
        if authority and valid_authority(authority):
            return
    raise _Reject(400)


_SWITCH_TO_H2C = b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n"


_BASE64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def valid_h2_settings(value: bytes) -> bool:
    """Whether an HTTP2-Settings value is a SETTINGS payload h2 accepts (RFC 7540 §3.2.1:
    base64url, padding optional, of whole six-byte settings; each value in its RFC 9113
    §6.5.2 range, checked by h2's own Settings). Anything else (characters outside the
    base64url alphabet, a comma-joined list, a partial setting, ENABLE_PUSH 2...) is not an
    upgrade the proxy makes: the request is served as HTTP/1.1 (never 101 then an error)."""
    body = value.rstrip(b"=")
    if len(value) - len(body) > 2 or len(body) % 4 == 1 or body.translate(None, _BASE64URL):
        return False
    try:
        payload = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
    except ValueError:  # binascii.Error is one (one class per clause: compiled code)
        return False
    if len(payload) % 6:
        return False
    import h2.exceptions
    import h2.settings

    settings = h2.settings.Settings(client=True)
    for offset in range(0, len(payload), 6):
        code = int.from_bytes(payload[offset : offset + 2], "big")
        try:
            settings[code] = int.from_bytes(payload[offset + 2 : offset + 6], "big")
        except h2.exceptions.InvalidSettingsValueError:
            return False
    return True


def transfer_codings_status(values: list[bytes], http_version: str) -> int:
    """0 if the request's Transfer-Encoding values frame a body we can read (exactly one
    `chunked`), else the status to answer: 501 for a coding we do not implement (RFC 9112 §6.1),
    400 when chunked is not the final coding or is applied twice (§6.3, §7), 400 for any
    Transfer-Encoding in an HTTP/1.0 request (§6.1: its framing is faulty)."""
    if http_version == "1.0":
        return 400
    codings = [c.split(b";", 1)[0].strip().lower() for v in values for c in v.split(b",")]
    codings = [c for c in codings if c]
    if any(c != b"chunked" for c in codings):
        return 501
    if len(codings) != 1:
        return 400
    return 0


@dataclass
class EntryPointSettings:
    """One HTTP entrypoint's limits and timeouts: bytes and seconds (0 disables a timeout)."""

    name: str
    port: int
    trusted_networks: list[Any] = field(default_factory=list)
    insecure_forwarded: bool = False
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # request line and fields: 431 past it
    max_target_bytes: int = DEFAULT_MAX_TARGET_BYTES  # the request-target: 414 past it
    idle_timeout: float = 180.0  # between requests, and for an exchange that makes no progress
    read_timeout: float = 60.0  # for a whole request: head and body (Traefik's readTimeout)
    tunnel_idle_timeout: float = 3600.0  # an upgraded connection (WebSocket) with no byte
    # Percent-encodings refused in the path with 400 (upper-case, e.g. b"%2F"): Traefik's
    # entryPoints.X.http.encodedCharacters.allowEncoded*=false.
    refused_encodings: tuple[bytes, ...] = ()
    sanitize_path: bool = True  # http.sanitizePath: dot-segments and `//` removed (Request)
    # HTTP/2 (meshproxy.http2.server, docs/http2-server.md): Traefik's
    # entryPoints.X.http2.maxConcurrentStreams / maxDecoderHeaderTableSize /
    # maxEncoderHeaderTableSize, and our initialWindowSize / maxHeaderListSize (0: the
    # entrypoint's max_header_bytes).
    h2_max_concurrent_streams: int = 250
    h2_max_decoder_table_size: int = 4096
    h2_max_encoder_table_size: int = 4096
    h2_initial_window_size: int = 256 * 1024
    h2_max_header_list_size: int = 0
    # Requests arrive decrypted by the proxy (meshproxy.l4.tls): X-Forwarded-Proto https and
    # X-Forwarded-Port 443 by default, as Traefik's HTTPS handler.
    tls: bool = False


class HTTPEntryPoint:
    """Shared state of one HTTP entrypoint: its settings, its open connections, its handler."""

    def __init__(
        self,
        settings: EntryPointSettings,
        handler: Callable[[Exchange], None],
        on_open: Callable[[int], None] | None = None,
        on_protocol_error: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.trusted = NetworkSet(settings.trusted_networks)  # forwardedHeaders.trustedIPs
        self.connections: set[H1ServerConnection] = set()
        self.on_open = on_open or (lambda delta: None)
        # Called with the status of every request refused or cut for its framing.
        self.on_protocol_error = on_protocol_error or (lambda status: None)
        # Upgraded connections (WebSocket...) now relayed by a byte pipe, until it ends.
        self.tunnels: set[BytePipe] = set()
        self.sniffing: set[SniffingProtocol] = set()  # connections not yet classified
        # HTTP/2 connections (meshproxy.http2.server.H2ServerConnection): swept and closed
        # with the others.
        self.h2_connections: set[Any] = set()
        self._forwarded: dict[tuple[bytes, str], tuple[bytes, list[tuple[bytes, bytes]], bytes]]
        self._forwarded = {}
        self.tunnel_settings = PipeSettings(idle_timeout=settings.tunnel_idle_timeout)
        self.proto_value = b"https" if settings.tls else b"http"
        self.default_port = b"443" if settings.tls else b"80"
        # Set by meshproxy.l4.tls when the entrypoint has TCP or TLS routing: the sniffer's
        # `tls` hook, and what it gives non-TLS connections instead of HTTP/1.1 directly.
        self.tls_hook: Callable[[asyncio.Transport, bytes], None] | None = None
        self.plain_factory: Callable[[], asyncio.Protocol] | None = None
        # The same for HTTP/2 prior knowledge (TCP routers first): set by meshproxy.l4.tls.
        self.plain_h2_factory: Callable[[], asyncio.Protocol] | None = None
        # Graceful shutdown (meshproxy.daemon.stop): every response then ends its connection
        # with `Connection: close` (RFC 9112 §9.6), so keep-alive clients leave at a request
        # boundary rather than have the socket closed under a request they just sent.
        self.draining = False

    def forwarded_fields(
        self, host: bytes, port: str, client_ip: str
    ) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        """The X-Forwarded-* fields this entrypoint adds for a client that sent none: the same
        for every request with the same Host from the same client, so built once and shared
        by its connections (kept per connection, they cost ~640 bytes each; issue 9 item 3).
        The host is the request's authority: an absolute-form target's wins (RFC 9112
        §3.2.2). Returns (host, fields, the fields as lines with X-Forwarded-For)."""
        key = (host, client_ip)
        cached = self._forwarded.get(key)
        if cached is not None:
            return cached
        fields = [(b"x-forwarded-proto", self.proto_value)]
        if host:
            fields.append((b"x-forwarded-host", host))
        # The port the client addressed: Host's, else the scheme's default (as Traefik), not
        # the listener's (a pod that called svc.ns.traefik.mesh called port 80).
        fields.append((b"x-forwarded-port", port.encode() if port else self.default_port))
        fields.append((b"x-forwarded-server", SERVER_NAME))
        client = client_ip.encode()
        fields.append((b"x-real-ip", client))
        # X-Forwarded-For is written at forwarding time (it may be appended to); for the
        # verbatim block it is the client's address alone.
        lines = [name + b": " + value + _CRLF for name, value in fields]
        lines.append(b"x-forwarded-for: " + client + _CRLF)
        cached = (host, fields, b"".join(lines))
        if len(self._forwarded) >= 4096:
            self._forwarded.clear()
        self._forwarded[key] = cached
        return cached

    def open_tunnel(self, downstream: PipeEnd, upstream: PipeEnd, websocket: bool) -> BytePipe:
        """Relay an upgraded connection; it counts as open until both sockets are closed."""
        tunnel = _Tunnel(self)
        kind = WebSocketTunnel if websocket else BytePipe
        pipe = tunnel.pipe = kind(downstream, upstream, self.tunnel_settings, tunnel.closed)
        self.tunnels.add(pipe)
        pipe.start()
        return pipe

    def is_trusted(self, ip: str) -> bool:
        if self.settings.insecure_forwarded:
            return True
        return self.trusted.contains(ip)

    def protocol_factory(self) -> H1ServerConnection:
        """An HTTP/1.1 connection (what the sniffer hands plain HTTP to)."""
        return H1ServerConnection(self)

    def h2_factory(self) -> asyncio.Protocol:
        """An HTTP/2 connection (what the sniffer hands the HTTP/2 preface to)."""
        from meshproxy.http2.server import H2ServerConnection  # it imports this module

        return H2ServerConnection(self)

    def connection_factory(self) -> SniffingProtocol:
        """The first protocol of an accepted connection: it tells HTTP/1.1 from HTTP/2 and
        TLS by the first bytes (meshproxy.l4.sniff)."""
        plain = self.plain_factory or self.protocol_factory
        http2 = self.plain_h2_factory or self.h2_factory
        return SniffingProtocol(plain, self.sniffing, self.on_open, http2=http2, tls=self.tls_hook)

    def sweep(self) -> None:
        """Close idle keep-alive connections and clients that dribble their headers. Times
        are on the perf_counter clock, which the request path reads anyway."""
        now = _perf_counter()
        idle = self.settings.idle_timeout
        read = self.settings.read_timeout
        for conn in list(self.connections):
            conn.check_timeouts(now, idle, read)
        for h2conn in list(self.h2_connections):
            h2conn.check_timeouts(now, idle, read)
        for sniffer in list(self.sniffing):
            sniffer.check_timeout(now, read)  # the first bytes come within the read timeout

    def close_tunnels(self) -> None:
        """Graceful shutdown of upgraded connections: WebSockets get a Close frame with 1001
        on both sides (RFC 6455 §7.4.1), other tunnels are closed."""
        for pipe in list(self.tunnels):
            if isinstance(pipe, WebSocketTunnel):
                pipe.going_away()
            else:
                pipe.close()

    def shutdown_http2(self) -> None:
        """Graceful shutdown of HTTP/2 connections: GOAWAY(NO_ERROR), each closes once the
        streams it already accepted are done (RFC 9113 §6.8)."""
        for h2conn in list(self.h2_connections):
            h2conn.shutdown()

    def drain(self) -> None:
        """Start a graceful shutdown of HTTP/1.1: later responses carry `Connection: close`
        and connections idle between requests (no request begun) are closed now, as Go's
        `http.Server.Shutdown` closes idle connections (Traefik's graceful stop)."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()
        for h2conn in list(self.h2_connections):
            h2conn.close()
        for pipe in list(self.tunnels):
            pipe.abort()


class _Tunnel:
    """Forgets an entrypoint's tunnel when its pipe has closed both sockets."""

    __slots__ = ("entry", "pipe")

    def __init__(self, entry: HTTPEntryPoint) -> None:
        self.entry = entry
        self.pipe: BytePipe | None = None

    def closed(self, stats: PipeStats) -> None:
        if self.pipe is not None:
            self.entry.tunnels.discard(self.pipe)
            self.pipe = None
        self.entry.on_open(-1)


def _new_parser(protocol: H1ServerConnection) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(protocol)
    # The version is checked by the protocol (505 for a major other than 1; RFC 9110 §6.2
    # serves HTTP/1.2 as 1.1), which llhttp would refuse with a bare parse error.
    parser.set_dangerous_leniencies(lenient_version=True)
    return parser


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
        "_h2c_settings",
        "_head_fed",
        "_head_in_chunk",
        "_header_bytes",
        "_headers",
        "_host",
        "_host_seen",
        "_in_head",
        "_last_keep_alive",
        "_linger_timer",
        "_message_started_at",
        "_messages",
        "_pending_head",
        "_pending_status",
        "_perf_start",
        "_progress",
        "_progress_seen",
        "_raw_body_ex",
        "_raw_body_left",
        "_receiving",
        "_refused_encodings",
        "_sanitize_path",
        "_special",
        "_stalled_since",
        "_trusted",
        "_tunnel",
        "_tunnel_size",
        "_upgrade_request",
        "_upgrading",
        "_url",
        "_url_bytes",
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
        self._sanitize_path = entry.settings.sanitize_path
        self._refused_encodings = entry.settings.refused_encodings
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = None  # made at the first byte
        self.current: Exchange | None = None
        # A list, not a deque: an empty deque costs ~600 bytes per idle connection, and
        # pipelining is rare enough that pop(0) on a short list does not matter.
        self.pipeline: list[Exchange] = []
        self._receiving: Exchange | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._url_bytes = 0
        self._head_fed = 0  # bytes of whole reads inside one unfinished head (memory bound)
        self._messages = 0  # requests begun on this connection
        self._in_head = False  # between a request's first byte and the end of its head
        self._host = b""
        self._host_seen = False
        self._xf_seen = 0
        self._special = False
        self._chunked_request = False
        self._trusted = False
        self._closing = False
        self._client_paused = False
        self._write_paused = False
        self._chunked = False
        self._pending_status = b""  # a response's status line, held back with its fields:
        self._pending_head = b""  # see write_head
        self._error_after_current: int | None = None
        self._message_started_at: float | None = None
        self._perf_start = 0.0
        self._chunk = b""  # the bytes of the current read
        self._between_messages = True  # the parser is not inside a message
        self._head_in_chunk = False  # the current message's head began at the read's start
        self._verbatim = False  # no field of the current request needs rewriting
        self._forwarded: tuple[bytes, list[tuple[bytes, bytes]], bytes] | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._last_keep_alive = True  # the last request parsed lets the connection go on
        self._upgrading: Exchange | None = None  # an upgrade request awaiting its answer
        self._upgrade_request: Exchange | None = None  # the last upgrade request parsed
        self._h2c_settings = b""  # the HTTP2-Settings of an h2c upgrade the proxy will make
        # A request whose body llhttp skips (it asked for an h2c upgrade the proxy ignores):
        # the body is read here, `_raw_body_left` bytes more.
        self._raw_body_ex: Exchange | None = None
        self._raw_body_left = 0
        self._tunnel: list[bytes] = []  # client bytes read after that request's head
        self._tunnel_size = 0
        self.idle_since = 0.0
        self._progress = 0  # grows with every read and response write: the sweep's stall check
        self._progress_seen = -1
        self._stalled_since = 0.0
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
        self.idle_since = _perf_counter()
        self.entry.connections.add(self)
        self.entry.on_open(1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._linger_timer is not None:  # the client closed first: nothing to wait for
            self._linger_timer.cancel()
            self._linger_timer = None
        self.parser = None  # it holds our bound callbacks: a cycle the GC would have to find
        self.entry.connections.discard(self)
        self.entry.on_open(-1)
        for ex in (self.current, *self.pipeline):
            if ex is None:
                continue
            if not ex.finished:
                ex.client_gone = True
            # Even after a complete response, an upstream still waiting for the rest of the
            # request body holds a connection whose framing is now unknown: drop it.
            upstream = ex.upstream
            if upstream is not None:
                upstream.client_gone()
        self.pipeline.clear()

    def close(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def close_if_idle(self) -> None:
        """Close the connection if it is between requests (no byte of a next one read). One
        that has not sent its first request yet is left to send it (answered with
        `Connection: close`): a client may only retry a request on a reused connection."""
        if (
            self._messages > 0
            and self.current is None
            and self._message_started_at is None
            and not self.pipeline
        ):
            self.close()

    def check_timeouts(self, now: float, idle: float, read: float) -> None:
        """Close a connection past one of its timeouts (seconds; 0 disables one): `read` for a
        whole request, head and body (Traefik's readTimeout); `idle` between requests and for
        an exchange that has made no progress in either direction (a backend that stopped
        sending its body, a client that stopped reading or sending)."""
        if self._closing:
            return
        ex = self.current
        if ex is None:
            started = self._message_started_at
            if started is not None:
                if read > 0 and now - started > read:
                    self.close()
            elif idle > 0 and now - self.idle_since > idle:
                self.close()
            elif self.parser is not None and now - self.idle_since > 1.0:
                self._shrink()
            return
        if read > 0 and not ex.body_complete and now - ex.started_at > read:
            self._request_failed(ex, 408)  # RFC 9110 §15.5.9
            return
        if self._progress != self._progress_seen:
            self._progress_seen = self._progress
            self._stalled_since = now
        elif idle > 0 and now - self._stalled_since > idle:
            log.info("closing a stalled exchange from %s after %.0f s", self.client_ip, idle)
            self._request_failed(ex, 504 if not ex.response_started else 0)

    def _shrink(self) -> None:
        """An idle keep-alive connection gives back what only a request in progress needs:
        the parser (~850 bytes with its bound callbacks; remade at the next byte), the last
        request's fields and target, and the X-Forwarded-* cache. Issue 9 item 3: thousands of
        idle connections from a node's pods must cost little."""
        self.parser = None
        self._headers = []
        self._url = b""
        self._host = b""
        self._host_seen = False
        self._forwarded = None

    # -- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closing or self._error_after_current is not None:
            return
        self._progress += 1
        if self._raw_body_ex is not None:
            self._feed_raw_body(data)
            return
        if self._upgrading is not None:
            self._hold(data)
            return
        self._chunk = data
        self._head_in_chunk = between = self._between_messages  # a request starts at byte 0
        if between and self._message_started_at is None:
            self._message_started_at = _perf_counter()  # the read timeout starts now
        # A head that began in an earlier read and is still unfinished after this one: llhttp
        # keeps a partial field value in memory until its end, so such reads are counted and
        # the head is bounded as a whole, not only per field (the exact limits are checked
        # per field; this bounds memory for a head that never ends).
        continuing = self._in_head and not between
        message = self._messages
        parser = self.parser
        if parser is None:
            parser = self.parser = _new_parser(self)
        try:
            parser.feed_data(data)
        except _Reject as reject:  # one name per handler: mypyc gives a name one type
            self._protocol_error(reject.status)
        except httptools.HttpParserUpgrade as upgrade:
            self._on_upgrade_request(data[upgrade.args[0] :] if upgrade.args else b"")
        except httptools.HttpParserError as exc:
            cause = exc.__context__ or exc.__cause__
            self._protocol_error(cause.status if isinstance(cause, _Reject) else 400)
        self._head_in_chunk = False  # a head still incomplete will span several reads
        self._chunk = b""  # do not keep the read alive (up to 256 KiB) past this call
        if continuing and self._in_head and self._messages == message and not self._closing:
            self._head_fed += len(data)  # the whole read belonged to the same unfinished head
            settings = self.entry.settings
            if self._head_fed > settings.max_header_bytes + settings.max_target_bytes:
                self._protocol_error(431)

    def on_url(self, url: bytes) -> None:
        if self._between_messages:
            # A request begins (llhttp reports its URL first). Done here rather than in an
            # on_message_begin callback: one call less per request.
            self._between_messages = False
            self._url = url
            self._in_head = True
            self._messages += 1
            self._head_fed = 0
            self._headers = []
            self._header_bytes = 0
            self._url_bytes = 0
            self._host = b""
            self._host_seen = False
            self._xf_seen = 0
            self._special = False
            self._chunked_request = False
            self._verbatim = True
            started = self._message_started_at
            if started is None:  # pipelined: this request began inside an earlier read
                started = self._message_started_at = _perf_counter()
            self._perf_start = started
        else:
            self._url += url
        self._url_bytes += len(url)
        if self._url_bytes > self.entry.settings.max_target_bytes:
            raise _Reject(414)  # RFC 9110 §15.5.15
        self._header_bytes += len(url)
        if self._header_bytes > self.entry.settings.max_header_bytes:
            raise _Reject(431)  # RFC 6585 §5

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.entry.settings.max_header_bytes:
            raise _Reject(431)  # RFC 6585 §5: trailers count towards the same limit
        name = name.lower()
        if not self._in_head:  # after a chunked body: a trailer field (RFC 9112 §7.1.2)
            ex = self._receiving
            if ex is not None:
                if ex.request_trailers is None:
                    ex.request_trailers = []
                ex.request_trailers.append((name, value))
            return
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
                if self._host_seen or not valid_authority(value):
                    raise _Reject(400)  # RFC 9112 §3.2: one Host, a valid uri-host [":" port]
                self._host = value
                self._host_seen = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        self._in_head = False
        self._head_fed = 0
        # A head that began this read (the usual case) is read straight off the bytes: the
        # version from the request line, and maybe the fields to forward verbatim.
        chunk = self._chunk
        line_end = chunk.find(_CRLF) if self._head_in_chunk else -1
        self._head_in_chunk = False  # a pipelined request after this one starts mid-read
        raw_method = parser.get_method()
        url = self._url
        # RFC 9112 §3: method SP request-target SP HTTP-version; llhttp would take more
        # blanks (Go and Traefik refuse them: one parse of a request line, not two). A line
        # as long as method, target, "HTTP/x.y" and two blanks has exactly two (llhttp checked
        # the method, the target has none, the version is 8 bytes): counted only otherwise.
        if (
            line_end > 0
            and line_end != len(raw_method) + len(url) + 10
            and chunk.count(b" ", 0, line_end) != 2
        ):
            raise _Reject(400)
        if line_end > 0 and chunk[line_end - 1] == 49 and chunk[line_end - 3] == 49:
            version = "1.1"  # "1.1": llhttp checked the request line ends with HTTP/x.y
        else:
            version = parser.get_http_version()
            if version[:2] != "1.":
                if version[:2] == "0." and (line_end < 0 or b" HTTP/0." not in chunk[:line_end]):
                    raise _Reject(400)  # no HTTP-version at all (llhttp says 0.9): malformed
                raise _Reject(505)  # RFC 9110 §6.2, §15.6.6: only HTTP/1.x here
            if version != "1.0":
                version = "1.1"  # a higher minor version is served as 1.1 (RFC 9110 §6.2)
        if raw_method == b"CONNECT":
            raise _Reject(501)  # RFC 9110 §9.3.6: tunnels are not offered on HTTP entrypoints
        method = _METHOD_NAMES.get(raw_method) or raw_method.decode("latin-1")
        if url[:1] != b"/" or url.find(b"#") >= 0:  # not `in` (see check_target)
            check_target(url, raw_method)
        refused = self._refused_encodings
        if refused and b"%" in url:
            path = url.partition(b"?")[0].upper()
            for encoded in refused:
                if encoded in path:
                    raise _Reject(400)  # as Traefik's encodedCharacters options
        host = self._host
        if not self._host_seen and version == "1.1":
            raise _Reject(400)  # RFC 9112 §3.2: an HTTP/1.1 request carries Host (maybe empty)
        headers = self._headers
        received = len(headers)
        try:
            request = Request(
                method,
                url,
                headers,
                host,
                self.client_ip,
                self.client_port,
                version,
                sanitize_path=self._sanitize_path,
            )
        except ValueError:
            raise _Reject(400) from None
        request.keep_alive = self._last_keep_alive = parser.should_keep_alive()
        # Traefik's entrypoint sets these before routing, so rules can match on them.
        seen = self._xf_seen & _XF_ALL
        if seen:
            self._add_forwarded_fields(request, seen)
        else:
            cached = self._forwarded
            if cached is None or cached[0] != request.host_header:
                cached = self._forwarded = self.entry.forwarded_fields(
                    request.host_header, request.port, self.client_ip
                )
            headers.extend(cached[1])
            if self._verbatim and line_end > 0 and host and request.host_header is host:
                request.verbatim = self._verbatim_fields(line_end, received, cached[2])
        has_body = self._chunked_request
        raw_body = False
        if self._special:
            codings: list[bytes] = []
            upgrade = b""
            h2_settings: list[bytes] = []
            for name, value in headers:
                if name == b"content-length":
                    request.content_length = int(value)
                    has_body = has_body or request.content_length > 0
                elif name == b"transfer-encoding":
                    codings.append(value)
                elif name == b"expect":
                    if value.strip().lower() != b"100-continue":
                        raise _Reject(417)  # RFC 9110 §10.1.1: an expectation we cannot meet
                    request.expect_continue = True
                elif name == b"connection":
                    request.connection_tokens |= frozenset(connection_tokens(value))
                elif name == b"upgrade":
                    upgrade = value
                elif name == b"te":
                    request.te_trailers = b"trailers" in connection_tokens(value)
                elif name == b"http2-settings":
                    h2_settings.append(value)
            if upgrade and b"upgrade" in request.connection_tokens:
                # RFC 9110 §7.8: one protocol is forwarded (the backend picks among several
                # only if it can; a proxy offering one keeps the answer checkable).
                if _UPGRADE_TOKEN.fullmatch(upgrade.strip()) is None:
                    raise _Reject(400)
                token = upgrade.strip()
                if token.lower() == b"h2c":
                    # Never forwarded (a backend switched to h2c would take streams the
                    # routers never saw): the proxy itself switches, and every stream is
                    # routed (RFC 7540 §3.2, meshproxy.http2.server). Ignored (served as
                    # HTTP/1.1) in HTTP/1.0, behind another request, without exactly one
                    # valid HTTP2-Settings named by Connection (§3.2.1), and for a request
                    # with a body, as nghttpx does: §3.2 wants the whole body before the
                    # client's preface, which deadlocks with `Expect: 100-continue` (curl
                    # sends it past 1 MiB) and races a client that switches on the 101
                    # mid-body. llhttp reads such a body, then stops as for any upgrade.
                    if (
                        version != "1.0"
                        and self.current is None
                        and not self.pipeline
                        and len(h2_settings) == 1
                        and b"http2-settings" in request.connection_tokens
                        and valid_h2_settings(h2_settings[0])
                        and not has_body
                    ):
                        self._h2c_settings = h2_settings[0]
                    elif has_body:
                        if request.content_length is None or codings:
                            raise _Reject(501)  # a chunked body cannot be told from h2c frames
                        raw_body = True
                elif has_body:
                    raise _Reject(501)  # llhttp would read the body as the new protocol
                elif version != "1.0":  # ignored in HTTP/1.0 (RFC 9110 §7.8)
                    request.upgrade = token
            if codings:
                unreadable = transfer_codings_status(codings, version)
                if unreadable:
                    raise _Reject(unreadable)
        ex = Exchange(self, request, self.entry_name, self._perf_start, has_body)
        if raw_body:
            self._raw_body_ex = ex  # llhttp skips an upgrade request's body: read below
        if request.upgrade is not None or self._h2c_settings:
            self._upgrade_request = ex  # llhttp stops after its head (HttpParserUpgrade)
            if self._h2c_settings:
                self._message_started_at = None
                return  # served as HTTP/2 stream 1, once llhttp has stopped
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

    def _add_forwarded_fields(self, request: Request, seen: int) -> None:
        """A trusted client sent some X-Forwarded-* fields: add only the missing ones."""
        headers = self._headers
        if not seen & 1:
            headers.append((b"x-forwarded-proto", self.entry.proto_value))
        if not seen & 2 and request.host_header:
            headers.append((b"x-forwarded-host", request.host_header))
        if not seen & 4:
            port = request.port
            default = self.entry.default_port
            headers.append((b"x-forwarded-port", port.encode() if port else default))
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
            if ex is self._raw_body_ex:
                return  # llhttp skipped its body: `_feed_raw_body` reads it
            if ex.has_body:  # a bodiless exchange starts out complete
                ex.on_request_end()

    # -- upgrades (RFC 9110 §7.8) ----------------------------------------------------------

    def _on_upgrade_request(self, rest: bytes) -> None:
        """llhttp stopped after a request asking to switch protocols: hold what follows until
        the backend answers. A 101 hands both connections to a byte pipe (`switch_protocols`);
        any other answer is an ordinary response and the connection stays HTTP/1.1."""
        ex = self._upgrade_request
        self._upgrade_request = None
        self._receiving = None
        self.parser = None  # llhttp stays paused after an upgrade: a new one for what follows
        if self._closing:
            return
        raw = self._raw_body_ex
        if raw is not None:
            self._raw_body_left = raw.request.content_length or 0
            self._between_messages = False
            if rest:
                self._feed_raw_body(rest)
            return
        settings = self._h2c_settings
        if settings and ex is not None:
            self._h2c_settings = b""
            self._switch_to_h2c(ex, settings, rest)
            return
        if ex is None or ex.finished:
            # An upgrade we ignore (h2c, HTTP/1.0), or one already answered without a 101 (a
            # middleware refused it): the connection goes on as HTTP/1.1, one answer each.
            if rest:
                self.data_received(rest)
            return
        self._upgrading = ex
        if rest:
            self._hold(rest)

    def _feed_raw_body(self, data: bytes) -> None:
        """The body of a request whose h2c upgrade is ignored, framed by its Content-Length
        (RFC 9112 §6.3), read past llhttp; what follows it is the next request."""
        ex = self._raw_body_ex
        assert ex is not None
        left = self._raw_body_left
        body, rest = (data, b"") if len(data) <= left else (data[:left], data[left:])
        self._raw_body_left = left - len(body)
        if body:
            ex.on_request_body(body)
        if self._raw_body_left == 0:
            self._raw_body_ex = None
            self._between_messages = True
            ex.on_request_end()
            if rest and not self._closing:
                self.data_received(rest)

    def _switch_to_h2c(self, ex: Exchange, settings: bytes, rest: bytes) -> None:
        """Answer an `Upgrade: h2c` request with 101 and go on as HTTP/2 on this connection:
        the request becomes stream 1 (RFC 7540 §3.2), served by the HTTP/2 server like every
        stream after it. The connection stays counted as open (the HTTP/2 side counts it
        down)."""
        from meshproxy.http2.server import H2ServerConnection  # it imports this module

        transport = self.transport
        assert transport is not None
        transport.write(_SWITCH_TO_H2C)
        self._closing = True  # nothing of HTTP/1.1 happens on this connection again
        self.entry.connections.discard(self)
        conn = H2ServerConnection(self.entry)
        transport.set_protocol(conn)
        conn.upgrade_from_http1(transport, settings, ex, rest)

    def _hold(self, data: bytes) -> None:
        self._tunnel.append(data)
        self._tunnel_size += len(data)
        if self._tunnel_size > _TUNNEL_HOLD and self.transport is not None:
            self.transport.pause_reading()

    def switch_protocols(
        self,
        ex: Exchange,
        headers: list[tuple[bytes, bytes]],
        upstream: asyncio.Transport,
        upstream_leftover: bytes,
        upstream_writing_paused: bool | None,
    ) -> None:
        """The backend answered 101: relay it, then both connections become one byte pipe
        (meshproxy.l4.pipe) until either side ends it. This connection leaves the entrypoint
        (no more HTTP here); the open-connections gauge counts it until the pipe closes."""
        transport = self.transport
        assert transport is not None
        ex.status = 101
        ex.response_started = True
        ex.finished = True
        status_line = _STATUS_LINES[101]
        transport.write(status_line + field_lines(headers) + _CRLF)
        held = b"".join(self._tunnel)
        self._tunnel = []
        self._upgrading = None
        self._closing = True  # nothing of HTTP/1.1 happens on this connection again
        self.current = None
        self.entry.connections.discard(self)
        upgrade = ex.request.upgrade
        self.entry.open_tunnel(
            PipeEnd(transport, leftover=held, writing_paused=self._write_paused),
            PipeEnd(upstream, leftover=upstream_leftover, writing_paused=upstream_writing_paused),
            websocket=upgrade is not None and upgrade.lower() == b"websocket",
        )
        # Reading is the pipe's business from here: start() sets it on both sides.

    def _upgrade_refused(self) -> None:
        """The backend did not switch: the connection goes on as HTTP/1.1 with the bytes held
        since the upgrade request (RFC 9110 §7.8: the Upgrade is simply ignored)."""
        self._upgrading = None
        held = b"".join(self._tunnel)
        self._tunnel = []
        paused = self._tunnel_size > _TUNNEL_HOLD
        self._tunnel_size = 0
        if paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()
        if held and not self._closing:
            self.data_received(held)

    def _protocol_error(self, status: int) -> None:
        """The bytes read are not a request we can serve: answer `status` and close. Inside a
        request body (the head is already being served) the exchange itself fails."""
        if self._closing:
            return  # a request after one that closed the connection, in the same read
        self.entry.on_protocol_error(status)
        self._in_head = False
        receiving = self._receiving
        if receiving is not None:
            self._receiving = None
            self._request_failed(receiving, status)
            return
        if not self._last_keep_alive and self.current is not None:
            # Bytes after a request that asked to close the connection: nobody is owed an
            # answer for them (one response per request); the connection closes after it.
            self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if self.current is None:
            self._write_error_and_close(status)
        else:
            self._error_after_current = status  # answered once the current response is out
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _request_failed(self, ex: Exchange, status: int) -> None:
        """End `ex` because its request can no longer be read (malformed body: 400, read
        timeout: 408) or it stalled: answer `status` if no response has started (0: never),
        else cut the connection; close whatever upstream connection it holds."""
        ex.request_error = status or 502
        ex.client_gone = True  # nothing more will be read from this client
        if ex is self.current:
            if ex.response_started or not status:
                self.abort(ex)
            else:
                ex.finished = True
                self._write_error_and_close(status)
        else:  # still queued behind the current exchange: it never started
            try:
                self.pipeline.remove(ex)
            except ValueError:
                pass
            self.pipeline.clear()
            if self._error_after_current is None and status:
                self._error_after_current = status
            if self.transport is not None and not self._closing:
                self.transport.pause_reading()
        upstream = ex.upstream
        if upstream is not None:
            upstream.client_gone()  # ends the exchange (the serving side sees ClientGone)
        waiter = ex.body_waiter
        if waiter is not None:  # a middleware waiting for the whole body: let it go on, and
            ex.body_waiter = None  # find the client gone (nothing is forwarded)
            waiter()

    def _write_error_and_close(self, status: int) -> None:
        body = b"%d %s" % (status, reason_phrase(status))
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason_phrase(status), len(body), body)
        )
        self._linger()

    def _linger(self) -> None:
        """Close after an error answer without losing it (RFC 9112 §9.6): closing a socket
        whose receive buffer still holds the client's bytes (the rest of a refused head or
        body) makes the kernel send a reset, which can destroy the answer before the client
        reads it. So: close the write side, read and discard for `LINGER_SECONDS` or until the
        client closes, then close."""
        transport = self.transport
        if transport is None or self._closing:
            return
        self._closing = True  # data_received now discards
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, transport.close)

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
            if self._closing:
                ex.finished = True  # the connection is going: nothing more to write
            elif not ex.response_started:
                ex.respond(500, b"Internal Server Error")
            else:
                self.abort(ex)
                return
        if ex is not self.current:
            return  # a queued exchange that failed before it started
        self.current = None
        if self._closing:
            return
        if self._error_after_current is not None:
            self._write_error_and_close(self._error_after_current)
            return
        if not ex.request.keep_alive or not ex.body_complete:
            self.close()
            return
        self.idle_since = _perf_counter()
        if self._upgrading is ex:
            self._upgrade_refused()
            return
        if self.pipeline:
            self._start(self.pipeline.pop(0))

    # -- Sink: writing the response -----------------------------------------------------

    def write_continue(self, ex: Exchange) -> None:
        """`100 Continue`, at most once per exchange, to an HTTP/1.1 client that asked for it
        and has no final response yet (RFC 9110 §10.1.1)."""
        if (
            ex.request.expect_continue
            and not ex.continue_sent
            and ex.request.http_version == "1.1"
            and not ex.response_started
            and not self._closing
        ):
            ex.continue_sent = True
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]

    def write_interim(self, ex: Exchange, status: int, headers: Fields) -> None:
        """Relay a backend's 1xx (RFC 9110 §15.2: a proxy forwards them): never to an HTTP/1.0
        client (§15.2), 100 only as `write_continue` allows, 101 never here (an upgrade)."""
        if status == 100:
            self.write_continue(ex)
            return
        if (
            status == 101
            or ex.request.http_version != "1.1"
            or ex.response_started
            or self._closing
        ):
            return
        status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        self._progress += 1
        self.transport.write(status_line + field_lines(headers) + _CRLF)  # type: ignore[union-attr]

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
        keep_alive = (
            request.keep_alive and self._error_after_current is None and not self.entry.draining
        )
        chunked = False
        if not no_body and content_length is None:
            if request.http_version == "1.1":
                chunked = True
            else:
                keep_alive = False
        if not ex.body_complete:
            keep_alive = False  # the rest of the request body would be read as a new request
        request.keep_alive = keep_alive
        fields = headers.raw if type(headers) is HeaderBlock else field_lines(headers)
        if chunked:
            fields += b"transfer-encoding: chunked\r\n"
        if not keep_alive:
            fields += b"connection: close\r\n"
        elif request.http_version == "1.0":
            fields += b"connection: keep-alive\r\n"
        self._chunked = chunked
        # Held back so head and body leave in one write (one syscall) when the body is small;
        # the pieces are joined once, with the body's first bytes (`write_body`).
        self._pending_status = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        self._pending_head = fields

    def write_body(self, ex: Exchange, chunk: bytes) -> None:
        if self._closing or not chunk:
            return
        self._progress += 1
        status = self._pending_status
        transport = self.transport
        if status:
            fields = self._pending_head
            self._pending_status = self._pending_head = b""
            if self._chunked:
                pieces: tuple[bytes, ...] = (
                    status,
                    fields,
                    _CRLF,
                    b"%x\r\n" % len(chunk),
                    chunk,
                    _CRLF,
                )
            else:
                pieces = (status, fields, _CRLF, chunk)
            if len(chunk) <= 16384:  # copied once into one write; a large body is not copied
                transport.write(b"".join(pieces))  # type: ignore[union-attr]
            else:
                transport.writelines(pieces)  # type: ignore[union-attr]
            return
        if self._chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))  # type: ignore[union-attr]
        else:
            transport.write(chunk)  # type: ignore[union-attr]

    def write_end(self, ex: Exchange) -> None:
        if self._closing:
            return
        status = self._pending_status
        end = _CHUNK_END
        if self._chunked and ex.response_trailers:  # dropped otherwise (RFC 9110 §6.5.1)
            end = trailer_lines(ex.response_trailers)
        if status:
            fields = self._pending_head
            self._pending_status = self._pending_head = b""
            self.transport.write(  # type: ignore[union-attr]
                b"".join((status, fields, _CRLF, end) if self._chunked else (status, fields, _CRLF))
            )
        elif self._chunked:
            self.transport.write(end)  # type: ignore[union-attr]
        self._chunked = False

    def flush(self, ex: Exchange) -> None:
        """Send a held-back response head now (the upstream read ended without body bytes)."""
        status = self._pending_status
        if status and not self._closing:
            fields = self._pending_head
            self._pending_status = self._pending_head = b""
            self.transport.write(b"".join((status, fields, _CRLF)))  # type: ignore[union-attr]

    def abort(self, ex: Exchange) -> None:
        ex.finished = True
        if self.transport is not None:
            self._closing = True
            self.transport.abort()

    def pause_request_body(self, ex: Exchange) -> None:
        """HTTP/1.1 carries one request body at a time: pausing it pauses the connection."""
        if not self._client_paused and self.transport is not None and not self._closing:
            self._client_paused = True
            self.transport.pause_reading()

    def resume_request_body(self, ex: Exchange) -> None:
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
