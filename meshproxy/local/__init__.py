"""`meshproxy local`: a whole mesh on loopback in one process, fed by manifests.

The controller reads the manifests (`config/local-mesh/` by default: Services, Endpoints and
Pods as a cluster would hold them), the proxy polls the controller exactly as a DaemonSet pod
would, and a demo backend is started for every Pod labelled `demo.meshproxy.io/backend`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from meshproxy.config.static import build_static
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


def proxy_flags(ports: LocalPorts) -> list[str]:
    flags = [
        f"--entryPoints.readiness.address=127.0.0.1:{ports.readiness}",
        f"--entryPoints.liveness.address=127.0.0.1:{ports.liveness}",
        f"--entryPoints.traefik.address=127.0.0.1:{ports.admin}",
    ]
    for offset in range(ports.count):
        flags += [
            f"--entryPoints.http-{ports.http + offset}.address=127.0.0.1:{ports.http + offset}",
            f"--entryPoints.http-{ports.http + offset}.forwardedHeaders.insecure=true",
            f"--entryPoints.tcp-{ports.tcp + offset}.address=127.0.0.1:{ports.tcp + offset}",
            f"--entryPoints.udp-{ports.udp + offset}.address=127.0.0.1:{ports.udp + offset}/udp",
        ]
    return [
        *flags,
        f"--providers.http.endpoint=http://127.0.0.1:{ports.api}/api/configuration/current",
        "--providers.http.pollInterval=200ms",
        "--providers.http.pollTimeout=1s",
        "--api.insecure",
        "--ping",
        "--metrics.prometheus=true",
    ]


async def run_local(ports: LocalPorts, manifests: Path | None = None) -> None:
    manifests = manifests or default_manifests()
    backends = await start_backends(manifests)
    with tempfile.TemporaryDirectory(prefix="meshproxy-local-") as state_dir:
        settings = ControllerSettings(
            manifests=str(manifests),
            api_host="127.0.0.1",
            api_port=ports.api,
            namespace="mesh",
            min_http_port=ports.http,
            min_tcp_port=ports.tcp,
            min_udp_port=ports.udp,
            limit_http_port=ports.count,
            limit_tcp_port=ports.count,
            limit_udp_port=ports.count,
            proxy_admin_port=ports.admin,
            port_state_file=str(Path(state_dir) / "ports.json"),
        )
        _, tasks, runner = await start_controller(settings)
        static, _ = build_static(None, proxy_flags(ports))
        daemon = ProxyDaemon(static)
        print(banner(ports, manifests), flush=True)
        try:
            await daemon.run_forever()
        finally:
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


def banner(ports: LocalPorts, manifests: Path) -> str:
    web = f"http://127.0.0.1:{ports.http}"
    return f"""meshproxy local mesh is up (Ctrl-C to stop)
  manifests  : {manifests}
  controller : http://127.0.0.1:{ports.api}/api/configuration/current (and /api/topology/current)
  proxy      : http-{ports.http}.. on 127.0.0.1, admin on 127.0.0.1:{ports.admin}

Try:
  curl -H 'Host: whoami.demo.traefik.mesh' {web}/     # round robin over whoami-1, whoami-2
  curl -H 'Host: api.demo.traefik.mesh' {web}/        # retry + rateLimit + circuitBreaker
  nc 127.0.0.1 {ports.tcp}                                   # TCP echo (echo-tcp)
  curl http://127.0.0.1:{ports.readiness}/ping                   # ready once the config arrived
  curl http://127.0.0.1:{ports.api}/api/topology/current
  curl http://127.0.0.1:{ports.admin}/api/rawdata
  curl http://127.0.0.1:{ports.admin}/metrics
The UDP (echo-udp), WebSocket (chat) and gRPC (greeter, h2c) backends run and are configured,
but the proxy does not serve those protocols yet (see the README).
"""
