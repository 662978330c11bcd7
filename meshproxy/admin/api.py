"""The admin entrypoint (Traefik's `traefik`, :8080): /ping, /api/rawdata, /metrics, Traefik's
API (admin.traefik_api), /api/explain (admin.explain) and the dashboard (admin.dashboard).

Off the hot path, so it is plain aiohttp.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from meshproxy.admin.dashboard import add_routes as add_dashboard_routes
from meshproxy.admin.explain import add_routes as add_explain_routes
from meshproxy.admin.traefik_api import AdminContext, add_routes
from meshproxy.balancer.health import describe_service
from meshproxy.config.decode import to_builtins
from meshproxy.observability.metrics import RequestMetrics
from meshproxy.runtime.manager import ConfigManager
from meshproxy.runtime.snapshot import ObjectStatus


def _section(
    objects: dict[str, Any], statuses: dict[str, ObjectStatus], provider: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, definition in objects.items():
        qualified = name if "@" in name else f"{name}@{provider}"
        entry = dict(to_builtins(definition))
        status = statuses.get(qualified, ObjectStatus())
        entry["status"] = status.status
        if status.errors:
            entry["error"] = list(status.errors)
        if status.using:
            entry["using"] = list(status.using)
        entry["name"] = qualified
        entry["provider"] = provider
        out[qualified] = entry
    return out


def rawdata(manager: ConfigManager) -> dict[str, Any]:
    snapshot = manager.snapshot
    config = snapshot.config
    provider = snapshot.provider
    services = _section(config.http.services, snapshot.services, provider)
    for name, entry in services.items():  # servers UP/DOWN and why (balancer.health)
        entry.update(describe_service(snapshot.service_objects.get(name)))
    return {
        "routers": _section(config.http.routers, snapshot.routers, provider),
        "services": services,
        "middlewares": _section(config.http.middlewares, snapshot.middlewares, provider),
        "tcpRouters": _section(config.tcp.routers, snapshot.tcp_routers, provider),
        "tcpServices": _section(config.tcp.services, snapshot.tcp_services, provider),
        "udpRouters": _section(config.udp.routers, snapshot.udp_routers, provider),
        "udpServices": _section(config.udp.services, snapshot.udp_services, provider),
        "meshproxy": {
            "generation": snapshot.generation,
            "lastConfigError": manager.last_error,
            "errors": snapshot.error_lines(),
        },
    }


async def _workers_servers(node: Any, services: dict[str, Any]) -> None:
    """With workers, the servers' live state (UP/DOWN, probes, in flight) is theirs: the
    supervisor runs no health check (meshproxy.node.supervisor.PassiveHealthRegistry)."""
    from meshproxy.admin.workers import ask_workers, merge_servers
    from meshproxy.node.supervisor import WorkerRequestFailed

    try:
        answers = await ask_workers(node, "servers")
    except WorkerRequestFailed:  # logged by the worker; the rest of rawdata still answers
        return
    merged = merge_servers(answers or [])
    for name, entry in services.items():
        if name in merged:
            for key in ("serverStatus", "meshproxyServers", "meshproxyWhy"):
                entry.pop(key, None)
            entry.update(merged[name])


def build_admin_app(
    manager: ConfigManager,
    metrics: RequestMetrics | None,
    *,
    ping: bool,
    api: bool,
    context: AdminContext | None = None,
    node: Any = None,
) -> web.Application:
    """`context` (the static config, the process) enables Traefik's API paths with `api`.
    `node` (meshproxy.daemon.ProxyDaemon) tells /ping the proxy is terminating, and with
    worker processes (meshproxy.node) lists them in /api/rawdata and sums their /metrics."""
    app = web.Application()

    async def handle_ping(request: web.Request) -> web.Response:
        if node is not None and node.terminating:  # Traefik: ping.terminatingStatusCode
            return web.Response(status=node.terminating_status, text="Service Unavailable")
        if node is not None and not node.ready:  # workers: none serves yet (docs/workers.md)
            return web.Response(status=503, text="Service Unavailable")
        return web.Response(text="OK")

    async def handle_rawdata(request: web.Request) -> web.Response:
        data = rawdata(manager)
        workers = node.admin_workers() if node is not None else None
        if workers is not None:
            data["meshproxy"]["workers"] = workers
            await _workers_servers(node, data["services"])
        return web.json_response(data)

    async def handle_metrics(request: web.Request) -> web.Response:
        assert metrics is not None
        return web.Response(
            body=await node.admin_metrics() if node is not None else metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    if ping:
        app.router.add_route("*", "/ping", handle_ping)
    if api:
        app.router.add_get("/api/rawdata", handle_rawdata)
        if context is not None:
            if context.daemon is None:
                context.daemon = node
            add_routes(app, context)
            add_explain_routes(app, context)
            if context.static.api is None or context.static.api.dashboard:
                add_dashboard_routes(app, context)
    if metrics is not None:
        app.router.add_get("/metrics", handle_metrics)
    return app
