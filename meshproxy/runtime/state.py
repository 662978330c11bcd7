"""State that outlives one config snapshot: upstream pools and balancer positions, kept by
name and reused when their definition did not change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshproxy.balancer.health import HealthRegistry
from meshproxy.http.upstream import ServerPool, TransportSettings, UpstreamPool
from meshproxy.http2.upstream import H2Pool
from meshproxy.middlewares.base import MiddlewareState, retire_dropped

PoolFactory = Callable[[str, str, int, TransportSettings], ServerPool]

# The upstream pool for each server URL scheme: (scheme, host, port, settings) -> pool.
POOL_KINDS: dict[str, PoolFactory] = {"http": UpstreamPool, "https": UpstreamPool, "h2c": H2Pool}


class RuntimeState:
    def __init__(self) -> None:
        self.pools: dict[tuple[str, str, int, TransportSettings], ServerPool] = {}
        self.services: dict[str, Any] = {}  # qualified name -> previous service object
        self.middlewares = MiddlewareState()  # token buckets, breaker windows, ...
        # Pools the config dropped while they still served exchanges: swept until idle.
        self.retired: list[ServerPool] = []
        # Active health checkers, one per (server, check), kept while a service wants them.
        self.health = HealthRegistry()

    def pool(self, scheme: str, host: str, port: int, settings: TransportSettings) -> ServerPool:
        """The pool for one server origin, made by `POOL_KINDS[scheme]` the first time."""
        key = (scheme, host, port, settings)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = POOL_KINDS[scheme](scheme, host, port, settings)
        return pool

    def retain_middlewares(self, current: MiddlewareState) -> None:
        """Swap in the middleware state of the snapshot just compiled, retiring the objects
        it dropped (a node-wide breaker or retry budget frees its shared entry at once, so
        the node's table does not fill with old definitions and a reverted one starts
        fresh, as in one process)."""
        retire_dropped(self.middlewares, current)
        self.middlewares = current

    def retain_pools(self, used: set[tuple[str, str, int, TransportSettings]]) -> None:
        """Close idle connections of pools the new config no longer uses."""
        for key in [k for k in self.pools if k not in used]:
            pool = self.pools.pop(key)
            pool.close()
            if pool.busy:
                self.retired.append(pool)

    def sweep(self, now: float) -> None:
        """Timeouts and idle connections of every pool; `now` on the loop's clock."""
        for pool in self.pools.values():
            pool.sweep(now)
        for pool in self.retired:
            pool.sweep(now)
        self.retired = [pool for pool in self.retired if pool.busy]
        for service in self.services.values():  # outlier ejections that are over
            outlier = getattr(service, "outlier", None)
            if outlier is not None:
                outlier.sweep(service)

    def close(self) -> None:
        self.health.stop()
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
