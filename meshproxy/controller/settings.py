"""The controller's options: Traefik Mesh's flags and defaults, plus meshproxy's own."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ControllerSettings:
    acl: bool = False
    default_mode: str = "http"
    namespace: str = "maesh"  # the mesh's own namespace (shadow services live there)
    watch_namespaces: list[str] = field(default_factory=list)
    ignore_namespaces: list[str] = field(default_factory=list)
    api_host: str = ""
    api_port: int = 9000
    limit_http_port: int = 10
    limit_tcp_port: int = 25
    limit_udp_port: int = 25
    min_http_port: int = 5000
    min_tcp_port: int = 10000
    min_udp_port: int = 15000
    cluster_domain: str = "cluster.local"
    proxy_admin_port: int = 8080  # the readiness router sends /ping to the proxy's admin port
    # meshproxy additions
    manifests: str | None = None  # read cluster state from this directory, not the API
    port_state_file: str | None = None  # TCP/UDP port table kept here in manifest mode
    kubeconfig: str | None = None
    master_url: str | None = None
    resync_seconds: float = 300.0
    local_traffic_policy: bool = False  # shadow services with internalTrafficPolicy: Local
    # The X-Forwarded-For ("indirect") allowlists also require the peer to be a mesh proxy;
    # false reproduces Traefik Mesh's output exactly (and its spoofable allowlist).
    indirect_from_proxies_only: bool = True
    # Addresses of mesh proxies that are not Pods (the local mesh's own proxy, 127.0.0.1):
    # added to the proxy pods' IPs where the configuration lists the proxies. Not a flag.
    extra_proxy_ips: list[str] = field(default_factory=list)

    @property
    def max_http_port(self) -> int:
        return self.min_http_port + self.limit_http_port - 1

    @property
    def max_tcp_port(self) -> int:
        return self.min_tcp_port + self.limit_tcp_port - 1

    @property
    def max_udp_port(self) -> int:
        return self.min_udp_port + self.limit_udp_port - 1
