"""`/metrics` against real Traefik 3.7 on the same config and traffic, and `promtool check
metrics` on meshproxy's exposition.

Traefik's Prometheus metrics (reference/traefik-proxy.md §6.1, pkg/observability/metrics/
prometheus.go) are what dashboards and alerts in the field are written against: every
`traefik_*` family Traefik exports for a config must be exported by meshproxy under the same
name, with the same type and the same label names. The traffic covers HTTP (a request retried
after a refused connection, a request with a body), HTTPS terminated by the proxy (TLS
request counters, certificate expiry), a health-checked service (`server_up`), a TCP
connection and a UDP datagram.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.differential.harness import TraefikProcess, TraefikUnavailable, traefik_binary
from tests.helpers import ProxyProcess, free_port, refused_url, request, wait_for
from tests.integration.test_udp import free_udp_port

HOST = "secure.example.test"


def _traefik_or_skip() -> None:
    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))


def families(text: str, prefix: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) of every family named `prefix`..., as a scraper reads
    them (histogram bucket `le` left out)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefix):
            continue
        labels = {name for s in family.samples for name in s.labels if name != "le"}
        out[family.name] = (family.type, frozenset(labels))
    return out


async def _echo_tcp() -> tuple[asyncio.AbstractServer, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class _UDPEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _UDPClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)


def dynamic_config(backend_url: str, tcp_port: int, udp_port: int, cert: Path, key: Path) -> Any:
    return {
        "http": {
            "routers": {
                "web": {
                    "rule": "PathPrefix(`/`)",
                    "service": "app",
                    "entryPoints": ["web"],
                    "middlewares": ["again"],
                },
                "secure": {
                    "rule": f"Host(`{HOST}`)",
                    "service": "checked",
                    "entryPoints": ["web"],
                    "tls": {},
                },
            },
            "middlewares": {"again": {"retry": {"attempts": 2}}},
            "services": {
                # a refused server first: the round robin's first request is retried
                "app": {
                    "loadBalancer": {"servers": [{"url": refused_url()}, {"url": backend_url}]}
                },
                "checked": {
                    "loadBalancer": {
                        "servers": [{"url": backend_url}],
                        "healthCheck": {"path": "/", "interval": "1s", "timeout": "1s"},
                    }
                },
            },
        },
        "tcp": {
            "routers": {
                "echo": {"rule": "HostSNI(`*`)", "service": "echo", "entryPoints": ["tcp"]}
            },
            "services": {
                "echo": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{tcp_port}"}]}}
            },
        },
        "udp": {
            "routers": {"dgram": {"service": "dgram", "entryPoints": ["udp"]}},
            "services": {
                "dgram": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{udp_port}"}]}}
            },
        },
        "tls": {"certificates": [{"certFile": str(cert), "keyFile": str(key)}]},
    }


async def drive(web: int, tcp: int, udp: int, ca: trustme.CA) -> None:
    """The same traffic through either proxy."""
    for _ in range(3):
        assert (await request(web, target="/plain")).status == 200
    assert (await request(web, method="POST", target="/form", body=b"a=1&b=2")).status == 200
    context = ssl.create_default_context()
    ca.configure_trust(context)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", web, ssl=context, server_hostname=HOST
    )
    writer.write(f"GET /tls HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.read(100), 10) == b"ping"
    writer.close()
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(
        _UDPClient, remote_addr=("127.0.0.1", udp)
    )
    transport.sendto(b"dgram")
    assert await asyncio.wait_for(client.answer, 10) == b"dgram"
    transport.close()


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


async def test_every_traefik_family_is_exported_with_its_type_and_labels(
    tmp_path: Path, backends: Any
) -> None:
    """Real Traefik 3.7 and meshproxy, same dynamic config, same traffic, both with
    `--metrics.prometheus.addRoutersLabels=true`: each `traefik_*` family Traefik exports is
    in meshproxy's /metrics with the same type and label names (Traefik's prometheus.go)."""
    _traefik_or_skip()
    backend = await backends("b")
    tcp_server, tcp_port = await _echo_tcp()
    loop = asyncio.get_running_loop()
    udp_transport, _ = await loop.create_datagram_endpoint(
        _UDPEcho, local_addr=("127.0.0.1", free_udp_port())
    )
    udp_port = udp_transport.get_extra_info("sockname")[1]
    ca = trustme.CA()
    issued = ca.issue_cert(HOST)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    dynamic = dynamic_config(backend.url, tcp_port, udp_port, cert, key)
    ports = {"web": free_port(), "tcp": free_port(), "udp": free_udp_port()}
    (tmp_path / "traefik").mkdir()
    (tmp_path / "mesh").mkdir()
    traefik = TraefikProcess(
        tmp_path / "traefik",
        dynamic,
        [
            f"--entryPoints.tcp.address=127.0.0.1:{ports['tcp']}",
            f"--entryPoints.udp.address=127.0.0.1:{ports['udp']}/udp",
            "--metrics.prometheus=true",
            "--metrics.prometheus.addRoutersLabels=true",
        ],
    )
    mesh_ports = {"web": free_port(), "tcp": free_port(), "udp": free_udp_port()}
    mesh = ProxyProcess(
        tmp_path / "mesh",
        dynamic,
        entrypoints={
            "web": f"127.0.0.1:{mesh_ports['web']}",
            "tcp": f"127.0.0.1:{mesh_ports['tcp']}",
            "udp": f"127.0.0.1:{mesh_ports['udp']}/udp",
        },
        extra_flags=["--metrics.prometheus.addRoutersLabels=true"],
    )
    try:
        await asyncio.to_thread(traefik.start)
        await mesh.start()
        await drive(traefik.port, ports["tcp"], ports["udp"], ca)
        await drive(mesh.port, mesh_ports["tcp"], mesh_ports["udp"], ca)
        wanted = ("traefik_service_server_up", "traefik_tls_certs_not_after")
        traefik_text = await wait_for(
            lambda: (t := _metrics(traefik.api_port)) and all(w in t for w in wanted) and t,
            15,
            "Traefik's health check and certificate series",
        )
        mesh_text = await wait_for(
            lambda: (t := mesh.metrics()) and "traefik_service_server_up{" in t and t, 15
        )
    finally:
        traefik.stop()
        mesh.stop()
        tcp_server.close()
        udp_transport.close()
    theirs = families(traefik_text, "traefik_")
    ours = families(mesh_text, "traefik_")
    assert (
        "traefik_entrypoint_requests_tls_total" in theirs
        or "traefik_entrypoint_requests_tls" in theirs
    )
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"Traefik exports {missing}, meshproxy does not"
    different = {name: (theirs[name], ours[name]) for name in theirs if theirs[name] != ours[name]}
    assert not different, f"type or label names differ (Traefik, meshproxy): {different}"
    # Where the values do not depend on timing, they are the same too: the certificate's
    # cn/serial/sans and expiry; the TLS version. (The cipher suite is each server's choice
    # for the same client: Go picks TLS_AES_128_GCM_SHA256 first, OpenSSL TLS_AES_256_GCM_
    # SHA384; both are written under their IANA name.)
    name = "traefik_tls_certs_not_after"
    assert samples(traefik_text, name) == samples(mesh_text, name), name
    name = "traefik_entrypoint_requests_tls_total"
    for text in (traefik_text, mesh_text):
        ((labels, count),) = samples(text, name)
        assert dict(labels)["tls_version"] == "1.3" and dict(labels)["tls_cipher"].startswith(
            "TLS_"
        )
        assert count == 1


def samples(text: str, name: str) -> set[tuple[frozenset[tuple[str, str]], float]]:
    return {
        (frozenset(s.labels.items()), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
async def test_promtool_check_metrics_is_clean(tmp_path: Path, backends: Any) -> None:
    """`promtool check metrics` (Prometheus' exposition-format linter: names, suffixes such as
    `_total` on counters, HELP text, label names) finds nothing in meshproxy's /metrics once
    every family has series: requests with retries, a circuit breaker, a retry budget, a rate
    limit, an upstream pool, TLS, UDP and tracing with an unreachable collector."""
    backend = await backends("b")
    ca = trustme.CA()
    issued = ca.issue_cert(HOST)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    tcp_server, tcp_port = await _echo_tcp()
    loop = asyncio.get_running_loop()
    udp_transport, _ = await loop.create_datagram_endpoint(
        _UDPEcho, local_addr=("127.0.0.1", free_udp_port())
    )
    udp_port = udp_transport.get_extra_info("sockname")[1]
    dynamic = dynamic_config(backend.url, tcp_port, udp_port, cert, key)
    dynamic["http"]["middlewares"].update(
        {
            "cb": {"circuitBreaker": {"expression": "NetworkErrorRatio() > 0.5"}},
            "budgeted": {"retry": {"attempts": 3, "budget": {"ratio": 0.2}}},
            "limit": {"rateLimit": {"average": 1, "burst": 1}},
        }
    )
    dynamic["http"]["routers"]["web"]["middlewares"] = ["limit", "cb", "budgeted", "again"]
    mesh_ports = {"web": free_port(), "tcp": free_port(), "udp": free_udp_port()}
    mesh = ProxyProcess(
        tmp_path,
        dynamic,
        entrypoints={
            "web": f"127.0.0.1:{mesh_ports['web']}",
            "tcp": f"127.0.0.1:{mesh_ports['tcp']}",
            "udp": f"127.0.0.1:{mesh_ports['udp']}/udp",
        },
        extra_flags=[
            "--metrics.prometheus.addRoutersLabels=true",
            "--metrics.prometheus.buckets=0.005,0.05,0.5,5",
            f"--tracing.otlp.http.endpoint=http://127.0.0.1:{free_port()}/v1/traces",
        ],
    )
    try:
        await mesh.start()
        for _ in range(3):  # the rate limit lets one through and refuses the rest
            await request(mesh.port, target="/plain")
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh_ports["tcp"])
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(100), 10) == b"ping"
        writer.close()
        text = await wait_for(
            lambda: (
                (t := mesh.metrics())
                and "meshproxy_tracing_spans_dropped_total" in t
                and "traefik_service_server_up{" in t
                # counted once the relayed connection has ended on both sides
                and (1.0 in {v for _, v in samples(t, "meshproxy_tcp_connections_total")})
                and t
            ),
            15,
        )
    finally:
        mesh.stop()
        tcp_server.close()
        udp_transport.close()
    for family in (
        'meshproxy_circuit_breaker_state{middleware="cb@file"',
        'meshproxy_retry_budget_remaining{middleware="budgeted@file"',
        'meshproxy_exchange_failures_total{entrypoint="web",service="",why="rate_limited"}',
        "meshproxy_upstream_pool_connections{",
        "traefik_tls_certs_not_after{",
        'le="0.005"',
    ):
        assert family in text, family
    tcp = {
        (dict(labels)["direction"], value)
        for labels, value in samples(text, "meshproxy_tcp_bytes_total")
        if dict(labels)["entrypoint"] == "tcp"
    }
    assert tcp == {("from_client", 4.0), ("from_server", 4.0)}  # "ping" each way
    connections = {
        dict(labels)["entrypoint"]: value
        for labels, value in samples(text, "meshproxy_tcp_connections_total")
    }
    assert connections["tcp"] == 1 and connections.get("web", 0) == 0
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    problems = (check.stdout + check.stderr).decode()
    assert check.returncode == 0 and not problems.strip(), problems
