"""UDP entrypoints: per-client sessions relayed to the server the entrypoint's UDP router picks.

Semantics follow Traefik's `pkg/udp` (reference/traefik-proxy.md §1.6, §4.1, §5.4):

- A *session* is keyed by the client's address (ip, port). Its first datagram picks a server
  once, through the router's service (`loadBalancer` round robin, `weighted` by weight); the
  session then owns one *connected* UDP socket to that server, so the kernel only delivers
  that server's replies to it and every reply goes back to the right client.
- Datagrams are relayed whole both ways (up to 65,535 bytes read; 65,507 is the IPv4 limit).
  A zero-length datagram is valid UDP (RFC 768), but Traefik 3.7 relays none (checked with the
  real binary: an empty datagram to its UDP entrypoint gets no answer, the echo server behind
  it none either), and asyncio's `DatagramTransport.sendto(b"")` sends nothing: it is dropped,
  counted under `dropped{reason="empty"}`, and opens no session.
- A new session's socket is created and connected synchronously (a UDP connect() only sets
  the peer address: it does not block) when the server is an IP address, and the datagrams
  that arrive before the loop has wrapped it in a transport are sent on the socket directly,
  so a new client's burst loses nothing (a StatsD or syslog client flushes its buffer in one
  go). Only a server given by name waits for resolution: its datagrams are held meanwhile, up
  to PENDING_DATAGRAMS per session and PENDING_BYTES per entrypoint.
- A session ends when nothing crossed it either way for `entryPoints.X.udp.timeout` (3 s by
  default). Like Traefik (a ticker at timeout/10 per session) expiry is checked on a sweep, not
  per datagram: here one timer per entrypoint, running only while sessions exist, every
  timeout/10 (at most 1 s). A session ends between `timeout` and `timeout` + 2 sweep periods
  after its last datagram.
- An error on the server socket that means the server is not there (ICMP port unreachable ->
  `ConnectionRefusedError`, host/network unreachable) ends the session, as Traefik's copy loop
  ends on a read error; the client's next datagram opens a new session (and picks again).

Beyond Traefik (which has no bound), sessions are capped so a flood cannot grow memory or file
descriptors without bound: at most `maxSessionsPerSource` per client IP and `maxSessions` per
entrypoint. At a cap the *least recently active* session (of that source, or of the
entrypoint) is evicted to make room, and counted. Evicting rather than refusing the newcomer
is deliberate: a UDP session is soft state (an evicted client's next datagram simply opens a
new one), whereas refusing new sessions would lock every new client out for as long as a flood
keeps the table full; least-recently-active order means busy clients are the last to go, and
the per-source cap makes a flood from one address compete only with itself.

Reloads: a new session reads the live snapshot's router for its entrypoint; live sessions keep
the server they picked (Traefik's "established sessions finish on the old handlers") until
idle, unless their router no longer serves the entrypoint (removed, disabled or replaced by
another router), which ends them at the next sweep.

Session order: the table is an OrderedDict kept in order of last activity, at the sweep's
granularity: a datagram moves its session to the end only the first time it is seen in a sweep
period, so the datagram path is a dict lookup and a send. Expiry pops from the front until a
live session is found, and eviction pops the front: both O(1) per session ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin
from meshproxy.observability.log_limit import LIMIT, held_back
from meshproxy.observability.metrics import UDPCounters
from meshproxy.upstream_address import resolve

log = logging.getLogger("meshproxy.udp")

DEFAULT_TIMEOUT = 3.0  # seconds: Traefik's entryPoints.X.udp.timeout default
DEFAULT_MAX_SESSIONS = 4096  # per entrypoint: one socket (file descriptor) each
DEFAULT_MAX_SESSIONS_PER_SOURCE = 512  # per client IP: one address gets 1/8 of the table
PENDING_DATAGRAMS = 4096  # held per session while a server *name* resolves; more are dropped
PENDING_BYTES = 4 << 20  # bytes held by all the opening sessions of one entrypoint, at most
PENDING_OVERHEAD = 64  # bytes charged per held datagram on top of its length (list slot, object)
# The listening socket's receive buffer, bytes (Linux caps it at net.core.rmem_max): the kernel
# default (~208 KiB) holds only ~256 small datagrams (each costs a ~830-byte buffer), so a burst
# of 500 from one client overflowed it before the loop read it. The memory is used only while
# datagrams wait.
LISTEN_RCVBUF = 4 << 20
SESSION_RCVBUF = 1 << 20  # a session socket's, for the server's answers to such a burst
MIN_SWEEP = 0.01  # seconds: the sweep's shortest period, whatever the timeout
MAX_SWEEP = 1.0  # seconds: and its longest, so a removed router's sessions end promptly

Address = tuple[Any, ...]  # (host, port) or IPv6's (host, port, flowinfo, scope_id)

# Errors on a server socket that mean nobody is listening there: they end the session.
_GONE = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}


@dataclass(frozen=True)
class UDPSettings:
    """One UDP entrypoint's settings: `timeout` in seconds (> 0), caps in sessions (> 0)."""

    timeout: float = DEFAULT_TIMEOUT
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_per_source: int = DEFAULT_MAX_SESSIONS_PER_SOURCE

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            # Traefik refuses it too (udp.Listen: "timeout should be greater than zero")
            raise ValueError("udp.timeout must be greater than zero")
        if self.max_sessions < 1 or self.max_sessions_per_source < 1:
            raise ValueError("udp.maxSessions and udp.maxSessionsPerSource must be at least 1")

    @property
    def sweep(self) -> float:
        """Seconds between sweeps: timeout/10 (Traefik's ticker), within MIN/MAX_SWEEP."""
        return min(max(self.timeout / 10, MIN_SWEEP), MAX_SWEEP)


def udp_settings(entrypoint: Any) -> UDPSettings:
    """The settings of a static-config entrypoint (`udp.timeout`, and meshproxy's
    `udp.maxSessions`, `udp.maxSessionsPerSource`); ValueError when one is out of range."""
    udp = getattr(entrypoint, "udp", None)
    if udp is None:
        return UDPSettings()
    return UDPSettings(
        timeout=DEFAULT_TIMEOUT if udp.timeout is None else float(udp.timeout),
        max_sessions=udp.max_sessions if udp.max_sessions is not None else DEFAULT_MAX_SESSIONS,
        max_sessions_per_source=(
            udp.max_sessions_per_source
            if udp.max_sessions_per_source is not None
            else DEFAULT_MAX_SESSIONS_PER_SOURCE
        ),
    )


def fd_budget_warning(settings: dict[str, UDPSettings], limit: int | None = None) -> str | None:
    """A warning when the session caps of the UDP entrypoints (one socket per session) add up
    to more than half of the open-file limit (`limit`, else this process's soft
    RLIMIT_NOFILE), so that a flood on every UDP entrypoint cannot starve TCP accepts of file
    descriptors; None when they fit. Go raises its soft limit to the hard one at start, Python
    does not: raise it (`ulimit -n`) or lower `udp.maxSessions`."""
    if limit is None:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return None
    total = sum(s.max_sessions for s in settings.values())
    if total <= limit // 2:
        return None
    return (
        f"the UDP entrypoints may hold {total} sessions (a socket each: udp.maxSessions of "
        f"{len(settings)} entrypoints) but the open-file limit is {limit}; raise it "
        "(ulimit -n) or lower entryPoints.<name>.udp.maxSessions"
    )


class UDPTarget:
    """A UDP service: picks the server (host, port) of a new session. A `loadBalancer`'s
    servers all weigh 1 (Traefik's UDP servers have no weight); a `weighted` service's children
    are other UDPTargets with their weights. Smooth weighted round robin: Traefik's UDP
    balancer is an interleaved WRR, a different order with the same ratios."""

    __slots__ = ("balancer", "name")

    def __init__(self, name: str, choices: list[tuple[Any, int]]) -> None:
        self.name = name
        self.balancer: SmoothWeightedRoundRobin[Any] = SmoothWeightedRoundRobin(choices)

    def pick(self) -> tuple[str, int] | None:
        """The next server, or None when the service has none (the datagram is dropped)."""
        choice = self.balancer.pick()
        if isinstance(choice, UDPTarget):
            return choice.pick()
        return choice


@dataclass(frozen=True, eq=False)
class UDPRoute:
    """The one UDP router that serves an entrypoint (qualified name) and its service."""

    name: str
    target: UDPTarget


RouteSource = Callable[[], "UDPRoute | None"]


class _Session(asyncio.DatagramProtocol):
    """One client address: the protocol of its connected socket to the server it picked."""

    __slots__ = (
        "client",
        "closed",
        "entry",
        "last",
        "opening",
        "paused",
        "pending",
        "route",
        "send",
        "server",
        "sock",
        "source",
        "transport",
    )

    def __init__(
        self, entry: UDPEntryPoint, client: Address, route: UDPRoute, server: tuple[str, int]
    ) -> None:
        self.entry = entry
        self.client = client
        self.source = client[0]
        self.route = route
        self.server = server
        self.last = entry.clock
        self.transport: asyncio.DatagramTransport | None = None
        # the connected socket made synchronously, until the loop's transport owns it
        self.sock: socket.socket | None = None
        self.pending: list[bytes] | None = []  # None once datagrams can be sent
        self.opening: asyncio.Task[None] | None = None
        self.paused = False
        self.closed = False
        # the socket's sendto while datagrams can go straight out (open, not paused, not
        # closed): the datagram path tests this one slot
        self.send: Callable[[bytes], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        entry = self.entry
        reply = entry.reply
        if reply is None or self.closed:  # the listener is paused or closing
            if not self.closed:
                entry.counters.drop("backpressure")
            return
        counters = entry.counters
        counters.datagrams_from_server += 1
        counters.bytes_from_server += len(data)
        if self.last != entry.clock:
            entry.touch(self)
        reply(data, self.client)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno in _GONE:
            self.entry.end(self, "upstream_error")
        else:  # EMSGSIZE and the like: that datagram is lost, the session goes on
            self.entry.counters.drop("send_error")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.entry.end(self, "upstream_error")

    def send_direct(self, data: bytes) -> None:
        """Send on the connected socket before the loop's transport is ready (one loop turn
        after the session opened): what the transport's `sendto` would do, errors included."""
        try:
            self.sock.send(data)  # type: ignore[union-attr]
        except BlockingIOError:
            self.entry.counters.drop("backpressure")
        except OSError as exc:
            self.error_received(exc)

    def pause_writing(self) -> None:
        self.paused = True  # the kernel's buffer is full: drop, never queue without bound
        self.send = None

    def resume_writing(self) -> None:
        self.paused = False
        if not self.closed and self.pending is None and self.transport is not None:
            self.send = self.transport.sendto


class UDPEntryPoint(asyncio.DatagramProtocol):
    """The protocol of one UDP entrypoint's listening socket and its session table.

    `route_of()` returns the live router of this entrypoint (read once per new session and
    once per sweep); `counters` are this entrypoint's metrics. `close()` ends every session.
    """

    def __init__(
        self,
        name: str,
        route_of: RouteSource,
        settings: UDPSettings | None = None,
        counters: UDPCounters | None = None,
    ) -> None:
        self.name = name
        self.route_of = route_of
        self.settings = settings or UDPSettings()
        self.counters = counters or UDPCounters()
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: OrderedDict[Address, _Session] = OrderedDict()
        self.by_source: dict[str, OrderedDict[Address, _Session]] = {}
        self.clock = 0.0  # the loop's time at the last sweep (or at the first session)
        self.pending_bytes = 0  # held for sessions whose socket is still opening
        self.paused = False
        # the listening socket's sendto while replies can go out (not paused, not closing)
        self.reply: Callable[[bytes, Address], None] | None = None
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._route: UDPRoute | None = None  # the route the last sweep saw
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the listening socket ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reply = self.transport.sendto  # type: ignore[union-attr]
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not data:
            self.counters.drop("empty")  # see the module docstring: Traefik relays none
            return
        session = self.sessions.get(addr)
        if session is None:
            session = self._open(addr)
            if session is None:
                return
        elif session.last != self.clock:
            self.touch(session)
        counters = self.counters
        counters.datagrams_from_client += 1
        counters.bytes_from_client += len(data)
        send = session.send
        if send is not None:
            send(data)
            return
        pending = session.pending
        if pending is None:  # open, but the kernel's send buffer is full
            counters.drop("backpressure")
        elif (
            len(pending) < PENDING_DATAGRAMS
            and self.pending_bytes + len(data) + PENDING_OVERHEAD <= PENDING_BYTES
        ):
            pending.append(data)  # the server's name is still resolving
            self.pending_bytes += len(data) + PENDING_OVERHEAD
        else:
            counters.drop("pending_full")

    def error_received(self, exc: Exception) -> None:
        # Only a reply to a client can fail here (the listening socket is not connected):
        # that datagram is lost, nothing else is affected.
        self.counters.drop("send_error")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        self.paused = True
        self.reply = None

    def resume_writing(self) -> None:
        self.paused = False
        if not self.closing and self.transport is not None:
            self.reply = self.transport.sendto

    # -- sessions -------------------------------------------------------------------------

    def _open(self, client: Address) -> _Session | None:
        if self.closing:
            return None
        route = self.route_of()
        if route is None:
            self.counters.drop("no_route")
            return None
        server = route.target.pick()
        if server is None:
            self.counters.drop("no_server")  # Traefik: no server up -> session dropped
            return None
        loop = self._loop or asyncio.get_running_loop()
        if not self.sessions:
            self.clock = loop.time()  # the sweep was idle: its clock is stale
            self._route = route
        settings = self.settings
        source = client[0]
        of_source = self.by_source.get(source)
        if of_source is not None and len(of_source) >= settings.max_sessions_per_source:
            self.end(next(iter(of_source.values())), "evicted_source")
        if len(self.sessions) >= settings.max_sessions:
            self.end(next(iter(self.sessions.values())), "evicted_entrypoint")
        of_source = self.by_source.get(source)  # an eviction may have emptied and dropped it
        if of_source is None:
            of_source = self.by_source[source] = OrderedDict()
        session = _Session(self, client, route, server)
        self.sessions[client] = session
        of_source[client] = session
        self.counters.sessions += 1
        self.counters.opened += 1
        host, port = resolve(*server)
        try:
            sock = _connected_socket(host, port)
        except OSError as exc:  # EMFILE, a bad address: the session ends at once
            self._open_failed(session, host, port, exc)
            return None
        if sock is not None:
            session.sock = sock
            session.pending = None
            session.send = session.send_direct
        session.opening = loop.create_task(self._connect(session, host, port))
        if self._sweeper is None:
            self._sweeper = loop.call_later(settings.sweep, self._sweep)
        return session

    async def _connect(self, session: _Session, host: str, port: int) -> None:
        """Wrap the session's socket in a datagram transport (opening it first when the
        server is a name to resolve), then send what was held."""
        loop = asyncio.get_running_loop()
        sock = session.sock
        try:
            if sock is not None:
                await loop.create_datagram_endpoint(lambda: session, sock=sock)
            else:
                await loop.create_datagram_endpoint(lambda: session, remote_addr=(host, port))
        except Exception as exc:  # resolution failure, EMFILE, bad address: the session ends
            session.opening = None
            if sock is not None:
                sock.close()
            self._open_failed(session, host, port, exc)
            return
        session.opening = None
        session.sock = None  # the transport owns it now
        transport = session.transport
        if session.closed:  # ended (evicted, removed router, shutdown) while opening
            if transport is not None:
                transport.close()
            return
        pending = session.pending or []
        session.pending = None
        self.pending_bytes -= sum(len(data) + PENDING_OVERHEAD for data in pending)
        for data in pending:
            transport.sendto(data)  # type: ignore[union-attr]
        if not session.paused:
            session.send = transport.sendto  # type: ignore[union-attr]

    def _open_failed(self, session: _Session, host: str, port: int, exc: Exception) -> None:
        if session.closed:
            return
        # Traefik logs a failed UDP dial at error level (pkg/udp/proxy.go: "Error while
        # dialing backend"); at most one line per cause and server every LogLimit interval,
        # so running out of descriptors under a flood does not flood the log too.
        held = LIMIT.allow(repr(exc), (host, port))
        if held is not None:
            log.error(
                "entrypoint %s, router %s: cannot open a socket to %s:%d: %r%s",
                self.name,
                session.route.name,
                host,
                port,
                exc,
                held_back(held),
            )
        self.end(session, "open_error")

    def touch(self, session: _Session) -> None:
        """Mark a session active in this sweep period: to the end of both tables' order."""
        session.last = self.clock
        self.sessions.move_to_end(session.client)
        self.by_source[session.source].move_to_end(session.client)

    def end(self, session: _Session, reason: str) -> None:
        """End a session once: close its socket, forget it, count it under `reason`."""
        if session.closed:
            return
        session.closed = True
        if session.pending:
            self.pending_bytes -= sum(len(data) + PENDING_OVERHEAD for data in session.pending)
        session.pending = None
        session.send = None
        client = session.client
        if self.sessions.get(client) is session:
            del self.sessions[client]
            of_source = self.by_source.get(session.source)
            if of_source is not None:
                of_source.pop(client, None)
                if not of_source:
                    del self.by_source[session.source]
        self.counters.session_closed(reason)
        if session.transport is not None:
            session.transport.close()  # its connection_lost finds it closed: no double count
        # still opening: _connect closes the socket (or its transport) when it arrives

    def _sweep(self) -> None:
        """Every timeout/10 while sessions exist: advance the clock, end idle sessions and
        those whose router no longer serves this entrypoint."""
        self._sweeper = None
        loop = self._loop or asyncio.get_running_loop()
        self.clock = now = loop.time()
        route = self.route_of()
        if route is not self._route:
            self._route = route
            name = route.name if route is not None else None
            for session in [s for s in self.sessions.values() if s.route.name != name]:
                self.end(session, "router_removed")
        settings = self.settings
        # `last` is the clock of the sweep period the last datagram came in, up to one period
        # before it: one more period of grace, so no session ends before `timeout`.
        deadline = now - settings.timeout - settings.sweep
        sessions = self.sessions
        while sessions:
            oldest = next(iter(sessions.values()))
            if oldest.last > deadline:
                break
            self.end(oldest, "idle")
        if sessions and not self.closing:
            self._sweeper = loop.call_later(settings.sweep, self._sweep)

    def close(self) -> None:
        """Stop receiving and end every session (shutdown)."""
        self.closing = True
        self.reply = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for session in list(self.sessions.values()):
            self.end(session, "shutdown")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _connected_socket(host: str, port: int) -> socket.socket | None:
    """A non-blocking UDP socket connected to `host:port` when `host` is an IP address (no
    resolution: AI_NUMERICHOST), else None (the caller resolves asynchronously). Raises
    OSError (EMFILE and the like)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SESSION_RCVBUF)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
