"""The README's run command: `meshproxy local` brings up controller, proxy and demo backends
on loopback from the manifests in config/, and traffic flows through the proxy."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.helpers import free_port, free_port_pair, request, wait_for

REPO = Path(__file__).resolve().parents[2]


async def test_local_mesh_serves_http_through_the_proxy_from_the_manifests(tmp_path):
    ports = {name: free_port() for name in ("admin", "api", "readiness", "liveness")}
    # the local mesh opens two entrypoints of each kind: base and base + 1
    ports["http"], ports["tcp"] = free_port_pair(), free_port_pair()
    ports["udp"] = free_port_pair(socket.SOCK_DGRAM)
    log = (tmp_path / "local.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "local",
            *[f"--{name}-port={port}" for name, port in ports.items()],
        ],
        cwd=REPO,  # so the manifests come from config/local-mesh
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        async def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError((tmp_path / "local.log").read_text())
            try:
                return (await request(ports["readiness"], target="/ping")).status == 200
            except OSError:
                return False

        await wait_for(ready, 30, "the proxy to be ready (config from the controller)")
        http = ports["http"]
        served = Counter()
        for _ in range(4):
            response = await request(http, host="whoami.demo.traefik.mesh")
            assert response.status == 200
            served[response.body.split(b"\n")[0]] += 1
        assert served == {b"Hostname: whoami-1": 2, b"Hostname: whoami-2": 2}
        # the canary TrafficSplit (3:1), through the second hop at the proxy itself
        canary = Counter()
        for _ in range(8):
            response = await request(http, host="canary.demo.traefik.mesh")
            assert response.status == 200
            canary[response.body.split(b"\n")[0]] += 1
        assert canary == {b"Hostname: whoami-1": 6, b"Hostname: whoami-2": 2}
        api = await request(http, host="api.demo.traefik.mesh")
        assert api.status == 200  # through retry, rateLimit and circuitBreaker
        assert (await request(http, host="nope.demo.traefik.mesh")).status == 404

        # TCP: the echo-tcp service through the proxy's first tcp- entrypoint
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["tcp"])
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        writer.close()
        assert b"mesh is up" in (tmp_path / "local.log").read_bytes()

        # UDP: echo-udp.demo.traefik.mesh, through the proxy's first udp- entrypoint
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        class UDPClient(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                replies.put_nowait(data)

        udp, _ = await loop.create_datagram_endpoint(
            UDPClient, remote_addr=("127.0.0.1", ports["udp"])
        )
        for payload in (b"ping", b"x" * 1400):  # one session, both relayed and answered
            udp.sendto(payload)
            assert await asyncio.wait_for(replies.get(), 10) == payload
        udp.close()

        # WebSocket through the mesh: ws://chat.demo.traefik.mesh, dialled at the proxy
        from websockets.asyncio.client import connect

        async with connect(
            "ws://chat.demo.traefik.mesh/", host="127.0.0.1", port=http, open_timeout=10
        ) as ws:
            await ws.send("hello mesh")
            assert await asyncio.wait_for(ws.recv(), 10) == "hello mesh"
            await ws.send(b"\x00binary")
            assert await asyncio.wait_for(ws.recv(), 10) == b"\x00binary"

        # gRPC through the mesh: greeter.demo.traefik.mesh (mesh.traefik.io/scheme: h2c), a
        # stock grpcio client speaking h2c to the proxy, the proxy h2c to the pod
        import grpc

        from meshproxy.demo.echo import GRPC_ECHO_METHOD

        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{http}", options=[("grpc.default_authority", "greeter.demo.traefik.mesh")]
        ) as channel:
            say = channel.unary_unary(GRPC_ECHO_METHOD)
            assert await say(b"hi", timeout=10) == b"hi"
            assert await say(b"x" * (1 << 20), timeout=10) == b"x" * (1 << 20)
        # the router that showed an h2c error in /api/rawdata before the h2c pool existed
        rawdata = json.loads((await request(ports["admin"], target="/api/rawdata")).body)
        greeter = rawdata["routers"]["demo-greeter-50051@http"]
        assert greeter["status"] == "enabled" and not greeter.get("error")
        service = rawdata["services"]["demo-greeter-50051@http"]
        assert service["status"] == "enabled" and not service.get("error")
        assert service["loadBalancer"]["servers"] == [{"url": "h2c://127.0.0.1:19013"}]
    finally:
        process.terminate()
        process.wait(15)
        log.close()


async def test_local_mesh_demo_in_acl_mode(tmp_path):
    """`meshproxy local --acl` on the shipped manifests (reference/traefik-mesh.md §2.7): the
    demo TrafficTarget lets the `client` pod (127.0.0.2) call the whoami pods, directly and
    through the canary TrafficSplit; the same requests from 127.0.0.1 (no pod) get 403."""
    from tests.e2e.test_local_mesh_smi import get_from

    ports = {name: free_port() for name in ("admin", "api", "readiness", "liveness")}
    ports["http"], ports["tcp"] = free_port_pair(), free_port_pair()
    ports["udp"] = free_port_pair(socket.SOCK_DGRAM)
    log_path = tmp_path / "local.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "local",
            "--acl",
            *[f"--{name}-port={port}" for name, port in ports.items()],
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    http = ports["http"]
    try:

        async def allowed() -> bool:
            if process.poll() is not None:
                raise AssertionError(log_path.read_text())
            try:
                response = await get_from("127.0.0.2", http, "whoami.demo.traefik.mesh")
            except OSError:
                return False
            return response.status == 200

        await wait_for(allowed, 30, "the client pod to be allowed")
        canary = Counter()
        for _ in range(4):
            response = await get_from("127.0.0.2", http, "canary.demo.traefik.mesh")
            assert response.status == 200
            canary[response.body.split(b"\n")[0]] += 1
        assert canary == {b"Hostname: whoami-1": 3, b"Hostname: whoami-2": 1}
        for host in ("whoami.demo.traefik.mesh", "canary.demo.traefik.mesh"):
            assert (await get_from("127.0.0.1", http, host)).status == 403
        assert b"(ACL mode)" in log_path.read_bytes()
    finally:
        process.terminate()
        process.wait(15)
        log.close()
