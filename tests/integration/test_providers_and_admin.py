"""HTTP provider polling, Traefik Mesh fixtures, readiness, metrics, the mesh's CLI flags."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from aiohttp import web

from tests.helpers import FIXTURES, catch_all, free_port, lb, request, router, wait_for


class Controller:
    """A stand-in controller endpoint serving a config with an ETag (aiohttp, real socket)."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.if_none_match: list[str | None] = []
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        etag = f'"{hash(self.body) & 0xFFFFFFFF:x}"'
        self.if_none_match.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            body=self.body, headers={"ETag": etag, "Content-Type": "application/json"}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/configuration/current", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/configuration/current"


async def test_http_provider_polls_with_etag_and_survives_an_unreachable_controller(
    backends, proxy_factory
):
    backend = await backends()
    controller = Controller()
    controller.body = json.dumps(
        {
            "http": {
                "routers": {"r": router("Host(`a.test`)", "s")},
                "services": {"s": lb(backend.url)},
            }
        }
    ).encode()
    await controller.start()
    proxy = await proxy_factory(
        None,
        provider="http",
        extra_flags=[
            f"--providers.http.endpoint={controller.url}",
            "--providers.http.pollInterval=50ms",
            "--providers.http.pollTimeout=1s",
        ],
    )
    await wait_for(lambda: proxy.generation() >= 1, 10, "first config from the controller")
    assert (await request(proxy.port, host="a.test")).status == 200
    await wait_for(lambda: any(controller.if_none_match), 5, "If-None-Match sent")
    generation = proxy.generation()
    await controller.stop()  # unreachable: the last good config keeps serving
    await wait_for(lambda: proxy.rawdata()["meshproxy"]["lastConfigError"], 10, "poll error seen")
    assert (await request(proxy.port, host="a.test")).status == 200
    assert proxy.generation() == generation
    controller.body = json.dumps(
        {
            "http": {
                "routers": {"r": router("Host(`b.test`)", "s")},
                "services": {"s": lb(backend.url)},
            }
        }
    ).encode()
    await controller.start()  # back: the new config applies
    await wait_for(
        lambda: proxy.generation() > generation, 20, "config after the controller is back"
    )
    assert (await request(proxy.port, host="b.test")).status == 200
    assert (await request(proxy.port, host="a.test")).status == 404
    await controller.stop()


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*-config.json")))
async def test_traefik_mesh_fixture_loads_without_errors(proxy_factory, tmp_path, fixture):
    entrypoints = {
        name: f"127.0.0.1:{free_port()}" for name in ("web", "http-10000", "readiness", "tcp-5000")
    }
    entrypoints["udp-15000"] = f"127.0.0.1:{free_port()}/udp"
    proxy = await proxy_factory(
        None,
        entrypoints=entrypoints,
        provider="none",
        extra_flags=[f"--providers.file.filename={FIXTURES / fixture}"],
    )
    await wait_for(lambda: proxy.generation() >= 1, 10, "fixture applied")
    raw = proxy.rawdata()
    assert raw["meshproxy"]["lastConfigError"] is None
    for section in ("routers", "services", "middlewares"):
        for name, obj in raw[section].items():
            assert obj["status"] == "enabled", (name, obj)
    readiness = await request(proxy.port_of("readiness"), target="/ping")
    assert readiness.status == 502  # readiness router -> 127.0.0.1:8080, not this test's admin


async def test_acl_fixture_blocks_unknown_sources_with_403(proxy_factory):
    entrypoints = {
        "web": f"127.0.0.1:{free_port()}",
        "http-10000": f"127.0.0.1:{free_port()}",
        "readiness": f"127.0.0.1:{free_port()}",
    }
    fixture = FIXTURES / "acl-enabled-http-traffic-split-http-route-group-config.json"
    proxy = await proxy_factory(
        None,
        entrypoints=entrypoints,
        provider="none",
        extra_flags=[f"--providers.file.filename={fixture}"],
    )
    await wait_for(lambda: proxy.generation() >= 1)
    port = proxy.port_of("http-10000")
    for host in ("svc-a.my-ns.traefik.mesh", "svc-b.my-ns.maesh", "10.10.16.1"):
        assert (await request(port, host=host, target="/app")).status == 403


async def test_readiness_answers_only_once_the_first_config_is_applied(proxy_factory):
    controller = Controller()
    readiness = free_port()
    proxy = await proxy_factory(
        None,
        provider="http",
        entrypoints={
            "web": f"127.0.0.1:{free_port()}",
            "readiness": f"127.0.0.1:{readiness}",
            "liveness": f"127.0.0.1:{free_port()}",
        },
        extra_flags=[
            f"--providers.http.endpoint={controller.url}",
            "--providers.http.pollInterval=50ms",
        ],
    )
    assert (await request(readiness, target="/ping")).status == 404  # no config yet: not ready
    assert (await request(proxy.port_of("liveness"), target="/")).status == 404  # but alive
    controller.body = json.dumps(
        {
            "http": {
                "routers": {
                    "readiness": {
                        "entryPoints": ["readiness"],
                        "rule": "Path(`/ping`)",
                        "service": "readiness",
                    }
                },
                "services": {"readiness": lb(f"http://127.0.0.1:{proxy.admin_port}")},
            }
        }
    ).encode()
    await controller.start()
    await wait_for(lambda: proxy.generation() >= 1, 20, "config applied")
    ready = await request(readiness, target="/ping")
    assert (ready.status, ready.body) == (200, b"OK")
    await controller.stop()


async def test_metrics_use_traefik_names_and_labels(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {"r": router("Host(`m.test`)", "s")},
                "services": {"s": lb(backend.url)},
            }
        }
    )
    for _ in range(3):
        await request(proxy.port, host="m.test")
    await request(proxy.port, host="none.test")
    text = proxy.metrics()
    assert (
        'traefik_entrypoint_requests_total{code="200",entrypoint="web",method="GET",protocol="http"} 3.0'
        in text
    )
    assert (
        'traefik_entrypoint_requests_total{code="404",entrypoint="web",method="GET",protocol="http"} 1.0'
        in text
    )
    assert (
        'traefik_service_requests_total{code="200",method="GET",protocol="http",service="s@file"} 3.0'
        in text
    )
    assert "traefik_service_request_duration_seconds_bucket" in text
    assert 'traefik_open_connections{entrypoint="web",protocol="TCP"}' in text
    assert "traefik_config_reloads_total 1.0" in text
    assert "traefik_config_last_reload_success" in text


def test_traefik_mesh_daemonset_flags_are_accepted():
    """The exact argument list of Traefik Mesh's proxy DaemonSet (chart defaults)."""
    from meshproxy.config.static import build_static, mesh_layout_flags

    flags = mesh_layout_flags() + [
        "--serversTransport.forwardingTimeouts.dialTimeout=30s",
        "--serversTransport.forwardingTimeouts.responseHeaderTimeout=0s",
        "--serversTransport.forwardingTimeouts.idleConnTimeout=5s",
        "--log.level=error",
        "--log.format=json",
        "--metrics.prometheus.addEntryPointsLabels=true",
        "--metrics.prometheus.addServicesLabels=true",
        "--metrics.prometheus.buckets=0.1,0.3,1.2,5",
        "--tracing.jaeger=true",
        "--tracing.jaeger.samplingServerURL=http://jaeger:5778/sampling",
        "--tracing.jaeger.localAgentHostPort=jaeger:6831",
    ]
    static, warnings = build_static(None, flags)
    assert len(static.entry_points) == 62
    assert static.entry_points["http-5000"].forwarded_headers.insecure is True
    assert static.metrics.prometheus.buckets == [0.1, 0.3, 1.2, 5.0]
    assert any(w.startswith("tracing:") for w in warnings)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args], capture_output=True, text=True, check=False
    )


def test_check_command_prints_every_error_with_its_path_and_exits_non_zero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "http:\n  routers:\n    r: {rule: 'Host(`a`) &&', service: s}\n"
        "  services:\n    s: {loadBalancer: {servers: [{url: 'http://a', weight: x}], nope: 1}}\n"
    )
    result = run_cli("check", str(bad))
    assert result.returncode == 1
    assert "http.services.s.loadBalancer.nope: field not found" in result.stdout
    assert "http.services.s.loadBalancer.servers[0].weight" in result.stdout
    fixture = FIXTURES / "acl-disabled-http-traffic-split-config.json"
    ok = run_cli("check", str(fixture))
    assert ok.returncode == 0, ok.stdout
    semantic = tmp_path / "semantic.yaml"
    semantic.write_text(
        "http:\n  routers:\n    r: {rule: 'Host(`a`) &&', service: s}\n"
        "  services:\n    s: {loadBalancer: {servers: [{url: 'http://a'}]}}\n"
    )
    result = run_cli("check", str(semantic))
    assert result.returncode == 1
    assert "http.routers.r: invalid rule" in result.stdout
    version = run_cli("version")
    assert version.stdout.startswith("meshproxy ")


async def test_proxy_exits_cleanly_on_sigterm(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    proxy.process.terminate()
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.process.wait, 15)
    assert code == 0
