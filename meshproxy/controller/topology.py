"""Cluster state -> the mesh topology: which pods serve which service, who may call whom, how
traffic is split. Mirrors Traefik Mesh's topology builder (and its JSON shape on
/api/topology/current); every problem is recorded in the `errors` of the object it concerns
and that object is skipped, never the whole topology.

Objects come from users (manifests, CRDs applied with kubectl), so their shape is checked
here: a wrong shape is an `ObjectError` naming the field, and any other exception raised while
building from one object is caught too. Either way the error lands on that object
(`objectErrors` in the JSON, keyed `Kind name@namespace`, plus the `errors` of a placed
service, target or split) and every other object is still built.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from meshproxy.controller.objects import (
    ClusterState,
    Object,
    key,
    labels_of,
    meta,
    name_of,
    namespace_of,
    spec_of,
)
from meshproxy.controller.settings import ControllerSettings

log = logging.getLogger("meshproxy.controller")

IGNORED_LABEL_APPS = ("maesh", "jaeger")


class ObjectError(ValueError):
    """A cluster object does not have the shape its kind requires (message names the field)."""


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
    headers: list[tuple[str, str]]  # (name, regex); a name may repeat (all must match)


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
    # "Kind name@namespace" -> problems of that object (shape errors, build failures)
    object_errors: dict[str, list[str]] = field(default_factory=dict)

    def record(self, ident: str, message: str) -> None:
        """Record a problem of one cluster object (kept once)."""
        problems = self.object_errors.setdefault(ident, [])
        if message not in problems:
            problems.append(message)

    def all_errors(self) -> list[str]:
        """Every problem, prefixed with the object it concerns (for logging)."""
        out = [f"{ident}: {m}" for ident, ms in sorted(self.object_errors.items()) for m in ms]
        out += [f"Service {k}: {m}" for k, s in sorted(self.services.items()) for m in s.errors]
        out += [
            f"TrafficTarget {k}: {m}"
            for k, t in sorted(self.traffic_targets.items())
            for m in t.errors
        ]
        out += [
            f"TrafficSplit {k}: {m}"
            for k, s in sorted(self.traffic_splits.items())
            for m in s.errors
        ]
        return out + list(self.errors)

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
            "objectErrors": {k: v for k, v in sorted(self.object_errors.items())},
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


# ---------------------------------------------------------------- shapes


def _kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _map(value: Any, where: str) -> dict[str, Any]:
    """A map field (absent = empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ObjectError(f"{where}: expected a map, got {_kind_of(value)}")
    return value


def _seq(value: Any, where: str) -> list[Any]:
    """A list field (absent = empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ObjectError(f"{where}: expected a list, got {_kind_of(value)}")
    return value


def _text(value: Any, where: str, default: str = "") -> str:
    """A scalar field read as text (YAML turns `1` or `true` into other scalars)."""
    if value is None:
        return default
    if isinstance(value, (dict, list)):
        raise ObjectError(f"{where}: expected a string, got {_kind_of(value)}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _port(value: Any, where: str) -> int:
    """A port number, 1..65535 (an int or a string of digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ObjectError(f"{where}: expected a port number, got {_kind_of(value)}")
    if isinstance(value, str) and not value.isdigit():
        raise ObjectError(f"{where}: expected a port number, got {value!r}")
    number = int(value)
    if not 1 <= number <= 65535:
        raise ObjectError(f"{where}: port {number} out of range 1-65535")
    return number


def _target_port(value: Any, default: int, where: str) -> int | str:
    """A Service targetPort: a number or the name of a container port."""
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return _port(value, where)
    if isinstance(value, str) and value:
        return _port(value, where) if value.isdigit() else value
    raise ObjectError(f"{where}: expected a port number or name, got {value!r}")


# RFC 9110 §5.6.2: method and field names are tokens. A token never contains the backtick
# that quotes values in Traefik rules, so a checked name cannot break out of the rule text.
_TOKEN = re.compile(r"^[!#$%&'*+.^_|~0-9A-Za-z-]+$")


def _rule_text(value: Any, where: str) -> str:
    """Text placed between backticks in a Traefik rule: a backtick would end the quoting and
    let the object inject matchers of its own, so it is refused."""
    text = _text(value, where)
    if "`" in text:
        raise ObjectError(f"{where}: a backtick is not allowed (it would end the rule's quoting)")
    return text


def _token(value: Any, where: str, what: str) -> str:
    text = _text(value, where)
    if not _TOKEN.match(text):
        raise ObjectError(f"{where}: {text!r} is not a valid {what} (RFC 9110 token)")
    return text


def parse_match_headers(value: Any, where: str) -> list[tuple[str, str]]:
    """HTTPRouteGroup `headers`, in both forms found in the wild.

    - a map `{Name: regex}` (Traefik Mesh's Go type in specs/v1alpha3);
    - a list of maps `[{Name: regex}, ...]` (the SMI specs v1alpha3 document and Traefik
      Mesh's own integration-test manifests write it this way).
    Both give (name, regex) pairs; every pair must match (they are ANDed in the rule).
    """
    if value is None:
        return []
    entries: list[tuple[Any, Any, str]] = []
    if isinstance(value, dict):
        entries = [(k, v, f"{where}.{k}") for k, v in value.items()]
    elif isinstance(value, list):
        for index, item in enumerate(value):
            item_map = _map(item, f"{where}[{index}]")
            if not item_map:
                raise ObjectError(f"{where}[{index}]: expected a {{name: regex}} map, got {{}}")
            entries += [(k, v, f"{where}[{index}].{k}") for k, v in item_map.items()]
    else:
        raise ObjectError(f"{where}: expected a map or a list of maps, got {_kind_of(value)}")
    out = []
    for name, regex, at in entries:
        header = _token(name, at, "header name")
        if isinstance(regex, (dict, list)) or regex is None:
            raise ObjectError(f"{at}: expected a regular expression, got {_kind_of(regex)}")
        pattern = _rule_text(regex, at)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ObjectError(f"{at}: invalid regular expression: {exc}") from None
        out.append((header, pattern))
    return out


def parse_route_group(group: Object) -> list[HTTPMatch]:
    """The matches of one HTTPRouteGroup (specs.smi-spec.io/v1alpha3); ObjectError when a
    field has the wrong shape."""
    spec = _map(group.get("spec"), "spec")
    out = []
    for index, raw in enumerate(_seq(spec.get("matches"), "spec.matches")):
        where = f"spec.matches[{index}]"
        match = _map(raw, where)
        methods_raw = match.get("methods")
        if isinstance(methods_raw, str):  # `methods: GET` would otherwise read as G, E, T
            raise ObjectError(f"{where}.methods: expected a list, got str")
        methods = [
            m if m == "*" else _token(m, f"{where}.methods[{i}]", "method")
            for i, m in enumerate(_seq(methods_raw, f"{where}.methods"))
        ]
        path_regex = _rule_text(match.get("pathRegex"), f"{where}.pathRegex")
        try:
            re.compile(path_regex)
        except re.error as exc:
            raise ObjectError(f"{where}.pathRegex: invalid regular expression: {exc}") from None
        out.append(
            HTTPMatch(
                name=_text(match.get("name"), f"{where}.name"),
                methods=methods,
                path_regex=path_regex,
                headers=parse_match_headers(match.get("headers"), f"{where}.headers"),
            )
        )
    return out


def parse_tcp_route(route: Object) -> list[str]:
    """The ports of one TCPRoute's `spec.matches.ports` (may be empty: every port)."""
    spec = _map(route.get("spec"), "spec")
    matches = _map(spec.get("matches"), "spec.matches")
    return [
        str(_port(p, f"spec.matches.ports[{i}]"))
        for i, p in enumerate(_seq(matches.get("ports"), "spec.matches.ports"))
    ]


def ident(kind: str, obj: Object) -> str:
    """How an object is named in `objectErrors` and the logs: `Kind name@namespace`."""
    return f"{kind} {key(name_of(obj), namespace_of(obj))}"


# ---------------------------------------------------------------- building


class _Builder:
    def __init__(self, state: ClusterState, settings: ControllerSettings) -> None:
        self.state = state
        self.settings = settings
        self.topology = Topology()
        # (namespace, name) -> matches / ports, or None when the object is invalid
        self.route_groups: dict[tuple[str, str], list[HTTPMatch] | None] = {}
        self.tcp_routes: dict[tuple[str, str], list[str] | None] = {}

    def build(self) -> Topology:
        self.load_pods()
        self.load_services()
        self.load_routes()
        if self.settings.acl:
            self.load_traffic_targets()
        self.load_traffic_splits()
        if self.settings.acl:
            self.compute_incoming()
        return self.topology

    def failed(self, kind: str, obj: Object, exc: Exception) -> None:
        """Record why one object could not be built. A shape error is the user's; anything
        else is a bug of ours, logged with its traceback, but still confined to the object."""
        name = ident(kind, obj)
        if isinstance(exc, ObjectError):
            self.topology.record(name, str(exc))
        else:
            log.error("%s: building from this object failed", name, exc_info=exc)
            self.topology.record(name, f"internal error: {type(exc).__name__}: {exc}")

    # -- pods and services --------------------------------------------------------------

    def load_pods(self) -> None:
        for obj in self.state.all("Pod"):
            if not watched(obj, self.settings):
                continue
            try:
                pod = self.pod(obj)
            except Exception as exc:  # one bad object must not stop the rebuild
                self.failed("Pod", obj, exc)
                continue
            self.topology.pods[key(pod.name, pod.namespace)] = pod

    @staticmethod
    def pod(obj: Object) -> Pod:
        spec = _map(obj.get("spec"), "spec")
        ports = []
        for c_index, raw in enumerate(_seq(spec.get("containers"), "spec.containers")):
            container = _map(raw, f"spec.containers[{c_index}]")
            where = f"spec.containers[{c_index}].ports"
            for p_index, port_raw in enumerate(_seq(container.get("ports"), where)):
                port = _map(port_raw, f"{where}[{p_index}]")
                _port(port.get("containerPort"), f"{where}[{p_index}].containerPort")
                ports.append(port)
        status = _map(obj.get("status"), "status")
        return Pod(
            name=name_of(obj),
            namespace=namespace_of(obj),
            service_account=_text(spec.get("serviceAccountName"), "spec.serviceAccountName")
            or _text(spec.get("serviceAccount"), "spec.serviceAccount")
            or "default",
            ip=_text(status.get("podIP"), "status.podIP"),
            container_ports=ports,
        )

    def load_services(self) -> None:
        for obj in self.state.all("Service"):
            if not meshed_service(obj, self.settings):
                continue
            try:
                service = self.service(obj)
            except Exception as exc:
                self.failed("Service", obj, exc)
                continue
            self.topology.services[service.key] = service

    def service(self, obj: Object) -> Service:
        spec = _map(obj.get("spec"), "spec")
        ports = []
        for index, raw in enumerate(_seq(spec.get("ports"), "spec.ports")):
            where = f"spec.ports[{index}]"
            port = _map(raw, where)
            number = _port(port.get("port"), f"{where}.port")
            ports.append(
                ServicePort(
                    name=_text(port.get("name"), f"{where}.name"),
                    protocol=_text(port.get("protocol"), f"{where}.protocol", "TCP"),
                    port=number,
                    target_port=_target_port(port.get("targetPort"), number, f"{where}.targetPort"),
                )
            )
        annotations = _map(meta(obj).get("annotations"), "metadata.annotations")
        selector = _map(spec.get("selector"), "spec.selector")
        service = Service(
            name=name_of(obj),
            namespace=namespace_of(obj),
            selector={str(k): _text(v, f"spec.selector.{k}") for k, v in selector.items()},
            annotations={
                str(k): _text(v, f"metadata.annotations.{k}") for k, v in annotations.items()
            },
            ports=ports,
            cluster_ip=_text(spec.get("clusterIP"), "spec.clusterIP"),
        )
        service.pods = self.service_pods(service)
        return service

    def service_pods(self, service: Service) -> list[str]:
        """Ready pods behind the Service, from Endpoints (or EndpointSlices), deduplicated.
        A malformed Endpoints or EndpointSlice is recorded on itself and contributes nothing."""
        refs: list[tuple[str, str]] = []
        endpoints = self.state.get("Endpoints", service.namespace, service.name)
        if endpoints is not None:
            try:
                refs = self.endpoint_refs(endpoints, service.namespace)
            except Exception as exc:
                self.failed("Endpoints", endpoints, exc)
        else:
            for slice_ in self.state.all("EndpointSlice"):
                if (
                    namespace_of(slice_) != service.namespace
                    or labels_of(slice_).get("kubernetes.io/service-name") != service.name
                ):
                    continue
                try:
                    refs += self.slice_refs(slice_, service.namespace)
                except Exception as exc:
                    self.failed("EndpointSlice", slice_, exc)
        pods: list[str] = []
        for namespace, name in refs:
            pod_key = key(name, namespace)
            if pod_key in self.topology.pods and pod_key not in pods:
                pods.append(pod_key)
        return pods

    @staticmethod
    def endpoint_refs(endpoints: Object, namespace: str) -> list[tuple[str, str]]:
        refs = []
        for s_index, raw in enumerate(_seq(endpoints.get("subsets"), "subsets")):
            subset = _map(raw, f"subsets[{s_index}]")
            where = f"subsets[{s_index}].addresses"
            for a_index, address_raw in enumerate(_seq(subset.get("addresses"), where)):
                address = _map(address_raw, f"{where}[{a_index}]")
                ref = _map(address.get("targetRef"), f"{where}[{a_index}].targetRef")
                if ref.get("kind", "Pod") == "Pod" and ref.get("name"):
                    refs.append(
                        (
                            _text(ref.get("namespace"), "targetRef.namespace") or namespace,
                            _text(ref["name"], "targetRef.name"),
                        )
                    )
        return refs

    @staticmethod
    def slice_refs(slice_: Object, namespace: str) -> list[tuple[str, str]]:
        refs = []
        for index, raw in enumerate(_seq(slice_.get("endpoints"), "endpoints")):
            endpoint = _map(raw, f"endpoints[{index}]")
            conditions = _map(endpoint.get("conditions"), f"endpoints[{index}].conditions")
            ready = conditions.get("ready", True)
            ref = _map(endpoint.get("targetRef"), f"endpoints[{index}].targetRef")
            if ready and ref.get("kind", "Pod") == "Pod" and ref.get("name"):
                refs.append(
                    (
                        _text(ref.get("namespace"), "targetRef.namespace") or namespace,
                        _text(ref["name"], "targetRef.name"),
                    )
                )
        return refs

    # -- SMI routes ---------------------------------------------------------------------

    def load_routes(self) -> None:
        """Parse every HTTPRouteGroup and TCPRoute once; an invalid one is recorded and every
        TrafficTarget or TrafficSplit referring to it is refused with it (fail closed)."""
        for obj in self.state.all("HTTPRouteGroup"):
            ident_key = (namespace_of(obj), name_of(obj))
            try:
                self.route_groups[ident_key] = parse_route_group(obj)
            except Exception as exc:
                self.failed("HTTPRouteGroup", obj, exc)
                self.route_groups[ident_key] = None
        for obj in self.state.all("TCPRoute"):
            ident_key = (namespace_of(obj), name_of(obj))
            try:
                self.tcp_routes[ident_key] = parse_tcp_route(obj)
            except Exception as exc:
                self.failed("TCPRoute", obj, exc)
                self.tcp_routes[ident_key] = None

    # -- SMI access ---------------------------------------------------------------------

    def load_traffic_targets(self) -> None:
        for obj in self.state.all("TrafficTarget"):
            if not watched(obj, self.settings):
                continue
            try:
                targets = self.traffic_target(obj)
            except Exception as exc:
                self.failed("TrafficTarget", obj, exc)
                continue
            self.register_targets(targets)

    def traffic_target(self, obj: Object) -> list[ServiceTrafficTarget]:
        """The ServiceTrafficTargets of one TrafficTarget (nothing is registered here, so a
        failure halfway leaves no trace in the topology but the error).

        As Traefik Mesh's builder (`evaluateTrafficTarget`), a TrafficTarget whose rules cannot
        be built (a missing or invalid HTTPRouteGroup or TCPRoute, a missing named match, an
        unknown kind) is not applied at all: in ACL mode its sources are then refused, rather
        than allowed on more paths than the target says.
        """
        topology = self.topology
        spec = _map(obj.get("spec"), "spec")
        tt_name, tt_ns = name_of(obj), namespace_of(obj)
        destination = _map(spec.get("destination"), "spec.destination")
        dest_sa = _text(destination.get("name"), "spec.destination.name")
        dest_ns = _text(destination.get("namespace"), "spec.destination.namespace") or tt_ns
        port = destination.get("port")
        dest_port = None if port is None else _port(port, "spec.destination.port")
        problems: list[str] = []
        sources = []
        for index, raw in enumerate(_seq(spec.get("sources"), "spec.sources")):
            source = _map(raw, f"spec.sources[{index}]")
            source_ns = _text(source.get("namespace"), f"spec.sources[{index}].namespace")
            source_sa = _text(source.get("name"), f"spec.sources[{index}].name")
            if not source_ns:
                problems.append(f"sources[{index}]: the source namespace is required")
                continue
            pods = [
                k
                for k, p in sorted(topology.pods.items())
                if p.service_account == source_sa and p.namespace == source_ns
            ]
            sources.append({"serviceAccount": source_sa, "namespace": source_ns, "pods": pods})
        rules, rule_problems = self.traffic_target_rules(
            _seq(spec.get("rules"), "spec.rules"), tt_ns
        )
        if rule_problems:
            raise ObjectError("; ".join(rule_problems) + "; TrafficTarget not applied")
        out = []
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
            if dest_port is not None:
                # Traefik Mesh matches the numeric targetPort; we keep the whole ServicePort
                # so the right entrypoint (by index in the Service) is used later.
                chosen = [
                    p for p in service.ports if p.target_port == dest_port or p.port == dest_port
                ]
                if not chosen:
                    target.errors.append(
                        f"destination port {dest_port} is not a port of service {service.key}"
                    )
                target.destination_ports = chosen
            out.append(target)
        return out

    def register_targets(self, targets: list[ServiceTrafficTarget]) -> None:
        topology = self.topology
        for target in targets:
            topology.traffic_targets[target.key] = target
            topology.services[target.service].traffic_targets.append(target.key)
            for pod in target.source_pods():
                topology.pods[pod].source_of.append(target.key)
            for pod in target.destination_pods:
                topology.pods[pod].destination_of.append(target.key)

    def traffic_target_rules(
        self, rules: list[Any], namespace: str
    ) -> tuple[list[TrafficTargetRule], list[str]]:
        out: list[TrafficTargetRule] = []
        problems: list[str] = []
        for index, raw in enumerate(rules):
            rule = _map(raw, f"spec.rules[{index}]")
            kind = rule.get("kind")
            name = _text(rule.get("name"), f"spec.rules[{index}].name")
            if kind == "HTTPRouteGroup":
                if (namespace, name) not in self.route_groups:
                    problems.append(f"rules[{index}]: HTTPRouteGroup {name}@{namespace} not found")
                    continue
                matches = self.route_groups[(namespace, name)]
                if matches is None:
                    problems.append(f"rules[{index}]: HTTPRouteGroup {name}@{namespace} is invalid")
                    continue
                wanted = [
                    _text(w, f"spec.rules[{index}].matches[{i}]")
                    for i, w in enumerate(_seq(rule.get("matches"), f"spec.rules[{index}].matches"))
                ]
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
                if (namespace, name) not in self.tcp_routes:
                    problems.append(f"rules[{index}]: TCPRoute {name}@{namespace} not found")
                    continue
                ports = self.tcp_routes[(namespace, name)]
                if ports is None:
                    problems.append(f"rules[{index}]: TCPRoute {name}@{namespace} is invalid")
                    continue
                out.append(TrafficTargetRule(tcp_route=True, tcp_ports=ports))
            else:
                problems.append(f"rules[{index}]: unknown rule kind {kind!r}")
        return out, problems

    # -- SMI split ----------------------------------------------------------------------

    def load_traffic_splits(self) -> None:
        topology = self.topology
        for obj in self.state.all("TrafficSplit"):
            if not watched(obj, self.settings):
                continue
            try:
                split = self.traffic_split(obj)
            except Exception as exc:
                self.failed("TrafficSplit", obj, exc)
                continue
            if split is None:
                continue
            topology.traffic_splits[split.key] = split
            topology.services[split.service].traffic_splits.append(split.key)
            for _, backend_key in split.backends:
                topology.services[backend_key].backend_of.append(split.key)
        self.remove_split_cycles()

    def traffic_split(self, obj: Object) -> TrafficSplit | None:
        """One TrafficSplit, not yet registered. A match that cannot be built (missing or
        invalid route, unknown kind) is an error and the split is not applied (no backends):
        its root service keeps its own routers rather than being split on the wrong traffic."""
        topology = self.topology
        spec = _map(obj.get("spec"), "spec")
        split = TrafficSplit(
            name=name_of(obj), namespace=namespace_of(obj), service="", backends=[]
        )
        root_key = key(_text(spec.get("service"), "spec.service"), split.namespace)
        root = topology.services.get(root_key)
        if root is None:
            topology.errors.append(
                f"TrafficSplit {split.key}: root service {root_key} does not exist"
            )
            return None
        split.service = root_key
        rules = []
        for index, raw in enumerate(_seq(spec.get("matches"), "spec.matches")):
            match = _map(raw, f"spec.matches[{index}]")
            kind = match.get("kind")
            name = _text(match.get("name"), f"spec.matches[{index}].name")
            if kind == "HTTPRouteGroup":
                if (split.namespace, name) not in self.route_groups:
                    split.errors.append(f"matches[{index}]: HTTPRouteGroup {name} not found")
                    continue
                matches = self.route_groups[(split.namespace, name)]
                if matches is None:
                    split.errors.append(f"matches[{index}]: HTTPRouteGroup {name} is invalid")
                    continue
                rules.append(TrafficTargetRule(http_matches=matches))
            elif kind == "TCPRoute":
                rules.append(TrafficTargetRule(tcp_route=True))
            else:
                split.errors.append(f"matches[{index}]: unknown kind {kind!r}")
        split.rules = rules
        invalid_match = any(e.endswith(" is invalid") for e in split.errors)
        root_ports = {p.port for p in root.ports}
        for index, raw in enumerate(_seq(spec.get("backends"), "spec.backends")):
            backend = _map(raw, f"spec.backends[{index}]")
            backend_key = key(
                _text(backend.get("service"), f"spec.backends[{index}].service"), split.namespace
            )
            weight_raw = backend.get("weight", 0)
            if isinstance(weight_raw, str) and weight_raw.isdigit():
                weight_raw = int(weight_raw)
            if isinstance(weight_raw, bool) or not isinstance(weight_raw, int) or weight_raw < 0:
                raise ObjectError(
                    f"spec.backends[{index}].weight: expected an integer >= 0, got {weight_raw!r}"
                )
            weight = weight_raw
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
            split.backends.append((weight, backend_key))
        if invalid_match:
            split.errors.append("TrafficSplit not applied (a match is invalid)")
            split.backends = []
        return split

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
