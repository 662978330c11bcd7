"""The controller process: keeps the cluster state from its source, rebuilds topology and
configuration when it changes, and serves them. The served bytes are canonical (sorted keys,
compact), so identical state gives identical bytes and the same ETag: proxies reload only when
something really changed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from meshproxy.controller import annotations as notes
from meshproxy.controller.config_builder import BuildOptions, build_config, default_config
from meshproxy.controller.objects import ClusterState, labels_of, name_of, namespace_of
from meshproxy.controller.ports import PortTable, load_tables, save_tables
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.topology import Topology, build_topology

log = logging.getLogger("meshproxy.controller")

PROXY_COMPONENT = "maesh-mesh"  # Traefik Mesh's label for proxy pods: component=maesh-mesh


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode() + b"\n"


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.state = ClusterState()
        self.source_errors: list[str] = []
        saved = load_tables(settings.port_state_file)
        self.tables = {
            "tcp": PortTable(settings.min_tcp_port, settings.max_tcp_port, saved.get("tcp")),
            "udp": PortTable(settings.min_udp_port, settings.max_udp_port, saved.get("udp")),
        }
        self.topology = Topology()
        self.config_bytes = canonical_json(
            default_config(settings.proxy_admin_port)
        )  # served before the first sync
        self.topology_bytes = canonical_json(self.topology.to_json())
        self.etag = _etag(self.config_bytes)
        self.synced = asyncio.Event()
        self.generation = 0
        self._pending: asyncio.TimerHandle | None = None
        # Called after each rebuild (the Kubernetes source syncs shadow services from it).
        self.on_rebuild: Callable[[Controller], None] | None = None
        self._logged_errors: set[str] = set()

    # -- state in -------------------------------------------------------------------------

    def set_state(self, state: ClusterState, errors: list[str] | None = None) -> None:
        """A whole new view of the cluster (manifest source, or a Kubernetes re-list)."""
        self.state = state
        self.source_errors = list(errors or [])
        self.rebuild()

    def state_changed(self) -> None:
        """The state was edited in place (a watch event): rebuild soon, once per burst."""
        if self._pending is None:
            loop = asyncio.get_running_loop()
            self._pending = loop.call_later(0.05, self._rebuild_pending)

    def _rebuild_pending(self) -> None:
        self._pending = None
        self.rebuild()

    # -- building -------------------------------------------------------------------------

    def proxy_pods(self) -> list[dict[str, Any]]:
        return [
            pod
            for pod in self.state.all("Pod")
            if namespace_of(pod) == self.settings.namespace
            and labels_of(pod).get("component") == PROXY_COMPONENT
        ]

    def rebuild(self) -> None:
        """Rebuild topology and configuration from the current state.

        Never raises: the builders confine a bad object to itself (its error is in the
        topology), and should anything still escape, the last good configuration keeps being
        served and the failure is logged (a watch callback or the manifest poller must not
        die, which would freeze the mesh with readiness stuck at "not synced yet").
        """
        try:
            self._rebuild()
        except Exception:
            log.exception("rebuilding the configuration failed; the last one is still served")

    def _rebuild(self) -> None:
        topology = build_topology(self.state, self.settings)
        topology.errors.extend(self.source_errors)
        proxy_ips = sorted(
            {
                str(pod["status"]["podIP"])
                for pod in self.proxy_pods()
                if isinstance(pod.get("status"), dict) and pod["status"].get("podIP")
            }
            | set(self.settings.extra_proxy_ips)
        )
        options = BuildOptions(
            indirect_from_proxies_only=self.settings.indirect_from_proxies_only,
            proxy_ips=proxy_ips,
        )
        config = build_config(topology, self.settings, self.tables, options)
        save_tables(self.settings.port_state_file, self.tables)
        config_bytes = canonical_json(config)
        self.topology = topology
        self.topology_bytes = canonical_json(topology.to_json())
        if config_bytes != self.config_bytes:
            self.config_bytes = config_bytes
            self.etag = _etag(config_bytes)
            self.generation += 1
            log.info("configuration %d built (%d bytes)", self.generation, len(config_bytes))
        # Each problem is logged when it appears, not again at every rebuild of a burst.
        errors = topology.all_errors()
        for error in errors:
            if error not in self._logged_errors:
                log.warning("%s", error)
        self._logged_errors = set(errors)
        self.synced.set()
        if self.on_rebuild is not None:
            self.on_rebuild(self)

    def mesh_entrypoint(self, host: str, port: int) -> int | None:
        """The proxy port that serves `svc.ns.traefik.mesh:port` (or `svc.ns.maesh`), from the
        current topology: what CoreDNS plus the shadow Service do in a cluster. For an HTTP
        service, the `http-` entrypoint of that port's index among the Service's TCP ports;
        for TCP/UDP, the port allocated in the port table. None when the name or port is not
        a meshed service port (the caller then dials the name as it is)."""
        name = host.lower().rstrip(".")
        for suffix in (".traefik.mesh", ".maesh"):
            if name.endswith(suffix):
                service_name, _, namespace = name[: -len(suffix)].partition(".")
                break
        else:
            return None
        service = self.topology.services.get(f"{service_name}@{namespace}")
        if service is None:
            return None
        try:
            mode = notes.traffic_type(service.annotations, self.settings.default_mode)
        except notes.AnnotationError:
            return None
        if mode == "http":
            tcp_ports = [p for p in service.ports if p.protocol == "TCP"]
            for index, candidate in enumerate(tcp_ports):
                if candidate.port == port or candidate.target_port == port:
                    number = self.settings.min_http_port + index
                    return number if number <= self.settings.max_http_port else None
            return None
        table = self.tables[mode]
        for candidate in service.ports:
            if candidate.port == port or candidate.target_port == port:
                return table.get(service.namespace, service.name, candidate.port)
        return None

    def nodes(self) -> list[dict[str, Any]]:
        out = []
        for pod in self.proxy_pods():
            raw_status = pod.get("status")
            status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
            raw = status.get("containerStatuses")
            statuses = [s for s in raw if isinstance(s, dict)] if isinstance(raw, list) else []
            out.append(
                {
                    "Name": name_of(pod),
                    "IP": str(status.get("podIP") or ""),
                    "Ready": bool(statuses) and all(s.get("ready") is True for s in statuses),
                }
            )
        return out


def _etag(data: bytes) -> str:
    return '"' + hashlib.blake2b(data, digest_size=16).hexdigest() + '"'
