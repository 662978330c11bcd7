"""TLS on an entrypoint: SNI/ALPN routing from the ClientHello, passthrough to TCP backends,
and termination (for HTTPS routers and TCP routers with `tls` but no `passthrough`).

Per connection, following Traefik's TCP router (pkg/server/router/tcp/router.go `ServeTCP`):

1. When the entrypoint's TCP routers are all non-TLS and there is no HTTPS router, the
   connection is routed when it opens, before any byte is read (server-speaks-first
   protocols: SMTP, MySQL, PostgreSQL); if no router matches (a `ClientIP` rule), it goes on
   to 2, as in Traefik.
2. Otherwise the first bytes are sniffed (meshproxy.l4.sniff). Not a TLS handshake record:
   the first non-TLS TCP router that matches (SNI and ALPN empty), else the HTTP handler.
3. A TLS record: the ClientHello is read whole (meshproxy.l4.clienthello: across segments and
   records, bounded, within the entrypoint's read timeout), then, in Traefik's order:
   an HTTPS router whose `Host` names the SNI (exact, or `*.domain` for one label) wins over
   TCP routers; then a TCP TLS router whose rule is not exactly HostSNI(`*`); then an HTTPS
   router without a Host (catch-all); then a TCP HostSNI(`*`) TLS router; then the HTTPS
   handler (a handshake with the default certificate, then 404), as Traefik's
   `httpsForwarder`, there on every entrypoint.
4. `tls.passthrough: true`: the bytes read (the ClientHello and anything after it) are
   replayed to the chosen backend untouched through the byte pipe: the proxy never sees the
   keys. Other `tls` routers terminate TLS (`L4Entry.terminate`; certificates and options
   from meshproxy.l4.certificates); the HTTPS handler then sniffs the decrypted stream
   again (HTTP/2 preface or HTTP/1.1) behind Traefik's SNI check (`SNICheck`).

A ClientHello that is malformed, oversized, or not whole within the read timeout closes that
connection only (logged at debug: a scanner must not fill the logs).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from asyncio import sslproto
from collections.abc import Callable, Sequence
from typing import Any

from meshproxy.l4.clienthello import ClientHelloError, ClientHelloReader
from meshproxy.l4.pipe import PipeSettings
from meshproxy.rules.ast import And, Call, Node, Not, Or
from meshproxy.rules.http import KNOWN_HTTP
from meshproxy.rules.parser import RuleError, parse_rule
from meshproxy.tcp.proxy import TCPConnectionView, TCPRelay, TCPRoute, client_ip

log = logging.getLogger("meshproxy.tls")

DEFAULT_OPTIONS = "default"
TLS_INFO = "meshproxy.tls"  # extra info of a terminated transport: (SNI, TLS options name)
MISDIRECTED = b"Misdirected Request\n"


def qualify_options(name: str | None, provider: str) -> str:
    """A router's `tls.options` reference as the store names it: `default` stays, `x`
    becomes `x@provider` (Traefik qualifies names per provider)."""
    if not name or name == DEFAULT_OPTIONS:
        return DEFAULT_OPTIONS
    return name if "@" in name else f"{name}@{provider}"


def https_domains(rule: str) -> list[str]:
    """The `Host` values of an HTTPS router's rule, lower-cased, negated ones left out:
    what Traefik's `ParseDomains` gives the TLS layer to pick options and certificates by
    SNI. A rule that does not parse gives none (the router is disabled elsewhere)."""
    try:
        node = parse_rule(rule, KNOWN_HTTP)
    except RuleError:
        return []
    found: list[str] = []

    def walk(n: Node, negated: bool) -> None:
        if isinstance(n, Not):
            walk(n.operand, not negated)
        elif isinstance(n, And | Or):
            walk(n.left, negated)
            walk(n.right, negated)
        elif isinstance(n, Call) and n.name in ("Host", "HostHeader") and not negated:
            found.extend(a.lower().rstrip(".") for a in n.args if a != "*")

    walk(node, False)
    return found


class HTTPSHosts:
    """What the HTTPS routers (HTTP routers with `tls`) of one entrypoint tell the TLS layer:
    the TLS options per SNI host (Traefik's `tlsOptionsForHost`: a host whose routers ask for
    different options gets the default ones), whether a router without a Host rule exists
    (then every SNI may end at the HTTPS handler: Traefik's `Host(*)` TLS config), and
    whether there is any HTTPS router at all."""

    __slots__ = ("any", "catch_all", "exact", "wildcard")

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}  # host -> TLS options name
        self.wildcard: dict[str, str] = {}  # ".example.com" (from `*.example.com`) -> options
        self.catch_all = False
        self.any = False

    def add(self, domains: Sequence[str], options: str) -> list[str]:
        """Record one HTTPS router's Host domains (lower-case) and options; returns the
        domains whose options now conflict (they fall back to the default options)."""
        self.any = True
        if not domains:
            self.catch_all = True
            return []
        conflicts = []
        for domain in domains:
            table = self.wildcard if domain.startswith("*.") else self.exact
            key = domain[1:] if domain.startswith("*.") else domain
            previous = table.get(key)
            if previous is not None and previous != options:
                table[key] = DEFAULT_OPTIONS
                conflicts.append(domain)
            else:
                table[key] = options
        return conflicts

    def options_for(self, sni: str) -> str | None:
        """The options of the HTTPS routers that name `sni`, None if none names it."""
        if not sni:
            return None
        found = self.exact.get(sni)
        if found is not None:
            return found
        dot = sni.find(".")
        if dot > 0:
            return self.wildcard.get(sni[dot:])
        return None


class L4Table:
    """The TCP and TLS routing of one entrypoint in one snapshot (immutable once built).

    plain: the non-TLS TCP routes, by priority; tls_routes: the TCP routes with `tls`
    (passthrough or terminated), by priority; https: the HTTPS routers' hosts; store: the
    certificate store of the snapshot (None until TLS termination is configured).
    """

    __slots__ = ("https", "immediate", "plain", "store", "tls_routes")

    def __init__(
        self, routes: Sequence[TCPRoute], https: HTTPSHosts | None = None, store: Any = None
    ) -> None:
        self.plain = tuple(r for r in routes if r.tls is None)
        self.tls_routes = tuple(r for r in routes if r.tls is not None)
        self.https = https or HTTPSHosts()
        self.store = store
        # Traefik routes at once only without TLS routers and HTTPS routers: a client that
        # waits for the server to speak would otherwise wait for the peek forever.
        self.immediate = bool(self.plain) and not self.tls_routes and not self.https.any

    def match_plain(self, view: TCPConnectionView) -> TCPRoute | None:
        for route in self.plain:
            if route.matcher(view):
                return route
        return None

    def route_hello(self, view: TCPConnectionView) -> TCPRoute | str | None:
        """Where a TLS connection with this ClientHello goes: a TCP route, the name of the
        TLS options to terminate with for the HTTPS handler, or None (close). Traefik's order
        (router.go ServeTCP): specific HTTPS, specific TCP-TLS, HTTPS catch-all, TCP-TLS
        catch-all, the HTTPS handler's 404."""
        https = self.https
        options = https.options_for(view.sni)
        if options is not None:
            return options
        first = None
        for route in self.tls_routes:
            if route.matcher(view):
                first = route
                break
        if first is not None and not first.catch_all:
            return first
        if https.catch_all:
            return DEFAULT_OPTIONS
        if first is not None:
            return first
        if https.any or (self.store is not None and self.store.has_default):
            return DEFAULT_OPTIONS
        return None


class L4Entry:
    """TCP and TLS handling of one entrypoint, around its HTTP entrypoint: makes the first
    protocol of every accepted connection from the live snapshot's `L4Table`.

    `http_entry` is the entrypoint's HTTPEntryPoint (plain HTTP); `https_entry` the one that
    serves requests decrypted here (its routers are the HTTPS ones). `on_open(+1/-1)` counts
    open connections (the entrypoint's gauge).
    """

    def __init__(
        self,
        name: str,
        snapshot: Callable[[], Any],
        http_entry: Any,
        on_open: Callable[[int], None],
        pipe_settings: PipeSettings,
        https_entry: Any = None,
    ) -> None:
        self.name = name
        self.snapshot = snapshot  # returns the live RuntimeSnapshot
        self.http_entry = http_entry
        self.https_entry = https_entry
        self.on_open = on_open
        # told how each relayed TCP connection ended (the daemon counts its bytes)
        self.on_tcp_closed: Callable[[Any], None] | None = None
        self.pipe_settings = pipe_settings
        self.peek_timeout = float(http_entry.settings.read_timeout)
        http_entry.tls_hook = self.take_tls
        http_entry.plain_factory = self.plain_protocol
        http_entry.plain_h2_factory = self.plain_h2_protocol

    def table(self) -> L4Table | None:
        tables: dict[str, L4Table] = getattr(self.snapshot(), "l4_tables", {})
        return tables.get(self.name)

    def connection_factory(self) -> asyncio.Protocol:
        """The first protocol of an accepted connection."""
        table = self.table()
        if table is not None and table.immediate:
            return TCPRelay(
                self.name,
                list(table.plain),
                self.on_open,
                self.pipe_settings,
                fallback=self.sniff,
                on_closed=self.on_tcp_closed,
            )
        return self.http_entry.connection_factory()  # type: ignore[no-any-return]

    def sniff(self, transport: asyncio.Transport) -> None:
        """Hand an open connection nothing was read from to the sniffer."""
        sniffer = self.http_entry.connection_factory()
        transport.set_protocol(sniffer)
        sniffer.connection_made(transport)

    def plain_protocol(self) -> asyncio.Protocol:
        """What the sniffer gives a non-TLS connection: a non-TLS TCP router if one matches,
        else HTTP/1.1 (as Traefik's router.go: muxerTCP, then the HTTP forwarder)."""
        table = self.table()
        if table is None or not table.plain:
            return self.http_entry.protocol_factory()  # type: ignore[no-any-return]
        return _PlainDispatch(self, table, self.http_entry.protocol_factory)

    def plain_h2_protocol(self) -> asyncio.Protocol:
        """What the sniffer gives an HTTP/2 prior-knowledge connection: as `plain_protocol`,
        a non-TLS TCP router first (Traefik's muxer sees every non-TLS connection), else the
        HTTP/2 server."""
        table = self.table()
        if table is None or not table.plain:
            return self.http_entry.h2_factory()  # type: ignore[no-any-return]
        return _PlainDispatch(self, table, self.http_entry.h2_factory)

    def take_tls(self, transport: asyncio.Transport, data: bytes) -> None:
        """The sniffer's `tls` hook: read the ClientHello, starting with `data`."""
        reader = _HelloReader(self, transport)
        transport.set_protocol(reader)
        reader.data_received(data)

    def relay(
        self,
        transport: asyncio.Transport,
        route: TCPRoute,
        view: TCPConnectionView,
        data: bytes,
    ) -> None:
        """Give `transport` (reading nothing yet past `data`) to `route`'s TCP relay."""
        relay = TCPRelay(
            self.name,
            [],
            self.on_open,
            self.pipe_settings,
            route=route,
            view=view,
            on_closed=self.on_tcp_closed,
        )
        transport.set_protocol(relay)
        relay.connection_made(transport)
        if data:
            relay.data_received(data)

    def routed_hello(
        self, transport: asyncio.Transport, view: TCPConnectionView, data: bytes
    ) -> None:
        """A whole ClientHello was read (`data`: every byte read so far): route it."""
        table = self.table()
        decision = table.route_hello(view) if table is not None else None
        if isinstance(decision, TCPRoute):
            tls = decision.tls
            assert tls is not None and table is not None
            if tls.passthrough:
                self.relay(transport, decision, view, data)
                return
            self.terminate(transport, data, table, tls.options, decision, view)
            return
        if decision is not None and table is not None:
            self.terminate(transport, data, table, decision, None, view)
            return
        log.debug("TLS from %s (SNI %r): no router; closed", view.client_ip, view.sni)
        transport.close()

    def terminate(
        self,
        transport: asyncio.Transport,
        data: bytes,
        table: L4Table,
        options: str,
        route: TCPRoute | None,
        view: TCPConnectionView,
    ) -> None:
        """Terminate TLS on `transport` (the bytes read so far are `data`, the ClientHello
        first) with the TLS options `options`; once the handshake is done, the decrypted
        connection goes to `route`'s TCP relay, or (route None) to the HTTPS handler."""
        store = table.store
        contexts = store.context(options) if store is not None else None
        if contexts is None or (route is None and self.https_entry is None):
            log.info(
                "TLS from %s (SNI %r): TLS options %r are broken or unknown; closed",
                view.client_ip,
                view.sni,
                options,
            )
            transport.close()
            return
        _Terminated(self, route, view, options).start(transport, contexts.default, data)


def ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The SSL protocol wrapper that terminates TLS: the stdlib's `asyncio.sslproto.
    SSLProtocol` (the design uvloop's Cython one was ported from), as `AlertingSSLProtocol`.
    Both are buffered protocols fed through `get_buffer`/`buffer_updated`, so the bytes
    already read (the ClientHello) are given to them as if just received; `loop.start_tls`
    cannot take them. uvloop's is ~15% cheaper per handshake here (1,310 vs 1,150 TLS 1.3
    handshakes per CPU-second), but neither sends the alert OpenSSL writes when a handshake
    fails (they abort the socket at once), and a client must learn why it was refused
    (protocol_version, unrecognized_name, certificate_required...): only the stdlib's can be
    subclassed to flush it."""
    return AlertingSSLProtocol


class _ReadBuffer(threading.local):
    """The socket read buffer every terminated TLS connection of one thread's event loop
    shares (see AlertingSSLProtocol.__init__)."""

    def __init__(self) -> None:
        self.buffer = bytearray(READ_BUFFER)
        self.view = memoryview(self.buffer)


READ_BUFFER = 256 * 1024  # asyncio's SSLProtocol.max_size: bytes read from the socket at once
_read_buffer = _ReadBuffer()


class AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's SSL protocol, sending OpenSSL's alert before a failed handshake closes the
    connection (RFC 8446 §6.2: errors are signalled with an alert, then the connection is
    closed), and sharing one read buffer between connections."""

    max_size = 0  # asyncio's __init__ allocates a read buffer this large; set below

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """asyncio's, without its 256 KiB read buffer per connection (a zeroed bytearray:
        resident memory, ~90 KB per idle TLS connection measured over 9,000, 763 MiB,
        bench/idle_connections.py --kinds tls). The buffer only carries bytes from the
        socket's `recv_into` (after `get_buffer`) to `buffer_updated`, whose first act is
        to copy them into the SSL object's MemoryBIO, with nothing run in between (as in
        `feed` below): every connection of a thread can use the same one."""
        super().__init__(*args, **kwargs)
        self.max_size = READ_BUFFER
        self._ssl_buffer = _read_buffer.buffer
        self._ssl_buffer_view = _read_buffer.view

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            try:
                self._process_outgoing()  # type: ignore[attr-defined]
            except Exception:  # the transport may already be gone: nothing to tell then
                pass
        super()._on_handshake_complete(handshake_exc)  # type: ignore[misc]

    def _call_eof_received(self) -> None:
        """As asyncio's, without its warning when the application protocol returns True:
        the byte pipe and the TCP relay ask to stay open after EOF (half-close) on every
        transport, and over TLS the pipe ends instead (it knows the transport cannot
        half-close); a warning per connection would only fill the logs."""
        this: Any = self  # asyncio's private state, untyped
        states: Any = sslproto.AppProtocolState  # type: ignore[attr-defined]
        try:
            if this._app_state == states.STATE_CON_MADE:
                this._app_state = states.STATE_EOF
                this._app_protocol.eof_received()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as ex:
            this._fatal_error(ex, "Error calling eof_received()")


def feed(protocol: Any, data: bytes) -> None:
    """Give `data` to a buffered protocol as if read from its transport."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


class _Terminated(asyncio.Protocol):
    """The application side of a terminated TLS connection, until the handshake is done:
    then it hands the decrypted transport to the TCP relay of `route`, or to the HTTPS
    entrypoint's sniffer (which tells HTTP/2 by its preface, else HTTP/1.1). Counts the
    connection as open during the handshake; a failed handshake is logged with its reason
    (the TLS alert was sent by OpenSSL) and closes the connection."""

    __slots__ = ("counted", "entry", "options", "route", "view")

    def __init__(
        self, entry: L4Entry, route: TCPRoute | None, view: TCPConnectionView, options: str
    ) -> None:
        self.entry = entry
        self.route = route
        self.view = view
        self.options = options
        self.counted = False

    def start(self, transport: asyncio.Transport, context: Any, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        timeout = self.entry.peek_timeout or None
        protocol = ssl_protocol_class(loop)(loop, self, context, waiter, True, None, True, timeout)
        # What the HTTPS handler's SNI check reads: get_extra_info(TLS_INFO) on the
        # decrypted transport.
        protocol._extra[TLS_INFO] = (self.view.sni, self.options)
        self.entry.on_open(1)
        self.counted = True
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        feed(protocol, data)

    def _handshake_done(self, waiter: asyncio.Future[Any]) -> None:
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is not None:
            self._release()
            log.info(
                "TLS handshake from %s (SNI %r) failed: %s",
                self.view.client_ip,
                self.view.sni,
                str(exc) or repr(exc),
            )

    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.entry.on_open(-1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._release()  # the protocol it goes to counts it from now on
        entry = self.entry
        if self.route is not None:
            entry.relay(transport, self.route, self.view, b"")  # type: ignore[arg-type]
            return
        protocol = entry.https_entry.connection_factory()
        transport.set_protocol(protocol)  # type: ignore[attr-defined]
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - replaced on hand-over
        raise AssertionError("data before the hand-over")

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()


class _PlainDispatch(asyncio.Protocol):
    """A non-TLS connection on an entrypoint with non-TLS TCP routers: the sniffer calls
    `connection_made` then `data_received` with the bytes it read; the first non-TLS TCP
    router that matches takes it, else `http` (the HTTP/1.1 or the HTTP/2 server)."""

    __slots__ = ("entry", "http", "table", "transport")

    def __init__(
        self, entry: L4Entry, table: L4Table, http: Callable[[], asyncio.Protocol]
    ) -> None:
        self.entry = entry
        self.table = table
        self.http = http
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.transport = None
        view = TCPConnectionView(client_ip(transport))
        route = self.table.match_plain(view)
        if route is not None:
            self.entry.relay(transport, route, view, data)
            return
        protocol = self.http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class _HelloReader(asyncio.Protocol):
    """Reads a ClientHello to its end, then hands the connection to `L4Entry.routed_hello`.

    Counts the connection as open while reading (the sniffer stopped counting it, the relay
    or TLS protocol it goes to counts it from then on); closes it on a malformed or oversized
    ClientHello, on EOF before the end, and after the entrypoint's read timeout.
    """

    __slots__ = ("chunks", "counted", "entry", "reader", "timer", "transport")

    def __init__(self, entry: L4Entry, transport: asyncio.Transport) -> None:
        self.entry = entry
        self.transport: asyncio.Transport | None = transport
        self.reader = ClientHelloReader()
        self.chunks: list[bytes] = []
        entry.on_open(1)
        self.counted = True
        self.timer: asyncio.TimerHandle | None = None
        if entry.peek_timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(entry.peek_timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.chunks.append(data)
        try:
            hello = self.reader.feed(data)
        except ClientHelloError as exc:
            log.debug("TLS from %s: %s; closed", client_ip(transport), exc)
            self._close()
            return
        if hello is not None:
            self._done()
            view = TCPConnectionView(client_ip(transport), hello.server_name, list(hello.alpn))
            self.entry.routed_hello(transport, view, b"".join(self.chunks))

    def eof_received(self) -> bool | None:
        return None  # a ClientHello cut short: nothing to answer, the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._done()

    def _expired(self) -> None:
        self.timer = None
        if self.transport is not None:
            log.debug(
                "TLS from %s: no whole ClientHello in time; closed", client_ip(self.transport)
            )
            self._close()

    def _close(self) -> None:
        transport = self.transport
        self._done()
        if transport is not None:
            transport.close()

    def _done(self) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.entry.on_open(-1)


def https_key(entrypoint: str) -> str:
    """The key of an entrypoint's HTTPS router table in `RuntimeSnapshot.http_tables` (the
    routers with `tls`, served only on connections decrypted here)."""
    return entrypoint + "#tls"


def h2_available() -> bool:
    """Whether the HTTP/2 server is there, so ALPN may offer `h2` on terminated TLS."""
    from meshproxy.http.server import HTTPEntryPoint

    return hasattr(HTTPEntryPoint, "h2_factory")


class SNICheck:
    """Traefik's `snicheck` in front of the HTTPS handler (pkg/middlewares/snicheck): a
    request whose Host is not the connection's SNI must need the same TLS options as the
    ones the handshake was made with, else it gets 421 Misdirected Request (RFC 9110
    §15.5.20). Without it a client could make the handshake for a host without client
    authentication and then ask, by Host, for one whose options require it (domain
    fronting). A Host covered by a `*.domain` router takes that router's options, as in
    Traefik 3.7 (checked against it).

    `next_handler` is the entrypoint's HTTPS dispatcher; a refused request is recorded in
    `metrics` (RequestMetrics) as the dispatcher records the others."""

    __slots__ = ("entrypoint", "metrics", "next_handler", "snapshot")

    def __init__(
        self,
        entrypoint: str,
        snapshot: Callable[[], Any],
        next_handler: Callable[[Any], None],
        metrics: Any,
    ) -> None:
        self.entrypoint = entrypoint
        self.snapshot = snapshot
        self.next_handler = next_handler
        self.metrics = metrics

    def __call__(self, ex: Any) -> None:
        info = _tls_info(ex)
        if info is not None:
            sni, options = info
            host = ex.request.host.lower()
            if host != sni:
                tables: dict[str, L4Table] = getattr(self.snapshot(), "l4_tables", {})
                table = tables.get(self.entrypoint)
                wanted = table.https.options_for(host) if table is not None else None
                if (wanted or DEFAULT_OPTIONS) != options:
                    log.debug(
                        "host %s (%s) and SNI %s (%s) TLS options are not the same: 421",
                        host,
                        wanted or DEFAULT_OPTIONS,
                        sni,
                        options,
                    )
                    ex.respond(421, MISDIRECTED)
                    ex.handled = True
                    self.metrics.record_request(ex, 421, time.perf_counter() - ex.started_at)
                    ex.sink.exchange_done(ex)
                    return
        self.next_handler(ex)


def _tls_info(ex: Any) -> tuple[str, str] | None:
    """(SNI, TLS options) of the connection an exchange came on (HTTP/1.1: its connection;
    HTTP/2: its stream's connection), None if it was not terminated here."""
    sink = ex.sink
    transport = getattr(sink, "transport", None)
    if transport is None:
        transport = getattr(getattr(sink, "conn", None), "transport", None)
    if transport is None:
        return None
    info: tuple[str, str] | None = transport.get_extra_info(TLS_INFO)
    return info
