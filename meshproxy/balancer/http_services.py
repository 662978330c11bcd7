"""HTTP services: a load balancer over servers, a weighted split over services, mirroring.

Each is a callback `Handler` (see http.exchange); they nest (weighted -> loadBalancer) and are
built once per config snapshot. A load balancer only *picks* a server: sending the exchange is
the job of the server's upstream pool (`target.pool.send`), one per scheme behind one
interface (http.upstream.ServerPool), so retry, mirroring and the circuit breaker see the same
outcomes whatever protocol the server speaks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from math import exp
from typing import Any, Final

from meshproxy.balancer.outlier import OutlierDetector
from meshproxy.balancer.sticky import Sticky
from meshproxy.balancer.strategies import (
    DEFAULT_DECAY,
    PeakEWMA,
    ServerState,
    Strategy,
    make_strategy,
)
from meshproxy.balancer.wrr import SmoothWeightedRoundRobin
from meshproxy.http.errors import NoServerAvailable, ProxyError
from meshproxy.http.exchange import Exchange, Finish, Handler, NullSink
from meshproxy.http.upstream import ServerTarget
from meshproxy.observability.metrics import RequestMetrics

log = logging.getLogger("meshproxy.balancer")
# Final: a C static in compiled code, not a module-dict lookup per call
_perf_counter: Final = time.perf_counter

# The latency a failed try counts as for the peak-EWMA estimate (seconds): a server that
# refuses connections in a millisecond must not look like the fastest one.
FAILURE_RTT: Final = 1.0
INVERSE_DECAY: Final = 1.0 / DEFAULT_DECAY


class LoadBalancerService:
    """A `loadBalancer` service: picks a server with its strategy (balancer.strategies), or
    the one a sticky cookie pins, among the servers that are up (active health check and
    passive outlier detection), and hands the exchange to that server's pool.

    `updaters` are told when the service as a whole goes up or down (no server available):
    the parents that declared `healthCheck` (Traefik's SetStatus propagation)."""

    def __init__(
        self,
        name: str,
        servers: list[tuple[ServerTarget, int]],
        pass_host_header: bool,
        metrics: RequestMetrics,
        states: list[ServerState] | None = None,
        strategy: str | None = None,
        sticky: Sticky | None = None,
        outlier: OutlierDetector | None = None,
    ) -> None:
        self.name = name
        self.targets = [target for target, _ in servers]
        self.states: list[ServerState] = (
            states if states is not None else [ServerState(t.url) for t, _ in servers]
        )
        weights = [w for _, w in servers]
        self.strategy: Strategy = make_strategy(strategy, self.states, weights)
        self.pass_host_header = pass_host_header
        self.metrics = metrics
        self.sticky = sticky
        self.outlier = outlier
        self.ewma = isinstance(self.strategy, PeakEWMA)
        self.weights_key = tuple((t.url, w) for t, w in servers)
        self.updaters: list[Callable[[bool], None]] = []
        self.up = self.strategy.any_up()
        self.health_check = False  # declared `healthCheck`: tells its parents its status
        self.checkers: list[Any] = []  # per server: its health.HealthChecker, or None

    def serve(self, ex: Exchange, finish: Finish) -> None:
        """Send `ex` to the next server; `finish` is called once, when the exchange is over."""
        ex.service = self.name
        index = -1
        sticky = self.sticky
        if sticky is not None:
            index = sticky.pinned(ex)
            if index >= 0:
                if self.states[index].available:
                    sticky.keep(ex, index)
                else:
                    index = -1  # pinned to a server that is down: balance and re-pin
        if index < 0:
            index = self.strategy.pick()
            if index < 0:
                finish(ex, NoServerAvailable(f"service {self.name} has no available server"))
                return
            if sticky is not None:
                sticky.stick(ex, index)
        state = self.states[index]
        state.in_flight += 1
        target = self.targets[index]
        try:
            span = ex.span  # tracing: one client span per try, its context sent upstream
            attempt = _Attempt(
                self,
                state,
                ex,
                finish,
                _perf_counter(),
                None if span is None else span.attempt(ex, target.url, target.host_header),
            )
            target.pool.send(ex, target, attempt.done)
        except BaseException:
            state.in_flight -= 1  # the try never started: its `done` will not come
            raise

    def observe(
        self, state: ServerState, exc: BaseException | None, status: int, now: float, seconds: float
    ) -> None:
        """One try at `state`'s server ended: feed the latency estimate and the detector.
        A failure (nothing reached the server, or a 5xx) counts as a slow answer for the
        estimate, so a server that fails fast does not attract the traffic."""
        if status == 499:  # the client left: says nothing about the server
            return
        failed = status >= 500  # the pool's errors (connect, reset, timeout) are 502/504
        if self.ewma:
            # ServerState.observe (peak EWMA, 10 s decay), inlined: it runs for every request
            sample = seconds if not failed or seconds > FAILURE_RTT else FAILURE_RTT
            stamp = state.stamp
            if stamp < 0.0 or sample > state.rtt:
                state.rtt = sample
            else:
                weight = exp(min(stamp - now, 0.0) * INVERSE_DECAY)
                state.rtt = state.rtt * weight + sample * (1.0 - weight)
            state.stamp = now
        outlier = self.outlier
        # a success with nothing to reset skips the detector: the common case stays cheap
        if outlier is not None and (failed or state.consecutive_failures):
            outlier.record(self, state, exc, status, now)

    # -- status (health checks, outlier detection): off the hot path ---------------------

    def refresh(self) -> None:
        """Recompute which servers take traffic after a state changed; publish
        `traefik_service_server_up` and tell the parents when the whole service flips."""
        self.strategy.refresh()
        server_up = self.metrics.server_up
        for state in self.states:
            server_up[(self.name, state.url)] = 1 if state.available else 0
        up = self.strategy.any_up()
        if up != self.up:
            self.up = up
            log.warning(
                "service %s is %s", self.name, "up again" if up else "down: no server available"
            )
            for updater in self.updaters:
                updater(up)

    def set_healthy(self, url: str, healthy: bool) -> None:
        """The active health check's verdict for the server at `url`."""
        changed = False
        for state in self.states:
            if state.url == url and state.healthy != healthy:
                state.healthy = healthy
                changed = True
        if changed:
            self.refresh()


class _Attempt:
    """One try of a request at a server, and what to do when it ends: an object rather than a
    closure, because compiled by mypyc a closure and its environment form a reference cycle,
    which would leave every request's objects to the garbage collector."""

    __slots__ = ("ex", "finish", "service", "span", "started", "state")

    def __init__(
        self,
        service: LoadBalancerService,
        state: ServerState,
        ex: Exchange,
        finish: Finish,
        started: float,
        span: Any = None,
    ) -> None:
        self.service = service
        self.span = span  # observability.tracing.ClientSpan, or None
        self.state = state
        self.ex = ex
        self.finish = finish
        self.started = started

    def done(self, exc: BaseException | None) -> None:
        now = _perf_counter()
        self.state.in_flight -= 1
        ex = self.ex
        if exc is None:
            status = ex.swallowed_status or ex.status
        elif isinstance(exc, ProxyError):
            status = exc.status
        else:  # cancelled, or a bug: dispatch logs it; no service series for it
            if self.span is not None:
                self.span.end(ex, 500, exc)
            self.finish(ex, exc)
            return
        if self.span is not None:
            self.span.end(ex, status, exc)
        service = self.service
        seconds = now - self.started
        service.observe(self.state, exc, status, now, seconds)
        service.metrics.record_service(service.name, ex, status, seconds)
        self.finish(ex, exc)


class WeightedService:
    """Traffic split: each request goes to one child service, in proportion to the weights.

    With `healthCheck` (Traefik's SetStatus propagation) a child that reports itself down
    (no server available) is skipped, and the service reports itself down to its own parents
    when every child is; with `sticky.cookie` a client is pinned to one child."""

    def __init__(
        self,
        name: str,
        children: list[tuple[Handler, int]],
        sticky: Sticky | None = None,
    ) -> None:
        self.name = name
        self.handlers = [handler for handler, _ in children]
        self.balancer: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin(
            [(i, w) for i, (_, w) in enumerate(children)]
        )
        self.weights_key = tuple(w for _, w in children)
        self.sticky = sticky
        self.children_up = [True] * len(children)
        self.updaters: list[Callable[[bool], None]] = []
        self.up = any(w > 0 for _, w in children)
        self.health_check = False
        self.child_names: list[str] = []  # set with healthCheck: the admin API's "why"

    def serve(self, ex: Exchange, finish: Finish) -> None:
        index = -1
        sticky = self.sticky
        if sticky is not None:
            index = sticky.pinned(ex)
            if index >= 0:
                if self.children_up[index]:
                    sticky.keep(ex, index)
                else:
                    index = -1
        if index < 0:
            picked = self.balancer.pick()
            if picked is None:
                finish(ex, NoServerAvailable(f"service {self.name} has no available child"))
                return
            index = picked
            if sticky is not None:
                sticky.stick(ex, index)
        self.handlers[index](ex, finish)

    def set_child_up(self, index: int, up: bool) -> None:
        """A child's status changed (it declared a health check): skip it while down."""
        self.children_up[index] = up
        if self.weights_key[index] > 0:
            self.balancer.set_up(index, up)
        now_up = any(u and w > 0 for u, w in zip(self.children_up, self.weights_key, strict=True))
        if now_up != self.up:
            self.up = now_up
            for updater in self.updaters:
                updater(now_up)


class MirroringService:
    """Serves from the main service; copies bodiless requests to mirrors by percentage.

    Requests with a body are not mirrored (that would need the body buffered); the main
    response is never delayed by a mirror. With `healthCheck`, the service's status is its
    main service's, told to its parents (Traefik's mirror.RegisterStatusUpdater).
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
        self.updaters: list[Callable[[bool], None]] = []
        self.up = True
        self.health_check = False
        self.main_name = ""  # set with healthCheck: the admin API's "why"

    def serve(self, ex: Exchange, finish: Finish) -> None:
        if not ex.has_body and self.mirrors and ex.request.upgrade is None:
            self.total += 1
            for i, (_, handler, percent) in enumerate(self.mirrors):
                if self.counts[i] * 100 < self.total * percent:
                    self.counts[i] += 1
                    _mirror(ex, handler)
        self.main(ex, finish)

    def set_main_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            for updater in self.updaters:
                updater(up)


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
