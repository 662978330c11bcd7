"""The README's run command: `meshproxy local` brings up controller, proxy and demo backends
on loopback from the manifests in config/, and traffic flows through the proxy."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.helpers import free_port, request, wait_for

REPO = Path(__file__).resolve().parents[2]


def free_port_pair(kind: int = socket.SOCK_STREAM) -> int:
    """A port p such that p and p + 1 are both free on loopback."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket(socket.AF_INET, kind) as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


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
        api = await request(http, host="api.demo.traefik.mesh")
        assert api.status == 200  # through retry, rateLimit and circuitBreaker
        assert (await request(http, host="nope.demo.traefik.mesh")).status == 404

        # TCP: the echo-tcp service through the proxy's first tcp- entrypoint
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["tcp"])
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        writer.close()
        assert b"mesh is up" in (tmp_path / "local.log").read_bytes()

        # the gRPC demo backend answers (directly: the proxy does not serve h2c yet)
        import grpc

        from meshproxy.demo.echo import GRPC_ECHO_METHOD

        async with grpc.aio.insecure_channel("127.0.0.1:19013") as channel:
            assert await channel.unary_unary(GRPC_ECHO_METHOD)(b"hi", timeout=10) == b"hi"
    finally:
        process.terminate()
        process.wait(15)
        log.close()
