"""HTTP services: a load balancer over servers, a weighted split over services, mirroring.

Each is a callback `Handler` (see http.exchange); they nest (weighted -> loadBalancer) and are
built once per config snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from time import perf_counter

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin
from meshproxy.http.dial import exchange_fresh
from meshproxy.http.errors import NoServerAvailable, ProxyError
from meshproxy.http.exchange import Exchange, Finish, Handler, NullSink
from meshproxy.http.forwarding import HOP_BY_HOP
from meshproxy.http.upstream import EarlyEOF, UpstreamError, UpstreamPool, may_replay
from meshproxy.observability.metrics import RequestMetrics

log = logging.getLogger("meshproxy.balancer")

_CRLF = b"\r\n"
_SKIP_ALWAYS = HOP_BY_HOP | {b"host", b"x-forwarded-for"}
# An HTTP/1.0 server ignores Expect; the proxy answers 100 itself instead (RFC 9110 §10.1.1).
_SKIP_FOR_HTTP10 = _SKIP_ALWAYS | {b"expect"}
_DIALS: set[asyncio.Future[None]] = set()


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
    verbatim = request.verbatim
    if verbatim is not None and pass_host_header:
        # the client's own lines (its Host among them) and X-Forwarded-*: nothing to rebuild
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (request.method.encode(), path, verbatim), False
    host = request.host_header if pass_host_header else target.host_header
    skip = _SKIP_FOR_HTTP10 if target.pool.http10 else _SKIP_ALWAYS
    if request.connection_tokens:
        skip = skip | request.connection_tokens
    headers = request.headers
    lines = [name + b": " + value + _CRLF for name, value in headers if name not in skip]
    if request.append_client_ip:
        client = request.client_ip.encode()
        if request.forwarded_for:  # a trusted client sent X-Forwarded-For: append to it
            xff = b", ".join(value for name, value in headers if name == b"x-forwarded-for")
            client = xff + b", " + client
        lines.append(b"x-forwarded-for: " + client + _CRLF)
    elif request.forwarded_for:
        lines.extend(
            b"x-forwarded-for: " + v + _CRLF for n, v in headers if n == b"x-forwarded-for"
        )
    if request.upgrade is not None:
        # The one hop-by-hop pair a proxy carries on (RFC 9110 §7.8): the backend may switch.
        lines.append(b"connection: Upgrade\r\nupgrade: " + request.upgrade + _CRLF)
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
            b"transfer-encoding: chunked\r\n\r\n" if chunked else _CRLF,
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

    def serve(self, ex: Exchange, finish: Finish) -> None:
        """Forward `ex` to the next server. With an idle upstream connection ready (the
        common case) this is all callbacks; a dial runs in a Task."""
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

        attempt = _Attempt(self, ex, finish, target, head, chunked, started)
        conn.start(ex, head, chunked, attempt.done)

    def _in_task(self, ex: Exchange, finish: Finish, work: Awaitable[None], started: float) -> None:
        """Continue in a Task (a new connection must be dialled first)."""
        task = asyncio.ensure_future(work)
        _DIALS.add(task)  # the loop keeps only weak references to tasks

        def ended(t: asyncio.Future[None]) -> None:
            _DIALS.discard(t)
            exc = asyncio.CancelledError() if t.cancelled() else t.exception()
            if exc is None or isinstance(exc, ProxyError):
                status = ex.status if exc is None else exc.status
                self.metrics.record_service(self.name, ex, status, perf_counter() - started)
            finish(ex, exc)

        task.add_done_callback(ended)


class _Attempt:
    """One try of a request on a pooled connection, and what to do when it ends. An object
    rather than a closure: compiled by mypyc, a closure and its environment form a reference
    cycle, which would leave every request's objects to the garbage collector."""

    __slots__ = ("chunked", "ex", "finish", "head", "service", "started", "target")

    def __init__(
        self,
        service: LoadBalancerService,
        ex: Exchange,
        finish: Finish,
        target: ServerTarget,
        head: bytes,
        chunked: bool,
        started: float,
    ) -> None:
        self.service = service
        self.ex = ex
        self.finish = finish
        self.target = target
        self.head = head
        self.chunked = chunked
        self.started = started

    def done(self, exc: BaseException | None) -> None:
        ex = self.ex
        service = self.service
        if exc is None:
            status = ex.swallowed_status or ex.status
            service.metrics.record_service(service.name, ex, status, perf_counter() - self.started)
            self.finish(ex, None)
            return
        if isinstance(exc, EarlyEOF):
            if may_replay(ex, True):
                retry = exchange_fresh(self.target.pool, ex, self.head, self.chunked)
                service._in_task(ex, self.finish, retry, self.started)
                return
            exc = UpstreamError("backend closed the connection without answering")
        status = exc.status if isinstance(exc, ProxyError) else ex.swallowed_status or ex.status
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
