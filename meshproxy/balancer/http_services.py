"""HTTP services: a load balancer over servers, a weighted split over services, mirroring.

Each is an async handler `serve(exchange)`; they nest (weighted -> loadBalancer) and are
built once per config snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin
from meshproxy.http.errors import NoServerAvailable, ProxyError
from meshproxy.http.exchange import Exchange
from meshproxy.http.forwarding import HOP_BY_HOP
from meshproxy.http.upstream import (
    EarlyEOF,
    UpstreamError,
    UpstreamPool,
    exchange_fresh,
    exchange_once,
    may_replay,
)
from meshproxy.observability.metrics import RequestMetrics

log = logging.getLogger("meshproxy.balancer")

Handler = Callable[[Exchange], Awaitable[None]]
Finish = Callable[[Exchange, BaseException | None], None]
_CRLF = b"\r\n"
_SKIP_ALWAYS = HOP_BY_HOP | {b"host", b"expect", b"x-forwarded-for"}


@dataclass(eq=False)
class ServerTarget:
    """One backend server of a loadBalancer."""

    url: str
    pool: UpstreamPool
    host_header: bytes  # host[:port] of the server, used when passHostHeader is false
    path_prefix: bytes = b""  # with preservePath


def build_request_head(
    ex: Exchange, target: ServerTarget, pass_host_header: bool
) -> tuple[bytes, bool]:
    """Serialize the upstream request head; returns (head, body is chunked)."""
    request = ex.request
    path = target.path_prefix + request.target if target.path_prefix else request.target
    host = request.host_header if pass_host_header else target.host_header
    skip = _SKIP_ALWAYS | request.connection_tokens if request.connection_tokens else _SKIP_ALWAYS
    headers = request.headers
    lines = [name + b": " + value + _CRLF for name, value in headers if name not in skip]
    client = request.client_ip.encode()
    if request.forwarded_for:  # a trusted client sent X-Forwarded-For: append to it
        xff = b", ".join(value for name, value in headers if name == b"x-forwarded-for")
        client = xff + b", " + client
    chunked = ex.has_body and request.content_length is None
    return b"".join(
        (
            request.method.encode(),
            b" ",
            path,
            b" HTTP/1.1\r\nhost: ",
            host,
            _CRLF,
            *lines,
            b"x-forwarded-for: ",
            client,
            b"\r\ntransfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n\r\n",
        )
    ), chunked


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

    async def serve(self, ex: Exchange) -> None:
        """The coroutine path, used behind middlewares."""
        ex.service = self.name
        target = self.balancer.pick()
        if target is None:
            raise NoServerAvailable(f"service {self.name} has no available server")
        head, chunked = build_request_head(ex, target, self.pass_host_header)
        started = perf_counter()
        try:
            await exchange_once(target.pool, ex, head, chunked)
        except ProxyError as exc:
            self.metrics.record_service(self.name, ex, exc.status, perf_counter() - started)
            raise
        self.metrics.record_service(self.name, ex, ex.status, perf_counter() - started)

    def serve_direct(self, ex: Exchange, finish: Finish) -> None:
        """The callback path for a router with no middlewares: no coroutine, no Task and no
        Future per request when an idle upstream connection is ready (the common case).
        `finish(ex, error)` is called once when the exchange is over."""
        ex.service = self.name
        target = self.balancer.pick()
        if target is None:
            finish(ex, NoServerAvailable(f"service {self.name} has no available server"))
            return
        head, chunked = build_request_head(ex, target, self.pass_host_header)
        started = perf_counter()
        conn = target.pool.take_idle()
        if conn is None:
            self._in_task(ex, finish, exchange_fresh(target.pool, ex, head, chunked), started)
            return

        def done(exc: BaseException | None) -> None:
            if isinstance(exc, EarlyEOF):
                if may_replay(ex, True):
                    retry = exchange_fresh(target.pool, ex, head, chunked)
                    self._in_task(ex, finish, retry, started)
                    return
                exc = UpstreamError("backend closed the connection without answering")
            status = exc.status if isinstance(exc, ProxyError) else ex.status
            self.metrics.record_service(self.name, ex, status, perf_counter() - started)
            finish(ex, exc)

        conn.start(ex, head, chunked, done)

    def _in_task(self, ex: Exchange, finish: Finish, work: Awaitable[None], started: float) -> None:
        """Continue in a Task (a new connection must be dialled first)."""

        async def run() -> None:
            try:
                await work
            except ProxyError as exc:
                self.metrics.record_service(self.name, ex, exc.status, perf_counter() - started)
                raise
            self.metrics.record_service(self.name, ex, ex.status, perf_counter() - started)

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(
            lambda t: finish(ex, asyncio.CancelledError() if t.cancelled() else t.exception())
        )


class WeightedService:
    """Traffic split: each request goes to one child service, in proportion to the weights."""

    def __init__(self, name: str, children: list[tuple[Handler, int]]) -> None:
        self.name = name
        self.balancer: SmoothWeightedRoundRobin[Handler] = SmoothWeightedRoundRobin(children)
        self.weights_key = tuple(w for _, w in children)

    async def serve(self, ex: Exchange) -> None:
        child = self.balancer.pick()
        if child is None:
            raise NoServerAvailable(f"service {self.name} has no available child")
        await child(ex)


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
        mirror_request: Callable[[Exchange, Handler], Awaitable[None]],
    ) -> None:
        self.name = name
        self.main = main
        self.mirrors = mirrors
        self.counts = [0] * len(mirrors)
        self.total = 0
        self.mirror_request = mirror_request
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, ex: Exchange) -> None:
        if not ex.has_body and self.mirrors:
            self.total += 1
            for i, (_, handler, percent) in enumerate(self.mirrors):
                if self.counts[i] * 100 < self.total * percent:
                    self.counts[i] += 1
                    task = asyncio.get_running_loop().create_task(self.mirror_request(ex, handler))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        await self.main(ex)
