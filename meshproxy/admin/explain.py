"""`GET /api/explain`: what the proxy would do, right now, with a request or a connection.

HTTP: `method=`, `host=`, `path=` (with its query), `headers=` (repeatable, `Name: value`),
`source=` (client IP), `entrypoint=` (optional when there is one HTTP entrypoint), `tls=true`
(the entrypoint's HTTPS routers). TCP: `sni=`, `alpn=` (comma list), `source=`, `entrypoint=`.

The answer (JSON) has:
- `router`: the router that takes it, found by the live router table itself (the same code
  as traffic), or null;
- `skipped`: every router tried before it (by priority), each with the first matcher of its
  rule that failed (rules.explain walks the rule's AST with reasons);
- `disabled`: routers of the config not in service (with their errors);
- `middlewares`: the chain in order, each with what it would do now: a rateLimit's tokens left
  for this source, a circuitBreaker's state, an ipAllowList's allow/deny for the source, an
  inFlightReq's count, the options of the others;
- `service`: its type and, for a loadBalancer, each server's state and the server the
  balancer would pick next (computed on a copy of the rotation: no pick is consumed;
  p2c/ewma draw at random, so the least loaded up server is given as the likely one);
- `outcome`: one line saying what the client would get.

A malformed query is answered 400 with `{"error": "<what is wrong>"}`: an unknown parameter,
a method that is not an HTTP token, a path that does not start with "/" or has a space or a
control character, a header without ":" or whose value has CR, LF or another control
character (one header per `headers=`), a host with a byte Go's ValidHostHeader refuses (NUL,
space, "/"...), a source that is not an IP address, an unknown entrypoint, both HTTP and TCP
parameters: whatever a real request could not carry (it would be refused with 400).
Traefik has no such endpoint; it is meshproxy's.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from meshproxy.admin.traefik_api import AdminContext
from meshproxy.balancer.strategies import PeakEWMA, PowerOfTwo, RoundRobin
from meshproxy.config.static import parse_address
from meshproxy.http.request import Request
from meshproxy.l4.tls import https_key
from meshproxy.middlewares.ip_strategy import client_ip_getter, parse_ranges
from meshproxy.middlewares.rate_limit import max_delay
from meshproxy.middlewares.source import source_key_getter
from meshproxy.networks import NetworkSet
from meshproxy.rules.explain import explain_http_rule, explain_tcp_rule
from meshproxy.rules.parser import RuleError
from meshproxy.tcp.proxy import TCPConnectionView

HTTP_PARAMS = {"method", "host", "path", "headers", "source", "entrypoint", "tls"}
TCP_PARAMS = {"sni", "alpn", "source", "entrypoint"}
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §5.6.2 token
# Bytes Go's httpguts.ValidHostHeader accepts in a Host (what Traefik applies before routing;
# RFC 3986 §3.2.2 reg-name / IP-literal / port characters): anything else is refused with 400.
_HOST_CHARS = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!$%&'()*+,-.:;=[]_~"
)


def _field_value_problem(value: str) -> str | None:
    """Why `value` cannot be a header field value (RFC 9110 §5.5: no CR, LF, NUL or other
    control character but HTAB; one byte per character), or None when it can."""
    for char in value:
        code = ord(char)
        if code in (0x0D, 0x0A):
            return "contains CR or LF (one header per headers= parameter)"
        if (code < 0x20 and code != 0x09) or code == 0x7F:
            return f"contains the control character {char!r}"
        if code > 0xFF:
            return f"contains {char!r}, not a single byte"
    return None


class ExplainError(ValueError):
    """A malformed explain query: the message says what is wrong (400)."""


def _qualified(name: str, provider: str) -> str:
    return name if "@" in name else f"{name}@{provider}"


def _source(query: Any) -> str:
    source = query.get("source", "127.0.0.1")
    try:
        return str(ipaddress.ip_address(source))
    except ValueError:
        raise ExplainError(f"source={source!r} is not an IP address") from None


class Explainer:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    # -- entrypoints ------------------------------------------------------------------

    def _entrypoint(self, query: Any, udp: bool = False) -> str:
        names = [
            n
            for n, e in self.ctx.static.entry_points.items()
            if n != "traefik" and parse_address(e.address).protocol == ("udp" if udp else "tcp")
        ]
        name = query.get("entrypoint")
        if name is None:
            if len(names) == 1:
                return names[0]
            raise ExplainError(f"entrypoint= is required: one of {', '.join(sorted(names))}")
        if name not in names:
            raise ExplainError(
                f"entrypoint={name!r} is not a traffic entrypoint: one of "
                f"{', '.join(sorted(names)) or '(none)'}"
            )
        return name

    # -- HTTP -------------------------------------------------------------------------

    def http_request(self, query: Any) -> tuple[Request, str]:
        method = query.get("method", "GET")
        if not _TOKEN.match(method):
            raise ExplainError(f"method={method!r} is not an HTTP method token")
        path = query.get("path", "/")
        # a request-target is visible ASCII only (RFC 9112 §3.2, RFC 3986 §2)
        if not path.startswith("/") or any(not "!" <= c <= "~" for c in path):
            raise ExplainError(
                f"path={path!r} must be an ASCII path starting with '/', "
                "without spaces or control characters"
            )
        host = query.get("host", "")
        bad = sorted({c for c in host if c not in _HOST_CHARS})
        if bad:
            raise ExplainError(
                f"host={host!r} is not a host name: {''.join(bad)!r} not allowed in a Host "
                "(a request with it is refused with 400)"
            )
        headers: list[tuple[bytes, bytes]] = []
        # One header per parameter: a CR/LF inside is not a line separator but a value a
        # real request could not carry (it would be refused with 400, RFC 9112 §5).
        for item in query.getall("headers", []):
            name, colon, value = item.partition(":")
            if not colon or not _TOKEN.match(name.strip()):
                raise ExplainError(f"headers={item!r}: expected 'Name: value'")
            problem = _field_value_problem(value)
            if problem is not None:
                raise ExplainError(
                    f"headers={item!r}: the value of {name.strip()} {problem}; "
                    "a request with it is refused with 400"
                )
            headers.append((name.strip().lower().encode(), value.strip(" \t").encode("latin-1")))
        tls = query.get("tls", "false").lower()
        if tls not in ("true", "false"):
            raise ExplainError(f"tls={tls!r}: expected true or false")
        entrypoint = self._entrypoint(query)
        source = _source(query)  # its own message, outside the path's try below
        headers.insert(0, (b"host", host.encode()))
        try:
            request = Request(
                method,
                path.encode("latin-1"),
                headers,
                host.encode(),
                source,
                0,
                scheme="https" if tls == "true" else "http",
            )
        except ValueError as exc:
            raise ExplainError(f"path={path!r}: {exc}") from None
        return request, https_key(entrypoint) if tls == "true" else entrypoint

    def explain_http(self, query: Any) -> dict[str, Any]:
        request, table_key = self.http_request(query)
        snapshot = self.ctx.manager.snapshot
        config = snapshot.config
        core = self.ctx.static.core
        default_syntax = core.default_rule_syntax if core else None
        table = snapshot.http_tables.get(table_key)
        chosen = table.match(request) if table is not None else None
        skipped = []
        for route in table.routes if table is not None else ():
            if route is chosen:
                break
            definition = config.http.routers.get(route.name.rpartition("@")[0])
            rule = definition.rule if definition else ""
            try:
                verdict = explain_http_rule(
                    rule or "",
                    request,
                    definition.rule_syntax if definition else None,
                    default_syntax,
                )
                reason = verdict.reason or "matched, but an earlier router was taken"
            except RuleError as exc:
                reason = f"rule does not parse: {exc}"
            skipped.append(
                {"router": route.name, "priority": route.priority, "rule": rule, "reason": reason}
            )
        out: dict[str, Any] = {
            "kind": "http",
            "request": {
                "method": request.method,
                "host": request.host,
                "path": request.path,
                "query": request.query,
                "source": request.client_ip,
                "entrypoint": table_key.partition("#")[0],
                "tls": table_key.endswith("#tls"),
            },
            "router": chosen.name if chosen else None,
            "skipped": skipped,
            "disabled": self._disabled(snapshot.routers),
            "generation": snapshot.generation,
        }
        if chosen is None:
            out["middlewares"] = []
            out["service"] = None
            out["outcome"] = "404 page not found: no router matches (why: no_route)"
            if snapshot.generation == 0:
                out["outcome"] += "; no configuration has been applied yet"
            return out
        definition = config.http.routers.get(chosen.name.rpartition("@")[0])
        out["rule"] = definition.rule if definition else ""
        out["priority"] = chosen.priority
        chain = self._chain(chosen.name, definition.middlewares if definition else [], request)
        out["middlewares"] = chain
        out["service"] = self._service(chosen.service, headers=request.headers)
        refusing = next((m for m in chain if m.get("refuses")), None)
        if refusing is not None:
            out["outcome"] = f"answered by middleware {refusing['name']}: {refusing['now']}"
        elif out["service"].get("server"):
            out["outcome"] = f"proxied to {out['service']['server']}"
        else:
            out["outcome"] = out["service"].get("why") or "served by the service"
        return out

    def _disabled(self, statuses: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"router": name, "errors": list(status.errors)}
            for name, status in sorted(statuses.items())
            if status.status == "disabled"
        ]

    def _chain(self, router: str, names: list[str], request: Request) -> list[dict[str, Any]]:
        snapshot = self.ctx.manager.snapshot
        provider = snapshot.provider
        out: list[dict[str, Any]] = []
        for reference in names:
            qualified = _qualified(reference, provider)
            definition = snapshot.config.http.middlewares.get(qualified.rpartition("@")[0])
            if definition is None:
                out.append({"name": qualified, "type": None, "now": "does not exist"})
                continue
            kinds = [k for k in definition.__struct_fields__ if getattr(definition, k) is not None]
            kind = kinds[0] if kinds else ""
            options = getattr(definition, kind) if kind else None
            if kind == "chain" and options is not None:
                out.append({"name": qualified, "type": "chain", "now": "runs its middlewares:"})
                out.extend(self._chain(router, options.middlewares, request))
                continue
            entry: dict[str, Any] = {"name": qualified, "type": _camel(kind)}
            entry.update(self._middleware_now(router, qualified, kind, options, request))
            out.append(entry)
        return out

    def _state(self, router: str, middleware: str) -> Any:
        state = self.ctx.state
        if state is None:
            return None
        kept = state.middlewares.objects.get((router, middleware))
        return kept[1] if kept else None

    def _middleware_now(
        self, router: str, name: str, kind: str, options: Any, request: Request
    ) -> dict[str, Any]:
        state = self._state(router, name)
        if kind == "rate_limit" and state is not None:
            source = source_key_getter(options.source_criterion, "sourceCriterion")(request)
            # RateLimiterState in one process, node.shared_state.SharedLimiter in a worker
            # (the node's buckets): both answer tokens() without taking one.
            tokens = float(state.tokens(source, time.monotonic()))
            info: dict[str, Any] = {
                "source": source,
                "tokensLeft": round(tokens, 3),
                "burst": int(state.burst),
                "ratePerSecond": state.rate,
            }
            if tokens >= 1:
                info["now"] = f"pass ({tokens:.2f} of {int(state.burst)} tokens left for {source})"
            else:
                wait = (1.0 - tokens) / state.rate
                if wait <= max_delay(state.rate):
                    info["now"] = f"hold {wait * 1000:.0f} ms, then pass"
                else:
                    info["now"] = f"answer 429 (next token in {wait:.2f} s; why: rate_limited)"
                    info["refuses"] = True
            return info
        if kind == "circuit_breaker" and state is not None:
            info = {"state": state.state, "expression": options.expression}
            if state.state == "standby":
                info["now"] = "pass (closed: watching the expression)"
            elif state.state == "tripped":
                code = options.response_code or 503
                info["now"] = f"answer {code} (open; why: breaker_open)"
                info["refuses"] = True
            else:
                info["now"] = "let some requests through (recovering)"
            return info
        if kind in ("ip_allow_list", "ip_white_list"):
            networks = NetworkSet(parse_ranges(options.source_range or [], "sourceRange"))
            ip = client_ip_getter(options.ip_strategy, "ipStrategy")(request)
            if networks.contains(ip):
                return {"clientIP": ip, "now": f"allow {ip}"}
            code = getattr(options, "reject_status_code", None) or 403
            return {
                "clientIP": ip,
                "now": f"deny {ip}: answer {code} (why: denied)",
                "refuses": True,
            }
        if kind == "in_flight_req" and isinstance(state, dict):
            source = source_key_getter(options.source_criterion, "sourceCriterion")(request)
            count = state.get(source, 0)
            info = {"source": source, "inFlight": count, "amount": options.amount}
            if count >= options.amount:
                info["now"] = f"answer 429 ({count} in flight; why: rate_limited)"
                info["refuses"] = True
            else:
                info["now"] = f"pass ({count} of {options.amount} in flight for {source})"
            return info
        from meshproxy.config.decode import to_builtins

        return {"now": "applies its options", "options": to_builtins(options)}

    # -- services -----------------------------------------------------------------------

    def _service(
        self, qualified: str, depth: int = 0, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> dict[str, Any]:
        snapshot = self.ctx.manager.snapshot
        definition = snapshot.config.http.services.get(qualified.rpartition("@")[0])
        status = snapshot.services.get(qualified)
        out: dict[str, Any] = {"name": qualified}
        if status is not None and status.errors:
            out["errors"] = list(status.errors)
        if definition is None:
            out["type"] = None
            return out
        if definition.weighted is not None:
            out["type"] = "weighted"
            children = definition.weighted.services or []
            out["children"] = [
                {"name": _qualified(c.name, snapshot.provider), "weight": c.weight}
                for c in children
            ]
            out["why"] = "the weighted rotation picks one child, then the child its server"
            service = snapshot.service_objects.get(qualified)
            rotation = getattr(service, "balancer", None)
            if rotation is not None and depth < 8:
                up = getattr(service, "children_up", None) or [True] * len(children)
                pinned = _sticky_pick(service, up, headers, out)
                # else a copy of the rotation picks: no pick consumed
                picked = pinned if pinned >= 0 else copy.deepcopy(rotation).pick()
                if picked is not None and 0 <= picked < len(children):
                    child = self._service(
                        _qualified(children[picked].name, snapshot.provider), depth + 1, headers
                    )
                    out["next"] = child
                    out["server"] = child.get("server")
                    if child.get("why") and not child.get("server"):
                        out["why"] = child["why"]
            return out
        if definition.mirroring is not None:
            out["type"] = "mirroring"
            out["main"] = _qualified(definition.mirroring.service, snapshot.provider)
            out["why"] = f"served by {out['main']}, copies sent to the mirrors"
            return out
        if definition.failover is not None:
            out["type"] = "failover"
            out["why"] = "served by the main service, or the fallback when it is down"
            return out
        out["type"] = "loadBalancer"
        service = snapshot.service_objects.get(qualified)
        if service is None:
            out["why"] = "the service is not in service (see errors)"
            return out
        out.update(_peek(service, headers))
        return out

    # -- TCP ----------------------------------------------------------------------------

    def explain_tcp(self, query: Any) -> dict[str, Any]:
        sni = query.get("sni", "").lower()
        if not sni.isascii() or any(c in sni for c in " /\r\n"):
            raise ExplainError(f"sni={sni!r} is not a server name")
        alpn = [p.strip() for p in query.get("alpn", "").split(",") if p.strip()]
        entrypoint = self._entrypoint(query)
        view = TCPConnectionView(_source(query), sni, alpn)
        snapshot = self.ctx.manager.snapshot
        table = snapshot.l4_tables.get(entrypoint)
        tls = "sni" in query or "alpn" in query
        routes = () if table is None else (table.tls_routes if tls else table.plain)
        chosen: Any = None
        if table is not None:
            chosen = table.route_hello(view) if tls else table.match_plain(view)
        skipped = []
        config = snapshot.config
        for route in routes:
            if route is chosen:
                break
            definition = config.tcp.routers.get(route.name.rpartition("@")[0])
            rule = definition.rule if definition else ""
            try:
                verdict = explain_tcp_rule(
                    rule or "", view, getattr(definition, "rule_syntax", None)
                )
                reason = verdict.reason or "matched, but a more specific router was taken"
            except RuleError as exc:
                reason = f"rule does not parse: {exc}"
            skipped.append(
                {"router": route.name, "priority": route.priority, "rule": rule, "reason": reason}
            )
        out: dict[str, Any] = {
            "kind": "tcp",
            "request": {
                "sni": sni,
                "alpn": alpn,
                "source": view.client_ip,
                "entrypoint": entrypoint,
                "tls": tls,
            },
            "skipped": skipped,
            "disabled": self._disabled(snapshot.tcp_routers),
            "generation": snapshot.generation,
        }
        if isinstance(chosen, str):
            out["router"] = None
            out["outcome"] = (
                f"TLS terminated with options {chosen!r}, then routed by the HTTPS routers "
                "(explain with tls=true)"
            )
            return out
        if chosen is None:
            out["router"] = None
            out["outcome"] = (
                "no TCP router matches: the connection goes to the HTTP routers"
                if not tls
                else "no router matches: the connection is closed"
            )
            return out
        out["router"] = chosen.name
        servers = [getattr(s, "address", str(s)) for s in chosen.target.servers()]
        preview = copy.deepcopy(chosen.target.balancer)
        nxt = preview.pick()
        out["service"] = {"name": chosen.target.name, "servers": servers}
        if nxt is not None and hasattr(nxt, "address"):
            out["service"]["server"] = nxt.address
        out["outcome"] = (
            f"relayed to {out['service'].get('server') or 'one of ' + ', '.join(servers)}"
        )
        return out

    # -- handler ------------------------------------------------------------------------

    def explain(self, query: Any) -> dict[str, Any]:
        """The answer to one explain query (a MultiDict); ExplainError if it is malformed."""
        unknown = sorted(set(query) - HTTP_PARAMS - TCP_PARAMS)
        if unknown:
            raise ExplainError(
                f"unknown parameter(s) {', '.join(unknown)}: HTTP takes "
                f"{', '.join(sorted(HTTP_PARAMS))}; TCP takes {', '.join(sorted(TCP_PARAMS))}"
            )
        tcp = bool({"sni", "alpn"} & set(query))
        http = bool({"method", "host", "path", "headers", "tls"} & set(query))
        if tcp and http:
            raise ExplainError(
                "give HTTP parameters (method, host, path...) or TCP ones (sni, alpn), not both"
            )
        for key in set(query):
            if len(query.getall(key)) > 1 and key != "headers":
                raise ExplainError(f"{key}= is given more than once")
        return self.explain_tcp(query) if tcp else self.explain_http(query)

    async def handle(self, request: web.Request) -> web.Response:
        from meshproxy.admin.workers import ask_workers
        from meshproxy.node.supervisor import WorkerRequestFailed

        # With worker processes, the live state is theirs: the first worker answers.
        try:
            answers = await ask_workers(self.ctx.daemon, "explain", list(request.query.items()))
        except WorkerRequestFailed as exc:  # a bug: the worker logged it and keeps serving
            return web.json_response({"error": f"internal error: {exc}"}, status=500)
        if answers:
            body = answers[0]
            if "error" in body:
                return web.json_response(body, status=400)
            return web.json_response(body)
        try:
            body = self.explain(request.query)
        except ExplainError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(body)


def _camel(kind: str) -> str:
    head, *rest = kind.split("_")
    return head + "".join(part.title() for part in rest)


def _sticky_pick(
    service: Any, up: Sequence[bool], headers: Sequence[tuple[bytes, bytes]], out: dict[str, Any]
) -> int:
    """The child index the request's sticky cookie pins when that child is up (as
    Traefik's sticky handler and WeightedService.serve / LoadBalancerService do), else -1;
    says which in out["sticky"]."""
    sticky = getattr(service, "sticky", None)
    if sticky is None:
        return -1
    index = sticky.child_for(headers)
    if index < 0:
        out["sticky"] = f"no valid {sticky.name} cookie: balanced, then pinned by Set-Cookie"
        return -1
    if not up[index]:
        out["sticky"] = f"the {sticky.name} cookie pins a child that is down: balanced, re-pinned"
        return -1
    out["sticky"] = f"pinned by the {sticky.name} cookie"
    return index


def _peek(service: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    """The servers of a LoadBalancerService and the one it would pick next, without moving
    its rotation (wrr: a copy of it picks), or the one the request's sticky cookie pins.
    Reads the balancer's internals on purpose: this is the only reader, off the hot path."""
    states = service.states
    servers = [
        {
            "url": s.url,
            "up": s.available,
            "inFlight": s.in_flight,
            "latencyEstimateMs": round(s.rtt * 1000.0, 3) if s.stamp >= 0 else None,
        }
        for s in states
    ]
    strategy = service.strategy
    out: dict[str, Any] = {"strategy": strategy.name, "servers": servers}
    up = [i for i, s in enumerate(states) if s.available]
    if not up:
        out["server"] = None
        out["why"] = "503 no available server: every server is down (why: no_healthy_server)"
        return out
    index = _sticky_pick(service, [s.available for s in states], headers, out)
    if index >= 0:
        out["pick"] = "the server the sticky cookie pins"
    elif isinstance(strategy, RoundRobin):
        preview = copy.deepcopy(strategy._wrr)
        picked = preview.pick()
        index = -1 if picked is None else picked
        out["pick"] = "next in the weighted round robin"
    elif isinstance(strategy, PeakEWMA):
        now = strategy.clock()  # type: ignore[operator]  # the balancer's own clock
        index = min(up, key=lambda i: strategy.cost(i, now))
        out["pick"] = "random two, lower peak-EWMA cost: the lowest-cost server is the likely one"
    elif isinstance(strategy, PowerOfTwo):
        index = min(up, key=lambda i: states[i].in_flight)
        out["pick"] = "random two, fewer in flight: the least loaded server is the likely one"
    out["server"] = states[index].url if index >= 0 else None
    return out


def add_routes(app: web.Application, ctx: AdminContext) -> Explainer:
    explainer = Explainer(ctx)
    app.router.add_get("/api/explain", explainer.handle)
    return explainer


# -- the `meshproxy explain` command -----------------------------------------------------


def render_tree(answer: dict[str, Any]) -> str:
    """An explain answer as a readable tree (the CLI's output)."""
    request = answer.get("request", {})
    lines = []
    if answer.get("kind") == "tcp":
        lines.append(
            f"TCP connection sni={request.get('sni') or '-'} alpn="
            f"{','.join(request.get('alpn', [])) or '-'} from {request.get('source')} "
            f"on {request.get('entrypoint')}"
        )
    else:
        target = request.get("path", "/") + (f"?{request['query']}" if request.get("query") else "")
        scheme = "https" if request.get("tls") else "http"
        lines.append(
            f"{request.get('method')} {scheme}://{request.get('host') or '-'}{target} "
            f"from {request.get('source')} on {request.get('entrypoint')}"
        )
    for skipped in answer.get("skipped", []):
        lines.append(f"├─ skipped {skipped['router']} (priority {skipped['priority']})")
        lines.append(f"│    {skipped['reason']}")
    router = answer.get("router")
    if router is None:
        lines.append("└─ no router matches")
    else:
        lines.append(f"├─ router {router} (priority {answer.get('priority', '-')})")
        if answer.get("rule"):
            lines.append(f"│    rule {answer['rule']}")
        for middleware in answer.get("middlewares", []):
            lines.append(f"├─ middleware {middleware['name']} ({middleware.get('type')})")
            lines.append(f"│    {middleware.get('now', '')}")
        service = answer.get("service") or {}
        if service:
            lines.append(f"├─ service {service.get('name')} ({service.get('type', '-')})")
            for server in service.get("servers", []):
                if isinstance(server, dict):
                    state = "up" if server.get("up") else "DOWN"
                    latency = server.get("latencyEstimateMs")
                    extra = f", ~{latency} ms" if latency is not None else ""
                    lines.append(
                        f"│    {server['url']}: {state}, {server.get('inFlight', 0)} in flight"
                        f"{extra}"
                    )
                else:
                    lines.append(f"│    {server}")
            child = service.get("next")
            if service.get("sticky"):
                lines.append(f"│    sticky: {service['sticky']}")
            if child:
                lines.append(f"│    next child: {child.get('name')} ({child.get('type', '-')})")
            if service.get("server"):
                lines.append(f"│    next pick: {service['server']}")
    for disabled in answer.get("disabled", []):
        lines.append(f"│  (disabled: {disabled['router']}: {'; '.join(disabled['errors'])})")
    lines.append(f"=> {answer.get('outcome', '')}")
    return "\n".join(lines)


def cmd_explain(argv: list[str]) -> int:
    """`meshproxy explain`: ask a running proxy's /api/explain and print the tree. Exit
    status 0 when answered, 2 for a query the proxy refused (400, its message printed), 1
    when the admin API cannot be reached."""
    import argparse
    import json
    import sys
    import urllib.error
    import urllib.parse
    import urllib.request

    parser = argparse.ArgumentParser(
        prog="meshproxy explain",
        description="which router, middlewares, service and server a request would get",
    )
    parser.add_argument("--admin", default="http://127.0.0.1:8080", help="admin API base URL")
    parser.add_argument("--method")
    parser.add_argument("--host")
    parser.add_argument("--path")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--source", help="client IP")
    parser.add_argument("--entrypoint")
    parser.add_argument("--tls", action="store_true", help="the entrypoint's HTTPS routers")
    parser.add_argument("--sni", help="TCP: the TLS server name")
    parser.add_argument("--alpn", help="TCP: ALPN protocols, comma separated")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    args = parser.parse_args(argv)
    params: list[tuple[str, str]] = []
    for key in ("method", "host", "path", "source", "entrypoint", "sni", "alpn"):
        value = getattr(args, key)
        if value is not None:
            params.append((key, value))
    params += [("headers", h) for h in args.header]
    if args.tls:
        params.append(("tls", "true"))
    url = args.admin.rstrip("/") + "/api/explain?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            message = json.loads(body).get("error", body.decode(errors="replace"))
        except ValueError:
            message = body.decode(errors="replace")
        print(f"meshproxy explain: {exc.code}: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"meshproxy explain: cannot reach {args.admin}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2) if args.json else render_tree(answer))
    return 0
