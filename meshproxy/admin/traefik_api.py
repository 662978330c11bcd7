"""Traefik's HTTP API on the admin entrypoint, from the live snapshot.

The same paths and JSON keys as Traefik 3's API (doc: https://doc.traefik.io/traefik/operations/api/,
shapes checked against Traefik 3.7's answers for the same config in
tests/differential/test_api_vs_traefik.py), so Traefik's dashboard and tools that read its API
work against meshproxy:

- `/api/overview`: counts (total, warnings, errors) per kind, features, providers.
- `/api/http/routers[/{name}]`, `/api/http/services[/{name}]`, `/api/http/middlewares[/{name}]`,
  `/api/tcp/routers|services|middlewares[/{name}]`, `/api/udp/routers|services[/{name}]`:
  the object as configured (with the defaults Traefik's decoder fills in, so the keys match),
  plus `status` (enabled | disabled | warning), `error` (list, when there are problems),
  `using` (routers: entrypoints) or `usedBy` (services, middlewares: routers), `name`,
  `provider`, `type` (services, middlewares) and, for loadBalancer services, `serverStatus`
  (url -> UP/DOWN). Lists are sorted by name, filtered by `search`, `status`, `serviceName`,
  `middlewareName`, paginated by `page` / `per_page` with Traefik's `X-Next-Page` header.
- `/api/entrypoints[/{name}]` and `/api/version`.

meshproxy's additions, under keys Traefik does not use: `meshproxyServers` on loadBalancer
services (per server: up, inFlight, latencyEstimateMs, healthCheck, outlier, why: see
balancer.health.describe_service) and `meshproxyWhy` when no server is up.

Unknown names answer 404 `{"message": "<kind> not found: <name>"}` as Traefik does. Only GET
and HEAD are routed (aiohttp answers 405 to anything else); the admin entrypoint is its own
listener, never one of the traffic entrypoints (daemon.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshproxy import __version__
from meshproxy.balancer.health import describe_service
from meshproxy.config.decode import to_builtins
from meshproxy.config.durations import format_duration
from meshproxy.config.static import StaticConfig, parse_address
from meshproxy.rules.http import default_priority
from meshproxy.rules.tcp import tcp_default_priority
from meshproxy.runtime.manager import ConfigManager
from meshproxy.runtime.snapshot import ObjectStatus, RuntimeSnapshot

ROUTER_OBSERVABILITY = {
    "accessLogs": True,
    "metrics": True,
    "tracing": True,
    "traceVerbosity": "minimal",
}
# Traefik's "priorityStr": the priority as a string, for clients that lose int64 precision.
DEFAULT_PER_PAGE = 100


@dataclass
class AdminContext:
    """What the admin API reads: the live config, the static config and the process."""

    manager: ConfigManager
    static: StaticConfig
    started: float  # wall clock, seconds
    access_log: bool = False
    metrics: Any = None
    state: Any = None  # runtime.state.RuntimeState: middleware states (explain)
    daemon: Any = None  # meshproxy.daemon.ProxyDaemon: its `node` when workers serve traffic


def _qualified(name: str, provider: str) -> str:
    return name if "@" in name else f"{name}@{provider}"


def _status_fields(entry: dict[str, Any], status: ObjectStatus) -> None:
    entry["status"] = status.status
    if status.errors:
        entry["error"] = list(status.errors)


def _service_type(definition: dict[str, Any]) -> str:
    for key in ("loadBalancer", "weighted", "mirroring", "failover", "highestRandomWeight"):
        if key in definition:
            return key.lower()
    return ""


def http_routers(snapshot: RuntimeSnapshot, default_eps: list[str]) -> dict[str, Any]:
    provider = snapshot.provider
    out = {}
    for name, router in snapshot.config.http.routers.items():
        qualified = _qualified(name, provider)
        entry: dict[str, Any] = dict(to_builtins(router))
        entry.setdefault("entryPoints", list(default_eps))
        if "priority" not in entry or not entry["priority"]:
            entry["priority"] = default_priority(router.rule or "")
        entry.setdefault("observability", dict(ROUTER_OBSERVABILITY))
        status = snapshot.routers.get(qualified, ObjectStatus())
        _status_fields(entry, status)
        entry["using"] = list(status.using)
        entry["name"] = qualified
        entry["provider"] = provider
        entry["priorityStr"] = str(entry["priority"])
        out[qualified] = entry
    return out


def _load_balancer_defaults(lb: dict[str, Any]) -> None:
    lb.setdefault("strategy", "wrr")
    lb.setdefault("passHostHeader", True)
    lb.setdefault("responseForwarding", {"flushInterval": "100ms"})


def http_services(
    snapshot: RuntimeSnapshot, workers: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`workers`: the per-server state merged from worker processes (admin.workers), which
    replaces this process's own when the workers serve the traffic."""
    provider = snapshot.provider
    out = {}
    for name, service in snapshot.config.http.services.items():
        qualified = _qualified(name, provider)
        entry: dict[str, Any] = dict(to_builtins(service))
        if "loadBalancer" in entry:
            _load_balancer_defaults(entry["loadBalancer"])
        status = snapshot.services.get(qualified, ObjectStatus())
        _status_fields(entry, status)
        if status.using:
            entry["usedBy"] = list(status.using)
        entry["name"] = qualified
        entry["provider"] = provider
        entry["type"] = _service_type(entry)
        if workers is not None:
            described = workers.get(qualified, {})
        else:
            described = describe_service(snapshot.service_objects.get(qualified))
        if "loadBalancer" in entry:
            servers = entry["loadBalancer"].get("servers", [])
            entry["serverStatus"] = described.get("serverStatus") or {
                s.get("url", ""): "DOWN" for s in servers if status.status == "disabled"
            }
            if not entry["serverStatus"]:
                del entry["serverStatus"]
        for key in ("meshproxyServers", "meshproxyWhy"):
            if key in described:
                entry[key] = described[key]
        out[qualified] = entry
    return out


def _middleware_defaults(kind: str, options: dict[str, Any]) -> None:
    if kind == "rateLimit":
        options.setdefault("period", "1s")
        options.setdefault("burst", 1)


def middlewares(
    snapshot: RuntimeSnapshot, objects: dict[str, Any], statuses: dict[str, ObjectStatus]
) -> dict[str, Any]:
    provider = snapshot.provider
    out = {}
    for name, middleware in objects.items():
        qualified = _qualified(name, provider)
        entry: dict[str, Any] = dict(to_builtins(middleware))
        kinds = list(entry)
        for kind in kinds:
            if isinstance(entry[kind], dict):
                _middleware_defaults(kind, entry[kind])
        status = statuses.get(qualified, ObjectStatus())
        _status_fields(entry, status)
        if status.using:
            entry["usedBy"] = list(status.using)
        entry["name"] = qualified
        entry["provider"] = provider
        if len(kinds) == 1:
            entry["type"] = kinds[0].lower()
        out[qualified] = entry
    return out


def tcp_routers(snapshot: RuntimeSnapshot, default_eps: list[str]) -> dict[str, Any]:
    provider = snapshot.provider
    out = {}
    for name, router in snapshot.config.tcp.routers.items():
        qualified = _qualified(name, provider)
        entry: dict[str, Any] = dict(to_builtins(router))
        entry.setdefault("entryPoints", list(default_eps))
        if not entry.get("priority"):
            rule = router.rule or ""
            catch_all = rule.replace(" ", "") == "HostSNI(`*`)"
            entry["priority"] = tcp_default_priority(rule, catch_all)
        entry["priorityStr"] = str(entry["priority"])
        status = snapshot.tcp_routers.get(qualified, ObjectStatus())
        _status_fields(entry, status)
        entry["using"] = list(status.using) or list(entry["entryPoints"])
        entry["name"] = qualified
        entry["provider"] = provider
        out[qualified] = entry
    return out


def l4_services(
    snapshot: RuntimeSnapshot,
    objects: dict[str, Any],
    statuses: dict[str, ObjectStatus],
    routers: dict[str, Any],
    server_status: bool,
) -> dict[str, Any]:
    """TCP or UDP services; `usedBy` from the routers naming them; TCP loadBalancers have
    Traefik's `serverStatus` (every server UP: no TCP health check runs here)."""
    provider = snapshot.provider
    used_by: dict[str, list[str]] = {}
    for router_name, router in routers.items():
        if router.service:
            service = _qualified(router.service, provider)
            used_by.setdefault(service, []).append(_qualified(router_name, provider))
    out = {}
    for name, service in objects.items():
        qualified = _qualified(name, provider)
        entry: dict[str, Any] = dict(to_builtins(service))
        status = statuses.get(qualified, ObjectStatus())
        _status_fields(entry, status)
        users = status.using or sorted(used_by.get(qualified, []))
        if users:
            entry["usedBy"] = list(users)
        entry["name"] = qualified
        entry["provider"] = provider
        entry["type"] = _service_type(entry)
        lb = entry.get("loadBalancer")
        if server_status and lb and status.status != "disabled":
            entry["serverStatus"] = {s.get("address", ""): "UP" for s in lb.get("servers", [])}
        out[qualified] = entry
    return out


def udp_routers(snapshot: RuntimeSnapshot, udp_eps: list[str]) -> dict[str, Any]:
    provider = snapshot.provider
    out = {}
    for name, router in snapshot.config.udp.routers.items():
        qualified = _qualified(name, provider)
        entry: dict[str, Any] = dict(to_builtins(router))
        entry.setdefault("entryPoints", list(udp_eps))
        status = snapshot.udp_routers.get(qualified, ObjectStatus())
        _status_fields(entry, status)
        entry["using"] = list(status.using) or list(entry["entryPoints"])
        entry["name"] = qualified
        entry["provider"] = provider
        out[qualified] = entry
    return out


def entrypoints(static: StaticConfig) -> dict[str, Any]:
    """Traefik's entrypoint objects, with the defaults its static config fills in."""
    out = {}
    names = dict(static.entry_points)
    for name, entry in names.items():
        data: dict[str, Any] = dict(to_builtins(entry))
        transport = data.setdefault("transport", {})
        transport.setdefault("lifeCycle", {}).setdefault("graceTimeOut", "10s")
        timeouts = transport.setdefault("respondingTimeouts", {})
        timeouts.setdefault("readTimeout", "1m0s")
        timeouts.setdefault("idleTimeout", "3m0s")
        for key, value in list(timeouts.items()):
            if isinstance(value, int | float):
                timeouts[key] = format_duration(value)
        data.setdefault("forwardedHeaders", {})
        http = data.setdefault("http", {})
        http.setdefault("sanitizePath", True)
        http.setdefault("maxHeaderBytes", 1048576)
        http2 = data.setdefault("http2", {})
        http2.setdefault("maxConcurrentStreams", 250)
        http2.setdefault("maxDecoderHeaderTableSize", 4096)
        http2.setdefault("maxEncoderHeaderTableSize", 4096)
        data.setdefault("udp", {}).setdefault("timeout", "3s")
        data["name"] = name
        out[name] = data
    return out


def _counts(objects: dict[str, Any]) -> dict[str, int]:
    statuses = [o.get("status") for o in objects.values()]
    return {
        "total": len(statuses),
        "warnings": statuses.count("warning"),
        "errors": statuses.count("disabled"),
    }


class TraefikAPI:
    """The handlers, over an `AdminContext`."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.worker_servers: dict[str, dict[str, Any]] | None = None

    async def refresh_workers(self) -> None:
        """With worker processes, fetch their per-server state (admin.workers)."""
        from meshproxy.admin.workers import ask_workers, merge_servers

        answers = await ask_workers(self.ctx.daemon, "servers")
        self.worker_servers = merge_servers(answers) if answers is not None else None

    # -- the views ----------------------------------------------------------------------

    def _http_eps(self) -> list[str]:
        eps = [
            n
            for n, e in self.ctx.static.entry_points.items()
            if n != "traefik" and parse_address(e.address).protocol == "tcp"
        ]
        explicit = [n for n in eps if self.ctx.static.entry_points[n].as_default]
        return sorted(explicit or eps)

    def _udp_eps(self) -> list[str]:
        return sorted(
            n
            for n, e in self.ctx.static.entry_points.items()
            if parse_address(e.address).protocol == "udp"
        )

    def collection(self, kind: str) -> dict[str, Any]:
        snapshot = self.ctx.manager.snapshot
        config = snapshot.config
        if kind == "http/routers":
            return http_routers(snapshot, self._http_eps())
        if kind == "http/services":
            return http_services(snapshot, self.worker_servers)
        if kind == "http/middlewares":
            return middlewares(snapshot, config.http.middlewares, snapshot.middlewares)
        if kind == "tcp/routers":
            return tcp_routers(snapshot, self._http_eps())
        if kind == "tcp/services":
            return l4_services(
                snapshot, config.tcp.services, snapshot.tcp_services, config.tcp.routers, True
            )
        if kind == "tcp/middlewares":
            return middlewares(snapshot, config.tcp.middlewares, {})
        if kind == "udp/routers":
            return udp_routers(snapshot, self._udp_eps())
        if kind == "udp/services":
            return l4_services(
                snapshot, config.udp.services, snapshot.udp_services, config.udp.routers, False
            )
        raise KeyError(kind)

    def overview(self) -> dict[str, Any]:
        metrics = self.ctx.static.metrics
        return {
            "http": {
                "routers": _counts(self.collection("http/routers")),
                "services": _counts(self.collection("http/services")),
                "middlewares": _counts(self.collection("http/middlewares")),
            },
            "tcp": {
                "routers": _counts(self.collection("tcp/routers")),
                "services": _counts(self.collection("tcp/services")),
                "middlewares": _counts(self.collection("tcp/middlewares")),
            },
            "udp": {
                "routers": _counts(self.collection("udp/routers")),
                "services": _counts(self.collection("udp/services")),
            },
            "certificates": {"total": 0, "warnings": 0, "errors": 0},
            "features": {
                "tracing": "",
                "metrics": "Prometheus" if metrics and metrics.prometheus else "",
                "accessLog": self.ctx.access_log,
            },
            "providers": self._providers(),
        }

    def _providers(self) -> list[str]:
        providers = self.ctx.static.providers
        out = []
        if providers.file is not None:
            out.append("File")
        if providers.http is not None:
            out.append("HTTP")
        return out

    # -- handlers -----------------------------------------------------------------------

    async def handle_overview(self, request: web.Request) -> web.Response:
        return web.json_response(self.overview())

    async def handle_version(self, request: web.Request) -> web.Response:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.ctx.started))
        return web.json_response(
            {"Version": __version__, "Codename": "meshproxy", "startDate": started}
        )

    async def handle_list(self, request: web.Request) -> web.Response:
        kind = f"{request.match_info['proto']}/{request.match_info['kind']}"
        if kind == "http/services":
            await self.refresh_workers()
        try:
            objects = self.collection(kind)
        except KeyError:
            raise web.HTTPNotFound() from None
        return _paginated(request, _filtered(request, list(objects.values())))

    async def handle_one(self, request: web.Request) -> web.Response:
        kind = f"{request.match_info['proto']}/{request.match_info['kind']}"
        if kind == "http/services":
            await self.refresh_workers()
        try:
            objects = self.collection(kind)
        except KeyError:
            raise web.HTTPNotFound() from None
        name = request.match_info["name"]
        entry = objects.get(name)
        if entry is None:
            noun = request.match_info["kind"].rstrip("s")
            return web.json_response({"message": f"{noun} not found: {name}"}, status=404)
        return web.json_response(entry)

    async def handle_entrypoints(self, request: web.Request) -> web.Response:
        eps = entrypoints(self.ctx.static)
        return _paginated(request, [eps[n] for n in sorted(eps)])

    async def handle_entrypoint(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        entry = entrypoints(self.ctx.static).get(name)
        if entry is None:
            return web.json_response({"message": f"entry point not found: {name}"}, status=404)
        return web.json_response(entry)


def _filtered(request: web.Request, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Traefik's list filters: `search` (in the name), `status`, `serviceName`,
    `middlewareName`; sorted by name."""
    query = request.query
    search = query.get("search", "").lower()
    status = query.get("status", "")
    service = query.get("serviceName", "")
    middleware = query.get("middlewareName", "")
    out = []
    for entry in objects:
        if search and search not in entry["name"].lower():
            continue
        if status and entry.get("status") != status:
            continue
        if service and entry.get("service") != service:
            continue
        if middleware and middleware not in (entry.get("middlewares") or []):
            continue
        out.append(entry)
    return sorted(out, key=lambda e: e["name"])


def _paginated(request: web.Request, objects: list[dict[str, Any]]) -> web.Response:
    """Traefik's pagination: `page` (from 1) and `per_page` (default 100); `X-Next-Page`
    names the next page, 1 on the last one. A page past the end is 400, as in Traefik."""
    try:
        page = int(request.query.get("page", "1"))
        per_page = int(request.query.get("per_page", str(DEFAULT_PER_PAGE)))
    except ValueError:
        return web.json_response({"message": "page and per_page must be integers"}, status=400)
    if page < 1 or per_page < 1:
        return web.json_response({"message": "page and per_page must be >= 1"}, status=400)
    start = (page - 1) * per_page
    if start > 0 and start >= len(objects):
        return web.json_response({"message": "invalid request: page out of range"}, status=400)
    end = start + per_page
    next_page = page + 1 if end < len(objects) else 1
    return web.json_response(objects[start:end], headers={"X-Next-Page": str(next_page)})


def add_routes(app: web.Application, ctx: AdminContext) -> TraefikAPI:
    """Route Traefik's API paths on the admin app (GET, and HEAD through aiohttp)."""
    api = TraefikAPI(ctx)
    app.router.add_get("/api/overview", api.handle_overview)
    app.router.add_get("/api/version", api.handle_version)
    app.router.add_get("/api/entrypoints", api.handle_entrypoints)
    app.router.add_get("/api/entrypoints/{name}", api.handle_entrypoint)
    kinds = "{proto:http|tcp|udp}/{kind:routers|services|middlewares}"
    app.router.add_get(f"/api/{kinds}", api.handle_list)
    app.router.add_get(f"/api/{kinds}/{{name}}", api.handle_one)
    return api
