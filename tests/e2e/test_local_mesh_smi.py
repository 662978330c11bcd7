"""The local mesh is the whole mesh (issue 9, item 21): `meshproxy local` takes every
controller flag, and the SMI objects work on a laptop as in a cluster.

In a cluster, a TrafficSplit backend is the upstream `http://svc.ns.traefik.mesh:80`
(reference/traefik-mesh.md §2.8): CoreDNS and the shadow Service send it back to a proxy,
which routes it by Host as the backend's own traffic (second hop). Locally those names are
dialled at the local proxy's entrypoint for that port. ACL mode (§2.7): a TrafficTarget
allows its sources' pod IPs, everything else gets 403 from the block-all router; a split's
second hop passes the "indirect" X-Forwarded-For allowlist, which also requires the local
proxy (127.0.0.1) as the peer. Client pods are 127.0.0.2 (allowed) and 127.0.0.3 (not): the
test binds its client sockets to those addresses.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import h11
import pytest
import yaml

from tests.helpers import Response, free_port, free_port_pair, read_response, wait_for

NS = "shop"
ALLOWED, REFUSED = "127.0.0.2", "127.0.0.3"


def manifests(directory: Path, ports: dict[str, int]) -> None:
    """Services web (root: pod v1 only), v1, v2; a TrafficSplit of web over v1 and v2; a
    TrafficTarget letting service account `client` (pod 127.0.0.2) call `server`."""

    def pod(name: str, ip: str, account: str, port: int | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"serviceAccountName": account, "containers": [{"name": "c"}]}
        labels = {}
        if port is not None:
            spec["containers"][0]["ports"] = [{"name": "http", "containerPort": port}]
            labels["demo.meshproxy.io/backend"] = "whoami"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": spec,
            "status": {"podIP": ip},
        }

    def service(name: str, ip: str, *pods: str) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "clusterIP": ip,
                    "ports": [{"name": "web", "protocol": "TCP", "port": 80, "targetPort": "http"}],
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": name, "namespace": NS},
                "subsets": [
                    {
                        "addresses": [
                            {"ip": "127.0.0.1", "targetRef": {"kind": "Pod", "name": p}}
                            for p in pods
                        ]
                    }
                ],
            },
        ]

    docs = [
        pod("v1", "127.0.0.1", "server", ports["v1"]),
        pod("v2", "127.0.0.1", "server", ports["v2"]),
        pod("client-a", ALLOWED, "client"),
        pod("client-b", REFUSED, "intruder"),
        *service("web", "10.96.1.1", "v1"),
        *service("v1", "10.96.1.2", "v1"),
        *service("v2", "10.96.1.3", "v2"),
        {
            "apiVersion": "split.smi-spec.io/v1alpha3",
            "kind": "TrafficSplit",
            "metadata": {"name": "web-split", "namespace": NS},
            "spec": {
                "service": "web",
                "backends": [{"service": "v1", "weight": 1}, {"service": "v2", "weight": 1}],
            },
        },
        {
            "apiVersion": "access.smi-spec.io/v1alpha2",
            "kind": "TrafficTarget",
            "metadata": {"name": "clients-to-server", "namespace": NS},
            "spec": {
                "destination": {"kind": "ServiceAccount", "name": "server", "namespace": NS},
                "sources": [{"kind": "ServiceAccount", "name": "client", "namespace": NS}],
            },
        },
    ]
    (directory / "mesh.yaml").write_text(yaml.safe_dump_all(docs))


async def get_from(source: str, port: int, host: str) -> Response:
    """GET / with `Host: host`, from a client socket bound to `source` (a pod's address)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="GET", target="/", headers=[("Host", host)])))
        writer.write(conn.send(h11.EndOfMessage()))
        return await asyncio.wait_for(read_response(conn, reader), 10)
    finally:
        writer.close()


def served_by(response: Response) -> str:
    return response.body.split(b"\n")[0].decode() if response.status == 200 else ""


@pytest.mark.parametrize("acl", [False, True], ids=["default-mode", "acl-mode"])
async def test_traffic_split_and_traffic_target_in_the_local_mesh(tmp_path, acl):
    """A TrafficSplit serves both of its backends through the second hop; with `--acl`, the
    TrafficTarget allows 127.0.0.2 and refuses 127.0.0.3 (403), on the split and on a backend
    called directly. The controller flags given to `local` (every one of them) take effect:
    the API port, the namespace filters, the entrypoint limits."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    backends = {"v1": free_port(), "v2": free_port()}
    manifests(directory, backends)
    ports = {"admin": free_port(), "readiness": free_port(), "liveness": free_port()}
    ports["http"] = free_port_pair()
    ports["tcp"] = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        ports["udp"] = probe.getsockname()[1]
    api_port = free_port()
    controller_flags = [
        f"--manifests={directory}",
        "--defaultMode=http",
        "--namespace=meshlocal",
        f"--watchNamespaces={NS}",
        "--ignoreNamespaces=kube-public",
        "--apiHost=127.0.0.1",
        f"--apiPort={api_port}",  # overrides --api-port
        "--limitHTTPPort=2",
        "--limitTCPPort=1",
        "--limitUDPPort=1",
        "--clusterDomain=cluster.local",
        f"--portStateFile={tmp_path / 'ports.json'}",
        "--resync=60s",
        "--localTrafficPolicy=false",
        "--indirectFromProxiesOnly=true",
        "--logLevel=INFO",
        "--logFormat=common",
        *(["--acl"] if acl else []),
    ]
    log_path = tmp_path / "local.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "local",
            *[f"--{name}-port={port}" for name, port in ports.items()],
            "--api-port=1",  # the controller's --apiPort wins
            *controller_flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    http = ports["http"]
    web = f"web.{NS}.traefik.mesh"
    try:

        async def split_served() -> bool:
            if process.poll() is not None:
                raise AssertionError(log_path.read_text())
            try:
                return (await get_from(ALLOWED, http, web)).status == 200
            except OSError:
                return False

        await wait_for(split_served, 30, "the split to serve (config from the controller)")
        with urllib.request.urlopen(
            f"http://127.0.0.1:{api_port}/api/configuration/current", timeout=5
        ) as r:
            config = json.loads(r.read())
        routers = config["http"]["routers"]
        assert f"{NS}-web-web-split-80-traffic-split-direct" in routers
        assert {r["entryPoints"][0] for r in routers.values()} <= {
            "readiness",
            f"http-{http}",
            f"http-{http + 1}",
        }

        served: Counter[str] = Counter()
        for _ in range(8):
            response = await get_from(ALLOWED, http, web)
            assert response.status == 200, response
            served[served_by(response)] += 1
        assert served == {"Hostname: v1": 4, "Hostname: v2": 4}  # smooth WRR, weights 1:1

        refused = [(await get_from(REFUSED, http, web)).status for _ in range(4)]
        direct = await get_from(REFUSED, http, f"v2.{NS}.traefik.mesh")
        if acl:
            assert refused == [403] * 4
            assert direct.status == 403
            allowed = await get_from(ALLOWED, http, f"v2.{NS}.traefik.mesh")
            assert served_by(allowed) == "Hostname: v2"
        else:
            assert refused == [200] * 4
            assert served_by(direct) == "Hostname: v2"
        text = log_path.read_text()
        assert "ACL mode" in text if acl else "default mode" in text
    finally:
        process.terminate()
        process.wait(15)
        log.close()
