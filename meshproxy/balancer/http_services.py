"""HTTP services: a load balancer over servers, a weighted split over services, mirroring.

Each is a callback `Handler` (see http.exchange); they nest (weighted -> loadBalancer) and are
built once per config snapshot. A load balancer only *picks* a server: sending the exchange is
the job of the server's upstream pool (`target.pool.send`), one per scheme behind one
interface (http.upstream.ServerPool), so retry, mirroring and the circuit breaker see the same
outcomes whatever protocol the server speaks.
"""

from __future__ import annotations

import logging
from time import perf_counter

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin
from meshproxy.http.errors import NoServerAvailable, ProxyError
from meshproxy.http.exchange import Exchange, Finish, Handler, NullSink
from meshproxy.http.upstream import ServerTarget
from meshproxy.observability.metrics import RequestMetrics

log = logging.getLogger("meshproxy.balancer")


class LoadBalancerService:
    def __init__(
        self,
        name: str,
        servers: list[tuple[ServerTarget, int]],
        pass_host_header: bool,
        metrics: RequestMetrics,
    ) -> None:
        self.name = name
        self.targets = [target for target, _ in servers]
        self.balancer: SmoothWeightedRoundRobin[ServerTarget] = SmoothWeightedRoundRobin(servers)
        self.pass_host_header = pass_host_header
        self.metrics = metrics
        self.weights_key = tuple((t.url, w) for t, w in servers)

    def serve(self, ex: Exchange, finish: Finish) -> None:
        """Send `ex` to the next server; `finish` is called once, when the exchange is over."""
        ex.service = self.name
        target = self.balancer.pick()
        if target is None:
            finish(ex, NoServerAvailable(f"service {self.name} has no available server"))
            return
        target.pool.send(ex, target, _Attempt(self, ex, finish, perf_counter()).done)


class _Attempt:
    """One try of a request at a server, and what to do when it ends: an object rather than a
    closure, because compiled by mypyc a closure and its environment form a reference cycle,
    which would leave every request's objects to the garbage collector."""

    __slots__ = ("ex", "finish", "service", "started")

    def __init__(
        self, service: LoadBalancerService, ex: Exchange, finish: Finish, started: float
    ) -> None:
        self.service = service
        self.ex = ex
        self.finish = finish
        self.started = started

    def done(self, exc: BaseException | None) -> None:
        ex = self.ex
        if exc is None:
            status = ex.swallowed_status or ex.status
        elif isinstance(exc, ProxyError):
            status = exc.status
        else:  # cancelled, or a bug: dispatch logs it; no service series for it
            self.finish(ex, exc)
            return
        service = self.service
        service.metrics.record_service(service.name, ex, status, perf_counter() - self.started)
        self.finish(ex, exc)


class WeightedService:
    """Traffic split: each request goes to one child service, in proportion to the weights."""

    def __init__(self, name: str, children: list[tuple[Handler, int]]) -> None:
        self.name = name
        self.balancer: SmoothWeightedRoundRobin[Handler] = SmoothWeightedRoundRobin(children)
        self.weights_key = tuple(w for _, w in children)

    def serve(self, ex: Exchange, finish: Finish) -> None:
        child = self.balancer.pick()
        if child is None:
            finish(ex, NoServerAvailable(f"service {self.name} has no available child"))
            return
        child(ex, finish)


class MirroringService:
    """Serves from the main service; copies bodiless requests to mirrors by percentage.

    Requests with a body are not mirrored (that would need the body buffered); the main
    response is never delayed by a mirror.
    """

    def __init__(
        self,
        name: str,
        main: Handler,
        mirrors: list[tuple[str, Handler, int]],
    ) -> None:
        self.name = name
        self.main = main
        self.mirrors = mirrors
        self.counts = [0] * len(mirrors)
        self.total = 0

    def serve(self, ex: Exchange, finish: Finish) -> None:
        if not ex.has_body and self.mirrors and ex.request.upgrade is None:
            self.total += 1
            for i, (_, handler, percent) in enumerate(self.mirrors):
                if self.counts[i] * 100 < self.total * percent:
                    self.counts[i] += 1
                    _mirror(ex, handler)
        self.main(ex, finish)


def _mirror(ex: Exchange, handler: Handler) -> None:
    """Replay a bodiless request to a mirror, discarding the response."""
    shadow = Exchange(NullSink(), ex.request.copy(), ex.entrypoint, ex.started_at, False)
    try:
        handler(shadow, _ignore_outcome)
    except Exception:  # a mirror must never hurt the main path
        log.debug("mirror request failed", exc_info=True)


def _ignore_outcome(ex: Exchange, exc: BaseException | None) -> None:
    if exc is not None and not isinstance(exc, ProxyError):
        log.debug("mirror request failed: %s", exc)
