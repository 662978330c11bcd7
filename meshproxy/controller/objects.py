"""The cluster objects the controller reads, kept as the API serves them (plain JSON dicts).

Both sources (the Kubernetes API and manifest files) fill a `ClusterState`; the topology
builder reads it through the small accessors below, so neither source needs typed models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Object = dict[str, Any]

# kind -> (apiVersion group/version we read, plural used by the API)
KINDS: dict[str, tuple[str, str]] = {
    "Service": ("v1", "services"),
    "Endpoints": ("v1", "endpoints"),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices"),
    "Pod": ("v1", "pods"),
    "TrafficTarget": ("access.smi-spec.io/v1alpha2", "traffictargets"),
    "HTTPRouteGroup": ("specs.smi-spec.io/v1alpha3", "httproutegroups"),
    "TCPRoute": ("specs.smi-spec.io/v1alpha3", "tcproutes"),
    "TrafficSplit": ("split.smi-spec.io/v1alpha3", "trafficsplits"),
}


def meta(obj: Object) -> Object:
    """The object's metadata; a malformed one (not a map) reads as empty, so every accessor
    below is safe on any input and the topology builder reports the shape problem."""
    value = obj.get("metadata")
    return value if isinstance(value, dict) else {}


def name_of(obj: Object) -> str:
    return str(meta(obj).get("name", ""))


def namespace_of(obj: Object) -> str:
    return str(meta(obj).get("namespace") or "default")


def labels_of(obj: Object) -> dict[str, str]:
    value = meta(obj).get("labels")
    return value if isinstance(value, dict) else {}


def annotations_of(obj: Object) -> dict[str, str]:
    value = meta(obj).get("annotations")
    return value if isinstance(value, dict) else {}


def spec_of(obj: Object) -> Object:
    value = obj.get("spec")
    return value if isinstance(value, dict) else {}


def key(name: str, namespace: str) -> str:
    """Traefik Mesh's topology key: name@namespace."""
    return f"{name}@{namespace}"


@dataclass
class ClusterState:
    """The objects currently known, by kind then (namespace, name)."""

    objects: dict[str, dict[tuple[str, str], Object]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )

    def put(self, obj: Object) -> bool:
        """Add or replace; False when the object is of a kind we do not read."""
        kind = obj.get("kind", "")
        table = self.objects.get(kind)
        if table is None:
            return False
        table[(namespace_of(obj), name_of(obj))] = obj
        return True

    def remove(self, obj: Object) -> None:
        table = self.objects.get(obj.get("kind", ""))
        if table is not None:
            table.pop((namespace_of(obj), name_of(obj)), None)

    def replace_kind(self, kind: str, items: list[Object]) -> None:
        self.objects[kind] = {(namespace_of(o), name_of(o)): o for o in items}

    def all(self, kind: str) -> Iterator[Object]:
        table = self.objects.get(kind, {})
        for ident in sorted(table):
            yield table[ident]

    def get(self, kind: str, namespace: str, name: str) -> Object | None:
        return self.objects.get(kind, {}).get((namespace, name))
