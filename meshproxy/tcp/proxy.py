"""TCP routing: a connection is matched against the entrypoint's TCP routers once, when it
opens (HostSNI(`*`) and ClientIP rules; SNI-based rules need TLS, which is not served), passes
its router's connection middlewares (ipAllowList closes refused connections), and is relayed
byte for byte to a server picked by weighted round robin, with flow control both ways.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin

log = logging.getLogger("meshproxy.tcp")

DIAL_TIMEOUT = 30.0


@dataclass
class TCPConnectionView:
    """What TCP rules and middlewares look at."""

    client_ip: str
    sni: str = ""
    alpn: list[str] = field(default_factory=list)


ConnectionCheck = Callable[[TCPConnectionView], bool]


class TCPTarget:
    """Picks the upstream address of a new connection (loadBalancer or weighted)."""

    def __init__(self, name: str, choices: list[tuple[Any, int]]) -> None:
        self.name = name
        self.balancer: SmoothWeightedRoundRobin[Any] = SmoothWeightedRoundRobin(choices)

    def pick(self) -> tuple[str, int] | None:
        choice = self.balancer.pick()
        if isinstance(choice, TCPTarget):
            return choice.pick()
        return choice


@dataclass(frozen=True, eq=False)
class TCPRoute:
    name: str
    priority: int
    matcher: Callable[[Any], bool]
    checks: tuple[ConnectionCheck, ...]
    target: TCPTarget


def allow_list_check(networks: list[Any]) -> ConnectionCheck:
    def allowed(view: TCPConnectionView) -> bool:
        try:
            addr = ipaddress.ip_address(view.client_ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in networks)

    return allowed


class _Upstream(asyncio.Protocol):
    def __init__(self, client: TCPRelay) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.send_to_client(data)

    def eof_received(self) -> bool:
        self.client.upstream_eof()
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.pause_client_reading()

    def resume_writing(self) -> None:
        self.client.resume_client_reading()


class TCPRelay(asyncio.Protocol):
    """One client connection relayed to one upstream connection."""

    def __init__(self, entrypoint: str, routes: list[TCPRoute], on_open: Callable[[int], None]):
        self.entrypoint = entrypoint
        self.routes = routes
        self.on_open = on_open
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.pending_eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.on_open(1)
        peer = transport.get_extra_info("peername") or ("", 0)
        ip = peer[0]
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
        view = TCPConnectionView(ip)
        route = next((r for r in self.routes if r.matcher(view)), None)
        if route is None or not all(check(view) for check in route.checks):
            self.transport.close()  # type: ignore[union-attr]
            return
        address = route.target.pick()
        if address is None:
            self.transport.close()  # type: ignore[union-attr]
            return
        asyncio.get_running_loop().create_task(self._dial(address, route.name))

    async def _dial(self, address: tuple[str, int], router: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self), address[0], address[1]),
                DIAL_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            log.info("router %s: dial %s:%d failed: %s", router, *address, exc)
            self.close()
            return
        if self.closed:
            upstream.transport.close()  # type: ignore[union-attr]
            return
        self.upstream = upstream
        for chunk in self.pending:
            upstream.transport.write(chunk)  # type: ignore[union-attr]
        self.pending = []
        self.transport.resume_reading()  # type: ignore[union-attr]  # paused while dialling
        if self.pending_eof and upstream.transport.can_write_eof():  # type: ignore[union-attr]
            upstream.transport.write_eof()  # type: ignore[union-attr]

    # client -> upstream
    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            self.pending.append(data)
            if sum(len(c) for c in self.pending) > 256 * 1024:
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        upstream.transport.write(data)

    def eof_received(self) -> bool:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            self.pending_eof = True
        elif upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_open(-1)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    # upstream -> client
    def send_to_client(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def upstream_eof(self) -> None:
        if not self.closed and self.transport.can_write_eof():  # type: ignore[union-attr]
            self.transport.write_eof()  # type: ignore[union-attr]

    def upstream_lost(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    # flow control
    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def pause_client_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_client_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]
