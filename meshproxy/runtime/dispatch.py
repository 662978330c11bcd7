"""The per-request entry: pick the router in the live snapshot, run its chain, map failures to
Traefik's status codes, record the request metrics."""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter

from meshproxy.http.errors import ClientGone, ProxyError
from meshproxy.http.exchange import Exchange
from meshproxy.observability.metrics import RequestMetrics
from meshproxy.runtime.manager import ConfigManager
from meshproxy.runtime.snapshot import Handler

log = logging.getLogger("meshproxy.http")

NOT_FOUND = b"404 page not found\n"


def make_dispatcher(entrypoint: str, manager: ConfigManager, metrics: RequestMetrics) -> Handler:
    async def dispatch(ex: Exchange) -> None:
        table = manager.snapshot.http_tables.get(entrypoint)
        route = table.match(ex.request) if table is not None else None
        status = 0
        try:
            if route is None:
                ex.respond(404, NOT_FOUND)
            else:
                ex.router = route.name
                await route.handler(ex)
            status = ex.status
        except ProxyError as exc:
            status = _fail(ex, exc)
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception:
            log.exception(
                "unexpected error while serving %s %s", ex.request.method, ex.request.target
            )
            status = _fail(ex, ProxyError("internal error"))
        finally:
            metrics.record_request(ex, status or 500, perf_counter() - ex.started_at)

    return dispatch


def _fail(ex: Exchange, exc: ProxyError) -> int:
    if ex.client_gone or isinstance(exc, ClientGone):
        return 499
    if not ex.response_started:
        ex.respond(exc.status, exc.body)
        return exc.status
    log.info("aborting response to %s: %s", ex.request.client_ip, exc)
    ex.abort()
    return ex.status
