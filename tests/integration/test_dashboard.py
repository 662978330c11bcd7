"""The dashboard (issue 14, point 6) in headless Chromium (Debian's `chromium`): entrypoints,
routers, services with server health, middlewares, live request and error rates per service,
the last config error and the explain form, served by the admin entrypoint with no build step;
without a config yet it says so. A screenshot goes to a tmp path (MESHPROXY_DASHBOARD_PNG
names another, e.g. docs/dashboard.png)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # the test may run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


def _fetch(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def _rate(fragment: str, service: str) -> float:
    match = re.search(
        rf'<tr data-service="{re.escape(service)}">.*?<td class="num rate">([\d.]+)</td>',
        fragment,
        re.S,
    )
    return float(match.group(1)) if match else 0.0


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
async def test_dashboard_in_headless_chromium(
    proxy_factory: Any, backends: Any, tmp_path: Path
) -> None:
    """The page as Chromium renders it, after its script ran: every section with the objects
    of the config (a health-checked server that is DOWN, a disabled router with its error),
    a non-zero request rate for the service taking traffic, and the explain form's answer
    for a request given in the URL. Then a broken config file: the page shows the last
    config error while the previous config keeps serving."""
    a, b = await backends("a"), await backends("b")
    dynamic = {
        "http": {
            "routers": {
                "shop": router("Host(`shop.test`)", "shop", middlewares=["limit", "office"]),
                "api": router("Host(`shop.test`) && PathPrefix(`/api`)", "api", priority=100),
                "broken": router("Path(`/b`)", "missing"),
            },
            "services": {
                "shop": lb(a.url, b.url),
                "api": lb(
                    a.url,
                    refused_url(),
                    healthCheck={"path": "/health", "interval": "200ms"},
                ),
            },
            "middlewares": {
                "limit": {"rateLimit": {"average": 1000, "burst": 500}},
                "office": {"ipAllowList": {"sourceRange": ["127.0.0.1/32"]}},
            },
        }
    }
    proxy = await proxy_factory(dynamic)
    admin = proxy.admin_port
    await asyncio.to_thread(_fetch, admin, "/dashboard/live")  # the rates' first sample
    sent = 0

    async def traffic_rate() -> bool:
        nonlocal sent
        for _ in range(10):
            response = await request(proxy.port, target="/", host="shop.test")
            assert response.status == 200
            sent += 1
        fragment = await asyncio.to_thread(_fetch, admin, "/dashboard/live")
        return _rate(fragment, "shop@file") > 0 and "DOWN" in fragment

    await wait_for(traffic_rate, 20, "a request rate for shop@file and the DOWN server")
    assert sent <= 2000
    url = f"http://127.0.0.1:{admin}/dashboard/?explain=1&host=shop.test&path=/api/x"
    done = await asyncio.to_thread(_chromium, "--virtual-time-budget=3000", "--dump-dom", url)
    dom = done.stdout
    assert done.returncode == 0 and "<html" in dom, done.stderr[-2000:]
    for text in (
        'id="entrypoints"',
        "web",
        "shop@file",
        "api@file",
        "limit@file",
        "ratelimit",
        "ipallowlist",
        "broken@file",
        "No configuration error.",
    ):
        assert text in dom, text
    assert re.search(r"does not exist", dom)  # the broken router's error
    assert re.search(r'class="down">DOWN</span> http://127\.0\.0\.1:\d+', dom)
    assert re.search(r'class="up">UP</span> ' + re.escape(a.url), dom)
    rates = re.search(
        r'<tr data-service="shop@file">.*?<td class="num rate">([\d.]+)</td>', dom, re.S
    )
    assert rates is not None
    # the explain form ran in the browser: the tree names the router and its next server
    explained = re.search(r'<pre id="explain-result"[^>]*>(.*?)</pre>', dom, re.S)
    assert explained is not None and "router api@file" in explained.group(1), dom[-3000:]
    assert "next pick: " + a.url in explained.group(1)

    shot = Path(os.environ.get("MESHPROXY_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    done = await asyncio.to_thread(
        _chromium,
        "--virtual-time-budget=3000",
        "--window-size=1400,1300",
        f"--screenshot={shot}",
        url,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    proxy.write("http: {routers: [unclosed")  # a config the provider cannot decode

    async def error_shown() -> bool:
        fragment = await asyncio.to_thread(_fetch, admin, "/dashboard/live")
        return 'class="banner error" id="last-error"' in fragment

    await wait_for(error_shown, 10, "the last config error on the dashboard")
    assert (await request(proxy.port, target="/", host="shop.test")).status == 200


async def test_dashboard_without_config(proxy_factory: Any) -> None:
    """Bad input: no configuration yet (the HTTP provider's endpoint does not answer): the
    dashboard says so instead of showing empty tables as if nothing were wrong."""
    proxy = await proxy_factory(
        None,
        provider="http",
        extra_flags=[
            f"--providers.http.endpoint=http://127.0.0.1:{free_port()}/config",
            "--providers.http.pollInterval=50ms",
        ],
    )
    page = await asyncio.to_thread(_fetch, proxy.admin_port, "/dashboard/")
    assert 'id="no-config"' in page and "No configuration yet" in page
    assert '<form id="explain-form"' in page
    assert await asyncio.to_thread(_fetch, proxy.admin_port, "/dashboard/static/dashboard.js")
    redirected = await asyncio.to_thread(_fetch, proxy.admin_port, "/")
    assert "No configuration yet" in redirected  # / leads to the dashboard, as in Traefik
