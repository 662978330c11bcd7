"""TCP services: the server side of a TCP route (Traefik's `tcp.services`, its TCP
`serversTransports`, and the TCP connection middlewares that hold state).

- `loadBalancer.servers[].address` (`host:port`; `tls: true` speaks TLS to that server with the
  transport's `tls` options) and `weighted` services of services, picked per connection by
  smooth weighted round robin (`balancer.wrr`).
- Failover: when the picked server cannot be dialled (refused, unreachable, dial timeout, TLS
  handshake refused), the next servers of the same loadBalancer are tried in order, then the
  other children of a `weighted` parent, each server once per connection. Traefik closes the
  client at the first failed dial; a mesh proxy in front of pods that come and go should not.
  When no server is reachable the client connection is reset (SO_LINGER 0, an RST at once), so
  a client sees "connection reset" promptly instead of an EOF it could mistake for an answer.
- `proxyProtocol` `{version: 1|2}` (default 2, Traefik's SetDefaults): a PROXY header
  (meshproxy.tcp.proxy_protocol) is the first thing written to the server, before TLS, with
  the client's address and the address it connected to, so pods see the real client.
- `terminationDelay`: after one side sent EOF, the other direction may flow that long
  (meshproxy.l4.pipe `termination_delay`); negative: no limit. Unset, meshproxy lets a
  half-close last (see docs/byte-pipe.md, a deliberate difference from Traefik).
- Which transport: a loadBalancer's `serversTransport` (`name`, `name@provider`,
  `default@internal`) names a `tcp.serversTransports` entry (`dialTimeout` 30 s,
  `dialKeepAlive` 15 s, `terminationDelay`, `proxyProtocol`, `tls`); without one, the static
  `tcpServersTransport` is the default, and the loadBalancer's own deprecated `proxyProtocol`
  and `terminationDelay` (milliseconds) apply, as Traefik 3.7's TCPDialerManager.Build does:
  a named transport's values replace the loadBalancer's.
- `inFlightConn` `{amount}`: at most `amount` simultaneous connections per client IP (Traefik
  groups by the remote IP); the next one is closed before any byte is relayed. Its counts
  survive reloads while its definition is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin
from meshproxy.http.transports import (
    TLS_HANDSHAKE_TIMEOUT,
    ClientTLS,
    TransportError,
    check_peer_uri,
    resolve_certificates,
    resolve_root_cas,
    tls_context,
)
from meshproxy.l4.pipe import PipeSettings
from meshproxy.tcp import proxy_protocol
from meshproxy.upstream_address import resolve

log = logging.getLogger("meshproxy.tcp")

DEFAULT_DIAL_TIMEOUT = 30.0  # Traefik's tcp serversTransport dialTimeout
DEFAULT_KEEP_ALIVE = 15.0  # Traefik's dialKeepAlive (Go's net.Dialer default)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


@dataclass(frozen=True)
class TCPTransport:
    """A TCP serversTransport, resolved: seconds, a PROXY version (0: none) and TLS."""

    dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    dial_keep_alive: float = DEFAULT_KEEP_ALIVE  # 0: the default; negative: no keep-alive
    termination_delay: float | None = None  # None: the half-close lasts
    proxy_protocol: int = 0
    tls: ClientTLS = field(default_factory=ClientTLS)


@dataclass(eq=False)
class TCPServer:
    """One `loadBalancer.servers[]` entry with everything its connections need."""

    address: str  # as configured, for logs
    host: str
    port: int
    transport: TCPTransport
    ssl: Any = None  # ssl.SSLContext for a `tls: true` server
    _pipe: dict[PipeSettings | None, PipeSettings | None] = field(default_factory=dict)

    def pipe_settings(self, base: PipeSettings | None) -> PipeSettings | None:
        """The entrypoint's pipe settings with this server's termination delay."""
        delay = self.transport.termination_delay
        if delay is None:
            return base
        settings = self._pipe.get(base)
        if settings is None:
            settings = self._pipe[base] = dataclasses.replace(
                base or PipeSettings(), termination_delay=delay
            )
        return settings


class TCPService:
    """A TCP loadBalancer (children are `TCPServer`s) or weighted service (children are
    `TCPService`s): `pick()` chooses per connection, `candidates()` gives the failover order."""

    def __init__(self, name: str, choices: Sequence[tuple[TCPServer | TCPService, int]]) -> None:
        self.name = name
        self.children = [child for child, weight in choices if weight > 0]
        self.balancer: SmoothWeightedRoundRobin[Any] = SmoothWeightedRoundRobin(
            [(child, weight) for child, weight in choices if weight > 0]
        )

    def pick(self) -> TCPServer | None:
        child = self.balancer.pick()
        if isinstance(child, TCPService):
            return child.pick()
        return child  # type: ignore[no-any-return]

    def candidates(self) -> list[TCPServer]:
        """The servers to try for one connection, in order: the balancer's pick, the servers
        after it in the same loadBalancer (wrapping), then the other children of a weighted
        service (each from its own pick). Every server at most once."""
        chosen = self.balancer.pick()
        if chosen is None:
            return []
        out: list[TCPServer] = []
        if isinstance(chosen, TCPService):
            out.extend(chosen.candidates())
        else:
            index = self.children.index(chosen)
            ring = self.children[index:] + self.children[:index]
            out.extend(c for c in ring if isinstance(c, TCPServer))
        for child in self.children:
            if child is not chosen and isinstance(child, TCPService):
                out.extend(s for s in child.servers() if s not in out)  # no balancer moved
        return out

    def servers(self) -> list[TCPServer]:
        return [
            s for c in self.children for s in (c.servers() if isinstance(c, TCPService) else [c])
        ]


# ---------------------------------------------------------------- building from the config


def transport_from_static(static: Any) -> TCPTransport:
    """The static `tcpServersTransport` (config.static.TCPServersTransportStatic or None):
    the default TCP transport. Raises TransportError."""
    if static is None:
        return TCPTransport()
    tls = static.tls
    if tls is not None and tls.spiffe is not None:
        raise TransportError("tcpServersTransport.tls.spiffe: SPIFFE is not supported")
    client = ClientTLS(
        insecure_skip_verify=bool(tls and tls.insecure_skip_verify),
        root_cas=resolve_root_cas(
            tls.root_c_as if tls else None, "tcpServersTransport.tls.rootCAs"
        ),
    )
    tls_context(client, (), "tcpServersTransport.tls")  # fail at start, not per connection
    return TCPTransport(
        dial_timeout=_seconds(static.dial_timeout, DEFAULT_DIAL_TIMEOUT),
        dial_keep_alive=_seconds(static.dial_keep_alive, DEFAULT_KEEP_ALIVE),
        termination_delay=_delay(static.termination_delay),
        tls=client,
    )


def transport_from_dynamic(options: Any, path: str) -> TCPTransport:
    """A `tcp.serversTransports` entry (config.dynamic.TCPServersTransport). Raises
    TransportError naming `path` and the option."""
    tls = options.tls
    client = ClientTLS()
    if tls is not None:
        if tls.spiffe is not None:
            raise TransportError(f"{path}.tls.spiffe: SPIFFE is not supported by meshproxy")
        client = ClientTLS(
            server_name=tls.server_name or None,
            insecure_skip_verify=bool(tls.insecure_skip_verify),
            root_cas=resolve_root_cas(tls.root_c_as, f"{path}.tls.rootCAs"),
            certificates=resolve_certificates(tls.certificates, f"{path}.tls.certificates"),
            peer_cert_uri=tls.peer_cert_uri or "",
        )
        tls_context(client, (), f"{path}.tls")
    return TCPTransport(
        dial_timeout=_seconds(options.dial_timeout, DEFAULT_DIAL_TIMEOUT),
        dial_keep_alive=_seconds(options.dial_keep_alive, DEFAULT_KEEP_ALIVE),
        termination_delay=_delay(options.termination_delay),
        proxy_protocol=proxy_version(options.proxy_protocol, f"{path}.proxyProtocol"),
        tls=client,
    )


def proxy_version(options: Any, path: str) -> int:
    """`proxyProtocol` -> 0 (absent), 1 or 2 (default 2). Raises TransportError otherwise."""
    if options is None:
        return 0
    version = 2 if options.version is None else options.version
    if version not in (1, 2):
        raise TransportError(f"{path}.version: unknown proxyProtocol version: {version}")
    return int(version)


def load_balancer_transport(
    lb: Any, named: TCPTransport | None, default: TCPTransport
) -> TCPTransport:
    """The transport of a loadBalancer: its named one as it is, or the default with the
    loadBalancer's deprecated `proxyProtocol` and `terminationDelay` (ms) on top."""
    if named is not None:
        return named
    transport = default
    if lb.proxy_protocol is not None:
        version = proxy_version(lb.proxy_protocol, "loadBalancer.proxyProtocol")
        transport = dataclasses.replace(transport, proxy_protocol=version)
    if lb.termination_delay is not None:
        transport = dataclasses.replace(
            transport, termination_delay=_delay(lb.termination_delay / 1000)
        )
    return transport


def make_server(
    address: str, host: str, port: int, tls: bool, transport: TCPTransport
) -> TCPServer:
    """A server; a `tls` one gets its transport's (shared, cached) SSL context."""
    context = tls_context(transport.tls, (), "tls") if tls else None
    return TCPServer(address, host, port, transport, context)


def _seconds(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def _delay(value: float | None) -> float | None:
    if value is None or value < 0:
        return None
    return float(value)


# ---------------------------------------------------------------- connecting


class NoServerReachable(Exception):
    """Every candidate server failed to connect; the message lists why."""


async def connect(
    servers: Sequence[TCPServer],
    client: asyncio.BaseTransport,
    protocol_factory: Callable[[], asyncio.Protocol],
) -> tuple[asyncio.Transport, Any, TCPServer]:
    """Connect to the first of `servers` that accepts (see the module docstring):
    (transport, its protocol, the server). The PROXY header (if any) is written first and
    TLS started after it. Raises NoServerReachable listing each failure."""
    failures = []
    for server in servers:
        try:
            transport, protocol = await asyncio.wait_for(
                _open(server, client, protocol_factory),
                server.transport.dial_timeout if server.transport.dial_timeout > 0 else None,
            )
        except TimeoutError:
            failures.append(f"{server.address}: dial timeout")
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            failures.append(f"{server.address}: {exc}")
        else:
            if failures:
                log.info("%s answered after: %s", server.address, "; ".join(failures))
            return transport, protocol, server
    raise NoServerReachable("; ".join(failures) or "no server")


async def _open(
    server: TCPServer,
    client: asyncio.BaseTransport,
    protocol_factory: Callable[[], asyncio.Protocol],
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    loop = asyncio.get_running_loop()
    host, port = resolve(server.host, server.port)
    transport, protocol = await loop.create_connection(protocol_factory, host, port)
    try:
        _keep_alive(transport, server.transport.dial_keep_alive)
        version = server.transport.proxy_protocol
        if version:
            transport.write(
                proxy_protocol.header(
                    version, client.get_extra_info("peername"), client.get_extra_info("sockname")
                )
            )
        if server.ssl is not None:
            name = server.transport.tls.server_name or server.host
            tls_transport = await loop.start_tls(
                transport,
                protocol,
                server.ssl,
                server_hostname=name,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
            if tls_transport is None:
                raise ConnectionError("TLS handshake ended the connection")
            transport = tls_transport  # type: ignore[assignment]
            if server.transport.tls.peer_cert_uri:
                check_peer_uri(transport, server.transport.tls.peer_cert_uri)
    except BaseException:
        transport.abort()
        raise
    return transport, protocol  # type: ignore[return-value]


def _keep_alive(transport: asyncio.BaseTransport, interval: float) -> None:
    """TCP keep-alive probes every `interval` s (Go's net.Dialer KeepAlive: idle and interval
    both; negative turns them off)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        if interval < 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
            return
        seconds = max(1, int(interval or DEFAULT_KEEP_ALIVE))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)


def reset(transport: asyncio.BaseTransport) -> None:
    """Close a client connection with an RST (SO_LINGER 0), dropping anything unsent."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- connection middlewares


class InFlightConn:
    """Traefik's TCP `inFlightConn` (pkg/middlewares/tcp/inflightconn): at most `amount`
    simultaneous connections per client IP. Called as a connection check: True admits (and
    counts) the connection, which must later be `release`d with the same view."""

    __slots__ = ("amount", "counts")

    def __init__(self, amount: int) -> None:
        self.amount = amount
        self.counts: dict[str, int] = {}

    def __call__(self, view: Any) -> bool:
        ip = view.client_ip
        count = self.counts.get(ip, 0)
        if count >= self.amount:
            log.info("inFlightConn: max number of connections reached for %s", ip)
            return False
        self.counts[ip] = count + 1
        return True

    def release(self, view: Any) -> None:
        ip = view.client_ip
        count = self.counts.get(ip, 0)
        if count <= 1:
            self.counts.pop(ip, None)
        else:
            self.counts[ip] = count - 1


def admit(checks: Sequence[Callable[[Any], bool]], view: Any) -> list[Any] | None:
    """Run a router's connection checks in order (Traefik's middleware order): the checks
    holding a count for this connection (to `release` when it ends), or None when one refused
    (the counts taken before it are given back at once)."""
    held: list[Any] = []
    for check in checks:
        if not check(view):
            for taken in held:
                taken.release(view)
            return None
        if hasattr(check, "release"):
            held.append(check)
    return held
