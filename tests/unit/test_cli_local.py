"""`meshproxy local` takes every controller flag (issue 9, item 21), and mesh names resolve to
the local proxy's entrypoints.

The flags are Traefik Mesh's controller flags (reference/traefik-mesh.md §2: `--acl`,
`--defaultMode`, `--namespace`, `--watchNamespaces`, `--ignoreNamespaces`, `--apiHost`,
`--apiPort`, `--limit*Port`) plus meshproxy's own; locally the ones not given get the local
defaults (API on 127.0.0.1, namespace `mesh`, two entrypoints of each kind). The resolution
mirrors the cluster: `svc.ns.traefik.mesh:PORT` reaches the proxy entrypoint of that Service
port (HTTP: `http-<min + index of the port>`; TCP/UDP: the allocated port, §2.2).
"""

from __future__ import annotations

import json
from pathlib import Path

from meshproxy.cli import _split_local_flags
from meshproxy.controller.app import Controller
from meshproxy.controller.flags import _FIELDS, parse_controller_flags
from meshproxy.controller.objects import ClusterState
from meshproxy.controller.settings import ControllerSettings
from meshproxy.local import LocalPorts, local_settings, mesh_resolver, proxy_flags

# one non-default value per controller flag (the deprecated --smi alias aside)
EVERY_FLAG = {
    "acl": ("--acl", True),
    "defaultmode": ("--defaultMode=tcp", "tcp"),
    "namespace": ("--namespace=meshns", "meshns"),
    "watchnamespaces": ("--watchNamespaces=a,b", ["a", "b"]),
    "ignorenamespaces": ("--ignoreNamespaces=c", ["c"]),
    "apihost": ("--apiHost=127.0.0.5", "127.0.0.5"),
    "apiport": ("--apiPort=9123", 9123),
    "limithttpport": ("--limitHTTPPort=3", 3),
    "limittcpport": ("--limitTCPPort=4", 4),
    "limitudpport": ("--limitUDPPort=5", 5),
    "clusterdomain": ("--clusterDomain=example.local", "example.local"),
    "manifests": ("--manifests=/tmp/m", "/tmp/m"),
    "portstatefile": ("--portStateFile=/tmp/ports.json", "/tmp/ports.json"),
    "kubeconfig": ("--kubeconfig=/tmp/kc", "/tmp/kc"),
    "masterurl": ("--masterURL=http://127.0.0.1:1", "http://127.0.0.1:1"),
    "resync": ("--resync=60s", 60.0),
    "localtrafficpolicy": ("--localTrafficPolicy", True),
    "indirectfromproxiesonly": ("--indirectFromProxiesOnly=false", False),
}


def test_every_controller_flag_reaches_the_local_controller():
    """Each flag `controller` accepts is accepted by `local` and lands in its settings."""
    assert set(_FIELDS) - {"smi"} == set(EVERY_FLAG)
    ports = LocalPorts(http=6000, tcp=11000, udp=16000, admin=8181, api=9191)
    for key, (flag, value) in EVERY_FLAG.items():
        own, rest = _split_local_flags(["--http-port=6000", flag, "--log-level", "DEBUG"])
        assert own == ["--http-port=6000", "--log-level", "DEBUG"]
        settings, extra = parse_controller_flags(rest)
        local = local_settings(ports, Path("/tmp/m"), settings, extra["given"], "/tmp/state")
        assert getattr(local, _FIELDS[key]) == value, flag
        # the entrypoint ranges always start where the local proxy listens
        assert (local.min_http_port, local.min_tcp_port, local.min_udp_port) == (
            6000,
            11000,
            16000,
        )


def test_local_defaults_apply_to_the_flags_not_given():
    ports = LocalPorts(api=9191, admin=8181)
    local = local_settings(ports, Path("/m"), ControllerSettings(), set(), "/state")
    assert (local.api_host, local.api_port, local.namespace) == ("127.0.0.1", 9191, "mesh")
    assert (local.limit_http_port, local.limit_tcp_port, local.limit_udp_port) == (2, 2, 2)
    assert local.manifests == "/m" and local.port_state_file == "/state/ports.json"
    assert local.proxy_admin_port == 8181 and local.extra_proxy_ips == ["127.0.0.1"]
    # with --kubeconfig (or --masterURL) the local mesh reads a cluster, not manifests
    settings, extra = parse_controller_flags(["--kubeconfig=/kc"])
    assert local_settings(ports, Path("/m"), settings, extra["given"]).manifests is None


def test_the_local_proxy_opens_the_entrypoints_the_limits_ask_for_and_polls_the_api():
    ports = LocalPorts(http=6000, tcp=11000, udp=16000, api=9191)
    settings, extra = parse_controller_flags(
        ["--limitHTTPPort=3", "--limitTCPPort=1", "--limitUDPPort=1", "--apiPort=9300"]
    )
    flags = proxy_flags(ports, local_settings(ports, None, settings, extra["given"]))
    http = [f for f in flags if f.startswith("--entryPoints.http-") and ".address=" in f]
    assert [f.split("=")[1] for f in http] == [f"127.0.0.1:{p}" for p in (6000, 6001, 6002)]
    assert sum(f.startswith("--entryPoints.tcp-") for f in flags) == 1
    endpoint = "--providers.http.endpoint=http://127.0.0.1:9300/api/configuration/current"
    assert endpoint in flags


def _controller(objects: list[dict], settings: ControllerSettings) -> Controller:
    controller = Controller(settings)
    state = ClusterState()
    for obj in objects:
        state.put(obj)
    controller.set_state(state)
    return controller


def _service(name: str, *ports: tuple[int, str], traffic_type: str | None = None) -> dict:
    annotations = {"mesh.traefik.io/traffic-type": traffic_type} if traffic_type else {}
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
        "spec": {
            "clusterIP": "10.0.0.9",
            "ports": [{"port": p, "targetPort": p, "protocol": proto} for p, proto in ports],
        },
    }


def test_mesh_names_resolve_to_the_local_entrypoint_of_that_port(tmp_path):
    """HTTP: the entrypoint by the port's index among the Service's TCP ports (so port 8080,
    the second one, is http-5001); TCP: the port the controller allocated (and served in its
    configuration); names and ports outside the mesh are left alone."""
    settings = ControllerSettings(port_state_file=str(tmp_path / "ports.json"))
    controller = _controller(
        [
            _service("web", (80, "TCP"), (8080, "TCP")),
            _service("db", (5432, "TCP"), traffic_type="tcp"),
        ],
        settings,
    )
    resolve = mesh_resolver(controller)
    assert resolve("web.ns.traefik.mesh", 80) == ("127.0.0.1", 5000)
    assert resolve("WEB.ns.traefik.mesh.", 8080) == ("127.0.0.1", 5001)
    assert resolve("web.ns.maesh", 80) == ("127.0.0.1", 5000)
    tcp = json.loads(controller.config_bytes)["tcp"]["routers"]["ns-db-5432"]["entryPoints"][0]
    assert resolve("db.ns.traefik.mesh", 5432) == ("127.0.0.1", int(tcp.split("-")[1]))
    assert resolve("web.ns.traefik.mesh", 81) is None  # not a port of the service
    assert resolve("ghost.ns.traefik.mesh", 80) is None
    assert resolve("web.ns.svc.cluster.local", 80) is None
    assert resolve("127.0.0.1", 80) is None
