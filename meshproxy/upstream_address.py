"""Where an upstream name is dialled: normally the name itself, unless a resolver is set.

In a cluster, `svc.ns.traefik.mesh:80` (the upstream Traefik Mesh gives TrafficSplit backends)
reaches a mesh proxy through CoreDNS and the shadow Service, which also maps the port to the
proxy's entrypoint. `meshproxy local` has neither, so it sets a resolver here that maps those
names to its own proxy's entrypoint for that port. Dialling code (HTTP upstream pools, TCP
relays) calls `resolve` once per new connection, never per request.
"""

from __future__ import annotations

from collections.abc import Callable

Resolver = Callable[[str, int], "tuple[str, int] | None"]

_resolver: Resolver | None = None


def set_resolver(resolver: Resolver | None) -> None:
    """Install (or with None, remove) the resolver; it returns None for names it leaves alone."""
    global _resolver
    _resolver = resolver


def resolve(host: str, port: int) -> tuple[str, int]:
    """The (host, port) to dial for the upstream `host:port`."""
    if _resolver is None:
        return host, port
    return _resolver(host, port) or (host, port)
