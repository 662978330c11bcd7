"""The per-request entry: pick the router in the live snapshot, run its chain, map failures to
Traefik's status codes, record the request metrics.

Handlers are callbacks (see http.exchange.Handler): dispatch starts the router's chain and the
chain calls `finish` once when the exchange is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from meshproxy.http.errors import (
    ClientGone,
    NoServerAvailable,
    ProxyError,
    ResponseAborted,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponseTimeout,
)
from meshproxy.http.exchange import Exchange
from meshproxy.http.grpc import MalformedTimeout, is_grpc, parse_grpc_timeout
from meshproxy.observability.access_log import AccessLog
from meshproxy.observability.metrics import RequestMetrics, protocol_label
from meshproxy.runtime.manager import ConfigManager

log = logging.getLogger("meshproxy.http")
# Final: a C static in compiled code, not a module-dict lookup per call
_perf_counter: Final = time.perf_counter

NOT_FOUND = b"404 page not found\n"

EntryHandler = Callable[[Exchange], None]


def make_dispatcher(
    entrypoint: str,
    manager: ConfigManager,
    metrics: RequestMetrics,
    access_log: AccessLog | None = None,
) -> EntryHandler:
    """The handler of one entrypoint: `dispatch(ex)` serves `ex` and calls
    `ex.sink.exchange_done(ex)` exactly once, when the exchange is over (whatever happened).
    With `access_log`, each exchange is queued for it (formatted later, off this path)."""
    # The HTTPS dispatcher's table key (l4.tls.https_key): its requests were decrypted here.
    decrypted = entrypoint.endswith("#tls")

    def finish(ex: Exchange, exc: BaseException | None) -> None:
        if ex.handled:
            return
        ex.handled = True
        status = ex.status
        if exc is not None:
            status = _fail(ex, exc)
        elif ex.request_error:
            status = ex.request_error
        seconds = _perf_counter() - ex.started_at
        metrics.record_request(ex, status or 500, seconds)
        if decrypted:
            metrics.record_tls(ex)
        if ex.why:
            metrics.record_failure(ex)
        if access_log is not None:
            access_log.record(ex, status or 500, seconds)
        span = ex.span  # tracing (observability.tracing): the server span ends here
        if span is not None:
            span.end(ex, status or 500)
        ex.sink.exchange_done(ex)

    def dispatch(ex: Exchange) -> None:
        if ex.request.target == b"*":  # OPTIONS * (the only method check_target lets through)
            # RFC 9110 §9.3.7: about the server as a whole, answered by it, as Go's server does
            ex.respond(200, b"", [])
            finish(ex, None)
            return
        if protocol_label(ex) == "grpc" and not grpc_deadline(ex):  # label cached for metrics
            finish(ex, None)
            return
        table = manager.snapshot.http_tables.get(entrypoint)
        route = None
        if table is not None:
            # RouterTable.match, inlined: this module is compiled, the table's is not, and an
            # interpreted call per request costs more than the loop itself.
            request = ex.request
            for candidate, test in table.by_host.get(request.host, table.any_host):
                if test is None or test(request):
                    route = candidate
                    break
        if route is None:
            ex.why = "no_route"
            ex.respond(404, NOT_FOUND)
            finish(ex, None)
            return
        ex.router = route.name
        try:
            route.handler(ex, finish)
        except Exception as exc:  # a bug must end this exchange, not the connection loop
            finish(ex, exc)

    return dispatch


def grpc_deadline(ex: Exchange) -> bool:
    """Set `ex.deadline` from a gRPC call's grpc-timeout (gRPC PROTOCOL-HTTP2.md, "Timeout"):
    the call must be over `timeout` seconds after the proxy received it. The pools fail an
    exchange past its deadline as a response timeout (504: DEADLINE_EXCEEDED to the client),
    so the proxy's own deadline is the smaller of its responseHeaderTimeout and the client's;
    the h2c pool forwards the time left as the backend's grpc-timeout. False when `ex` was
    answered here: a malformed value (INTERNAL "malformed grpc-timeout", as grpc-go's server
    answers it: a 400 here, mapped to INTERNAL) or no time left at all (504)."""
    if not is_grpc(ex.request):
        return True  # application/grpc-web, or a content-type that only starts the same
    for name, value in ex.request.headers:
        if name == b"grpc-timeout":
            try:
                timeout = parse_grpc_timeout(value)
            except MalformedTimeout as exc:
                ex.respond(400, str(exc).encode())
                return False
            if timeout <= 0:
                ex.why = "timeout"
                ex.respond(504, b"deadline exceeded before the call was routed")
                return False
            ex.deadline = ex.started_at + timeout
            return True
    return True


def _fail(ex: Exchange, exc: BaseException) -> int:
    if ex.request_error:
        return ex.request_error  # the client's connection already got its answer, or was cut
    if ex.client_gone or isinstance(exc, ClientGone | asyncio.CancelledError):
        ex.why = "client_gone"
        return 499
    if not ex.why:
        ex.why = why_code(exc)
    if not isinstance(exc, ProxyError):
        log.error(
            "unexpected error while serving %s %s",
            ex.request.method,
            ex.request.target,
            exc_info=exc,
        )
        exc = ProxyError("internal error")
    if not ex.response_started:
        ex.respond(exc.status, exc.body)
        return exc.status
    log.info("aborting response to %s: %s", ex.request.client_ip, exc)
    ex.abort()
    return ex.status


def why_code(exc: BaseException) -> str:
    """The "why" code of a failure the proxy decided (observability.access_log.WHY_CODES)."""
    if isinstance(exc, NoServerAvailable):
        return "no_healthy_server"
    if isinstance(exc, UpstreamConnectError):  # a dial timeout too: the server was not reached
        return "upstream_connect_failure"
    if isinstance(exc, UpstreamResponseTimeout):
        return "timeout"
    if isinstance(exc, UpstreamError):
        return "upstream_reset"
    if isinstance(exc, ResponseAborted):  # the backend broke off a response under way
        return "upstream_reset"
    if isinstance(exc, ClientGone):
        return "client_gone"
    return "internal_error"
