"""Load balancing against real Traefik 3.7 on the same dynamic config: sticky cookies
(names, values, attributes, legacy values, fallback), active health checks (which servers
are UP/DOWN in each API, 503 when none is), and `strategy: p2c` with a slow server.

Both proxies forward to the same real backends (tests/integration/lb_backend.py), which
die, slow down and recover on command; the two are compared on what a client and an operator
see: answers, Set-Cookie fields, and `serverStatus` in the API."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from meshproxy.balancer.sticky import fnv_hash, sticky_value
from tests.differential.harness import TraefikProcess
from tests.helpers import ProxyProcess, request, router, wait_for
from tests.integration.lb_backend import ControlledBackend

pytestmark = pytest.mark.usefixtures("traefik_bin")


@pytest.fixture
async def controlled() -> AsyncIterator[Callable[..., Any]]:
    started: list[ControlledBackend] = []

    async def make(name: str) -> ControlledBackend:
        backend = await ControlledBackend(name).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.aclose()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await pair(config)`: real Traefik and meshproxy started on the same dynamic config."""
    started: list[Any] = []

    async def make(config: dict[str, Any]) -> tuple[TraefikProcess, ProxyProcess]:
        traefik_dir = tmp_path / "traefik"
        traefik_dir.mkdir(exist_ok=True)
        traefik = TraefikProcess(traefik_dir, config)
        started.append(traefik)
        await asyncio.to_thread(traefik.start)
        mesh_dir = tmp_path / "meshproxy"
        mesh_dir.mkdir(exist_ok=True)
        mesh = ProxyProcess(mesh_dir, config)
        started.append(mesh)
        await mesh.start()
        return traefik, mesh

    yield make
    for process in started:
        process.stop()


def traefik_server_status(traefik: TraefikProcess, service: str) -> dict[str, str]:
    url = f"http://127.0.0.1:{traefik.api_port}/api/http/services/{service}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read()).get("serverStatus", {})
    except OSError:
        return {}


def mesh_server_status(mesh: ProxyProcess, service: str) -> dict[str, str]:
    return mesh.rawdata()["services"][service].get("serverStatus", {})


def set_cookie(response: Any) -> str | None:
    for name, value in response.raw_headers:
        if name.lower() == b"set-cookie":
            return value.decode()
    return None


def routed(services: dict[str, Any]) -> dict[str, Any]:
    """Routers `Host(<name>.test)` -> each service."""
    return {
        "http": {
            "routers": {name: router(f"Host(`{name}.test`)", name) for name in services},
            "services": services,
        }
    }


async def test_sticky_cookies_match_traefik(controlled, pair):
    """sticky.cookie on a loadBalancer (configured name and attributes) and on a weighted
    service (default name from the service): the same Set-Cookie from both proxies for the
    same pinned child, no cookie when the pin is honoured, a fresh cookie for a legacy FNV
    value (Traefik rewrites them), and for a value that names no server."""
    backends = [await controlled(f"b{i}") for i in range(3)]
    cookie = {"name": "pin me", "httpOnly": True, "secure": True, "sameSite": "lax", "maxAge": 90}
    config = routed(
        {
            "lb": {
                "loadBalancer": {
                    "servers": [{"url": b.url} for b in backends],
                    "sticky": {"cookie": cookie},
                }
            },
            "split": {
                "weighted": {
                    "services": [{"name": "one", "weight": 1}, {"name": "two", "weight": 1}],
                    "sticky": {"cookie": {"path": "/app"}},
                }
            },
            "one": {"loadBalancer": {"servers": [{"url": backends[0].url}]}},
            "two": {"loadBalancer": {"servers": [{"url": backends[1].url}]}},
        }
    )
    traefik, mesh = await pair(config)
    target = backends[2]
    pin = f"pin_me={sticky_value(target.url)}"
    for port in (traefik.port, mesh.port):
        first = await request(port, host="lb.test")
        picked = next(b for b in backends if b.name.encode() == first.body)
        assert set_cookie(first) == (
            f"pin_me={sticky_value(picked.url)}; Path=/; Max-Age=90; HttpOnly; Secure; SameSite=Lax"
        )
        pinned = [await request(port, host="lb.test", headers={"Cookie": pin}) for _ in range(4)]
        assert {r.body for r in pinned} == {b"b2"}
        assert all(set_cookie(r) is None for r in pinned)
        legacy = await request(
            port, host="lb.test", headers={"Cookie": f"pin_me={fnv_hash(target.url)}"}
        )
        assert legacy.body == b"b2" and set_cookie(legacy).startswith(pin + ";")
        unknown = await request(port, host="lb.test", headers={"Cookie": "pin_me=feedface"})
        assert unknown.status == 200 and set_cookie(unknown) is not None
    traefik_split = set_cookie(await request(traefik.port, host="split.test"))
    mesh_split = set_cookie(await request(mesh.port, host="split.test"))
    name = traefik_split.split("=")[0]
    assert mesh_split.split("=")[0] == name and name.startswith("_")
    for line in (traefik_split, mesh_split):
        value = line.split(";")[0].split("=")[1]
        assert value in (sticky_value("one"), sticky_value("two"))
        assert line.endswith("; Path=/app")


async def test_health_checks_match_traefik(controlled, pair):
    """loadBalancer.healthCheck: with one server's check failing, both APIs show it DOWN and
    both proxies send nothing to it; with every check failing both answer 503 `no available
    server`; back to healthy, both show every server UP again."""
    backends = [await controlled(f"b{i}") for i in range(3)]
    check = {"path": "/health", "interval": "300ms", "timeout": "300ms"}
    config = routed(
        {"s": {"loadBalancer": {"servers": [{"url": b.url} for b in backends], "healthCheck": check}}}
    )  # fmt: skip
    traefik, mesh = await pair(config)
    backends[0].health = "status:500"
    want = {backends[0].url: "DOWN", backends[1].url: "UP", backends[2].url: "UP"}
    await wait_for(lambda: traefik_server_status(traefik, "s@file") == want, 10, "traefik")
    await wait_for(lambda: mesh_server_status(mesh, "s@file") == want, 10, "meshproxy")
    for port in (traefik.port, mesh.port):
        answers = Counter([(await request(port, host="s.test")).body for _ in range(12)])
        assert set(answers) == {b"b1", b"b2"}
    await backends[1].die()
    backends[2].health = "hang"
    down = dict.fromkeys(want, "DOWN")
    await wait_for(lambda: traefik_server_status(traefik, "s@file") == down, 10, "traefik down")
    await wait_for(lambda: mesh_server_status(mesh, "s@file") == down, 10, "meshproxy down")
    for port in (traefik.port, mesh.port):
        response = await request(port, host="s.test")
        assert (response.status, response.body) == (503, b"no available server\n")
    backends[0].health = "ok"
    await backends[1].revive()
    backends[2].health = "ok"
    up = dict.fromkeys(want, "UP")
    await wait_for(lambda: traefik_server_status(traefik, "s@file") == up, 10, "traefik up")
    await wait_for(lambda: mesh_server_status(mesh, "s@file") == up, 10, "meshproxy up")


async def test_p2c_avoids_a_slow_server_like_traefik(controlled, pair):
    """strategy: p2c (Traefik v3.4+): with one server 100 ms slow and two fast, 12 concurrent
    clients, both proxies send the slow one well under a third of the requests."""
    slow = await controlled("slow")
    slow.mode = "slow:0.1"
    fast = [await controlled(f"fast{i}") for i in range(2)]
    servers = [{"url": b.url} for b in (slow, *fast)]
    traefik, mesh = await pair(
        routed({"s": {"loadBalancer": {"servers": servers, "strategy": "p2c"}}})
    )
    shares = {}
    for side, port in (("traefik", traefik.port), ("meshproxy", mesh.port)):
        counts: Counter[bytes] = Counter()

        async def worker(port: int = port, counts: Counter[bytes] = counts) -> None:
            for _ in range(30):
                counts[(await request(port, host="s.test")).body] += 1

        await asyncio.gather(*(worker() for _ in range(12)))
        assert sum(counts.values()) == 360
        shares[side] = counts[b"slow"] / 360
    print("p2c slow share", shares)
    assert shares["traefik"] < 0.15 and shares["meshproxy"] < 0.15, shares


async def test_passive_health_check_matches_traefik(controlled, pair):
    """passiveHealthCheck (Traefik v3.6+): after `maxFailedAttempts` 500s within
    `failureWindow` both proxies stop sending to the server, and send to it again once the
    window has passed (no active check). Traefik's API keeps showing it UP (its passive check
    does not update serverStatus); ours shows it DOWN while it is out."""
    bad = await controlled("bad")
    bad.mode = "status:500"
    good = await controlled("good")
    passive = {"failureWindow": "2s", "maxFailedAttempts": 2}
    servers = [{"url": bad.url}, {"url": good.url}]
    config = routed({"s": {"loadBalancer": {"servers": servers, "passiveHealthCheck": passive}}})
    traefik, mesh = await pair(config)
    for side, port in (("traefik", traefik.port), ("meshproxy", mesh.port)):
        statuses = Counter()
        for _ in range(8):
            statuses[(await request(port, host="s.test")).status] += 1
        assert statuses == {200: 6, 500: 2}, (side, statuses)
        if side == "meshproxy":
            assert mesh_server_status(mesh, "s@file")[bad.url] == "DOWN"
        after = [(await request(port, host="s.test")).body for _ in range(6)]
        assert after == [b"good"] * 6, side
        served = bad.served

        async def back(port: int = port, served: int = served) -> bool:
            await request(port, host="s.test")
            return bad.served > served

        await wait_for(back, 10, f"{side}: the server gets requests again")
