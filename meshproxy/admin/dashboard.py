"""The dashboard: one server-rendered page on the admin entrypoint, `/dashboard/`.

No build step: the HTML is rendered here from the same views as the Traefik-shaped API
(admin.traefik_api), with a hand-written stylesheet and a small script from admin/static/
(served at /dashboard/static/). The page shows the entrypoints, the HTTP/TCP/UDP routers (status,
errors), the services with each server's health, in-flight requests and latency estimate,
the middlewares, the live request and error rates per service, the last configuration error,
and the explain form. Without a configuration yet, it says so.

Refreshing: the script fetches `/dashboard/live` (the same sections, rendered again) every
2 seconds and swaps them in; rates are computed here from the request counters of
observability.metrics (`RequestMetrics.service`: requests per service and status code) as the
change between two samples at least one second apart, over the last ten seconds at most.
Errors are 5xx answers, counting the 503s of a service with no server up (which reach no
server: `meshproxy_exchange_failures_total{why="no_healthy_server"}`). The explain form calls
`/dashboard/explain` (the same query as /api/explain), which answers the text tree of
`meshproxy explain`.
"""

from __future__ import annotations

import html
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web

from meshproxy.admin.explain import Explainer, ExplainError, render_tree
from meshproxy.admin.traefik_api import AdminContext, TraefikAPI, entrypoints

STATIC = Path(__file__).parent / "static"
RATE_WINDOW = 10.0  # seconds of samples kept for the rates
REFRESH_MS = 2000


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


class Rates:
    """Per-service request and error rates from the metrics' cumulative counters."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()

    def _totals(self) -> dict[str, tuple[int, int]]:
        totals: dict[str, tuple[int, int]] = {}
        table = getattr(self.metrics, "service", None) or {}
        for (status, _method, _protocol, service), hist in list(table.items()):
            requests, errors = totals.get(service, (0, 0))
            totals[service] = (requests + hist.count, errors + (hist.count if status >= 500 else 0))
        # 503s of a service with no server up never reach a server: no service series
        failures = getattr(self.metrics, "failures", None) or {}
        for (_entrypoint, service, why), count in list(failures.items()):
            if why == "no_healthy_server":
                requests, errors = totals.get(service, (0, 0))
                totals[service] = (requests + count, errors + count)
        return totals

    def sample(
        self, totals: dict[str, tuple[int, int]] | None = None
    ) -> dict[str, tuple[float, float]]:
        """service -> (requests/s, errors/s) since the oldest sample of the window; `totals`
        (cumulative requests, errors per service) from the workers' summed metrics, else
        this process's counters."""
        now = time.monotonic()
        totals = self._totals() if totals is None else totals
        samples = self.samples
        while samples and now - samples[0][0] > RATE_WINDOW:
            samples.popleft()
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, totals))
        then, old = samples[0]
        elapsed = now - then
        if elapsed < 0.5:
            return {name: (0.0, 0.0) for name in totals}
        out = {}
        for name, (requests, errors) in totals.items():
            old_requests, old_errors = old.get(name, (0, 0))
            out[name] = ((requests - old_requests) / elapsed, (errors - old_errors) / elapsed)
        return out


_SERVICE_SERIES = re.compile(r"^traefik_service_requests_total\{([^}]*)\} (\S+)$", re.M)
_FAILURE_SERIES = re.compile(r"^meshproxy_exchange_failures_total\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def totals_from_text(text: str) -> dict[str, tuple[int, int]]:
    """Cumulative (requests, 5xx) per service from a Prometheus exposition (the workers'
    metrics summed by meshproxy.node.metrics)."""
    totals: dict[str, tuple[int, int]] = {}
    for labels, value in _FAILURE_SERIES.findall(text):
        fields = dict(_LABEL.findall(labels))
        if fields.get("why") == "no_healthy_server":  # 503s that never reached a server
            count = int(float(value))
            requests, errors = totals.get(fields.get("service", ""), (0, 0))
            totals[fields.get("service", "")] = (requests + count, errors + count)
    for labels, value in _SERVICE_SERIES.findall(text):
        fields = dict(_LABEL.findall(labels))
        service = fields.get("service", "")
        count = int(float(value))
        requests, errors = totals.get(service, (0, 0))
        failed = count if fields.get("code", "").startswith("5") else 0
        totals[service] = (requests + count, errors + failed)
    return totals


class Dashboard:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.api = TraefikAPI(ctx)
        self.explainer = Explainer(ctx)
        self.rates = Rates(ctx.metrics)
        self.totals: dict[str, tuple[int, int]] | None = None

    async def prepare(self) -> None:
        """With worker processes: their per-server state and summed request counters."""
        from meshproxy.admin.workers import supervisor_of

        await self.api.refresh_workers()
        daemon = self.ctx.daemon
        if supervisor_of(daemon) is not None:
            self.totals = totals_from_text((await daemon.admin_metrics()).decode())

    # -- sections -------------------------------------------------------------------------

    def live(self) -> str:
        """Everything that changes: rendered for the page and for each refresh."""
        manager = self.ctx.manager
        snapshot = manager.snapshot
        parts = []
        if snapshot.generation == 0:
            parts.append(
                '<div class="banner warn" id="no-config">No configuration yet: the proxy '
                "is waiting for its provider. Nothing is routed until one is applied.</div>"
            )
        error = manager.last_error
        if error:
            parts.append(
                '<div class="banner error" id="last-error"><b>Last configuration error</b> '
                f"(the previous configuration keeps serving): {_e(error)}</div>"
            )
        else:
            parts.append('<div class="banner ok" id="last-error">No configuration error.</div>')
        parts.append(
            f'<p class="meta">Configuration generation {snapshot.generation} · provider '
            f"{_e(snapshot.provider)} · updated {_e(time.strftime('%H:%M:%S'))}</p>"
        )
        parts.append(self._overview())
        parts.append(self._services())
        parts.append(self._routers())
        parts.append(self._middlewares())
        parts.append(self._l4())
        return "\n".join(parts)

    def _overview(self) -> str:
        overview = self.api.overview()
        cells = []
        for proto in ("http", "tcp", "udp"):
            for kind, count in overview[proto].items():
                warn = f' <span class="warn">{count["warnings"]} warn</span>' * bool(
                    count["warnings"]
                )
                err = f' <span class="bad">{count["errors"]} err</span>' * bool(count["errors"])
                cells.append(
                    f'<div class="card"><div class="n">{count["total"]}</div>'
                    f"<div>{proto.upper()} {kind}{warn}{err}</div></div>"
                )
        eps = entrypoints(self.ctx.static)
        rows = "".join(
            f"<tr><td>{_e(name)}</td><td>{_e(ep.get('address', ''))}</td></tr>"
            for name, ep in sorted(eps.items())
        )
        return (
            f'<section><h2>Overview</h2><div class="cards">{"".join(cells)}</div>'
            f'<h3>Entrypoints</h3><table id="entrypoints"><tr><th>name</th><th>address</th>'
            f"</tr>{rows}</table></section>"
        )

    def _services(self) -> str:
        services = self.api.collection("http/services")
        rates = self.rates.sample(self.totals)
        rows = []
        for name in sorted(services):
            service = services[name]
            rps, eps = rates.get(name, (0.0, 0.0))
            servers = service.get("meshproxyServers") or []
            if servers:
                health = "<br>".join(
                    f'<span class="{"up" if s["up"] else "down"}">'
                    f"{'UP' if s['up'] else 'DOWN'}</span> {_e(s['url'])} · "
                    f"{s['inFlight']} in flight"
                    + (
                        f" · ~{s['latencyEstimateMs']} ms"
                        if s.get("latencyEstimateMs") is not None
                        else ""
                    )
                    + (f' <span class="why">{_e(s["why"])}</span>' if s.get("why") else "")
                    for s in servers
                )
            else:
                health = _e(service.get("type", ""))
            rows.append(
                f'<tr data-service="{_e(name)}"><td>{_e(name)}</td>'
                f"<td>{self._status(service)}</td><td>{health}</td>"
                f'<td class="num rate">{rps:.1f}</td>'
                f'<td class="num {"bad" if eps else ""}">{eps:.1f}</td></tr>'
            )
        return (
            '<section><h2>HTTP services</h2><table id="services"><tr><th>name</th>'
            "<th>status</th><th>servers</th><th>req/s</th><th>5xx/s</th></tr>"
            f"{''.join(rows) or '<tr><td colspan=5>none</td></tr>'}</table></section>"
        )

    def _status(self, entry: dict[str, Any]) -> str:
        status = entry.get("status", "")
        css = {"enabled": "up", "warning": "warn", "disabled": "down"}.get(status, "")
        errors = "".join(f'<div class="why">{_e(e)}</div>' for e in entry.get("error", []))
        return f'<span class="{css}">{_e(status)}</span>{errors}'

    def _routers(self) -> str:
        routers = self.api.collection("http/routers")
        rows = "".join(
            f"<tr><td>{_e(name)}</td><td>{self._status(r)}</td><td><code>{_e(r.get('rule'))}"
            f"</code></td><td>{_e(r.get('priority'))}</td>"
            f"<td>{_e(', '.join(r.get('entryPoints', [])))}</td>"
            f"<td>{_e(', '.join(r.get('middlewares', [])))}</td><td>{_e(r.get('service'))}</td>"
            "</tr>"
            for name, r in sorted(routers.items())
        )
        return (
            '<section><h2>HTTP routers</h2><table id="routers"><tr><th>name</th><th>status</th>'
            "<th>rule</th><th>priority</th><th>entrypoints</th><th>middlewares</th>"
            f"<th>service</th></tr>{rows or '<tr><td colspan=7>none</td></tr>'}</table></section>"
        )

    def _middlewares(self) -> str:
        middlewares = self.api.collection("http/middlewares")
        rows = "".join(
            f"<tr><td>{_e(name)}</td><td>{_e(m.get('type', ''))}</td><td>{self._status(m)}</td>"
            f"<td>{_e(', '.join(m.get('usedBy', [])))}</td></tr>"
            for name, m in sorted(middlewares.items())
        )
        return (
            '<section><h2>Middlewares</h2><table id="middlewares"><tr><th>name</th><th>type</th>'
            f"<th>status</th><th>used by</th></tr>{rows or '<tr><td colspan=4>none</td></tr>'}"
            "</table></section>"
        )

    def _l4(self) -> str:
        rows = []
        for kind in ("tcp/routers", "tcp/services", "udp/routers", "udp/services"):
            for name, entry in sorted(self.api.collection(kind).items()):
                detail = entry.get("rule") or ", ".join(
                    f"{_e(k)} {_e(v)}" for k, v in (entry.get("serverStatus") or {}).items()
                )
                rows.append(
                    f"<tr><td>{_e(kind)}</td><td>{_e(name)}</td><td>{self._status(entry)}</td>"
                    f"<td>{_e(detail) if entry.get('rule') else detail}</td></tr>"
                )
        if not rows:
            return ""
        return (
            '<section><h2>TCP and UDP</h2><table id="l4"><tr><th>kind</th><th>name</th>'
            f"<th>status</th><th>rule / servers</th></tr>{''.join(rows)}</table></section>"
        )

    def page(self) -> str:
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>meshproxy dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
</head><body data-refresh="{REFRESH_MS}">
<header><h1>meshproxy</h1><span>live view of the proxy · refreshes every
{REFRESH_MS // 1000} s</span></header>
<main>
<div id="live">{self.live()}</div>
<section id="explain"><h2>Explain a request</h2>
<form id="explain-form" action="/dashboard/explain" method="get">
<label>method <input name="method" value="GET" size="6"></label>
<label>host <input name="host" placeholder="shop.example"></label>
<label>path <input name="path" value="/" size="24"></label>
<label>header <input name="headers" placeholder="Name: value"></label>
<label>source <input name="source" value="127.0.0.1" size="14"></label>
<label>entrypoint <input name="entrypoint" size="8"></label>
<button type="submit">Explain</button>
</form>
<pre id="explain-result"></pre>
</section>
</main>
<script src="/dashboard/static/dashboard.js"></script>
</body></html>"""

    # -- handlers -------------------------------------------------------------------------

    async def handle_page(self, request: web.Request) -> web.Response:
        await self.prepare()
        return web.Response(text=self.page(), content_type="text/html")

    async def handle_live(self, request: web.Request) -> web.Response:
        await self.prepare()
        return web.Response(
            text=self.live(), content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    async def handle_explain(self, request: web.Request) -> web.Response:
        query = request.query
        # the form sends every field, empty ones too: drop them (explain's defaults apply)
        params = {k: v for k, v in query.items() if v.strip()}
        from meshproxy.admin.workers import ask_workers

        answers = await ask_workers(self.ctx.daemon, "explain", list(params.items()))
        if answers:
            if "error" in answers[0]:
                return web.Response(text=f"error: {answers[0]['error']}", status=400)
            return web.Response(text=render_tree(answers[0]))
        try:
            answer = self.explainer.explain_http(_Query(params))
        except ExplainError as exc:
            return web.Response(text=f"error: {exc}", status=400)
        return web.Response(text=render_tree(answer))

    async def handle_root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard/")


class _Query(dict[str, str]):
    """A plain dict with MultiDict's getall, for Explainer."""

    def getall(self, key: str, default: list[str] | None = None) -> list[str]:
        return [self[key]] if key in self else (default if default is not None else [])


def add_routes(app: web.Application, ctx: AdminContext) -> Dashboard:
    """The dashboard on the admin app: `/` redirects to `/dashboard/`, as in Traefik."""
    dashboard = Dashboard(ctx)
    app.router.add_get("/", dashboard.handle_root)
    app.router.add_get("/dashboard", dashboard.handle_root)
    app.router.add_get("/dashboard/", dashboard.handle_page)
    app.router.add_get("/dashboard/live", dashboard.handle_live)
    app.router.add_get("/dashboard/explain", dashboard.handle_explain)
    app.router.add_static("/dashboard/static/", STATIC)
    return dashboard
