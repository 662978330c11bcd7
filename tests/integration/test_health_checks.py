"""Active health checks (Traefik's loadBalancer.healthCheck) end to end through a running
proxy, with real backends that die, hang, misbehave and recover on command
(tests/integration/lb_backend.py), a real gRPC health service (grpcio) and an h2c server
made with the h2 library."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trustme

from tests.grpc_peers import EchoClient, EchoServer
from tests.helpers import request, router, wait_for
from tests.integration.lb_backend import ControlledBackend

NO_OUTLIER = {"enabled": False}  # isolate the active checks from passive detection


@pytest.fixture
async def controlled() -> AsyncIterator[Callable[..., Any]]:
    started: list[ControlledBackend] = []

    async def make(name: str, health_path: str = "/health") -> ControlledBackend:
        backend = await ControlledBackend(name, health_path).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.aclose()


def checked(*urls: str, check: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {
        "loadBalancer": {
            "servers": [{"url": u} for u in urls],
            "healthCheck": check,
            "outlierDetection": NO_OUTLIER,
            **options,
        }
    }


def one_service(service: dict[str, Any]) -> dict[str, Any]:
    return {"http": {"routers": {"r": router("Host(`a.test`)", "s")}, "services": {"s": service}}}


def server_status(proxy: Any, service: str = "s@file") -> dict[str, str]:
    return proxy.rawdata()["services"][service].get("serverStatus", {})


async def test_dead_server_leaves_within_one_interval_and_comes_back(controlled, proxy_factory):
    """Traefik healthCheck: a server whose probe fails is DOWN and gets no request; it is UP
    again once a probe passes (unhealthyInterval); traefik_service_server_up follows. A dead
    pod leaves within one interval plus the probe's timeout (checks are jittered to 90-100%
    of the interval)."""
    backends = [await controlled(f"b{i}") for i in range(3)]
    check = {"path": "/health", "interval": "500ms", "unhealthyInterval": "200ms",
             "timeout": "200ms"}  # fmt: skip
    proxy = await proxy_factory(one_service(checked(*(b.url for b in backends), check=check)))
    await wait_for(lambda: backends[0].health_probes >= 1, 5, "first probe")
    dead = backends[0]
    await dead.die()
    # "Within one interval" measured on the checkers' own clock, not the wall's (a loaded
    # machine delays every checker alike): a live server, probed on the same interval, has
    # seen at most two more probes by the time the dead one is DOWN.
    clock = backends[1].health_probes
    await wait_for(lambda: server_status(proxy)[dead.url] == "DOWN", 10, "DOWN")
    assert backends[1].health_probes - clock <= 2
    answers = Counter([(await request(proxy.port, host="a.test")).body for _ in range(20)])
    assert answers == {b"b1": 10, b"b2": 10}
    metrics = proxy.metrics()
    assert f'traefik_service_server_up{{service="s@file",url="{dead.url}"}} 0.0' in metrics
    assert f"health check of {dead.url} failed, server DOWN" in proxy.log_path.read_text()
    await dead.revive()
    await wait_for(lambda: server_status(proxy)[dead.url] == "UP", 5, "UP again")
    answers = Counter([(await request(proxy.port, host="a.test")).body for _ in range(30)])
    assert answers == {b"b0": 10, b"b1": 10, b"b2": 10}
    assert f'traefik_service_server_up{{service="s@file",url="{dead.url}"}} 1.0' in (
        proxy.metrics()
    )


async def test_probe_sends_the_configured_request(controlled, proxy_factory):
    """Traefik's newRequest: `method`, `path` (with its query) resolved against the server
    URL, `port` replacing the server's, `hostname` as the Host field, `headers` added."""
    server = await controlled("server")
    server.health = "status:500"  # would fail if the probe went to the server's own port
    probed = await controlled("probed")
    check = {
        "path": "/health?deep=1",
        "port": probed.port,
        "method": "HEAD",
        "hostname": "check.internal",
        "headers": {"X-Probe": "meshproxy"},
        "interval": "200ms",
    }
    proxy = await proxy_factory(one_service(checked(server.url, check=check)))
    await wait_for(lambda: probed.health_probes >= 2, 5, "probes on the health port")
    assert server.health_probes == 0
    head = probed.probe_heads[0].decode().lower()
    assert head.startswith("head /health?deep=1 http/1.1\r\n")
    assert "\r\nhost: check.internal\r\n" in head
    assert "\r\nx-probe: meshproxy\r\n" in head
    assert server_status(proxy) == {server.url: "UP"}


async def test_status_and_redirects(controlled, proxy_factory):
    """`status` must match exactly when set (else [200, 400) passes); redirects are followed
    (at most 10, as Go's client: a loop is a failure) unless `followRedirects: false`, where
    a 302 itself passes."""
    expects_204 = await controlled("expects204")
    loops = await controlled("loops")
    loops.health = "redirect-loop"
    loops_no_follow = await controlled("loops-no-follow")
    loops_no_follow.health = "redirect-loop"
    fast = {"path": "/health", "interval": "200ms", "timeout": "1s"}
    config = {
        "http": {
            "routers": {},
            "services": {
                "a": checked(expects_204.url, check={**fast, "status": 204}),
                "b": checked(loops.url, check=fast),
                "c": checked(loops_no_follow.url, check={**fast, "followRedirects": False}),
            },
        }
    }
    proxy = await proxy_factory(config)
    await wait_for(lambda: server_status(proxy, "a@file")[expects_204.url] == "DOWN", 5, "204")
    await wait_for(lambda: server_status(proxy, "b@file")[loops.url] == "DOWN", 5, "loop")
    await wait_for(lambda: loops_no_follow.health_probes >= 2, 5, "no-follow probes")
    assert server_status(proxy, "c@file")[loops_no_follow.url] == "UP"
    servers = proxy.rawdata()["services"]["b@file"]["meshproxyServers"]
    assert "more than 10 redirects" in servers[0]["healthCheck"]["lastError"]
    assert loops.health_probes >= 10  # one probe: ten requests, as Go's CheckRedirect


async def test_bad_health_endpoints_are_bounded(controlled, proxy_factory):
    """Issue 13, Bad input: a server that accepts and never answers is DOWN once `timeout`
    passes; a check answering 200 with a 2 GB body is bounded by the read cap (1 MiB) and
    counted as unhealthy (Traefik trusts the status and closes the body unread); with no
    healthy server the router answers 503, the proxy staying responsive."""
    hangs = await controlled("hangs")
    hangs.health = "hang"
    big = await controlled("big")
    big.health = "big"
    endless = await controlled("endless")
    endless.health = "big-chunked"
    check = {"path": "/health", "interval": "200ms", "timeout": "300ms"}
    config = {
        "http": {
            "routers": {"r": router("Host(`a.test`)", "big")},
            "services": {
                "hangs": checked(hangs.url, check=check),
                "big": checked(big.url, check=check),
                "endless": checked(endless.url, check={**check, "timeout": "5s"}),
            },
        }
    }
    proxy = await proxy_factory(config)
    await wait_for(lambda: server_status(proxy, "hangs@file")[hangs.url] == "DOWN", 5, "hang")
    servers = proxy.rawdata()["services"]["hangs@file"]["meshproxyServers"]
    assert servers[0]["healthCheck"]["lastError"] == "no answer within 0.3s"
    await wait_for(lambda: server_status(proxy, "big@file")[big.url] == "DOWN", 5, "big body")
    servers = proxy.rawdata()["services"]["big@file"]["meshproxyServers"]
    assert "more than 1048576" in servers[0]["healthCheck"]["lastError"]
    # a chunked answer with no end is cut at the cap, well before its 5 s timeout
    await wait_for(lambda: server_status(proxy, "endless@file")[endless.url] == "DOWN", 5, "cap")
    servers = proxy.rawdata()["services"]["endless@file"]["meshproxyServers"]
    assert servers[0]["healthCheck"]["lastError"] == "body larger than 1048576 bytes"
    assert (await request(proxy.port, host="a.test", timeout=2)).status == 503


async def test_all_servers_down_is_503_and_the_admin_api_says_why(controlled, proxy_factory):
    """Traefik: no healthy server -> 503 `no available server`; the admin API shows every
    server DOWN with the probe's error."""
    backends = [await controlled(f"b{i}") for i in range(2)]
    for backend in backends:
        backend.health = "status:503"
    check = {"path": "/health", "interval": "200ms"}
    proxy = await proxy_factory(one_service(checked(*(b.url for b in backends), check=check)))
    await wait_for(lambda: set(server_status(proxy).values()) == {"DOWN"}, 5, "every server DOWN")
    response = await request(proxy.port, host="a.test")
    assert (response.status, response.body) == (503, b"no available server\n")
    service = proxy.rawdata()["services"]["s@file"]
    assert service["meshproxyWhy"].startswith("no server available")
    assert all(
        s["why"] == "health check failed: received error status code: 503"
        for s in service["meshproxyServers"]
    )
    assert "service s@file is down: no server available" in proxy.log_path.read_text()


async def test_invalid_health_check_is_an_error_with_its_path(controlled, proxy_factory):
    """Bad input: a health check Traefik could not run disables its service with the key at
    fault, the rest serves; an undecodable value rejects the payload with its JSON path and
    the last good configuration keeps serving."""
    good = await controlled("good")
    config = {
        "http": {
            "routers": {
                "bad": router("Host(`bad.test`)", "bad"),
                "good": router("Host(`good.test`)", "good"),
            },
            "services": {
                "bad": checked(good.url, check={"scheme": "ftp"}),
                "good": checked(good.url, check={"path": "/health"}),
            },
        }
    }
    proxy = await proxy_factory(config)
    data = proxy.rawdata()
    assert data["services"]["bad@file"]["status"] == "disabled"
    assert data["services"]["bad@file"]["error"] == [
        "loadBalancer.healthCheck.scheme: 'ftp' is not supported (http, https, h2c)"
    ]
    assert (await request(proxy.port, host="good.test")).status == 200
    assert (await request(proxy.port, host="bad.test")).status == 404
    config["http"]["services"]["good"]["loadBalancer"]["healthCheck"]["interval"] = "soon"
    proxy.write(config)
    await wait_for(lambda: proxy.rawdata()["meshproxy"]["lastConfigError"], 5, "rejected")
    assert (
        "http.services.good.loadBalancer.healthCheck.interval: invalid duration"
        in (proxy.rawdata()["meshproxy"]["lastConfigError"])
    )
    assert (await request(proxy.port, host="good.test")).status == 200


async def test_one_checker_per_server_shared_kept_across_reloads_and_stopped(
    controlled, proxy_factory
):
    """One checker per (server, check) for the process: two services listing the same
    server with the same check probe it once per interval, not twice. A reload that keeps it
    keeps its verdict (Traefik restarts checks with every server UP); a reload that drops it
    stops the probes."""
    shared = await controlled("shared")
    check = {"path": "/health", "interval": "200ms"}
    config = {
        "http": {
            "routers": {
                "r1": router("Host(`one.test`)", "one"),
                "r2": router("Host(`two.test`)", "two"),
            },
            "services": {
                "one": checked(shared.url, check=check),
                "two": checked(shared.url, check=check),
            },
        }
    }
    proxy = await proxy_factory(config)
    await wait_for(lambda: shared.health_probes >= 1, 5, "first probe")
    start, began = shared.health_probes, time.monotonic()
    await asyncio.sleep(2.0)  # a measurement window, not a wait for a condition
    rate = (shared.health_probes - start) / (time.monotonic() - began)
    assert 3.5 < rate < 6.5  # one checker: 5-5.6 probes per second; two would be 10-11
    shared.health = "status:500"
    await wait_for(lambda: server_status(proxy, "one@file")[shared.url] == "DOWN", 5, "DOWN")
    assert server_status(proxy, "two@file")[shared.url] == "DOWN"
    config["http"]["routers"]["r3"] = router("Host(`three.test`)", "one")
    generation = proxy.generation()
    proxy.write(config)
    await wait_for(lambda: proxy.generation() > generation, 5, "reload")
    assert server_status(proxy, "one@file")[shared.url] == "DOWN"
    assert (await request(proxy.port, host="three.test")).status == 503
    del config["http"]["services"]["one"]["loadBalancer"]["healthCheck"]
    del config["http"]["services"]["two"]["loadBalancer"]["healthCheck"]
    generation = proxy.generation()
    proxy.write(config)
    await wait_for(lambda: proxy.generation() > generation, 5, "reload")
    assert server_status(proxy, "one@file")[shared.url] == "UP"  # no check: UP (Traefik)
    await asyncio.sleep(0.3)  # let a probe already on the wire land
    stopped_at = shared.health_probes
    await asyncio.sleep(0.6)
    assert shared.health_probes == stopped_at


async def test_weighted_and_mirroring_parents_see_a_child_down(controlled, proxy_factory):
    """Traefik's SetStatus propagation: a `weighted` service with `healthCheck: {}` skips a
    child with no healthy server (no 503 while another child is up), through a `mirroring`
    child with `healthCheck: {}` too; a parent with healthCheck over a child without one is a
    build error, as Traefik's RegisterStatusUpdater."""
    a, b = await controlled("a"), await controlled("b")
    check = {"path": "/health", "interval": "200ms"}
    config = {
        "http": {
            "routers": {
                "r": router("Host(`w.test`)", "split"),
                "bad": router("Host(`bad.test`)", "bad-split"),
            },
            "services": {
                "split": {
                    "weighted": {
                        "services": [{"name": "mirrored-a"}, {"name": "sb"}],
                        "healthCheck": {},
                    }
                },
                "mirrored-a": {"mirroring": {"service": "sa", "healthCheck": {}}},
                "sa": checked(a.url, check=check),
                "sb": checked(b.url, check=check),
                "plain": {"loadBalancer": {"servers": [{"url": a.url}]}},
                "bad-split": {"weighted": {"services": [{"name": "plain"}], "healthCheck": {}}},
            },
        }
    }
    proxy = await proxy_factory(config)
    answers = Counter([(await request(proxy.port, host="w.test")).body for _ in range(10)])
    assert answers == {b"a": 5, b"b": 5}
    a.health = "status:500"
    await wait_for(lambda: server_status(proxy, "sa@file")[a.url] == "DOWN", 5, "a DOWN")
    answers = Counter([(await request(proxy.port, host="w.test")).body for _ in range(10)])
    assert answers == {b"b": 10}
    a.health = "ok"
    await wait_for(lambda: server_status(proxy, "sa@file")[a.url] == "UP", 5, "a UP")
    answers = Counter([(await request(proxy.port, host="w.test")).body for _ in range(10)])
    assert answers == {b"a": 5, b"b": 5}
    error = proxy.rawdata()["services"]["bad-split@file"]["error"][0]
    assert re.search(r"child service plain@file of bad-split@file not a", error)
    # every child down: 503 as Traefik, and the API says why on the parents (fresh tester F10)
    a.health = b.health = "status:500"
    await wait_for(lambda: "meshproxyWhy" in proxy.rawdata()["services"]["split@file"], 5, "why")
    assert (await request(proxy.port, host="w.test")).status == 503
    services = proxy.rawdata()["services"]
    assert services["split@file"]["meshproxyWhy"] == (
        "no available child: every child service with a weight is down (mirrored-a@file, sb@file)"
    )
    assert services["mirrored-a@file"]["meshproxyWhy"] == (
        "main service sa@file is down (no server available)"
    )


async def test_a_down_weighted_parent_says_why_with_worker_processes(controlled, proxy_factory):
    """The admin API merges the workers' views (admin/workers.py): a `weighted` parent with
    `healthCheck` whose children are all down keeps its `meshproxyWhy` there too (fresh
    tester F10: 503 with no reason in the API)."""
    a = await controlled("a")
    check = {"path": "/health", "interval": "200ms"}
    config = {
        "http": {
            "routers": {"r": router("Host(`w.test`)", "split")},
            "services": {
                "split": {"weighted": {"services": [{"name": "sa"}], "healthCheck": {}}},
                "sa": checked(a.url, check=check),
            },
        }
    }
    proxy = await proxy_factory(config, extra_flags=["--workers=2"])
    a.health = "status:500"
    await wait_for(
        lambda: "meshproxyWhy" in proxy.rawdata()["services"]["split@file"], 10, "parent why"
    )
    assert proxy.rawdata()["services"]["split@file"]["meshproxyWhy"] == (
        "no available child: every child service with a weight is down (sa@file)"
    )

    async def refused_everywhere() -> bool:  # each worker runs its own checker
        answers = [(await request(proxy.port, host="w.test")).status for _ in range(4)]
        return answers == [503] * 4

    await wait_for(refused_everywhere, 10, "503 from every worker")


async def test_grpc_mode_uses_the_grpc_health_protocol(proxy_factory):
    """`mode: grpc`: grpc.health.v1.Health/Check with an empty service name; SERVING is UP,
    NOT_SERVING is DOWN (Traefik's checkHealthGRPC), against grpcio's own health service."""
    server = EchoServer()
    try:
        server.set_serving("", True)
        url = f"http://127.0.0.1:{server.port}"
        check = {"mode": "grpc", "interval": "200ms", "timeout": "1s"}
        proxy = await proxy_factory(one_service(checked(url, check=check)))
        await wait_for(
            lambda: (
                proxy.rawdata()["services"]["s@file"]["meshproxyServers"][0]["healthCheck"][
                    "probes"
                ]
                >= 2
            ),
            5,
            "gRPC probes",
        )
        assert server_status(proxy)[url] == "UP"
        server.set_serving("", False)
        await wait_for(lambda: server_status(proxy)[url] == "DOWN", 5, "NOT_SERVING -> DOWN")
        error = proxy.rawdata()["services"]["s@file"]["meshproxyServers"][0]["why"]
        assert error == "health check failed: received gRPC status NOT_SERVING"
        server.set_serving("", True)
        await wait_for(lambda: server_status(proxy)[url] == "UP", 5, "SERVING -> UP")
    finally:
        server.stop()


class H2CHealthServer:
    """An HTTP/2-only (prior knowledge) server made with the h2 library: answers every
    request with `status` and records the request fields."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[dict[bytes, bytes]] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> H2CHealthServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.requests.append(dict(event.headers))
                        conn.send_headers(
                            event.stream_id,
                            [(":status", str(self.status)), ("content-length", "0")],
                            end_stream=True,
                        )
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_h2c_scheme_probes_over_http2(proxy_factory):
    """`scheme: h2c`: the probe speaks HTTP/2 with prior knowledge (RFC 9113 §3.3) to a
    server that speaks nothing else; its status decides as for HTTP/1.1."""
    server = await H2CHealthServer().start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        check = {"scheme": "h2c", "path": "/ready", "hostname": "svc.test", "interval": "200ms"}
        proxy = await proxy_factory(one_service(checked(url, check=check)))
        await wait_for(lambda: len(server.requests) >= 2, 5, "h2c probes")
        assert server_status(proxy)[url] == "UP"
        first = server.requests[0]
        assert (first[b":path"], first[b":authority"], first[b":scheme"]) == (
            b"/ready",
            b"svc.test",
            b"http",
        )
        server.status = 503
        await wait_for(lambda: server_status(proxy)[url] == "DOWN", 5, "h2c 503 -> DOWN")
    finally:
        server.close()


async def test_h2c_server_urls_are_probed_with_their_host(proxy_factory):
    """An `h2c://host:port` server (how Traefik, and Traefik Mesh's controller for
    `mesh.traefik.io/scheme: h2c`, write such servers) with an HTTP check: the probe goes to
    that host over HTTP/2 prior knowledge, path and query kept, and the server is UP as in
    Traefik 3.7 (checked with the binary on `h2c://127.0.0.1:P` + `path: /health?deep=1`:
    UP, probe `:path /health?deep=1`, `:authority 127.0.0.1:P`, `:scheme http`; fresh tester
    F4: meshproxy had it DOWN, "Name or service not known", and every request got 503). A `port`
    override moves the probe to another port of the same host."""
    server = await H2CHealthServer().start()
    other = await H2CHealthServer().start()
    try:
        url = f"h2c://127.0.0.1:{server.port}"
        check = {"path": "/health?deep=1", "interval": "200ms"}
        proxy = await proxy_factory(one_service(checked(url, check=check)))
        await wait_for(lambda: len(server.requests) >= 2, 5, "h2c:// probes")
        assert server_status(proxy)[url] == "UP"
        first = server.requests[0]
        assert (first[b":path"], first[b":authority"]) == (
            b"/health?deep=1",
            f"127.0.0.1:{server.port}".encode(),
        )
        server.status = 503
        await wait_for(lambda: server_status(proxy)[url] == "DOWN", 5, "h2c:// 503 -> DOWN")
        server.status = 200
        await wait_for(lambda: server_status(proxy)[url] == "UP", 5, "h2c:// back UP")
        check = {"path": "/p", "port": other.port, "interval": "200ms"}
        proxy.write(one_service(checked(url, check=check)))
        await wait_for(lambda: len(other.requests) >= 1, 5, "probe on the `port` override")
        assert other.requests[0][b":path"] == b"/p"
    finally:
        server.close()
        other.close()


async def test_https_checks_go_through_the_service_transport(proxy_factory):
    """Traefik runs a service's checks with the service's serversTransport: with its rootCAs
    the probe trusts the backend's certificate (UP); the same server in a service without
    them fails verification (DOWN, the TLS error in the API)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    backend = ControlledBackend("tls")
    backend.ssl = context
    await backend.start()
    try:
        check = {"path": "/health", "interval": "200ms"}
        config = {
            "http": {
                "routers": {},
                "services": {
                    "trusted": checked(backend.url, check=check, serversTransport="ca"),
                    "untrusted": checked(backend.url, check=check),
                },
                "serversTransports": {"ca": {"rootCAs": [ca.cert_pem.bytes().decode()]}},
            }
        }
        proxy = await proxy_factory(config)
        await wait_for(
            lambda: server_status(proxy, "untrusted@file")[backend.url] == "DOWN", 5, "DOWN"
        )

        def trusted_probes() -> int:
            servers = proxy.rawdata()["services"]["trusted@file"]["meshproxyServers"]
            return servers[0]["healthCheck"]["probes"]

        await wait_for(lambda: trusted_probes() >= 2, 5, "probes of the trusted service")
        assert backend.health_probes >= 2  # the TLS handshakes that passed reached it
        assert server_status(proxy, "trusted@file")[backend.url] == "UP"
        servers = proxy.rawdata()["services"]["untrusted@file"]["meshproxyServers"]
        assert "certificate verify failed" in servers[0]["healthCheck"]["lastError"]
    finally:
        await backend.aclose()


async def test_grpc_clients_get_unavailable_when_no_server_is_healthy(proxy_factory):
    """Bad input: every server of a gRPC service unhealthy: the proxy's 503 reaches a gRPC
    client as UNAVAILABLE (grpc-status 14), while with the server SERVING the same call goes
    through (h2c end to end, `mode: grpc` checks)."""
    server = EchoServer()
    try:
        server.set_serving("", True)
        check = {"mode": "grpc", "interval": "200ms", "timeout": "1s"}
        service = checked(server.url, check=check)
        config = {
            "http": {"routers": {"r": router("PathPrefix(`/`)", "s")}, "services": {"s": service}}
        }
        proxy = await proxy_factory(config)
        address = f"127.0.0.1:{proxy.port}"

        def call() -> tuple[grpc.StatusCode, bytes]:
            with EchoClient(address) as client:
                try:
                    return grpc.StatusCode.OK, client.unary(b"ping", timeout=5)
                except grpc.RpcError as exc:
                    return exc.code(), b""

        assert await asyncio.to_thread(call) == (grpc.StatusCode.OK, b"ping")
        server.set_serving("", False)
        await wait_for(lambda: server_status(proxy)[server.url] == "DOWN", 5, "DOWN")
        code, _ = await asyncio.to_thread(call)
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
