"""What the proxy logs at its default level (ERROR, as Traefik's): every failure Traefik 3.7
logs at ERR has a line, per configuration generation for config errors and rate-limited
(one per cause and target every 10 s) for per-request failures, so a dead backend under load
does not flood the log. The proxy runs without `--log.level`; its stderr is read.

Traefik's lines, checked with the real binary at its default level (fresh-tcp F-TLS-1):
`ERR error="error building proxy for server URL …: servers transport not found nosuch@file"
routerName=missing@file` once per configuration it receives, and `ERR 500 Internal Server
Error error="tls: failed to verify certificate: x509: certificate signed by unknown
authority"` for each request; a TCP dial failure is `ERR Error while dialing backend`
(pkg/tcp/proxy.go)."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import trustme

from tests.helpers import ProxyProcess, free_port, request, router, wait_for


class DefaultLevelProxy(ProxyProcess):
    """The test harness's proxy without its `--log.level=INFO`: the default level applies."""

    def flags(self) -> list[str]:
        return [f for f in super().flags() if not f.startswith("--log.level")]


async def default_level_proxy(tmp_path: Path, dynamic: dict[str, Any], **kwargs: Any) -> Any:
    proxy = DefaultLevelProxy(tmp_path, dynamic, **kwargs)
    await proxy.start()
    return proxy


def lines(proxy: ProxyProcess, pattern: str) -> list[str]:
    return [line for line in proxy.log_path.read_text().splitlines() if re.search(pattern, line)]


async def test_a_router_disabled_by_a_missing_transport_is_logged_once_per_generation(tmp_path):
    """A service naming a serversTransport that does not exist is disabled, and its router
    with it (404, as Traefik): at the default level that is one ERROR line per
    configuration generation naming the transport, not one per request; a non-critical
    error (an unknown entrypoint) is an ERROR line too, as Traefik; nothing is logged below
    ERROR."""
    config = {
        "http": {
            "routers": {"missing": router("PathPrefix(`/`)", "s")},
            "services": {
                "s": {
                    "loadBalancer": {
                        "servers": [{"url": f"https://127.0.0.1:{free_port()}"}],
                        "serversTransport": "nosuch",
                    }
                }
            },
        }
    }
    proxy = await default_level_proxy(tmp_path, config)
    try:
        await wait_for(lambda: lines(proxy, "nosuch"), 10, "the error line")
        for _ in range(5):
            assert (await request(proxy.port)).status == 404
        first = lines(proxy, "nosuch")
        assert first and all(" ERROR " in line for line in first), first
        # a non-critical error too (Traefik 3.7: `ERR EntryPoint doesn't exist
        # entryPointName=nosuchep routerName=r@file`, the router still serving on `web`)
        config["http"]["routers"]["other"] = router("PathPrefix(`/other`)", "s")
        config["http"]["routers"]["other"]["entryPoints"] = ["web", "nosuchep"]
        proxy.write(config)
        await wait_for(lambda: proxy.generation() >= 2, 10, "the second generation")
        await wait_for(lambda: len(lines(proxy, "nosuch")) > len(first), 10, "logged again")
        await wait_for(lambda: lines(proxy, "nosuchep"), 10, "the entrypoint error")
        assert all(" ERROR " in line for line in lines(proxy, "nosuch"))
        assert not lines(proxy, r" (WARNING|INFO|DEBUG) ")
    finally:
        proxy.stop()


async def test_a_refused_backend_certificate_is_one_error_line_per_interval(tmp_path):
    """An https server whose certificate fails verification: each of 20 requests gets 502,
    and the log has one ERROR line with the reason (Traefik: one ERR line per request; the
    rest are held back here and counted in the next line)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = {
        "http": {
            "routers": {"r": router("PathPrefix(`/`)", "s")},
            "services": {
                "s": {"loadBalancer": {"servers": [{"url": url}], "serversTransport": "t"}}
            },
            "serversTransports": {"t": {"rootCAs": [trustme.CA().cert_pem.bytes().decode()]}},
        }
    }
    proxy = await default_level_proxy(tmp_path, config)
    try:
        for _ in range(20):
            assert (await request(proxy.port)).status == 502
        await wait_for(lambda: lines(proxy, "CERTIFICATE_VERIFY_FAILED"), 10, "the error line")
        logged = lines(proxy, "CERTIFICATE_VERIFY_FAILED")
        assert len(logged) == 1 and " ERROR " in logged[0], logged
        assert url.removeprefix("https://") in logged[0]
    finally:
        proxy.stop()
        server.close()


async def test_no_tcp_server_reachable_is_one_error_line_per_interval(tmp_path):
    """A TCP route whose only server refuses: each of 10 clients is reset at once, and the
    log has one ERROR line naming the router, the service and the failure (Traefik: `ERR
    Error while dialing backend` per connection)."""
    port = free_port()
    config = {
        "tcp": {
            "routers": {"r": {"entryPoints": ["tcp"], "rule": "HostSNI(`*`)", "service": "s"}},
            "services": {"s": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{port}"}]}}},
        }
    }
    proxy = await default_level_proxy(
        tmp_path,
        config,
        entrypoints={"web": f"127.0.0.1:{free_port()}", "tcp": f"127.0.0.1:{free_port()}"},
    )
    try:
        for _ in range(10):
            try:  # the RST may come before connect() returns, or at the first read
                with socket.create_connection(("127.0.0.1", proxy.port_of("tcp")), 5) as s:
                    assert s.recv(10) == b""
            except ConnectionResetError:
                pass
        await wait_for(lambda: lines(proxy, "reachable"), 10, "the error line")
        logged = lines(proxy, "reachable")
        assert len(logged) == 1 and " ERROR " in logged[0], logged
        assert "router r@file: no server of s@file reachable" in logged[0]
        assert f"127.0.0.1:{port}" in logged[0]
    finally:
        proxy.stop()
