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
- The `@internal` routers, services and middlewares Traefik lists for the handlers the admin
  entrypoint serves (api, dashboard, ping, prometheus: `internal_objects`), counted in the
  overview as Traefik counts them; the defaults Traefik shows (sticky cookie name and path,
  health check mode, interval, timeout, followRedirects) filled in with the values applied.

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
from meshproxy.balancer.health import DEFAULT_INTERVAL, DEFAULT_TIMEOUT, describe_service
from meshproxy.balancer.sticky import cookie_name
from meshproxy.config.decode import to_builtins
from meshproxy.config.durations import format_duration
from meshproxy.config.static import StaticConfig, parse_address
from meshproxy.rules.http import default_priority
from meshproxy.rules.tcp import tcp_default_priority
from meshproxy.runtime.manager import ConfigManager
from meshproxy.runtime.snapshot import ObjectStatus, RuntimeSnapshot

ADMIN_ENTRYPOINT = "traefik"  # daemon.ADMIN_ENTRYPOINT (not imported: the daemon imports us)
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


def _sticky_defaults(options: dict[str, Any], service: str) -> None:
    """Traefik 3.7 shows the cookie it sets: the derived name when none is configured
    (cookie.GetName, balancer.sticky.cookie_name: the same name meshproxy sets) and path `/`."""
    sticky = options.get("sticky")
    if isinstance(sticky, dict) and isinstance(sticky.get("cookie"), dict):
        cookie = sticky["cookie"]
        if not cookie.get("name"):
            cookie["name"] = cookie_name(None, service)
        cookie.setdefault("path", "/")


def _load_balancer_defaults(lb: dict[str, Any], service: str) -> None:
    lb.setdefault("strategy", "wrr")
    lb.setdefault("passHostHeader", True)
    lb.setdefault("responseForwarding", {"flushInterval": "100ms"})
    _sticky_defaults(lb, service)
    check = lb.get("healthCheck")
    if isinstance(check, dict):
        # Traefik's dynamic.ServerHealthCheck.SetDefaults, the values balancer.health applies
        check.setdefault("mode", "http")
        check.setdefault("interval", format_duration(DEFAULT_INTERVAL))
        check.setdefault("timeout", format_duration(DEFAULT_TIMEOUT))
        check.setdefault("followRedirects", True)


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
            _load_balancer_defaults(entry["loadBalancer"], qualified)
        if isinstance(entry.get("weighted"), dict):
            _sticky_defaults(entry["weighted"], qualified)
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


# Traefik's internal provider (pkg/provider/traefik/internal.go) gives its own handlers these
# priorities (math.MaxInt64, -1, -2), so nothing a user writes outranks them.
_MAX_PRIORITY = 2**63 - 1
INTERNAL = "internal"


def _internal_router(
    name: str, rule: str, priority: int, middlewares: list[str] | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"entryPoints": [ADMIN_ENTRYPOINT]}
    if middlewares:
        entry["middlewares"] = middlewares
    entry.update(
        {
            "service": f"{name}@internal",
            "rule": rule,
            "ruleSyntax": "default",
            "priority": priority,
            "observability": dict(ROUTER_OBSERVABILITY),
            "status": "enabled",
            "using": [ADMIN_ENTRYPOINT],
            "name": f"{name}@internal",
            "provider": INTERNAL,
            "priorityStr": str(priority),
        }
    )
    return entry


def internal_objects(static: StaticConfig) -> dict[str, dict[str, Any]]:
    """The `@internal` routers, services and middlewares Traefik 3.7 lists for the same
    static config (its internal provider), for the handlers meshproxy serves on the admin
    entrypoint (admin.api.build_admin_app): `api@internal` and `dashboard@internal` with
    `api` (Traefik: the router only with `api.insecure`; meshproxy always serves the API on
    the admin entrypoint), the dashboard's `dashboard_redirect` / `dashboard_stripprefix`
    middlewares with `api.dashboard` (meshproxy's `/` redirect is a 302, hence `permanent:
    false`), `ping@internal` with `ping`, `prometheus@internal` with Prometheus metrics.
    Not listed: `noop@internal` (Traefik's target of entrypoint-redirection routers, which
    meshproxy does not generate), `acme-http@internal`, `rest@internal` (not implemented)."""
    routers: dict[str, Any] = {}
    services: dict[str, Any] = {}
    mws: dict[str, Any] = {}

    def service(name: str) -> None:
        qualified = f"{name}@internal"
        services[qualified] = {
            "status": "enabled",
            "usedBy": [qualified],
            "name": qualified,
            "provider": INTERNAL,
        }

    api = static.api
    if api is not None:
        routers["api@internal"] = _internal_router("api", "PathPrefix(`/api`)", _MAX_PRIORITY - 1)
        service("api")
        if api.dashboard:
            chain = ["dashboard_redirect@internal", "dashboard_stripprefix@internal"]
            routers["dashboard@internal"] = _internal_router(
                "dashboard", "PathPrefix(`/`)", _MAX_PRIORITY - 2, chain
            )
            service("dashboard")
            options: list[tuple[str, dict[str, Any]]] = [
                (
                    "redirectRegex",
                    {
                        "regex": r"^(http:\/\/(\[[\w:.]+\]|[\w\._-]+)(:\d+)?)\/$",
                        "replacement": "${1}/dashboard/",
                        "permanent": False,
                    },
                ),
                ("stripPrefix", {"prefixes": ["/dashboard/", "/dashboard"]}),
            ]
            for name, (kind, option) in zip(chain, options, strict=True):
                mws[name] = {
                    kind: option,
                    "status": "enabled",
                    "usedBy": ["dashboard@internal"],
                    "name": name,
                    "provider": INTERNAL,
                    "type": kind.lower(),
                }
    if static.ping is not None:
        routers["ping@internal"] = _internal_router("ping", "PathPrefix(`/ping`)", _MAX_PRIORITY)
        service("ping")
    if static.metrics is not None and static.metrics.prometheus is not None:
        routers["prometheus@internal"] = _internal_router(
            "prometheus", "PathPrefix(`/metrics`)", _MAX_PRIORITY
        )
        service("prometheus")
    return {"http/routers": routers, "http/services": services, "http/middlewares": mws}


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
        """The objects of `kind` ("http/routers"...) by qualified name: the configured ones
        and, for HTTP, the `@internal` ones (`internal_objects`), as Traefik lists them."""
        snapshot = self.ctx.manager.snapshot
        config = snapshot.config
        internal = internal_objects(self.ctx.static).get(kind, {})
        if kind == "http/routers":
            return {**internal, **http_routers(snapshot, self._http_eps())}
        if kind == "http/services":
            return {**internal, **http_services(snapshot, self.worker_servers)}
        if kind == "http/middlewares":
            configured = middlewares(snapshot, config.http.middlewares, snapshot.middlewares)
            return {**internal, **configured}
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
