"""The immutable runtime view of one dynamic configuration.

Requests read the snapshot they started with; a reload builds a new one and swaps a single
reference, so nothing in here is ever mutated after compilation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshproxy.config.dynamic import DynamicConfig
from meshproxy.http.exchange import Handler


@dataclass(frozen=True, eq=False)
class Route:
    name: str
    priority: int
    matcher: Callable[[Any], bool]
    hosts: frozenset[str] | None
    handler: Handler
    service: str
    within_hosts: Callable[[Any], bool] | None = None  # see rules.http.CompiledRule


_Candidate = tuple[Route, Callable[[Any], bool] | None]


class RouterTable:
    """Routers of one entrypoint, by priority (desc) then name; indexed by exact Host."""

    def __init__(self, routes: list[Route]) -> None:
        ordered = sorted(routes, key=lambda r: (-r.priority, r.name))
        self.routes = tuple(ordered)
        any_host = [r for r in ordered if r.hosts is None]
        by_host: dict[str, list[Route]] = {}
        for route in ordered:
            for host in route.hosts or ():
                by_host.setdefault(host, []).append(route)
        # Candidates with the test left to run: a route reached through its own host only
        # checks the rest of its rule (see rules.http.CompiledRule.within_hosts).
        self.any_host: tuple[_Candidate, ...] = tuple((r, r.matcher) for r in any_host)
        self.by_host: dict[str, tuple[_Candidate, ...]] = {
            host: tuple(
                (r, r.matcher if r.hosts is None else r.within_hosts)
                for r in sorted([*routes_for_host, *any_host], key=lambda r: (-r.priority, r.name))
            )
            for host, routes_for_host in by_host.items()
        }

    def match(self, request: Any) -> Route | None:
        for route, test in self.by_host.get(request.host, self.any_host):
            if test is None or test(request):
                return route
        return None


@dataclass
class ObjectStatus:
    """Traefik's per-object runtime info, as shown by /api/rawdata."""

    status: str = "enabled"  # enabled | disabled | warning
    errors: list[str] = field(default_factory=list)
    using: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.status = "disabled"
        self.errors.append(message)

    def warn(self, message: str) -> None:
        if self.status == "enabled":
            self.status = "warning"
        self.errors.append(message)


@dataclass
class RuntimeSnapshot:
    generation: int
    config: DynamicConfig
    provider: str
    http_tables: dict[str, RouterTable] = field(default_factory=dict)
    routers: dict[str, ObjectStatus] = field(default_factory=dict)
    services: dict[str, ObjectStatus] = field(default_factory=dict)
    middlewares: dict[str, ObjectStatus] = field(default_factory=dict)
    tcp_routers: dict[str, ObjectStatus] = field(default_factory=dict)
    tcp_tables: dict[str, list[Any]] = field(default_factory=dict)  # entrypoint -> TCPRoutes
    # entrypoint -> meshproxy.l4.tls.L4Table: TCP and TLS routing, certificates
    l4_tables: dict[str, Any] = field(default_factory=dict)
    tcp_services: dict[str, ObjectStatus] = field(default_factory=dict)
    udp_routers: dict[str, ObjectStatus] = field(default_factory=dict)
    udp_services: dict[str, ObjectStatus] = field(default_factory=dict)
    udp_routes: dict[str, Any] = field(default_factory=dict)  # entrypoint -> l4.udp.UDPRoute
    service_objects: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> RuntimeSnapshot:
        return cls(0, DynamicConfig(), "none")

    def error_lines(self) -> list[str]:
        """Every per-object problem, one line each, for logs and `check`."""
        lines = []
        for kind, table in (
            ("http.routers", self.routers),
            ("http.services", self.services),
            ("http.middlewares", self.middlewares),
            ("tcp.routers", self.tcp_routers),
            ("tcp.services", self.tcp_services),
            ("udp.routers", self.udp_routers),
            ("udp.services", self.udp_services),
        ):
            for name, status in sorted(table.items()):
                for message in status.errors:
                    lines.append(f"{kind}.{name} ({status.status}): {message}")
        return lines
