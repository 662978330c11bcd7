"""TCP routing: a connection is matched against the entrypoint's TCP routers once: when it
opens (non-TLS routers: HostSNI(`*`) and ClientIP rules), or once its TLS ClientHello has been
read (routers with `tls`: SNI and ALPN rules, see meshproxy.l4.tls). It passes its router's
connection middlewares (ipAllowList closes refused connections), and is relayed byte for byte
to a server picked by weighted round robin, with flow control both ways.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshproxy.l4.pipe import BytePipe, PipeEnd, PipeSettings, PipeStats
from meshproxy.networks import NetworkSet
from meshproxy.observability.log_limit import LIMIT, held_back
from meshproxy.tcp.services import NoServerReachable, TCPService, admit, connect, reset

log = logging.getLogger("meshproxy.tcp")

DIAL_TIMEOUT = 30.0  # seconds: Traefik's tcp serversTransport dialTimeout default
PENDING_LIMIT = 256 * 1024  # bytes read from a client while dialling before reading pauses


def pipe_settings(entrypoint: Any) -> PipeSettings:
    """The byte pipe's settings for TCP routes on a static-config entrypoint.

    The idle timeout is the entrypoint's `transport.respondingTimeouts.idleTimeout` when the
    static config sets it (0 turns it off); unset, it is 1 hour (Envoy's tcp_proxy default).
    Traefik itself puts no deadline on a routed TCP connection, and its 180 s default for that
    key is for idle HTTP keep-alive connections: applying it to TCP routes unasked would cut
    connections Traefik keeps (database pools...), so only an explicit value counts.
    """
    transport = getattr(entrypoint, "transport", None)
    timeouts = transport.responding_timeouts if transport else None
    if timeouts is None or timeouts.idle_timeout is None:
        return PipeSettings()
    return PipeSettings(idle_timeout=float(timeouts.idle_timeout))


@dataclass
class TCPConnectionView:
    """What TCP rules and middlewares look at."""

    client_ip: str
    sni: str = ""
    alpn: list[str] = field(default_factory=list)


ConnectionCheck = Callable[[TCPConnectionView], bool]


# A route's target: a TCP service (meshproxy.tcp.services: servers, failover, transports).
TCPTarget = TCPService


@dataclass(frozen=True, slots=True)
class TCPRouteTLS:
    """A TCP router's `tls` section: `passthrough` relays the TLS bytes untouched (the
    proxy holds no key); otherwise the proxy terminates TLS with the TLS options `options`
    (qualified name, "default" when unset) and relays the decrypted bytes."""

    passthrough: bool
    options: str = "default"


@dataclass(frozen=True, eq=False)
class TCPRoute:
    name: str
    priority: int
    matcher: Callable[[Any], bool]
    checks: tuple[ConnectionCheck, ...]
    target: TCPTarget
    catch_all: bool = False  # the rule is exactly HostSNI(`*`) (Traefik's muxer catchAll)
    tls: TCPRouteTLS | None = None  # None: a non-TLS router


def allow_list_check(networks: list[Any]) -> ConnectionCheck:
    allowed = NetworkSet(networks)

    def check(view: TCPConnectionView) -> bool:
        return allowed.contains(view.client_ip)

    return check


def client_ip(transport: asyncio.BaseTransport) -> str:
    """The peer address of a connection, IPv4-mapped IPv6 addresses as plain IPv4."""
    peer = transport.get_extra_info("peername") or ("", 0)
    ip: str = peer[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip


class _Dialled(asyncio.Protocol):
    """The upstream connection's protocol between `connect` and the hand-over to the pipe:
    keeps what the server sends meanwhile (a server may speak first), and its EOF or loss."""

    __slots__ = ("chunks", "eof", "lost", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the pipe half-closes or closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


# The relays open in this process, dialling or piping: a graceful stop waits for them (up to
# the entrypoints' lifeCycle.graceTimeOut, as Traefik's TCP connection tracker), then closes
# them (`close_relays`).
LIVE: set[TCPRelay] = set()


def close_relays() -> None:
    """Close every open TCP relay (the end of a graceful stop)."""
    for relay in list(LIVE):
        LIVE.discard(relay)
        if relay.pipe is not None:
            relay.pipe.close()
        elif relay.transport is not None:
            relay.transport.close()


class TCPRelay(asyncio.Protocol):
    """One client connection on a TCP route: routed and checked when it opens, then, once
    the server is dialled, handed with the server connection to a `BytePipe`.

    `on_open(+1)` is called when the connection is accepted and `on_open(-1)` exactly once
    when it is gone: when the client connection closes before a pipe exists (refused, no
    server, dial failure, client gone while dialling), else when the pipe has closed both
    connections. The server side (which server, failover to the next one, dial timeout, PROXY
    header, TLS, terminationDelay) is the route's TCP service's (meshproxy.tcp.services); when
    no server is reachable the client is reset (RST) without a byte relayed. Connection checks
    that count connections (inFlightConn) are released with the connection.
    """

    __slots__ = (
        "client_lost",
        "counted",
        "dial",
        "dial_timeout",
        "entrypoint",
        "fallback",
        "held",
        "on_closed",
        "on_open",
        "pending",
        "pending_eof",
        "pending_size",
        "pipe",
        "route",
        "routes",
        "settings",
        "transport",
        "view",
    )

    def __init__(
        self,
        entrypoint: str,
        routes: list[TCPRoute],
        on_open: Callable[[int], None],
        settings: PipeSettings | None = None,
        dial_timeout: float = DIAL_TIMEOUT,
        route: TCPRoute | None = None,
        view: TCPConnectionView | None = None,
        fallback: Callable[[asyncio.Transport], None] | None = None,
        on_closed: Callable[[PipeStats], None] | None = None,
    ) -> None:
        """`route`/`view`: the router already chosen and what it was chosen on (after a
        ClientHello was read); `fallback(transport)` takes over a connection no router of
        `routes` matches (Traefik then tries the HTTP handler), instead of closing it;
        `on_closed(stats)` is told how a relayed connection ended (its bytes: metrics)."""
        self.on_closed = on_closed
        self.entrypoint = entrypoint
        self.routes = routes
        self.route = route
        self.view = view
        self.fallback = fallback
        self.on_open = on_open
        self.settings = settings
        self.dial_timeout = dial_timeout
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # read from the client while dialling
        self.pending_size = 0
        self.pending_eof = False
        self.client_lost = False
        self.counted = False
        self.dial: asyncio.Task[None] | None = None
        self.pipe: BytePipe | None = None
        self.held: list[Any] = []  # connection checks counting this connection (inFlightConn)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counted = True
        self.on_open(1)
        LIVE.add(self)
        view = self.view or TCPConnectionView(client_ip(transport))
        route = self.route or next((r for r in self.routes if r.matcher(view)), None)
        if route is None and self.fallback is not None:
            self._release()
            self.transport = None
            self.fallback(transport)  # type: ignore[arg-type]
            return
        held = admit(route.checks, view) if route is not None else None
        if route is None or held is None:
            transport.close()  # refused: closed without a byte relayed
            return
        self.held = held
        self.view = view
        servers = route.target.candidates()
        if not servers:
            reset(transport)  # no server at all: as unreachable ones, a prompt RST
            return
        self.dial = asyncio.get_running_loop().create_task(self._dial(servers, route))

    async def _dial(self, servers: list[Any], route: TCPRoute) -> None:
        client = self.transport
        assert client is not None
        try:
            upstream, dialled, server = await connect(servers, client, _Dialled)
        except NoServerReachable as exc:
            # The client learns at once, by an RST, that nobody is there (issue 12 item 4).
            # Traefik logs each failed dial at ERR ("Error while dialing backend"): ERROR
            # here too, at most one line per router per LogLimit interval under load.
            held = LIMIT.allow("no TCP server reachable", route.name)
            if held is not None:
                log.error(
                    "router %s: no server of %s reachable: %s%s",
                    route.name,
                    route.target.name,
                    exc,
                    held_back(held),
                )
            self.dial = None
            if not self.client_lost:
                reset(client)
            return
        self.dial = None
        client = self.transport
        assert client is not None
        if self.client_lost or client.is_closing():
            upstream.close()  # the client left while we were dialling
            return
        leftover = b"".join(dialled.chunks)
        if dialled.lost:
            # The server came and went before the hand-over: give the client what it sent.
            if leftover:
                client.write(leftover)
            self._close_client()
            return
        pipe = self.pipe = BytePipe(
            PipeEnd(client, b"".join(self.pending), self.pending_eof, False),
            PipeEnd(upstream, leftover, dialled.eof, False),
            server.pipe_settings(self.settings),
            self._pipe_closed,
        )
        self.pending = []
        pipe.start()

    def _close_client(self) -> None:
        if self.transport is not None and not self.client_lost:
            self.transport.close()

    def _pipe_closed(self, stats: PipeStats) -> None:
        if self.on_closed is not None:
            self.on_closed(stats)
        self._release()

    def _release(self) -> None:
        LIVE.discard(self)
        if self.counted:
            self.counted = False
            self.on_open(-1)
            held, self.held = self.held, []
            for check in held:
                check.release(self.view)

    # Events from the client before the hand-over (afterwards the pipe's protocol gets them).

    def data_received(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT:
            self.transport.pause_reading()  # type: ignore[union-attr]  # the pipe resumes it

    def eof_received(self) -> bool:
        self.pending_eof = True
        return True  # keep the connection: the server may still answer (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_lost = True
        self.pending = []
        if self.dial is not None:
            self.dial.cancel()  # a socket connecting for nobody would outlive the client
            self.dial = None
        self._release()
