"""Cluster state -> the mesh topology: which pods serve which service, who may call whom, how
traffic is split. Mirrors Traefik Mesh's topology builder (and its JSON shape on
/api/topology/current); every problem is recorded in the `errors` of the object it concerns
and that object is skipped, never the whole topology.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshproxy.controller.objects import (
    ClusterState,
    Object,
    annotations_of,
    key,
    labels_of,
    name_of,
    namespace_of,
    spec_of,
)
from meshproxy.controller.settings import ControllerSettings

IGNORED_LABEL_APPS = ("maesh", "jaeger")


@dataclass
class ServicePort:
    name: str
    protocol: str
    port: int
    target_port: int | str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "port": self.port,
            "targetPort": self.target_port,
        }


@dataclass
class Pod:
    name: str
    namespace: str
    service_account: str
    ip: str
    container_ports: list[dict[str, Any]] = field(default_factory=list)
    source_of: list[str] = field(default_factory=list)
    destination_of: list[str] = field(default_factory=list)

    def resolve_port(self, target: int | str, protocol: str) -> int | None:
        """A numeric targetPort as is; a named one through this pod's container ports."""
        if isinstance(target, int):
            return target
        if target.isdigit():
            return int(target)
        for port in self.container_ports:
            if port.get("name") == target and port.get("protocol", "TCP") == protocol:
                return int(port["containerPort"])
        return None


@dataclass
class Service:
    name: str
    namespace: str
    selector: dict[str, str]
    annotations: dict[str, str]
    ports: list[ServicePort]
    cluster_ip: str
    pods: list[str] = field(default_factory=list)
    traffic_targets: list[str] = field(default_factory=list)
    traffic_splits: list[str] = field(default_factory=list)
    backend_of: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return key(self.name, self.namespace)


@dataclass
class HTTPMatch:
    name: str
    methods: list[str]
    path_regex: str
    headers: dict[str, str]


@dataclass
class TrafficTargetRule:
    http_matches: list[HTTPMatch] = field(default_factory=list)
    tcp_route: bool = False
    tcp_ports: list[str] = field(default_factory=list)


@dataclass
class ServiceTrafficTarget:
    """A TrafficTarget as it applies to one Service: destination pods behind that Service."""

    service: str
    name: str
    namespace: str
    sources: list[dict[str, Any]]  # {serviceAccount, namespace, pods}
    destination_sa: str
    destination_ns: str
    destination_ports: list[ServicePort]
    destination_pods: list[str]
    rules: list[TrafficTargetRule] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.service}:{key(self.name, self.namespace)}"

    def source_pods(self) -> list[str]:
        return [pod for source in self.sources for pod in source["pods"]]


@dataclass
class TrafficSplit:
    name: str
    namespace: str
    service: str
    backends: list[tuple[int, str]]  # (weight, service key)
    rules: list[TrafficTargetRule] = field(default_factory=list)
    incoming: list[str] = field(default_factory=list)  # pods allowed on every backend (ACL)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return key(self.name, self.namespace)


@dataclass
class Topology:
    services: dict[str, Service] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    traffic_targets: dict[str, ServiceTrafficTarget] = field(default_factory=dict)
    traffic_splits: dict[str, TrafficSplit] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # objects that could not even be placed

    def to_json(self) -> dict[str, Any]:
        return {
            "services": {
                k: {
                    "name": s.name,
                    "namespace": s.namespace,
                    "selector": s.selector,
                    "annotations": s.annotations,
                    "ports": [p.to_json() for p in s.ports],
                    "clusterIp": s.cluster_ip,
                    "pods": s.pods,
                    "trafficTargets": s.traffic_targets,
                    "trafficSplits": s.traffic_splits,
                    "backendOf": s.backend_of,
                    "errors": s.errors,
                }
                for k, s in sorted(self.services.items())
            },
            "pods": {
                k: {
                    "name": p.name,
                    "namespace": p.namespace,
                    "serviceAccount": p.service_account,
                    "ip": p.ip,
                    "sourceOf": p.source_of,
                    "destinationOf": p.destination_of,
                }
                for k, p in sorted(self.pods.items())
            },
            "serviceTrafficTargets": {
                k: {
                    "service": t.service,
                    "name": t.name,
                    "namespace": t.namespace,
                    "sources": t.sources,
                    "destination": {
                        "serviceAccount": t.destination_sa,
                        "namespace": t.destination_ns,
                        "ports": [p.to_json() for p in t.destination_ports],
                        "pods": t.destination_pods,
                    },
                    "errors": t.errors,
                }
                for k, t in sorted(self.traffic_targets.items())
            },
            "trafficSplits": {
                k: {
                    "name": s.name,
                    "namespace": s.namespace,
                    "service": s.service,
                    "backends": [{"weight": w, "service": b} for w, b in s.backends],
                    "incoming": s.incoming,
                    "errors": s.errors,
                }
                for k, s in sorted(self.traffic_splits.items())
            },
            "errors": self.errors,
        }


# ---------------------------------------------------------------- filters


def watched(obj: Object, settings: ControllerSettings) -> bool:
    """Traefik Mesh's resource filter: namespaces and its own objects are left alone."""
    namespace = namespace_of(obj)
    if namespace == "kube-system":
        return False
    if settings.watch_namespaces and namespace not in settings.watch_namespaces:
        return False
    if namespace in settings.ignore_namespaces:
        return False
    return labels_of(obj).get("app") not in IGNORED_LABEL_APPS


def meshed_service(obj: Object, settings: ControllerSettings) -> bool:
    if not watched(obj, settings):
        return False
    if namespace_of(obj) == "default" and name_of(obj) == "kubernetes":
        return False
    return spec_of(obj).get("type") != "ExternalName"


# ---------------------------------------------------------------- building


class _Builder:
    def __init__(self, state: ClusterState, settings: ControllerSettings) -> None:
        self.state = state
        self.settings = settings
        self.topology = Topology()

    def build(self) -> Topology:
        self.load_pods()
        self.load_services()
        if self.settings.acl:
            self.load_traffic_targets()
        self.load_traffic_splits()
        if self.settings.acl:
            self.compute_incoming()
        return self.topology

    # -- pods and services --------------------------------------------------------------

    def load_pods(self) -> None:
        for obj in self.state.all("Pod"):
            if not watched(obj, self.settings):
                continue
            spec = spec_of(obj)
            ports = [
                port
                for container in spec.get("containers") or []
                for port in container.get("ports") or []
            ]
            pod = Pod(
                name=name_of(obj),
                namespace=namespace_of(obj),
                service_account=spec.get("serviceAccountName")
                or spec.get("serviceAccount")
                or "default",
                ip=(obj.get("status") or {}).get("podIP") or "",
                container_ports=ports,
            )
            self.topology.pods[key(pod.name, pod.namespace)] = pod

    def load_services(self) -> None:
        for obj in self.state.all("Service"):
            if not meshed_service(obj, self.settings):
                continue
            spec = spec_of(obj)
            ports = [
                ServicePort(
                    name=p.get("name", ""),
                    protocol=p.get("protocol", "TCP"),
                    port=int(p["port"]),
                    target_port=p.get("targetPort", p["port"]),
                )
                for p in spec.get("ports") or []
            ]
            service = Service(
                name=name_of(obj),
                namespace=namespace_of(obj),
                selector=spec.get("selector") or {},
                annotations=annotations_of(obj),
                ports=ports,
                cluster_ip=spec.get("clusterIP") or "",
            )
            service.pods = self.service_pods(service)
            self.topology.services[service.key] = service

    def service_pods(self, service: Service) -> list[str]:
        """Ready pods behind the Service, from Endpoints (or EndpointSlices), deduplicated."""
        refs: list[tuple[str, str]] = []
        endpoints = self.state.get("Endpoints", service.namespace, service.name)
        if endpoints is not None:
            for subset in endpoints.get("subsets") or []:
                for address in subset.get("addresses") or []:
                    ref = address.get("targetRef") or {}
                    if ref.get("kind", "Pod") == "Pod" and ref.get("name"):
                        refs.append((ref.get("namespace") or service.namespace, ref["name"]))
        else:
            for slice_ in self.state.all("EndpointSlice"):
                if (
                    namespace_of(slice_) != service.namespace
                    or labels_of(slice_).get("kubernetes.io/service-name") != service.name
                ):
                    continue
                for endpoint in slice_.get("endpoints") or []:
                    ready = (endpoint.get("conditions") or {}).get("ready", True)
                    ref = endpoint.get("targetRef") or {}
                    if ready and ref.get("kind", "Pod") == "Pod" and ref.get("name"):
                        refs.append((ref.get("namespace") or service.namespace, ref["name"]))
        pods: list[str] = []
        for namespace, name in refs:
            pod_key = key(name, namespace)
            if pod_key in self.topology.pods and pod_key not in pods:
                pods.append(pod_key)
        return pods

    # -- SMI access ---------------------------------------------------------------------

    def load_traffic_targets(self) -> None:
        topology = self.topology
        for obj in self.state.all("TrafficTarget"):
            if not watched(obj, self.settings):
                continue
            spec = spec_of(obj)
            tt_name, tt_ns = name_of(obj), namespace_of(obj)
            destination = spec.get("destination") or {}
            dest_sa = destination.get("name", "")
            dest_ns = destination.get("namespace") or tt_ns
            problems: list[str] = []
            sources = []
            for index, source in enumerate(spec.get("sources") or []):
                if not source.get("namespace"):
                    problems.append(f"sources[{index}]: the source namespace is required")
                    continue
                pods = [
                    k
                    for k, p in sorted(topology.pods.items())
                    if p.service_account == source.get("name")
                    and p.namespace == source["namespace"]
                ]
                sources.append(
                    {
                        "serviceAccount": source.get("name", ""),
                        "namespace": source["namespace"],
                        "pods": pods,
                    }
                )
            rules, rule_problems = self.traffic_target_rules(spec.get("rules") or [], tt_ns)
            problems += rule_problems
            for service in topology.services.values():
                if service.namespace != dest_ns:
                    continue
                dest_pods = [p for p in service.pods if topology.pods[p].service_account == dest_sa]
                if not dest_pods:
                    continue
                target = ServiceTrafficTarget(
                    service=service.key,
                    name=tt_name,
                    namespace=tt_ns,
                    sources=sources,
                    destination_sa=dest_sa,
                    destination_ns=dest_ns,
                    destination_ports=list(service.ports),
                    destination_pods=dest_pods,
                    rules=rules,
                    errors=list(problems),
                )
                port = destination.get("port")
                if port is not None:
                    # Traefik Mesh matches the numeric targetPort; we keep the whole ServicePort
                    # so the right entrypoint (by index in the Service) is used later.
                    chosen = [p for p in service.ports if p.target_port == port or p.port == port]
                    if not chosen:
                        target.errors.append(
                            f"destination port {port} is not a port of service {service.key}"
                        )
                    target.destination_ports = chosen
                topology.traffic_targets[target.key] = target
                service.traffic_targets.append(target.key)
                for pod in target.source_pods():
                    topology.pods[pod].source_of.append(target.key)
                for pod in dest_pods:
                    topology.pods[pod].destination_of.append(target.key)

    def traffic_target_rules(
        self, rules: list[Object], namespace: str
    ) -> tuple[list[TrafficTargetRule], list[str]]:
        out: list[TrafficTargetRule] = []
        problems: list[str] = []
        for index, rule in enumerate(rules):
            kind, name = rule.get("kind"), rule.get("name", "")
            if kind == "HTTPRouteGroup":
                group = self.state.get("HTTPRouteGroup", namespace, name)
                if group is None:
                    problems.append(f"rules[{index}]: HTTPRouteGroup {name}@{namespace} not found")
                    continue
                matches = self.http_matches(group)
                wanted = rule.get("matches") or []
                if wanted:
                    known = {m.name for m in matches}
                    missing = [w for w in wanted if w not in known]
                    if missing:
                        problems.append(
                            f"rules[{index}]: HTTPRouteGroup {name} has no match {missing[0]!r}"
                        )
                        continue
                    matches = [m for m in matches if m.name in wanted]
                out.append(TrafficTargetRule(http_matches=matches))
            elif kind == "TCPRoute":
                route = self.state.get("TCPRoute", namespace, name)
                if route is None:
                    problems.append(f"rules[{index}]: TCPRoute {name}@{namespace} not found")
                    continue
                ports = [str(p) for p in (spec_of(route).get("matches") or {}).get("ports") or []]
                out.append(TrafficTargetRule(tcp_route=True, tcp_ports=ports))
            else:
                problems.append(f"rules[{index}]: unknown rule kind {kind!r}")
        return out, problems

    @staticmethod
    def http_matches(group: Object) -> list[HTTPMatch]:
        return [
            HTTPMatch(
                name=m.get("name", ""),
                methods=list(m.get("methods") or []),
                path_regex=m.get("pathRegex") or "",
                headers=dict(m.get("headers") or {}),
            )
            for m in spec_of(group).get("matches") or []
        ]

    # -- SMI split ----------------------------------------------------------------------

    def load_traffic_splits(self) -> None:
        topology = self.topology
        for obj in self.state.all("TrafficSplit"):
            if not watched(obj, self.settings):
                continue
            spec = spec_of(obj)
            split = TrafficSplit(
                name=name_of(obj), namespace=namespace_of(obj), service="", backends=[]
            )
            root_key = key(spec.get("service", ""), split.namespace)
            root = topology.services.get(root_key)
            if root is None:
                topology.errors.append(
                    f"TrafficSplit {split.key}: root service {root_key} does not exist"
                )
                continue
            split.service = root_key
            rules = []
            for index, match in enumerate(spec.get("matches") or []):
                kind, name = match.get("kind"), match.get("name", "")
                if kind == "HTTPRouteGroup":
                    group = self.state.get("HTTPRouteGroup", split.namespace, name)
                    if group is None:
                        split.errors.append(f"matches[{index}]: HTTPRouteGroup {name} not found")
                        continue
                    rules.append(TrafficTargetRule(http_matches=self.http_matches(group)))
                elif kind == "TCPRoute":
                    rules.append(TrafficTargetRule(tcp_route=True))
                else:
                    split.errors.append(f"matches[{index}]: unknown kind {kind!r}")
            split.rules = rules
            root_ports = {p.port for p in root.ports}
            for index, backend in enumerate(spec.get("backends") or []):
                backend_key = key(backend.get("service", ""), split.namespace)
                target = topology.services.get(backend_key)
                if target is None:
                    split.errors.append(f"backends[{index}]: service {backend_key} does not exist")
                    continue
                missing = root_ports - {p.port for p in target.ports}
                if missing:
                    split.errors.append(
                        f"backends[{index}]: service {backend_key} lacks port(s) "
                        + ", ".join(str(p) for p in sorted(missing))
                    )
                    continue
                split.backends.append((int(backend.get("weight", 0)), backend_key))
            topology.traffic_splits[split.key] = split
            root.traffic_splits.append(split.key)
            for _, backend_key in split.backends:
                topology.services[backend_key].backend_of.append(split.key)
        self.remove_split_cycles()

    def remove_split_cycles(self) -> None:
        """A split whose backends lead back to its own root service is removed (with an error
        on it): following it would route a request in circles through the proxies."""
        topology = self.topology
        for split in sorted(topology.traffic_splits.values(), key=lambda s: s.key):
            if self._reaches(split, split.service, set()):
                split.errors.append(
                    f"TrafficSplit {split.key} forms a cycle through service {split.service}"
                )
                root = topology.services[split.service]
                root.traffic_splits = [k for k in root.traffic_splits if k != split.key]
                for _, backend in split.backends:
                    service = topology.services[backend]
                    service.backend_of = [k for k in service.backend_of if k != split.key]
                split.backends = []

    def _reaches(self, split: TrafficSplit, root: str, seen: set[str]) -> bool:
        for _, backend in split.backends:
            if backend == root:
                return True
            if backend in seen:
                continue
            seen.add(backend)
            for nested in self.topology.services[backend].traffic_splits:
                if self._reaches(self.topology.traffic_splits[nested], root, seen):
                    return True
        return False

    def compute_incoming(self) -> None:
        """Pods allowed on every backend of a split (recursively through nested splits)."""
        for split in self.topology.traffic_splits.values():
            split.incoming = sorted(self._allowed(split, set()))

    def _allowed(self, split: TrafficSplit, seen: set[str]) -> set[str]:
        result: set[str] | None = None
        for _, backend_key in split.backends:
            backend = self.topology.services[backend_key]
            allowed: set[str] = set()
            for target_key in backend.traffic_targets:
                allowed.update(self.topology.traffic_targets[target_key].source_pods())
            for nested in backend.traffic_splits:
                if nested not in seen:
                    seen.add(nested)
                    allowed &= self._allowed(self.topology.traffic_splits[nested], seen)
            result = allowed if result is None else result & allowed
        return result or set()


def build_topology(state: ClusterState, settings: ControllerSettings) -> Topology:
    return _Builder(state, settings).build()
