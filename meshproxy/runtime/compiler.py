"""Compile a DynamicConfig into a RuntimeSnapshot.

Errors are per object, as in Traefik: a broken service, middleware or rule disables only the
routers that depend on it, and every problem is recorded on the object it belongs to.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec

from meshproxy.balancer.building import link_mirroring, link_weighted, load_balancer_service
from meshproxy.balancer.http_services import (
    MirroringService,
    WeightedService,
)
from meshproxy.balancer.sticky import Sticky
from meshproxy.config.dynamic import (
    DynamicConfig,
    Middleware,
    Router,
    RouterTLS,
    ServersTransport,
    Service,
)
from meshproxy.http.exchange import Handler
from meshproxy.http.transports import TransportError, http_transport
from meshproxy.http.upstream import ServerTarget, TransportSettings
from meshproxy.l4.certificates import store_for
from meshproxy.l4.tls import (
    HTTPSHosts,
    L4Table,
    h2_available,
    https_domains,
    https_key,
    qualify_options,
)
from meshproxy.l4.udp import UDPRoute, UDPTarget
from meshproxy.middlewares.base import BuildContext, MiddlewareConfigError, MiddlewareState
from meshproxy.middlewares.ip_strategy import parse_ranges
from meshproxy.middlewares.registry import MIDDLEWARE_BUILDERS
from meshproxy.observability.metrics import RequestMetrics
from meshproxy.rules.http import compile_http_rule, default_priority
from meshproxy.rules.parser import RuleError
from meshproxy.rules.tcp import compile_tcp_rule, tcp_default_priority
from meshproxy.runtime.snapshot import ObjectStatus, Route, RouterTable, RuntimeSnapshot
from meshproxy.runtime.state import POOL_KINDS, RuntimeState
from meshproxy.tcp.proxy import TCPRoute, TCPRouteTLS, allow_list_check
from meshproxy.tcp.services import (
    InFlightConn,
    TCPService,
    TCPTransport,
    load_balancer_transport,
    make_server,
    transport_from_dynamic,
)

log = logging.getLogger("meshproxy.runtime")

MAX_PRIORITY = (1 << 63) - 1 - 1000


@dataclass
class CompileContext:
    """What the compiler needs from the static configuration and the process."""

    provider: str
    http_entrypoints: list[str]
    udp_entrypoints: list[str]
    default_entrypoints: list[str]
    transport: TransportSettings
    metrics: RequestMetrics
    state: RuntimeState
    generation: int = 0
    internal_services: dict[str, Handler] = field(default_factory=dict)
    # static `core.defaultRuleSyntax` ("v2"/"v3"; None: detect Traefik Mesh's v2 rules)
    default_rule_syntax: str | None = None
    # the static `tcpServersTransport`: TCP services' default transport (tcp/services.py)
    tcp_transport: TCPTransport = field(default_factory=TCPTransport)
    # static `entryPoints.X.http.tls`, per entrypoint: the TLS of every HTTP router there that
    # has no `tls` of its own (Traefik's entrypoint model, server/aggregator.go applyModel)
    entrypoint_tls: dict[str, RouterTLS] = field(default_factory=dict)


def _one_l4_kind(definition: Any) -> None:
    """A TCP or UDP service is exactly one of `loadBalancer` and `weighted` (Traefik's
    messages); raises _BuildError otherwise."""
    kinds = [k for k in ("load_balancer", "weighted") if getattr(definition, k) is not None]
    if len(kinds) != 1:
        raise _BuildError(
            "the service does not have any type defined"
            if not kinds
            else "multi-types service not supported"
        )


class _BuildError(Exception):
    pass


class _Compiler:
    def __init__(self, config: DynamicConfig, ctx: CompileContext) -> None:
        self.config = config
        self.ctx = ctx
        self.snapshot = RuntimeSnapshot(ctx.generation, config, ctx.provider)
        self.services: dict[str, Handler | None] = {}
        self.building: set[str] = set()
        self.used_pools: set[Any] = set()
        self.middleware_state = MiddlewareState()
        self.service_objects: dict[str, Any] = {}
        self.health_wanted: dict[Any, list[Any]] = {}  # health checks the services want
        self.transports: dict[str, TransportSettings | str] = {}  # name -> settings or error
        self.tcp_transports: dict[str, TCPTransport | str] = {}  # name -> transport or error

    # -- names --------------------------------------------------------------------------

    def qualify(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.ctx.provider}"

    def resolve(self, reference: str, kind: str) -> str:
        base, _, provider = reference.partition("@")
        if provider and provider != self.ctx.provider:
            if provider == "internal" and reference in self.ctx.internal_services:
                return reference
            raise _BuildError(
                f"the {kind} {reference!r} does not exist (unknown provider {provider!r})"
            )
        return f"{base}@{self.ctx.provider}"

    # -- services -----------------------------------------------------------------------

    def service(self, qualified: str) -> Handler:
        if qualified in self.ctx.internal_services:
            return self.ctx.internal_services[qualified]
        if qualified in self.services:
            handler = self.services[qualified]
            if handler is None:
                raise _BuildError(
                    f"the service {qualified!r} is disabled: "
                    + "; ".join(self.snapshot.services[qualified].errors)
                )
            return handler
        if qualified in self.building:
            raise _BuildError(f"the service {qualified!r} references itself (cycle)")
        name = qualified.rpartition("@")[0]
        definition = self.config.http.services.get(name)
        if definition is None:
            raise _BuildError(f"the service {qualified!r} does not exist")
        status = self.snapshot.services.setdefault(qualified, ObjectStatus())
        self.building.add(qualified)
        try:
            handler = self.build_service(qualified, definition)
        except _BuildError as exc:
            status.fail(str(exc))
            self.services[qualified] = None
            raise _BuildError(f"the service {qualified!r} is disabled: {exc}") from None
        finally:
            self.building.discard(qualified)
        self.services[qualified] = handler
        return handler

    def build_service(self, qualified: str, definition: Service) -> Handler:
        kinds = [
            k
            for k in ("load_balancer", "weighted", "mirroring", "failover", "highest_random_weight")
            if getattr(definition, k) is not None
        ]
        if not kinds:
            raise _BuildError("the service does not have any type defined")
        if len(kinds) > 1:
            raise _BuildError(
                "multi-types service not supported, consider declaring two "
                "different pieces of service instead"
            )
        kind = kinds[0]
        if kind == "load_balancer":
            return self.build_load_balancer(qualified, definition)
        if kind == "weighted":
            return self.build_weighted(qualified, definition)
        if kind == "mirroring":
            return self.build_mirroring(qualified, definition)
        raise _BuildError(f"service type {kind_name(kind)!r} is not supported yet")

    def transport_for(self, name: str | None) -> TransportSettings:
        """The settings of `loadBalancer.serversTransport` (`name`, `name@provider`, or
        `default@internal`: the static default, as Traefik); none: the static default."""
        if not name or name == "default@internal":
            return self.ctx.transport
        base = self.resolve(name, "serversTransport").rpartition("@")[0]
        transport: ServersTransport | None = self.config.http.servers_transports.get(base)
        if transport is None:
            raise _BuildError(f"serversTransport {name!r} does not exist")
        cached = self.transports.get(base)
        if cached is None:
            try:
                cached = http_transport(transport, f"http.serversTransports.{base}")
            except TransportError as exc:
                cached = str(exc)
                log.error("serversTransport %s@%s: %s", base, self.ctx.provider, exc)
            self.transports[base] = cached
        if isinstance(cached, str):
            raise _BuildError(f"serversTransport {name!r} is invalid: {cached}")
        return cached

    def build_load_balancer(self, qualified: str, definition: Service) -> Handler:
        lb = definition.load_balancer
        assert lb is not None
        settings = self.transport_for(lb.servers_transport)
        servers: list[tuple[ServerTarget, int]] = []
        for index, server in enumerate(lb.servers):
            target = self.server_target(
                server.url,
                settings,
                bool(server.preserve_path),
                f"loadBalancer.servers[{index}].url",
            )
            weight = 1 if server.weight is None else server.weight
            servers.append((target, weight))
        pass_host = True if lb.pass_host_header is None else lb.pass_host_header
        for target, _ in servers:
            target.pass_host_header = pass_host
        warnings: list[str] = []
        try:
            service = load_balancer_service(
                qualified,
                lb,
                servers,
                pass_host,
                self.ctx.metrics,
                self.ctx.state.services.get(qualified),
                settings,
                self.ctx.state.health,
                self.health_wanted,
                warnings,
            )
        except ValueError as exc:
            raise _BuildError(str(exc)) from None
        for warning in warnings:
            self.snapshot.services[qualified].warn(f"loadBalancer.{warning}")
        self.service_objects[qualified] = service
        return service.serve

    def server_target(
        self, url: str, settings: TransportSettings, preserve_path: bool, path: str
    ) -> ServerTarget:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise _BuildError(f"{path}: invalid URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in POOL_KINDS:
            raise _BuildError(
                f"{path}: scheme {scheme!r} of {url!r} is not supported "
                f"(supported: {', '.join(sorted(POOL_KINDS))})"
            )
        if not parts.hostname:
            raise _BuildError(f"{path}: URL {url!r} has no host")
        port = port or (443 if scheme == "https" else 80)
        host = parts.hostname
        pool = self.ctx.state.pool(scheme, host, port, settings)
        self.used_pools.add((scheme, host, port, settings))
        host_header = parts.netloc.rpartition("@")[2].encode()
        prefix = parts.path.rstrip("/").encode() if preserve_path else b""
        return ServerTarget(url, pool, host_header, prefix)

    def build_weighted(self, qualified: str, definition: Service) -> Handler:
        weighted = definition.weighted
        assert weighted is not None
        children = []
        objects = []
        for child in weighted.services:
            child_name = self.resolve(child.name, "service")
            handler = self.service(child_name)
            children.append((handler, 1 if child.weight is None else child.weight))
            objects.append((child_name, self.service_objects.get(child_name)))
        sticky = None
        if weighted.sticky is not None and weighted.sticky.cookie is not None:
            names = [child.name for child in weighted.services]
            sticky = Sticky(weighted.sticky.cookie, qualified, names)
        service = WeightedService(qualified, children, sticky)
        if weighted.health_check is not None:
            service.health_check = True
            try:
                link_weighted(service, objects)
            except ValueError as exc:
                raise _BuildError(str(exc)) from None
        previous = self.ctx.state.services.get(qualified)
        if isinstance(previous, WeightedService) and previous.weights_key == service.weights_key:
            service.balancer.adopt_position(previous.balancer)
        self.service_objects[qualified] = service
        return service.serve

    def build_mirroring(self, qualified: str, definition: Service) -> Handler:
        mirroring = definition.mirroring
        assert mirroring is not None
        main = self.service(self.resolve(mirroring.service, "service"))
        mirrors = []
        for index, mirror in enumerate(mirroring.mirrors):
            if not 0 <= mirror.percent <= 100:
                raise _BuildError(f"mirroring.mirrors[{index}].percent must be within 0..100")
            mirrors.append(
                (mirror.name, self.service(self.resolve(mirror.name, "service")), mirror.percent)
            )
        service = MirroringService(qualified, main, mirrors)
        if mirroring.health_check is not None:
            service.health_check = True
            main_name = self.resolve(mirroring.service, "service")
            try:
                link_mirroring(service, main_name, self.service_objects.get(main_name))
            except ValueError as exc:
                raise _BuildError(str(exc)) from None
        self.service_objects[qualified] = service
        return service.serve

    # -- middlewares --------------------------------------------------------------------

    def middleware_chain(
        self, router: str, names: list[str], handler: Handler, seen: tuple[str, ...] = ()
    ) -> Handler:
        for reference in reversed(names):
            qualified = self.resolve(reference, "middleware")
            if qualified in seen:
                raise _BuildError(f"middleware chain cycle through {qualified!r}")
            name = qualified.rpartition("@")[0]
            definition = self.config.http.middlewares.get(name)
            if definition is None:
                raise _BuildError(f"middleware {qualified!r} does not exist")
            status = self.snapshot.middlewares.setdefault(qualified, ObjectStatus())
            try:
                handler = self.build_middleware(
                    router, qualified, definition, handler, (*seen, qualified)
                )
            except MiddlewareConfigError as exc:
                message = f"{kind_name(_middleware_kind(definition) or '')}.{exc}"
                if message not in status.errors:
                    status.fail(message)
                raise _BuildError(f"middleware {qualified!r} is invalid: {message}") from None
            except _BuildError as exc:
                if str(exc) not in status.errors:
                    status.fail(str(exc))
                raise _BuildError(f"middleware {qualified!r} is invalid: {exc}") from None
            if router not in status.using:
                status.using.append(router)
        return handler

    def build_middleware(
        self,
        router: str,
        qualified: str,
        definition: Middleware,
        next_handler: Handler,
        seen: tuple[str, ...],
    ) -> Handler:
        kinds = [k for k in definition.__struct_fields__ if getattr(definition, k) is not None]
        if not kinds:
            raise _BuildError("the middleware does not have any type defined")
        if len(kinds) > 1:
            raise _BuildError(
                "multi-types middleware not supported, consider declaring two "
                "different pieces of middleware instead"
            )
        kind = kinds[0]
        if kind == "chain":
            chain = definition.chain
            assert chain is not None
            return self.middleware_chain(router, chain.middlewares, next_handler, seen)
        builder = MIDDLEWARE_BUILDERS.get(kind)
        if builder is None:
            raise _BuildError(f"middleware type {kind_name(kind)!r} is not supported yet")
        options = getattr(definition, kind)
        context = BuildContext(
            router=router,
            name=qualified,
            metrics=self.ctx.metrics,
            fingerprint=kind.encode() + msgspec.json.encode(options, enc_hook=_plain),
            previous=self.ctx.state.middlewares,
            current=self.middleware_state,
        )
        return builder(options, next_handler, context)

    # -- routers ------------------------------------------------------------------------

    def compile_router(self, name: str, router: Router) -> tuple[list[str], Route] | None:
        qualified = self.qualify(name)
        status = self.snapshot.routers.setdefault(qualified, ObjectStatus())
        entrypoints = router.entry_points or self.ctx.default_entrypoints
        valid = [ep for ep in entrypoints if ep in self.ctx.http_entrypoints]
        for ep in entrypoints:
            if ep not in self.ctx.http_entrypoints:
                status.warn(f"entryPoint {ep!r} doesn't exist")
        status.using = valid
        if not valid:
            status.fail("no valid entryPoint for this router")
            return None
        if not router.rule:
            status.fail("router has no rule")
            return None
        try:
            rule = compile_http_rule(router.rule, router.rule_syntax, self.ctx.default_rule_syntax)
        except RuleError as exc:
            status.fail(f"invalid rule: {exc}")
            return None
        priority = router.priority or default_priority(router.rule)
        if priority > MAX_PRIORITY:
            status.fail(f"the router priority {priority} exceeds the max priority {MAX_PRIORITY}")
            return None
        if not router.service:
            status.fail("router has no service")
            return None
        try:
            service_name = self.resolve(router.service, "service")
            handler = self.service(service_name)
            handler = self.middleware_chain(qualified, router.middlewares, handler)
        except _BuildError as exc:
            status.fail(str(exc))
            return None
        if service_name in self.snapshot.services:
            using = self.snapshot.services[service_name].using
            if qualified not in using:
                using.append(qualified)
        return valid, Route(
            qualified, priority, rule.matcher, rule.hosts, handler, service_name, rule.within_hosts
        )

    def compile(self) -> RuntimeSnapshot:
        per_entrypoint: dict[str, list[Route]] = {ep: [] for ep in self.ctx.http_entrypoints}
        # Routers with `tls` serve only connections the proxy decrypts (meshproxy.l4.tls).
        self.tls_store = store_for(self.config.tls, self.ctx.provider, h2_available())
        self.https_hosts = {ep: HTTPSHosts() for ep in self.ctx.http_entrypoints}
        for ep in self.ctx.http_entrypoints:
            per_entrypoint[https_key(ep)] = []
        for name, router in sorted(self.config.http.routers.items()):
            built = self.compile_router(name, router)
            if built is None:
                continue
            entrypoints, route = built
            for ep in entrypoints:
                tls = router.tls if router.tls is not None else self.ctx.entrypoint_tls.get(ep)
                if tls is None:
                    per_entrypoint[ep].append(route)
                    continue
                per_entrypoint[https_key(ep)].append(route)
                options = qualify_options(tls.options, self.ctx.provider)
                if self.tls_store.context(options) is None:
                    self.snapshot.routers[route.name].warn(
                        f"TLS options {options!r} are unknown or broken: TLS connections "
                        "that need them are closed"
                    )
                for domain in self.https_hosts[ep].add(https_domains(router.rule), options):
                    self.snapshot.routers[route.name].warn(
                        f"found different TLS options for routers on the same host {domain}, "
                        "so using the default TLS options instead"
                    )
        # services no router uses are still validated, so their errors show up
        for name in sorted(self.config.http.services):
            qualified = self.qualify(name)
            if qualified not in self.services:
                try:
                    self.service(qualified)
                except _BuildError:
                    pass
        for name in sorted(self.config.http.middlewares):
            self.snapshot.middlewares.setdefault(self.qualify(name), ObjectStatus())
        self.snapshot.http_tables = {
            ep: RouterTable(routes) for ep, routes in per_entrypoint.items()
        }
        self.compile_tcp()
        self.compile_udp()
        self.snapshot.service_objects = self.service_objects
        return self.snapshot

    def compile_tcp(self) -> None:
        tcp = self.config.tcp
        targets: dict[str, TCPService | None] = {}

        def target(qualified: str, seen: tuple[str, ...] = ()) -> TCPService:
            if qualified in targets:
                built = targets[qualified]
                if built is None:
                    raise _BuildError(f"the service {qualified!r} is disabled")
                return built
            if qualified in seen:
                raise _BuildError(f"the service {qualified!r} references itself (cycle)")
            status = self.snapshot.tcp_services.setdefault(qualified, ObjectStatus())
            definition = tcp.services.get(qualified.rpartition("@")[0])
            if definition is None:
                raise _BuildError(f"the service {qualified!r} does not exist")
            try:
                built = self.build_tcp_service(qualified, definition, status, target, seen)
            except _BuildError as exc:
                status.fail(str(exc))
                targets[qualified] = None
                raise _BuildError(f"the service {qualified!r} is disabled: {exc}") from None
            targets[qualified] = built
            return built

        for name in sorted(tcp.services):
            try:
                target(self.qualify(name))
            except _BuildError:
                pass
        tables: dict[str, list[TCPRoute]] = {}
        for name, router in sorted(tcp.routers.items()):
            qualified = self.qualify(name)
            status = self.snapshot.tcp_routers.setdefault(qualified, ObjectStatus())
            status.using = list(router.entry_points)
            try:
                route = self.compile_tcp_router(qualified, router, target)
            except _BuildError as exc:
                status.fail(str(exc))
                continue
            for entrypoint in router.entry_points or self.ctx.default_entrypoints:
                if entrypoint in self.ctx.http_entrypoints:
                    tables.setdefault(entrypoint, []).append(route)
                else:
                    status.warn(f"entryPoint {entrypoint!r} doesn't exist")
        self.snapshot.tcp_tables = {
            ep: sorted(routes, key=lambda r: (-r.priority, r.name)) for ep, routes in tables.items()
        }
        self.snapshot.l4_tables = {
            ep: L4Table(
                self.snapshot.tcp_tables.get(ep, []), self.https_hosts.get(ep), self.tls_store
            )
            for ep in self.ctx.http_entrypoints
        }

    def build_tcp_service(
        self,
        qualified: str,
        definition: Any,
        status: ObjectStatus,
        target: Any,
        seen: tuple[str, ...],
    ) -> TCPService:
        _one_l4_kind(definition)
        choices: list[tuple[Any, int]] = []
        lb = definition.load_balancer
        if lb is not None:
            named = self.tcp_transport_for(lb.servers_transport)
            if lb.health_check is not None:
                status.warn("loadBalancer.healthCheck is not implemented for TCP services; ignored")
            try:
                transport = load_balancer_transport(lb, named, self.ctx.tcp_transport)
            except TransportError as exc:
                raise _BuildError(str(exc)) from None
            for i, server in enumerate(lb.servers):
                if not _valid_address(server.address):
                    status.warn(
                        f"loadBalancer.servers[{i}].address {server.address!r} is "
                        "not host:port; server skipped"
                    )
                    continue
                host, _, port = server.address.rpartition(":")
                weight = 1 if server.weight is None else server.weight
                try:
                    built = make_server(
                        server.address, host.strip("[]"), int(port), bool(server.tls), transport
                    )
                except TransportError as exc:
                    raise _BuildError(f"loadBalancer.servers[{i}]: {exc}") from None
                choices.append((built, weight))
        else:
            for child in definition.weighted.services:
                child_name = self.resolve(child.name, "service")
                weight = 1 if child.weight is None else child.weight
                choices.append((target(child_name, (*seen, qualified)), weight))
        return TCPService(qualified, choices)

    def tcp_transport_for(self, name: str | None) -> TCPTransport | None:
        """The `tcp.serversTransports` entry a TCP loadBalancer names (`name`,
        `name@provider`); None when it names none (the default applies with the
        loadBalancer's own deprecated options). `default@internal` is the static one."""
        if not name:
            return None
        if name == "default@internal":
            return self.ctx.tcp_transport
        base = self.resolve(name, "serversTransport").rpartition("@")[0]
        options = self.config.tcp.servers_transports.get(base)
        if options is None:
            raise _BuildError(f"serversTransport {name!r} does not exist")
        cached = self.tcp_transports.get(base)
        if cached is None:
            try:
                cached = transport_from_dynamic(options, f"tcp.serversTransports.{base}")
            except TransportError as exc:
                cached = str(exc)
                log.error("TCP serversTransport %s@%s: %s", base, self.ctx.provider, exc)
            self.tcp_transports[base] = cached
        if isinstance(cached, str):
            raise _BuildError(f"serversTransport {name!r} is invalid: {cached}")
        return cached

    def compile_tcp_router(self, qualified: str, router: Any, target: Any) -> TCPRoute:
        if not router.rule:
            raise _BuildError("router has no rule")
        try:
            rule = compile_tcp_rule(router.rule, router.rule_syntax, self.ctx.default_rule_syntax)
        except RuleError as exc:
            raise _BuildError(f"invalid rule: {exc}") from None
        if rule.needs_sni and router.tls is None:
            # Traefik's words (pkg/server/router/tcp/manager.go)
            raise _BuildError(
                f"invalid rule: {router.rule!r} , has HostSNI matcher, but no TLS on router"
            )
        tls = None
        if router.tls is not None:
            options = qualify_options(router.tls.options, self.ctx.provider)
            if not router.tls.passthrough and self.tls_store.context(options) is None:
                raise _BuildError(f"TLS options {options!r} are unknown or broken")
            tls = TCPRouteTLS(router.tls.passthrough, options)
        if not router.service:
            raise _BuildError("router has no service")
        service = target(self.resolve(router.service, "service"))
        checks: list[Any] = []  # in the router's order: allow lists and inFlightConn counters
        for reference in router.middlewares:
            name = self.resolve(reference, "middleware")
            middleware = self.config.tcp.middlewares.get(name.rpartition("@")[0])
            if middleware is None:
                raise _BuildError(f"middleware {name!r} does not exist")
            kinds = [k for k in middleware.__struct_fields__ if getattr(middleware, k) is not None]
            if len(kinds) != 1:
                raise _BuildError(
                    f"middleware {name!r}: "
                    + ("multi-types middleware not supported" if kinds else "no type defined")
                )
            if middleware.in_flight_conn is not None:
                checks.append(self.in_flight_conn(qualified, name, middleware.in_flight_conn))
                continue
            allow = middleware.ip_allow_list or middleware.ip_white_list
            if allow is None:
                raise _BuildError(f"TCP middleware {name!r} is not supported yet")
            try:
                networks = parse_ranges(allow.source_range or [], "sourceRange")
            except MiddlewareConfigError as exc:
                raise _BuildError(f"middleware {name!r} is invalid: ipAllowList.{exc}") from None
            checks.append(allow_list_check(networks))  # empty range: nobody gets through
        priority = router.priority or tcp_default_priority(router.rule, rule.catch_all)
        return TCPRoute(
            qualified, priority, rule.matcher, tuple(checks), service, rule.catch_all, tls
        )

    def in_flight_conn(self, router: str, name: str, options: Any) -> InFlightConn:
        """The router's inFlightConn counter: the previous one while `amount` is unchanged,
        so connections open across a reload are still counted (and released)."""
        amount = int(options.amount or 0)
        key = (f"tcp:{router}", name)
        fingerprint = b"inFlightConn:%d" % amount
        old = self.ctx.state.middlewares.objects.get(key)
        counter = old[1] if old is not None and old[0] == fingerprint else InFlightConn(amount)
        self.middleware_state.objects[key] = (fingerprint, counter)
        return counter  # type: ignore[no-any-return]

    def compile_udp(self) -> None:
        """UDP routers and services (reference/traefik-proxy.md §1.6): a router has no rule;
        as Traefik's UDP router manager, per entrypoint the routers are taken by qualified name
        in descending order and the first that builds serves it (one UDP router per
        entrypoint); the others get a warning naming it. No entryPoints: every UDP one."""
        udp = self.config.udp
        targets: dict[str, UDPTarget | None] = {}

        def target(qualified: str, seen: tuple[str, ...] = ()) -> UDPTarget:
            if qualified in targets:
                built = targets[qualified]
                if built is None:
                    raise _BuildError(f"the service {qualified!r} is disabled")
                return built
            if qualified in seen:
                raise _BuildError(f"the service {qualified!r} references itself (cycle)")
            definition = udp.services.get(qualified.rpartition("@")[0])
            if definition is None:
                raise _BuildError(f"the service {qualified!r} does not exist")
            status = self.snapshot.udp_services.setdefault(qualified, ObjectStatus())
            try:
                built = self.build_udp_service(qualified, definition, status, target, seen)
            except _BuildError as exc:
                status.fail(str(exc))
                targets[qualified] = None
                raise _BuildError(f"the service {qualified!r} is disabled: {exc}") from None
            targets[qualified] = built
            return built

        for name in sorted(udp.services):
            try:
                target(self.qualify(name))
            except _BuildError:
                pass
        routes: dict[str, UDPRoute] = {}
        qualified_routers = sorted(
            ((self.qualify(name), router) for name, router in udp.routers.items()),
            key=lambda item: item[0],
            reverse=True,
        )
        for qualified, router in qualified_routers:
            status = self.snapshot.udp_routers.setdefault(qualified, ObjectStatus())
            entrypoints = router.entry_points or self.ctx.udp_entrypoints
            valid = [ep for ep in entrypoints if ep in self.ctx.udp_entrypoints]
            for ep in entrypoints:
                if ep not in self.ctx.udp_entrypoints:
                    status.warn(f"entryPoint {ep!r} doesn't exist")
            status.using = valid
            if not valid:
                status.fail("no valid entryPoint for this router")
                continue
            if not router.service:
                status.fail("router has no service")
                continue
            try:
                service_name = self.resolve(router.service, "service")
                route = UDPRoute(qualified, target(service_name))
            except _BuildError as exc:
                status.fail(str(exc))
                continue
            using = self.snapshot.udp_services[service_name].using
            if qualified not in using:
                using.append(qualified)
            for ep in valid:
                if ep in routes:
                    status.warn(
                        f"entryPoint {ep!r} is served by the UDP router {routes[ep].name!r}: "
                        "one UDP router per entrypoint, the last by name"
                    )
                else:
                    routes[ep] = route
        self.snapshot.udp_routes = routes

    def build_udp_service(
        self,
        qualified: str,
        definition: Any,
        status: ObjectStatus,
        target: Any,
        seen: tuple[str, ...],
    ) -> UDPTarget:
        _one_l4_kind(definition)
        choices: list[tuple[Any, int]] = []
        if definition.load_balancer is not None:
            for i, server in enumerate(definition.load_balancer.servers):
                if not _valid_address(server.address):
                    # Traefik: "Failed to split host port", the server is skipped
                    status.warn(
                        f"loadBalancer.servers[{i}].address {server.address!r} is "
                        "not host:port; server skipped"
                    )
                    continue
                host, _, port = server.address.rpartition(":")
                choices.append(((host.strip("[]"), int(port)), 1))
        else:
            for child in definition.weighted.services:
                child_name = self.resolve(child.name, "service")
                weight = 1 if child.weight is None else child.weight
                choices.append((target(child_name, (*seen, qualified)), weight))
        return UDPTarget(qualified, choices)


def compile_snapshot(config: DynamicConfig, ctx: CompileContext) -> RuntimeSnapshot:
    compiler = _Compiler(config, ctx)
    snapshot = compiler.compile()
    ctx.state.services = compiler.service_objects
    ctx.state.retain_middlewares(compiler.middleware_state)
    ctx.state.retain_pools(compiler.used_pools)
    ctx.state.health.retain(compiler.health_wanted)
    return snapshot


def kind_name(field_name: str) -> str:
    """load_balancer -> loadBalancer."""
    head, *rest = field_name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _middleware_kind(definition: Middleware) -> str | None:
    for name in definition.__struct_fields__:
        if getattr(definition, name) is not None:
            return name
    return None


def _plain(value: Any) -> Any:
    """msgspec cannot encode float subclasses (Duration): encode them as numbers."""
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return False
    host = host.strip("[]")
    if not host:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return all(part for part in host.split("."))
    return True
