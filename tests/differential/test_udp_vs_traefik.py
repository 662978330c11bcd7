"""UDP against real Traefik 3.7 on the same dynamic config and the same real datagram servers:
which router serves an entrypoint when several name it, how sessions are spread over a
`loadBalancer` and a `weighted` service, and that a client keeps its server for its session.
Rules: reference/traefik-proxy.md §1.6, §1.7 (one UDP router per entrypoint, qualified names
descending), §4.1 (UDP WRR), §5.4 (a session per client address)."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.differential.harness import TraefikProcess
from tests.helpers import ProxyProcess, wait_for
from tests.integration.test_udp import free_udp_port
from tests.unit.test_udp_sessions import backend, client

pytestmark = pytest.mark.usefixtures("traefik_bin")


async def start_both(tmp_path: Path, dynamic: dict[str, Any]) -> tuple[Any, Any, int, int]:
    """Traefik and meshproxy, each with a UDP entrypoint `dns` on its own port, on `dynamic`;
    returned once both list every UDP router of the config."""
    traefik_port, mesh_port = free_udp_port(), free_udp_port()
    (tmp_path / "traefik").mkdir()
    (tmp_path / "mesh").mkdir()
    traefik = TraefikProcess(
        tmp_path / "traefik", dynamic, [f"--entryPoints.dns.address=127.0.0.1:{traefik_port}/udp"]
    ).start()
    wanted = set(dynamic["udp"]["routers"])

    def traefik_lists_them() -> bool:
        url = f"http://127.0.0.1:{traefik.api_port}/api/udp/routers?per_page=1000"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                names = {r["name"].split("@")[0] for r in json.loads(answer.read())}
        except OSError:
            return False
        return wanted <= names

    await wait_for(traefik_lists_them, 15, "Traefik's UDP routers")
    mesh = ProxyProcess(
        tmp_path / "mesh", dynamic, entrypoints={"dns": f"127.0.0.1:{mesh_port}/udp"}
    )
    await mesh.start()
    return traefik, mesh, traefik_port, mesh_port


async def picks(port: int, sessions: int) -> Counter[bytes]:
    """`sessions` new clients, two datagrams each: the tag of the server that answered, which
    must be the same for both datagrams of a session."""
    seen: Counter[bytes] = Counter()
    for _ in range(sessions):
        peer = await client(("127.0.0.1", port))
        peer.transport.sendto(b"1")
        first = (await peer.recv())[:2]
        peer.transport.sendto(b"2")
        assert (await peer.recv())[:2] == first
        seen[first] += 1
        peer.transport.close()
    return seen


async def test_udp_router_choice_and_session_spread_match_traefik(tmp_path):
    """Entrypoint `dns` named by three routers: `z` is broken (unknown service), `a` and
    `a-b` build; Traefik takes qualified names in descending order ("a@file" > "a-b@file"),
    so `a` serves it on both proxies. Its `loadBalancer` of two servers gives 2 + 2 of 4
    sessions on both, each session keeping its server."""
    _, one = await backend(b"1:")
    _, two = await backend(b"2:")
    _, other = await backend(b"x:")
    dynamic = {
        "udp": {
            "routers": {
                "a": {"entryPoints": ["dns"], "service": "pair"},
                "a-b": {"entryPoints": ["dns"], "service": "other"},
                "z": {"entryPoints": ["dns"], "service": "missing"},
            },
            "services": {
                "pair": {
                    "loadBalancer": {
                        "servers": [{"address": "{}:{}".format(*s)} for s in (one, two)]
                    }
                },
                "other": {"loadBalancer": {"servers": [{"address": "{}:{}".format(*other)}]}},
            },
        }
    }
    traefik, mesh, traefik_port, mesh_port = await start_both(tmp_path, dynamic)
    try:
        expected = Counter({b"1:": 2, b"2:": 2})
        assert await picks(traefik_port, 4) == expected
        assert await picks(mesh_port, 4) == expected
    finally:
        traefik.stop()
        mesh.stop()


async def test_weighted_udp_service_ratio_matches_traefik(tmp_path):
    """A `weighted` UDP service 3:1 over 20 new sessions: 15 and 5 on both proxies."""
    _, heavy = await backend(b"h:")
    _, light = await backend(b"l:")
    dynamic = {
        "udp": {
            "routers": {"r": {"entryPoints": ["dns"], "service": "split"}},
            "services": {
                "split": {
                    "weighted": {
                        "services": [{"name": "heavy", "weight": 3}, {"name": "light", "weight": 1}]
                    }
                },
                "heavy": {"loadBalancer": {"servers": [{"address": "{}:{}".format(*heavy)}]}},
                "light": {"loadBalancer": {"servers": [{"address": "{}:{}".format(*light)}]}},
            },
        }
    }
    traefik, mesh, traefik_port, mesh_port = await start_both(tmp_path, dynamic)
    try:
        expected = Counter({b"h:": 15, b"l:": 5})
        assert await picks(traefik_port, 20) == expected
        assert await picks(mesh_port, 20) == expected
    finally:
        traefik.stop()
        mesh.stop()
