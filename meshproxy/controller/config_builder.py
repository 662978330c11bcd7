"""Topology -> the dynamic configuration proxies poll, with Traefik Mesh's names, entrypoints,
rules and priorities (see ../shared/reference/traefik-mesh.md §2).

Where Traefik Mesh is known to be wrong this builder differs, each behind `BuildOptions`:
- annotation middlewares come in a stable (sorted) order;
- a TrafficTarget's `destination.port` selects the entrypoint of that port (not always the
  first one);
- TCP TrafficTargets enforce their sources (a TCP ipAllowList);
- the X-Forwarded-For "indirect" allowlist also requires the connection to come from a mesh
  proxy, so a client talking to a proxy directly cannot claim another pod's address
  (`indirect_from_proxies_only`; off reproduces Traefik Mesh exactly).
Problems are recorded on the topology object concerned; that object is skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from meshproxy.controller import annotations as notes
from meshproxy.controller.ports import PortsExhausted, PortTable
from meshproxy.controller.rules import (
    SERVICE,
    SPLIT,
    TARGET_DIRECT,
    TARGET_INDIRECT,
    XFF_RULE,
    host_rule,
    priority,
    service_rule,
)
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.topology import Service, ServicePort, Topology

log = logging.getLogger("meshproxy.controller")

BLOCK_ALL_MIDDLEWARE = "block-all-middleware"
BLOCK_ALL_SERVICE = "block-all-service"
PROXIES_ONLY_MIDDLEWARE = "mesh-proxies-only"


@dataclass
class BuildOptions:
    indirect_from_proxies_only: bool = True
    proxy_ips: list[str] = field(default_factory=list)  # pod IPs of the mesh proxies


def default_config(admin_port: int = 8080) -> dict[str, Any]:
    """What every configuration contains, even before the first cluster sync."""
    return {
        "http": {
            "routers": {
                "readiness": {
                    "entryPoints": ["readiness"],
                    "service": "readiness",
                    "rule": "Path(`/ping`)",
                }
            },
            "services": {
                BLOCK_ALL_SERVICE: {"loadBalancer": {"passHostHeader": False}},
                "readiness": {
                    "loadBalancer": {
                        "servers": [{"url": f"http://127.0.0.1:{admin_port}"}],
                        "passHostHeader": True,
                    }
                },
            },
            "middlewares": {
                BLOCK_ALL_MIDDLEWARE: {"ipWhiteList": {"sourceRange": ["255.255.255.255"]}}
            },
        }
    }


def _lb(servers: list[dict[str, str]], pass_host: bool | None = None) -> dict[str, Any]:
    lb: dict[str, Any] = {}
    if servers:
        lb["servers"] = servers
    if pass_host is not None:
        lb["passHostHeader"] = pass_host
    return {"loadBalancer": lb}


def _allow(ips: list[str], depth: int = 0) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if ips:
        options["sourceRange"] = ips
    if depth:
        options["ipStrategy"] = {"depth": depth}
    return {"ipWhiteList": options}


def _router(
    entrypoint: str,
    service: str,
    rule: str | None,
    prio: int | None,
    middlewares: list[str] | None = None,
) -> dict[str, Any]:
    router: dict[str, Any] = {"entryPoints": [entrypoint]}
    if middlewares:
        router["middlewares"] = middlewares
    router["service"] = service
    if rule is not None:
        router["rule"] = rule
    if prio:
        router["priority"] = prio
    return router


class ConfigBuilder:
    def __init__(
        self,
        topology: Topology,
        settings: ControllerSettings,
        tables: dict[str, PortTable],
        options: BuildOptions | None = None,
    ) -> None:
        self.topology = topology
        self.settings = settings
        self.tables = tables
        self.options = options or BuildOptions()
        self.config = default_config(settings.proxy_admin_port)
        self.live_ports: dict[str, set[str]] = {"tcp": set(), "udp": set()}

    # -- helpers --------------------------------------------------------------------------

    def section(self, protocol: str, kind: str) -> dict[str, Any]:
        return self.config.setdefault(protocol, {}).setdefault(kind, {})

    def pod_ips(self, pods: list[str]) -> list[str]:
        ips = []
        for key in pods:
            pod = self.topology.pods.get(key)
            if pod is not None and pod.ip and pod.ip not in ips:
                ips.append(pod.ip)
        return ips

    def servers(
        self, service: Service, port: ServicePort, pods: list[str], scheme: str | None
    ) -> list[dict[str, str]]:
        out = []
        for key in pods:
            pod = self.topology.pods[key]
            if not pod.ip:
                continue
            target = pod.resolve_port(port.target_port, port.protocol)
            if target is None:
                service.errors.append(
                    f"pod {key}: no container port named {port.target_port!r} "
                    f"({port.protocol}); skipped"
                )
                continue
            host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
            if scheme is None:
                out.append({"address": f"{host}:{target}"})
            else:
                out.append({"url": f"{scheme}://{host}:{target}"})
        return out

    @staticmethod
    def key(service: Service, *parts: object) -> str:
        return "-".join([service.namespace, service.name, *[str(p) for p in parts]])

    def section_sizes(self) -> dict[tuple[str, str], int]:
        return {
            (protocol, kind): len(table)
            for protocol, kinds in self.config.items()
            for kind, table in kinds.items()
        }

    def drop_added(self, sizes: dict[tuple[str, str], int]) -> None:
        """Remove what a failed service added: dicts keep insertion order, so its objects are
        the keys past each section's size before it started."""
        for protocol, kinds in self.config.items():
            for kind, table in kinds.items():
                for name in list(table)[sizes.get((protocol, kind), 0) :]:
                    del table[name]

    def add_lb_options(self, sizes: dict[tuple[str, str], int], options: dict[str, Any]) -> None:
        """meshproxy.io/* load-balancer options onto the loadBalancers this service added."""
        if not options:
            return
        services = self.section("http", "services")
        for name in list(services)[sizes.get(("http", "services"), 0) :]:
            lb = services[name].get("loadBalancer")
            if lb is not None and lb.get("servers"):
                lb.update(options)

    # -- build ----------------------------------------------------------------------------

    def build(self) -> dict[str, Any]:
        for service in self.topology.services.values():
            try:
                mode = notes.traffic_type(service.annotations, self.settings.default_mode)
                scheme = notes.scheme(service.annotations)
                middlewares = notes.middlewares(service.annotations) if mode == "http" else {}
                lb_options = notes.load_balancer_options(service.annotations)
            except notes.AnnotationError as exc:
                service.errors.append(str(exc))
                continue
            except Exception as exc:  # an annotation parser bug: this service only
                log.error("service %s: reading its annotations failed", service.key, exc_info=exc)
                service.errors.append(f"internal error: {type(exc).__name__}: {exc}")
                continue
            sizes = self.section_sizes()
            try:
                if mode == "http":
                    self.build_http(service, scheme, middlewares)
                    self.add_lb_options(sizes, lb_options)
                else:
                    self.build_l4(service, mode)
            except Exception as exc:  # one service must not stop the whole configuration
                log.error(
                    "service %s: building its configuration failed", service.key, exc_info=exc
                )
                service.errors.append(f"internal error: {type(exc).__name__}: {exc}")
                self.drop_added(sizes)
        for kind, table in self.tables.items():
            table.retain(self.live_ports.get(kind, set()))
        if self.options.indirect_from_proxies_only and any(
            PROXIES_ONLY_MIDDLEWARE in r.get("middlewares", [])
            for r in self.config["http"]["routers"].values()
        ):
            self.section("http", "middlewares")[PROXIES_ONLY_MIDDLEWARE] = _allow(
                sorted(self.options.proxy_ips)
            )
        return self.config

    # -- HTTP -----------------------------------------------------------------------------

    def http_ports(self, service: Service) -> list[tuple[ServicePort, str]]:
        """(port, entrypoint) for each TCP port, entrypoint by the port's index."""
        out = []
        tcp_ports = [p for p in service.ports if p.protocol == "TCP"]
        for index, port in enumerate(tcp_ports):
            number = self.settings.min_http_port + index
            if number > self.settings.max_http_port:
                service.errors.append(
                    f"port {port.port}: too many HTTP entrypoints "
                    f"(limit {self.settings.limit_http_port})"
                )
                continue
            out.append((port, f"http-{number}"))
        return out

    def build_http(
        self, service: Service, scheme: str, annotation_mws: dict[str, dict[str, Any]]
    ) -> None:
        routers = self.section("http", "routers")
        services = self.section("http", "services")
        chain = []
        for suffix, definition in annotation_mws.items():
            name = self.key(service, suffix)
            self.section("http", "middlewares")[name] = definition
            chain.append(name)
        ports = self.http_ports(service)
        entrypoint_of = {id(port): ep for port, ep in ports}
        host = host_rule(service)
        for port, entrypoint in ports:
            key = self.key(service, port.port)
            if self.settings.acl:
                routers[key] = _router(
                    entrypoint, BLOCK_ALL_SERVICE, host, 1, [BLOCK_ALL_MIDDLEWARE]
                )
            else:
                routers[key] = _router(entrypoint, key, host, priority(SERVICE, host), chain)
                servers = self.servers(service, port, service.pods, scheme)
                services[key] = _lb(servers, True)
        if self.settings.acl:
            self.build_http_traffic_targets(service, scheme, chain, entrypoint_of)
        self.build_http_splits(service, scheme, chain, ports)

    def build_http_traffic_targets(
        self,
        service: Service,
        scheme: str,
        chain: list[str],
        entrypoint_of: dict[int, str],
    ) -> None:
        routers = self.section("http", "routers")
        services = self.section("http", "services")
        middlewares = self.section("http", "middlewares")
        for target_key in service.traffic_targets:
            target = self.topology.traffic_targets[target_key]
            if any(rule.tcp_route for rule in target.rules) and not any(
                rule.http_matches for rule in target.rules
            ):
                continue  # a TCP-only target says nothing about HTTP
            sources = self.pod_ips(target.source_pods())
            direct = self.key(service, target.name, "whitelist-traffic-target-direct")
            middlewares[direct] = _allow(sources)
            indirect = self.key(service, target.name, "whitelist-traffic-target-indirect")
            if service.backend_of:
                middlewares[indirect] = _allow(sources, depth=1)
            rule = service_rule(service, target.rules)
            for port in target.destination_ports:
                entrypoint = entrypoint_of.get(id(port))
                if entrypoint is None:
                    continue
                name = self.key(service, target.name, port.port, "traffic-target")
                services[name] = _lb(
                    self.servers(service, port, target.destination_pods, scheme), True
                )
                routers[f"{name}-direct"] = _router(
                    entrypoint, name, rule, priority(TARGET_DIRECT, rule), [*chain, direct]
                )
                if service.backend_of:
                    routers[f"{name}-indirect"] = self.indirect_router(
                        entrypoint, name, rule, TARGET_INDIRECT, [*chain, indirect]
                    )

    def indirect_router(
        self, entrypoint: str, service: str, rule: str, base: int, chain: list[str]
    ) -> dict[str, Any]:
        indirect_rule = f"({rule}) && {XFF_RULE}"
        if self.options.indirect_from_proxies_only:
            chain = [PROXIES_ONLY_MIDDLEWARE, *chain]
        return _router(entrypoint, service, indirect_rule, priority(base, indirect_rule), chain)

    def build_http_splits(
        self,
        service: Service,
        scheme: str,
        chain: list[str],
        ports: list[tuple[ServicePort, str]],
    ) -> None:
        routers = self.section("http", "routers")
        services = self.section("http", "services")
        middlewares = self.section("http", "middlewares")
        for split_key in service.traffic_splits:
            split = self.topology.traffic_splits[split_key]
            if not split.backends:
                continue
            rule = service_rule(service, split.rules)
            direct_mw = indirect_mw = ""
            if self.settings.acl:
                incoming = self.pod_ips(split.incoming)
                direct_mw = self.key(service, split.name, "whitelist-traffic-split-direct")
                middlewares[direct_mw] = _allow(incoming)
                if service.backend_of:
                    indirect_mw = self.key(service, split.name, "whitelist-traffic-split-indirect")
                    middlewares[indirect_mw] = _allow(incoming, depth=1)
            for port, entrypoint in ports:
                weighted = []
                for weight, backend_key in split.backends:
                    backend = self.topology.services[backend_key]
                    name = self.key(
                        service, split.name, port.port, backend.name, "traffic-split-backend"
                    )
                    url = f"{scheme}://{backend.name}.{backend.namespace}.traefik.mesh:{port.port}"
                    services[name] = _lb([{"url": url}], False)
                    weighted.append({"name": name, "weight": weight})
                name = self.key(service, split.name, port.port, "traffic-split")
                services[name] = {"weighted": {"services": weighted}}
                direct_chain = [*chain, direct_mw] if direct_mw else chain
                routers[f"{name}-direct"] = _router(
                    entrypoint, name, rule, priority(SPLIT, rule), direct_chain
                )
                if indirect_mw:
                    routers[f"{name}-indirect"] = self.indirect_router(
                        entrypoint, name, rule, TARGET_INDIRECT, [*chain, indirect_mw]
                    )

    # -- TCP and UDP ----------------------------------------------------------------------

    def build_l4(self, service: Service, mode: str) -> None:
        protocol = "TCP" if mode == "tcp" else "UDP"
        table = self.tables[mode]
        routers = self.section(mode, "routers")
        services = self.section(mode, "services")
        targets = [self.topology.traffic_targets[k] for k in service.traffic_targets]
        for port in service.ports:
            if port.protocol != protocol:
                service.errors.append(
                    f"port {port.port}: protocol {port.protocol} does not fit traffic-type {mode}"
                )
                continue
            try:
                number = table.allocate(service.namespace, service.name, port.port)
            except PortsExhausted as exc:
                service.errors.append(str(exc))
                continue
            self.live_ports[mode].add(PortTable.ident(service.namespace, service.name, port.port))
            key = self.key(service, port.port)
            entrypoint = f"{mode}-{number}"
            rule = "HostSNI(`*`)" if mode == "tcp" else None
            if self.settings.acl and mode == "tcp":
                self.build_tcp_targets(service, port, targets, entrypoint)
            elif self.settings.acl:
                service.errors.append("UDP services cannot be meshed in ACL mode (no SMI spec)")
            else:
                routers[key] = _router(entrypoint, key, rule, None)
                services[key] = _lb(self.servers(service, port, service.pods, None))
            for split_key in service.traffic_splits:
                split = self.topology.traffic_splits[split_key]
                if not split.backends:
                    continue
                weighted = []
                target_port = port.target_port
                for weight, backend_key in split.backends:
                    backend = self.topology.services[backend_key]
                    name = self.key(
                        service, split.name, port.port, backend.name, "traffic-split-backend"
                    )
                    address = f"{backend.name}.{backend.namespace}.traefik.mesh:{target_port}"
                    services[name] = _lb([{"address": address}])
                    weighted.append({"name": name, "weight": weight})
                services[key] = {"weighted": {"services": weighted}}
                routers[key] = _router(entrypoint, key, rule, None)

    def build_tcp_targets(
        self, service: Service, port: ServicePort, targets: list[Any], entrypoint: str
    ) -> None:
        """ACL mode: one router per TCP TrafficTarget, which (unlike Traefik Mesh) checks the
        sources with a TCP ipAllowList."""
        routers = self.section("tcp", "routers")
        services = self.section("tcp", "services")
        middlewares = self.section("tcp", "middlewares")
        for target in targets:
            if not any(rule.tcp_route for rule in target.rules):
                continue
            if port not in target.destination_ports:
                continue
            name = self.key(service, target.name, port.port, "traffic-target")
            services[name] = _lb(self.servers(service, port, target.destination_pods, None))
            allow = self.key(service, target.name, "whitelist-traffic-target")
            sources = self.pod_ips(target.source_pods())
            middlewares[allow] = {"ipAllowList": {"sourceRange": sources}}
            routers[name] = {
                "entryPoints": [entrypoint],
                "middlewares": [allow],
                "service": name,
                "rule": "HostSNI(`*`)",
            }


def build_config(
    topology: Topology,
    settings: ControllerSettings,
    tables: dict[str, PortTable],
    options: BuildOptions | None = None,
) -> dict[str, Any]:
    return ConfigBuilder(topology, settings, tables, options).build()
