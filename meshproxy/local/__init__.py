"""`meshproxy local`: a whole mesh on loopback in one process, fed by manifests.

The controller reads the manifests (`config/local-mesh/` by default: Services, Endpoints and
Pods as a cluster would hold them) and takes every controller flag (`--acl`, `--defaultMode`,
...); the proxy polls the controller exactly as a DaemonSet pod would, and a demo backend is
started for every Pod labelled `demo.meshproxy.io/backend`. Mesh names
(`svc.ns.traefik.mesh:PORT`, the upstreams of TrafficSplit backends) are dialled at the local
proxy's entrypoint for that port, as CoreDNS and the shadow Services arrange in a cluster.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from meshproxy.config.static import build_static
from meshproxy.controller.app import Controller
from meshproxy.controller.objects import labels_of, name_of
from meshproxy.controller.runner import start_controller
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.sources.manifests import load_manifests
from meshproxy.daemon import ProxyDaemon
from meshproxy.demo.backend import serve_whoami
from meshproxy.demo.echo import (
    serve_grpc_echo,
    serve_tcp_echo,
    serve_udp_echo,
    serve_websocket_echo,
)
from meshproxy.upstream_address import set_resolver

log = logging.getLogger("meshproxy.local")

BACKEND_LABEL = "demo.meshproxy.io/backend"


@dataclass
class LocalPorts:
    http: int = 5000
    tcp: int = 10000
    udp: int = 15000
    admin: int = 8080
    api: int = 9000
    readiness: int = 1081
    liveness: int = 1082
    count: int = 2  # entrypoints of each kind


def default_manifests() -> Path:
    """`config/local-mesh` in a checkout, else the copy shipped in the package."""
    checkout = Path("config/local-mesh")
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("meshproxy.local").joinpath("manifests")))


async def start_backends(manifests: Path) -> list[Any]:
    state, _ = load_manifests(manifests)
    started: list[Any] = []
    for pod in state.all("Pod"):
        kind = labels_of(pod).get(BACKEND_LABEL)
        if kind is None:
            continue
        ip = (pod.get("status") or {}).get("podIP", "127.0.0.1")
        ports = [p for c in pod["spec"].get("containers", []) for p in c.get("ports", [])]
        for port in ports:
            number = int(port["containerPort"])
            if kind == "whoami":
                started.append(await serve_whoami(ip, number, name_of(pod)))
            elif kind == "tcp-echo":
                started.append(await serve_tcp_echo(ip, number))
            elif kind == "udp-echo":
                started.append(await serve_udp_echo(ip, number))
            elif kind == "websocket-echo":
                started.append(await serve_websocket_echo(ip, number))
            elif kind == "grpc-echo":
                started.append(await serve_grpc_echo(ip, number))
            else:
                log.warning("pod %s: unknown demo backend %r", name_of(pod), kind)
    return started


def local_settings(
    ports: LocalPorts,
    manifests: Path | None,
    flags: ControllerSettings | None = None,
    given: set[str] | None = None,
    state_dir: str | None = None,
) -> ControllerSettings:
    """The controller's settings in the local mesh: every controller flag as given
    (`--acl`, `--defaultMode`, `--namespace`, `--limitHTTPPort`, `--apiPort`, ...), and for
    the flags not given the local defaults (API on 127.0.0.1:`ports.api`, namespace `mesh`,
    `ports.count` entrypoints of each kind, port table in `state_dir`). The entrypoint ranges
    always start at the local ports, which is where the local proxy listens."""
    settings = replace(flags) if flags is not None else ControllerSettings()
    given = given or set()
    local_defaults: dict[str, Any] = {
        "api_host": "127.0.0.1",
        "api_port": ports.api,
        "namespace": "mesh",
        "limit_http_port": ports.count,
        "limit_tcp_port": ports.count,
        "limit_udp_port": ports.count,
    }
    if state_dir is not None:
        local_defaults["port_state_file"] = str(Path(state_dir) / "ports.json")
    if "kubeconfig" not in given and "master_url" not in given:
        local_defaults["manifests"] = str(manifests or default_manifests())
    for name, value in local_defaults.items():
        if name not in given:
            setattr(settings, name, value)
    settings.min_http_port = ports.http
    settings.min_tcp_port = ports.tcp
    settings.min_udp_port = ports.udp
    settings.proxy_admin_port = ports.admin
    # The local proxy is a mesh proxy that is not a Pod: second hops (TrafficSplit backends)
    # come from it, and the "indirect" allowlists must accept it.
    settings.extra_proxy_ips = sorted({*settings.extra_proxy_ips, LOCAL_PROXY_HOST})
    return settings


LOCAL_PROXY_HOST = "127.0.0.1"


def proxy_flags(ports: LocalPorts, settings: ControllerSettings | None = None) -> list[str]:
    """The local proxy's flags: Traefik Mesh's DaemonSet layout on 127.0.0.1, with as many
    entrypoints of each kind as the controller's limits say."""
    settings = settings or local_settings(ports, None)
    host = LOCAL_PROXY_HOST
    flags = [
        f"--entryPoints.readiness.address={host}:{ports.readiness}",
        f"--entryPoints.liveness.address={host}:{ports.liveness}",
        f"--entryPoints.traefik.address={host}:{ports.admin}",
    ]
    for port in range(ports.http, ports.http + settings.limit_http_port):
        flags += [
            f"--entryPoints.http-{port}.address={host}:{port}",
            f"--entryPoints.http-{port}.forwardedHeaders.insecure=true",
        ]
    for port in range(ports.tcp, ports.tcp + settings.limit_tcp_port):
        flags.append(f"--entryPoints.tcp-{port}.address={host}:{port}")
    for port in range(ports.udp, ports.udp + settings.limit_udp_port):
        flags.append(f"--entryPoints.udp-{port}.address={host}:{port}/udp")
    api_host = settings.api_host if settings.api_host not in ("", "0.0.0.0", "::") else host
    if ":" in api_host:
        api_host = f"[{api_host}]"
    return [
        *flags,
        f"--providers.http.endpoint=http://{api_host}:{settings.api_port}/api/configuration/current",
        "--providers.http.pollInterval=200ms",
        "--providers.http.pollTimeout=1s",
        "--api.insecure",
        "--ping",
        "--metrics.prometheus=true",
    ]


def mesh_resolver(controller: Controller) -> Any:
    """`svc.ns.traefik.mesh:PORT` -> the local proxy's entrypoint for that service port (what
    CoreDNS and the shadow Service do in a cluster); other names are left alone."""

    def resolve(host: str, port: int) -> tuple[str, int] | None:
        entrypoint = controller.mesh_entrypoint(host, port)
        return None if entrypoint is None else (LOCAL_PROXY_HOST, entrypoint)

    return resolve


async def run_local(
    ports: LocalPorts,
    manifests: Path | None = None,
    flags: ControllerSettings | None = None,
    given: set[str] | None = None,
) -> None:
    """Controller, proxy and demo backends in this process, until SIGINT/SIGTERM."""
    manifests = manifests or default_manifests()
    with tempfile.TemporaryDirectory(prefix="meshproxy-local-") as state_dir:
        settings = local_settings(ports, manifests, flags, given, state_dir)
        controller, tasks, runner = await start_controller(settings)
        backends = await start_backends(manifests) if settings.manifests else []
        static, _ = build_static(None, proxy_flags(ports, settings))
        daemon = ProxyDaemon(static)
        set_resolver(mesh_resolver(controller))
        print(banner(ports, manifests, settings), flush=True)
        try:
            await daemon.run_forever()
        finally:
            set_resolver(None)
            for task in tasks:
                task.cancel()
            await runner.cleanup()
            for backend in backends:
                if hasattr(backend, "cleanup"):  # the aiohttp runner of the WebSocket echo
                    await backend.cleanup()
                elif hasattr(backend, "stop"):  # the gRPC server
                    await backend.stop(None)
                else:
                    backend.close()


def banner(ports: LocalPorts, manifests: Path, settings: ControllerSettings) -> str:
    web = f"http://127.0.0.1:{ports.http}"
    api = f"http://127.0.0.1:{settings.api_port}"
    mode = "ACL" if settings.acl else "default"
    return f"""meshproxy local mesh is up (Ctrl-C to stop)
  manifests  : {settings.manifests or "(none: the Kubernetes API)"} ({mode} mode)
  controller : {api}/api/configuration/current (and /api/topology/current)
  proxy      : http-{ports.http}.. on 127.0.0.1, admin on 127.0.0.1:{ports.admin}

Try:
  curl -H 'Host: whoami.demo.traefik.mesh' {web}/     # round robin over whoami-1, whoami-2
  curl -H 'Host: api.demo.traefik.mesh' {web}/        # retry + rateLimit + circuitBreaker
  curl -H 'Host: canary.demo.traefik.mesh' {web}/     # TrafficSplit: 3 in 4 to whoami-1
  with --acl: curl --interface 127.0.0.2 -H 'Host: whoami.demo.traefik.mesh' {web}/
              (pod `client`, allowed by a TrafficTarget; from 127.0.0.1: 403)
  nc 127.0.0.1 {ports.tcp}                                   # TCP echo (echo-tcp)
  nc -u 127.0.0.1 {ports.udp}                                # UDP echo (echo-udp.demo.traefik.mesh)
  WebSocket echo: ws://chat.demo.traefik.mesh/ dialled at {web} (Host: chat.demo.traefik.mesh)
  gRPC over h2c (greeter, mesh.traefik.io/scheme: h2c; the proxy speaks h2c both ways):
  printf '\\0\\0\\0\\0\\2hi' | curl --http2-prior-knowledge -H 'Host: greeter.demo.traefik.mesh' \\
    -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @- \\
    {web}/meshproxy.demo.Echo/Say | od -c
  curl http://127.0.0.1:{ports.readiness}/ping                   # ready once the config arrived
  curl {api}/api/topology/current
  curl http://127.0.0.1:{ports.admin}/api/rawdata
  curl http://127.0.0.1:{ports.admin}/metrics
"""
