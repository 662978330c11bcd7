"""The Traefik-shaped admin API (issue 14, point 4): objects with status and errors, per-server
state of loadBalancer services (up/down, in-flight, latency estimate), TCP/UDP objects, Traefik's
list filters and pagination, GET/HEAD only, and never reachable from a traffic entrypoint.
(Traefik's doc: operations/api; the keys are compared with real Traefik in
tests/differential/test_api_vs_traefik.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.helpers import free_port, lb, refused_url, request, router, wait_for


@pytest.fixture
def proxy_factory(proxy_factory: Any) -> Any:
    """One process (`--workers=1`): the admin API reads the state of the process that serves
    the traffic (in-flight counts, token buckets, the balancer's rotation, RequestCount).
    With N workers the supervisor answers the admin API (docs/observability.md)."""

    async def make(dynamic: Any = None, **kwargs: Any) -> Any:
        kwargs["extra_flags"] = ["--workers=1", *kwargs.get("extra_flags", [])]
        return await proxy_factory(dynamic, **kwargs)

    return make


def _get(port: int, path: str, method: str = "GET") -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None, dict(response.headers)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body) if body else None, dict(exc.headers)
        except ValueError:
            return exc.code, body.decode(errors="replace"), dict(exc.headers)


async def _aget(port: int, path: str, method: str = "GET") -> tuple[int, Any, dict[str, str]]:
    return await asyncio.to_thread(_get, port, path, method)


async def test_per_server_state_and_errors(proxy_factory: Any, scripted: Any) -> None:
    """A loadBalancer service shows Traefik's `serverStatus` and, per server, whether it is up,
    its requests in flight (1 while a request is held by the backend, 0 after) and its latency
    estimate (ewma strategy) once it answered; a server that failed its health check is DOWN
    with the reason. A router naming a missing service is `disabled` with the error, and the
    overview counts it."""
    held = await scripted("held")
    held.mode = "hold"
    dynamic = {
        "http": {
            "routers": {
                "r": router("PathPrefix(`/`)", "s"),
                "broken": router("Path(`/b`)", "missing"),
                "hc": router("Path(`/hc`)", "checked"),
            },
            "services": {
                "s": lb(held.url, strategy="ewma"),
                "checked": lb(refused_url(), healthCheck={"path": "/health", "interval": "100ms"}),
            },
        }
    }
    proxy = await proxy_factory(dynamic)
    admin = proxy.admin_port
    pending = asyncio.create_task(request(proxy.port, target="/slow"))

    async def in_flight() -> int:
        _, service, _ = await _aget(admin, "/api/http/services/s@file")
        return service["meshproxyServers"][0]["inFlight"]

    await wait_for(lambda: held.holding == 1, 10, "the request held by the backend")
    assert await in_flight() == 1
    held.release()
    assert (await pending).status == 200
    await wait_for(lambda: in_flight_zero(admin), 10, "in-flight back to 0")
    _, service, _ = await _aget(admin, "/api/http/services/s@file")
    assert service["serverStatus"] == {held.url: "UP"}
    server = service["meshproxyServers"][0]
    assert server["up"] is True and server["latencyEstimateMs"] > 0
    assert service["usedBy"] == ["r@file"] and service["type"] == "loadbalancer"

    async def checked_down() -> bool:
        _, checked, _ = await _aget(admin, "/api/http/services/checked@file")
        return "DOWN" in checked.get("serverStatus", {}).values()

    await wait_for(checked_down, 10, "the health-checked server DOWN")
    _, checked, _ = await _aget(admin, "/api/http/services/checked@file")
    assert "health check failed" in checked["meshproxyServers"][0]["why"]
    assert "meshproxyWhy" in checked

    _, broken, _ = await _aget(admin, "/api/http/routers/broken@file")
    assert broken["status"] == "disabled"
    assert any("missing" in error for error in broken["error"])
    _, overview, _ = await _aget(admin, "/api/overview")
    # 3 of the file provider and, as Traefik 3.7 counts them, the @internal routers of the
    # handlers the admin entrypoint serves (--api.insecure --ping --metrics.prometheus):
    # api, dashboard, ping, prometheus
    assert overview["http"]["routers"] == {"total": 3 + 4, "warnings": 0, "errors": 1}
    _, internal, _ = await _aget(admin, "/api/http/routers?search=@internal")
    assert [r["name"] for r in internal] == [
        "api@internal",
        "dashboard@internal",
        "ping@internal",
        "prometheus@internal",
    ]
    assert overview["features"]["metrics"] == "Prometheus"


def in_flight_zero(admin: int) -> bool:
    _, service, _ = _get(admin, "/api/http/services/s@file")
    return service["meshproxyServers"][0]["inFlight"] == 0


async def test_filters_and_pagination(proxy_factory: Any, backends: Any) -> None:
    """Traefik's list parameters: `search` (name contains), `status`, `serviceName`; `page`
    and `per_page` with `X-Next-Page` (1 on the last page); a page past the end is 400."""
    backend = await backends("b")
    routers = {f"r{i}": router(f"Path(`/{i}`)", "s") for i in range(5)}
    routers["other"] = router("Path(`/o`)", "t")
    proxy = await proxy_factory(
        {"http": {"routers": routers, "services": {"s": lb(backend.url), "t": lb(backend.url)}}}
    )
    admin = proxy.admin_port
    _, found, _ = await _aget(admin, "/api/http/routers?search=r3")
    assert [r["name"] for r in found] == ["r3@file"]
    _, by_service, _ = await _aget(admin, "/api/http/routers?serviceName=t")
    assert [r["name"] for r in by_service] == ["other@file"]
    _, disabled, _ = await _aget(admin, "/api/http/routers?status=disabled")
    assert disabled == []
    # 6 routers of the file provider and 4 @internal ones (api, dashboard, ping, prometheus)
    status, page1, headers = await _aget(admin, "/api/http/routers?per_page=4")
    assert status == 200 and len(page1) == 4 and headers["X-Next-Page"] == "2"
    _, page2, headers = await _aget(admin, "/api/http/routers?per_page=4&page=2")
    assert len(page2) == 4 and headers["X-Next-Page"] == "3"
    _, page3, headers = await _aget(admin, "/api/http/routers?per_page=4&page=3")
    assert len(page3) == 2 and headers["X-Next-Page"] == "1"
    names = [r["name"] for r in page1 + page2 + page3]
    assert sorted(names) == names and len(set(names)) == 10
    assert (await _aget(admin, "/api/http/routers?per_page=4&page=4"))[0] == 400


async def test_tcp_and_udp_objects(proxy_factory: Any, backends: Any) -> None:
    """TCP and UDP routers and services are listed with status, using/usedBy and (TCP)
    serverStatus; an unknown one is 404 with Traefik's message."""
    backend = await backends("b")
    udp_port = free_port()
    proxy = await proxy_factory(
        {
            "tcp": {
                "routers": {"t": {"rule": "HostSNI(`*`)", "service": "ts", "entryPoints": ["web"]}},
                "services": {
                    "ts": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{backend.port}"}]}}
                },
            },
            "udp": {
                "routers": {"u": {"service": "us", "entryPoints": ["dns"]}},
                "services": {"us": {"loadBalancer": {"servers": [{"address": "127.0.0.1:9"}]}}},
            },
        },
        entrypoints={"web": f"127.0.0.1:{free_port()}", "dns": f"127.0.0.1:{udp_port}/udp"},
    )
    admin = proxy.admin_port
    _, tcp_router, _ = await _aget(admin, "/api/tcp/routers/t@file")
    assert tcp_router["status"] == "enabled" and tcp_router["using"] == ["web"]
    _, tcp_service, _ = await _aget(admin, "/api/tcp/services/ts@file")
    assert tcp_service["serverStatus"] == {f"127.0.0.1:{backend.port}": "UP"}
    assert tcp_service["usedBy"] == ["t@file"]
    _, udp_router, _ = await _aget(admin, "/api/udp/routers/u@file")
    assert udp_router["entryPoints"] == ["dns"] and udp_router["status"] == "enabled"
    _, udp_services, _ = await _aget(admin, "/api/udp/services")
    assert [s["name"] for s in udp_services] == ["us@file"]
    status, body, _ = await _aget(admin, "/api/udp/services/nope@file")
    assert (status, body) == (404, {"message": "service not found: nope@file"})


async def test_get_head_only_and_never_on_a_traffic_entrypoint(
    proxy_factory: Any, backends: Any
) -> None:
    """The API answers GET and HEAD, 405 to other methods. It is never served by a traffic
    entrypoint: /api/overview on `web` goes to the user's router (the backend answers), and a
    router that names Traefik's `api@internal` service is refused (disabled), so `web`
    answers 404 there rather than the API."""
    backend = await backends("b")
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {
                    "app": router("PathPrefix(`/`)", "s"),
                    "expose": router("PathPrefix(`/api`)", "api@internal", priority=1000),
                },
                "services": {"s": lb(backend.url)},
            }
        }
    )
    admin = proxy.admin_port
    assert (await _aget(admin, "/api/overview"))[0] == 200
    assert (await _aget(admin, "/api/overview", "HEAD"))[0] == 200
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert (await _aget(admin, "/api/http/routers", method))[0] == 405, method
    through_web = await request(proxy.port, target="/api/overview")
    assert through_web.status == 200 and b'"http"' not in through_web.body
    assert backend.requests[-1]["url"] == "/api/overview"  # the user's backend answered
    _, expose, _ = await _aget(admin, "/api/http/routers/expose@file")
    assert expose["status"] == "disabled"
    assert (await _aget(admin, "/api/rawdata"))[0] == 200


async def test_worker_processes_state_reaches_the_admin_api(
    proxy_factory: Any, scripted: Any, backends: Any
) -> None:
    """With `--workers=2` the supervisor answers the admin entrypoint and serves no traffic:
    the per-server in-flight count comes from the workers over the control channel (1 while a
    request is held, whichever worker took it), explain is answered by a worker (its live
    router table), and the dashboard's request rate comes from the workers' summed counters."""
    held = await scripted("held")
    held.mode = "hold"
    fast = await backends("fast")
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {
                    "slow": router("Path(`/slow`)", "s", priority=100),
                    "quick": router("PathPrefix(`/`)", "q"),
                },
                "services": {"s": lb(held.url), "q": lb(fast.url)},
            }
        },
        extra_flags=["--workers=2"],
    )
    admin = proxy.admin_port

    def workers_configured() -> bool:
        data = json.loads(proxy.admin_get("/api/rawdata") or b"{}")
        workers = data.get("meshproxy", {}).get("workers") or []
        return len(workers) == 2 and all(w["generation"] >= 1 for w in workers)

    await wait_for(workers_configured, 20, "both workers on the first config")
    pending = asyncio.create_task(request(proxy.port, target="/slow"))
    await wait_for(
        lambda: held.holding == 1 or pending.done(), 10, "the request held by the backend"
    )
    assert not pending.done(), pending.result()

    async def in_flight() -> int:
        _, service, _ = await _aget(admin, "/api/http/services/s@file")
        return service["meshproxyServers"][0]["inFlight"]

    assert await in_flight() == 1
    held.release()
    assert (await pending).status == 200
    await wait_for(lambda: in_flight_of(admin, "s@file") == 0, 10, "in-flight back to 0")
    status, answer, _ = await _aget(admin, "/api/explain?path=/slow")
    assert status == 200 and answer["router"] == "slow@file"
    status, answer, _ = await _aget(admin, "/api/explain?source=bad")
    assert status == 400 and "source=" in answer["error"]

    async def rate_shown() -> bool:
        for _ in range(10):
            assert (await request(proxy.port, target="/q")).status == 200
        page = await asyncio.to_thread(_text, admin, "/dashboard/live")
        match = re.search(r'data-service="q@file">.*?<td class="num rate">([\d.]+)<', page, re.S)
        return match is not None and float(match.group(1)) > 0

    await wait_for(rate_shown, 20, "a request rate summed over the workers")


def in_flight_of(admin: int, service: str) -> int:
    _, data, _ = _get(admin, f"/api/http/services/{service}")
    return data["meshproxyServers"][0]["inFlight"]


def _text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()
