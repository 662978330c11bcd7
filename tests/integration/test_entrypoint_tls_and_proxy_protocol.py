"""Two static entrypoint options, through real processes on 127.0.0.1, each case run against
meshproxy and against the real Traefik 3.7 (`.venv/bin/traefik`) on the same configuration:

- `entryPoints.X.http.tls` (https://doc.traefik.io/traefik/routing/entrypoints/#tls): every
  HTTP router of the entrypoint without a `tls` of its own is a TLS router. Traefik: HTTPS
  with the default (generated) certificate answers 200; plaintext HTTP on the same port finds
  no router (404), it is not served in the clear.
- `entryPoints.X.proxyProtocol` (https://doc.traefik.io/traefik/routing/entrypoints/#proxyprotocol):
  a PROXY protocol header (HAProxy's spec, v1 text and v2 binary) from a `trustedIPs` peer
  makes its source the client: ClientIP rules, ipAllowList, X-Forwarded-For and X-Real-Ip,
  and the PROXY header meshproxy writes to a TCP server. Traefik (go-proxyproto IGNORE policy)
  takes a header from an untrusted peer off the stream and ignores its addresses; it closes a
  connection whose header is malformed; a connection without a header goes on as it is.

Each Traefik behaviour asserted here was observed on the binary first; the tests run both
sides with the same assertions (`side` parameter), so a difference fails the test. Where
meshproxy deliberately differs (a v1 header split after `PROXY TCP4`: go-proxyproto 0.8 in
Traefik 3.7 closes the connection, the spec asks the receiver to wait for the whole line),
the test says so and runs on meshproxy only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshproxy.config.decode import ConfigDecodeError
from meshproxy.config.static import build_static
from tests.differential.harness import TraefikUnavailable, traefik_binary
from tests.helpers import ProxyProcess, free_port, wait_for

SIDES = ["meshproxy", "traefik"]
CLIENT = "203.0.113.9"  # what the "load balancer" says the client is (TEST-NET-3)


# ---------------------------------------------------------------- the two proxies


class TraefikRun:
    """The real Traefik with a file provider and the given entrypoints and static flags;
    ready when its API lists every router of the dynamic config as enabled."""

    def __init__(
        self, tmp: Path, dynamic: dict[str, Any], entrypoints: dict[str, str], flags: list[str]
    ) -> None:
        self.tmp = tmp
        self.dynamic = dynamic
        self.entrypoints = entrypoints
        self.flags = flags
        self.api_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def port_of(self, name: str) -> int:
        return int(self.entrypoints[name].rsplit(":", 1)[1])

    def _routers_up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError((self.tmp / "traefik.log").read_text())
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.api_port}/api/rawdata", timeout=2
            ) as r:
                data = json.loads(r.read())
        except OSError:
            return False
        wanted = {f"{n}@file" for n in self.dynamic.get("http", {}).get("routers", {})}
        wanted |= {f"{n}@file" for n in self.dynamic.get("tcp", {}).get("routers", {})}
        found = {
            name
            for section in ("routers", "tcpRouters")
            for name, router in (data.get(section) or {}).items()
            if router.get("status") == "enabled"
        }
        return wanted <= found

    async def start(self) -> TraefikRun:
        self.tmp.mkdir(parents=True, exist_ok=True)
        config = self.tmp / "dynamic.yaml"
        config.write_text(yaml.safe_dump(self.dynamic))
        args = [traefik_binary()]
        args += [f"--entryPoints.{n}.address={a}" for n, a in self.entrypoints.items()]
        args += [
            f"--entryPoints.traefik.address=127.0.0.1:{self.api_port}",
            "--api.insecure=true",
            f"--providers.file.filename={config}",
            "--log.level=ERROR",
            *self.flags,
        ]
        self.log = open(self.tmp / "traefik.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        await wait_for(self._routers_up, 15, "traefik routers enabled")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if hasattr(self, "log"):
            self.log.close()


Starter = Callable[[dict[str, Any], list[str], list[str]], Awaitable[Any]]


@pytest.fixture
async def start(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Starter]:
    """`await start(dynamic, entrypoint_names, static_flags)` on the side under test."""
    side: str = request.node.callspec.params["side"]
    if side == "traefik":
        try:
            traefik_binary()
        except TraefikUnavailable as exc:
            pytest.skip(str(exc))
    started: list[Any] = []

    async def make(dynamic: dict[str, Any], names: list[str], flags: list[str]) -> Any:
        entrypoints = {n: f"127.0.0.1:{free_port()}" for n in names}
        proxy: Any
        if side == "traefik":
            proxy = TraefikRun(tmp_path / "traefik", dynamic, entrypoints, flags)
        else:
            proxy = ProxyProcess(tmp_path, dynamic, entrypoints=entrypoints, extra_flags=flags)
        started.append(proxy)
        await proxy.start()
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


# ---------------------------------------------------------------- backends and clients


class Echo:
    """A backend on 127.0.0.1: TCP, answers `got:<repr of every byte received up to the first
    newline>`; HTTP, answers 200 with the request head as the body (headers as received)."""

    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, handler: Any) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    @staticmethod
    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await asyncio.wait_for(reader.readuntil(b"hello\n"), 5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
            data = getattr(exc, "partial", b"")
        writer.write(b"got:" + repr(data).encode() + b"\n")
        await writer.drain()
        writer.close()

    @staticmethod
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, TimeoutError):
            writer.close()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(head) + head
        )
        await writer.drain()
        writer.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    backend = Echo()
    yield backend
    backend.close()


def v1(source: str = CLIENT, port: int = 5555) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 443\r\n".encode()


def v2(source: str = CLIENT, port: int = 5555) -> bytes:
    """HAProxy spec §2.2: signature, PROXY command (0x21), TCP over IPv4 (0x11), 12 bytes."""
    return (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11"
        + struct.pack("!H", 12)
        + socket.inet_aton(source)
        + socket.inet_aton("127.0.0.1")
        + struct.pack("!HH", port, 443)
    )


async def exchange(port: int, segments: list[bytes], timeout: float = 5.0) -> bytes:
    """Send `segments` (one write and drain each, so they leave as separate segments), then
    read until the server closes. b"" when it closed (or reset) without a byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for segment in segments:
            writer.write(segment)
            await writer.drain()
            await asyncio.sleep(0)  # let the segment go before the next write
        try:
            return await asyncio.wait_for(reader.read(), timeout)
        except ConnectionResetError:
            return b""
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        writer.close()


def http_get(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n".encode()


def header_values(answer: bytes, name: str) -> list[str]:
    """The values of `name` in the request head the HTTP echo backend sent back."""
    body = answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""
    out = []
    for line in body.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            out.append(value.strip())
    return out


def status(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


# ---------------------------------------------------------------- entryPoints.X.http.tls


def http_config(backend_port: int, entrypoint: str) -> dict[str, Any]:
    return {
        "http": {
            "routers": {
                "app": {
                    "entryPoints": [entrypoint],
                    "rule": "PathPrefix(`/`)",
                    "service": "echo",
                }
            },
            "services": {
                "echo": {"loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{backend_port}"}]}}
            },
        }
    }


async def https_get(port: int) -> bytes:
    """GET / over TLS, certificate not verified (the default one is self-signed/generated)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="app.test"
    )
    try:
        writer.write(http_get())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(
    "flag", ["--entryPoints.secure.http.tls", "--entryPoints.secure.http.tls=true"]
)
async def test_entrypoint_http_tls_makes_routers_https_only(
    side: str, flag: str, start: Starter, echo: Echo
) -> None:
    """Traefik's entrypoint `http.tls` (bare flag, or `=true`): the entrypoint's router without
    its own `tls` is served over HTTPS with the default certificate (200), and plaintext HTTP
    on the same port gets 404 (no non-TLS router left), never the route in the clear
    (Traefik 3.7: 404 / 200, checked). fresh-tcp F-SEC-1: meshproxy served it in plaintext."""
    port = await echo.start(Echo.http)
    proxy = await start(http_config(port, "secure"), ["secure"], [flag])
    secure = proxy.port_of("secure")
    answer = await https_get(secure)
    assert status(answer) == 200, answer
    assert header_values(answer, "X-Forwarded-Proto") == ["https"]
    plain = await exchange(secure, [http_get()])
    assert status(plain) == 404, plain


@pytest.mark.parametrize("side", SIDES)
async def test_entrypoint_http_tls_router_with_own_tls_keeps_it(
    side: str, start: Starter, echo: Echo
) -> None:
    """A router that sets its own `tls` keeps it on an entrypoint with `http.tls` (Traefik's
    applyModel: `if cp.TLS == nil { cp.TLS = m.TLS }`); the entrypoint's `options` name an
    unknown TLS options set, so only a router relying on the entrypoint's would fail: the one
    with `tls: {}` uses the default options and answers 200 over HTTPS."""
    port = await echo.start(Echo.http)
    dynamic = http_config(port, "secure")
    dynamic["http"]["routers"]["app"]["tls"] = {}
    proxy = await start(dynamic, ["secure"], ["--entryPoints.secure.http.tls.options=nosuch"])
    answer = await https_get(proxy.port_of("secure"))
    assert status(answer) == 200, answer


def test_http_tls_flag_forms_and_errors() -> None:
    """Traefik's flag parser takes `--entryPoints.web.http.tls` and `=true` as "enabled with
    defaults", `=false` as off; another value is an error that names the entrypoint's option
    (it said `entryPoints[...].http.tls` before)."""
    base = ["--entryPoints.web.address=:80"]
    for flag in ("--entryPoints.web.http.tls", "--entryPoints.web.http.tls=true"):
        config, _ = build_static(None, [*base, flag])
        http = config.entry_points["web"].http
        assert http is not None and http.tls is not None and http.tls.options is None
    config, _ = build_static(None, [*base, "--entryPoints.web.http.tls.options=strict"])
    http = config.entry_points["web"].http
    assert http is not None and http.tls is not None and http.tls.options == "strict"
    config, _ = build_static(None, [*base, "--entryPoints.web.http.tls=false"])
    http = config.entry_points["web"].http
    assert http is None or http.tls is None
    with pytest.raises(ConfigDecodeError) as caught:
        build_static(None, [*base, "--entryPoints.web.http.tls=maybe"])
    assert "entryPoints.web.http.tls" in str(caught.value)


def test_accepted_but_unimplemented_options_warn() -> None:
    """`meshproxy proxy --help` lists these as "accepted, not implemented (warning)": each one
    set must produce a start-up warning naming it (they were silently dropped), while
    implemented ones (encodedCharacters, proxyProtocol, http.tls) and `global` options set to
    false (what meshproxy does anyway) do not."""
    flags = [
        "--entryPoints.web.address=:80",
        "--entryPoints.web.http.redirections.entryPoint.to=websecure",
        "--entryPoints.web.http3",
        "--entryPoints.web.observability.accessLogs=false",
        "--entryPoints.web.http.middlewares=auth@file",
        "--entryPoints.web.http.tls.certResolver=le",
        "--entryPoints.web.http.encodedCharacters.allowEncodedSlash=false",
        "--entryPoints.web.proxyProtocol.trustedIPs=10.0.0.0/8",
        "--providers.http.tls.ca=/ca.pem",
        "--serversTransport.spiffe.ids=a",
        "--ocsp",
        "--spiffe.workloadAPIAddr=unix:///x",
        "--global.sendAnonymousUsage=false",
    ]
    _, warnings = build_static(None, flags)
    text = "\n".join(warnings)
    for path in (
        "entryPoints.web.http.redirections",
        "entryPoints.web.http3",
        "entryPoints.web.observability",
        "entryPoints.web.http.middlewares",
        "entryPoints.web.http.tls.certResolver",
        "providers.http.tls",
        "serversTransport.spiffe",
        "ocsp",
        "spiffe",
    ):
        assert any(w.startswith(path + ":") for w in warnings), (path, text)
    for quiet in ("encodedCharacters", "proxyProtocol", "global"):
        assert quiet not in text, text
    with pytest.raises(ConfigDecodeError) as caught:
        build_static(
            None, ["--entryPoints.web.address=:80", "--entryPoints.web.proxyProtocol.trustedIPs=lb"]
        )
    assert "entryPoints.web.proxyProtocol.trustedIPs" in str(caught.value)


# ---------------------------------------------------------------- PROXY protocol, HTTP


def pp_http_config(backend_port: int) -> dict[str, Any]:
    """`app` catches all; `fromclient` (ClientIP of the PROXY source, higher priority) marks
    the request; `/allow` is behind an ipAllowList of the PROXY source's network."""
    url = f"http://127.0.0.1:{backend_port}"
    return {
        "http": {
            "routers": {
                "app": {"entryPoints": ["web"], "rule": "PathPrefix(`/`)", "service": "echo"},
                "fromclient": {
                    "entryPoints": ["web"],
                    "rule": "ClientIP(`203.0.113.0/24`) && Path(`/who`)",
                    "service": "echo",
                    "priority": 100,
                    "middlewares": ["mark"],
                },
                "allow": {
                    "entryPoints": ["web"],
                    "rule": "Path(`/allow`)",
                    "service": "echo",
                    "priority": 100,
                    "middlewares": ["clients"],
                },
            },
            "middlewares": {
                "mark": {"headers": {"customRequestHeaders": {"X-Matched": "clientip"}}},
                "clients": {"ipAllowList": {"sourceRange": ["203.0.113.0/24"]}},
            },
            "services": {"echo": {"loadBalancer": {"servers": [{"url": url}]}}},
        }
    }


TRUSTED = ["--entryPoints.web.proxyProtocol.trustedIPs=127.0.0.1/32"]
UNTRUSTED = ["--entryPoints.web.proxyProtocol.trustedIPs=10.9.9.9/32"]


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_trusted_changes_client(side: str, start: Starter, echo: Echo) -> None:
    """From a trusted peer, v1 and v2 headers make their source the client (go-proxyproto USE):
    the ClientIP router matches, ipAllowList admits, X-Forwarded-For and X-Real-Ip carry it.
    Without a header the peer is the client (allowlist: 403). Traefik 3.7: the same."""
    port = await echo.start(Echo.http)
    proxy = await start(pp_http_config(port), ["web"], TRUSTED)
    web = proxy.port_of("web")
    for header in (v1(), v2()):
        answer = await exchange(web, [header + http_get("/who")])
        assert status(answer) == 200, answer
        assert header_values(answer, "X-Matched") == ["clientip"]
        assert header_values(answer, "X-Forwarded-For") == [CLIENT]
        assert header_values(answer, "X-Real-Ip") == [CLIENT]
        assert status(await exchange(web, [header + http_get("/allow")])) == 200
    answer = await exchange(web, [http_get("/who")])
    assert header_values(answer, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(answer, "X-Matched") == []
    assert status(await exchange(web, [http_get("/allow")])) == 403


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_untrusted_header_stripped_and_ignored(
    side: str, start: Starter, echo: Echo
) -> None:
    """From a peer outside trustedIPs, Traefik 3.7 (go-proxyproto IGNORE policy) reads the
    header off the stream and ignores it: the request is served, the client is the peer
    (127.0.0.1), nothing of the header reaches the backend, and the allowlist refuses."""
    port = await echo.start(Echo.http)
    proxy = await start(pp_http_config(port), ["web"], UNTRUSTED)
    web = proxy.port_of("web")
    for header in (v1(), v2()):
        answer = await exchange(web, [header + http_get("/who")])
        assert status(answer) == 200, answer
        assert header_values(answer, "X-Forwarded-For") == ["127.0.0.1"]
        assert header_values(answer, "X-Matched") == []
        assert b"PROXY" not in answer and b"QUIT" not in answer
        assert status(await exchange(web, [header + http_get("/allow")])) == 403


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_malformed_header_closes(
    side: str, start: Starter, echo: Echo
) -> None:
    """A malformed header (bad family, bad address, a v1 line past 107 bytes, a v2 with an
    unknown command) closes the connection without an answer, from a trusted peer and from an
    untrusted one alike (Traefik 3.7: "proxyproto: can't read version 1 header", closed)."""
    port = await echo.start(Echo.http)
    for flags in (TRUSTED, UNTRUSTED):
        proxy = await start(pp_http_config(port), ["web"], flags)
        web = proxy.port_of("web")
        for bad in (
            b"PROXY TCP9 x y 1 2\r\n",
            b"PROXY TCP4 1.2.3 127.0.0.1 1 2\r\n",
            b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
            v2()[:12] + b"\x2f\x11" + v2()[14:],
        ):
            assert await exchange(web, [bad + http_get("/who")]) == b"", bad
        proxy.stop()


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_header_in_several_segments(
    side: str, start: Starter, echo: Echo
) -> None:
    """A header that arrives over several reads is reassembled (HAProxy spec §2: the receiver
    must wait for the whole header): v1 cut after 3 bytes, v2 cut inside the signature and
    inside the addresses. Traefik 3.7 handles these cuts too."""
    port = await echo.start(Echo.http)
    proxy = await start(pp_http_config(port), ["web"], TRUSTED)
    web = proxy.port_of("web")
    one, two = v1(), v2()
    for segments in (
        [one[:3], one[3:] + http_get("/who")],
        [two[:5], two[5:20], two[20:] + http_get("/who")],
    ):
        answer = await exchange(web, segments)
        assert header_values(answer, "X-Forwarded-For") == [CLIENT], answer


@pytest.mark.parametrize("side", ["meshproxy"])
async def test_proxy_protocol_v1_cut_after_family(side: str, start: Starter, echo: Echo) -> None:
    """meshproxy only, on purpose: a v1 line cut right after `PROXY TCP4` is reassembled.
    Traefik 3.7 (go-proxyproto 0.8) closes such a connection ("can't read version 1 header",
    observed); the HAProxy spec asks the receiver to wait for the CRLF within 107 bytes."""
    port = await echo.start(Echo.http)
    proxy = await start(pp_http_config(port), ["web"], TRUSTED)
    one = v1()
    answer = await exchange(
        proxy.port_of("web"), [one[:10], one[10:30], one[30:] + http_get("/who")]
    )
    assert header_values(answer, "X-Forwarded-For") == [CLIENT], answer


# ---------------------------------------------------------------- PROXY protocol, TCP


def pp_tcp_config(backend_port: int) -> dict[str, Any]:
    """Two TCP entrypoints routed at once (no TLS router: immediate routing): `tcpe` relays to
    the backend with a v1 PROXY header of its own (serversTransport pp1), `tcpa` relays behind
    an ipAllowList of the PROXY source's network."""
    return {
        "tcp": {
            "routers": {
                "relay": {
                    "entryPoints": ["tcpe"],
                    "rule": "HostSNI(`*`)",
                    "service": "withpp",
                },
                "allowed": {
                    "entryPoints": ["tcpa"],
                    "rule": "HostSNI(`*`)",
                    "service": "plain",
                    "middlewares": ["clients"],
                },
            },
            "middlewares": {"clients": {"ipAllowList": {"sourceRange": ["203.0.113.0/24"]}}},
            "services": {
                "withpp": {
                    "loadBalancer": {
                        "servers": [{"address": f"127.0.0.1:{backend_port}"}],
                        "serversTransport": "pp1",
                    }
                },
                "plain": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{backend_port}"}]}},
            },
            "serversTransports": {"pp1": {"proxyProtocol": {"version": 1}}},
        }
    }


TCP_TRUSTED = [
    "--entryPoints.tcpe.proxyProtocol.trustedIPs=127.0.0.1/32",
    "--entryPoints.tcpa.proxyProtocol.trustedIPs=127.0.0.1",
]


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_tcp_route(side: str, start: Starter, echo: Echo) -> None:
    """TCP routes (the header is read before immediate routing): the incoming header is not
    relayed; the PROXY header written to the server carries the incoming header's source
    (Traefik: proxy.go writes HeaderProxyFromAddrs(conn.RemoteAddr()), which go-proxyproto
    replaced); the TCP ipAllowList judges that source (admitted), and refuses a connection
    without a header (the peer 127.0.0.1 is not in the list: closed, nothing relayed)."""
    port = await echo.start(Echo.tcp)
    proxy = await start(pp_tcp_config(port), ["tcpe", "tcpa"], TCP_TRUSTED)
    for header in (v1(port=6000), v2(port=6000)):
        answer = await exchange(proxy.port_of("tcpe"), [header + b"hello\n"])
        assert answer.startswith(b"got:b'PROXY TCP4 203.0.113.9 127.0.0.1 6000 "), answer
        assert answer.endswith(b"\\r\\nhello\\n'\n"), answer
        answer = await exchange(proxy.port_of("tcpa"), [header + b"hello\n"])
        assert answer == b"got:b'hello\\n'\n", answer
    assert await exchange(proxy.port_of("tcpa"), [b"hello\n"]) == b""
    answer = await exchange(proxy.port_of("tcpe"), [b"hello\n"])
    assert answer.startswith(b"got:b'PROXY TCP4 127.0.0.1 127.0.0.1 "), answer


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_tcp_untrusted_and_unknown(
    side: str, start: Starter, echo: Echo
) -> None:
    """TCP, untrusted peer: the header is taken off the stream, not relayed, and the
    allowlist judges the peer (refused). Trusted peer sending `PROXY UNKNOWN`: no address in
    it, the connection's own is used (allowlist refuses 127.0.0.1). Traefik 3.7: the same."""
    port = await echo.start(Echo.tcp)
    flags = [
        "--entryPoints.tcpe.proxyProtocol.trustedIPs=10.9.9.9/32",
        "--entryPoints.tcpa.proxyProtocol.trustedIPs=127.0.0.1/32",
    ]
    proxy = await start(pp_tcp_config(port), ["tcpe", "tcpa"], flags)
    answer = await exchange(proxy.port_of("tcpe"), [v1() + b"hello\n"])
    assert answer.startswith(b"got:b'PROXY TCP4 127.0.0.1 127.0.0.1 "), answer
    assert answer.count(b"PROXY") == 1, answer
    assert await exchange(proxy.port_of("tcpa"), [b"PROXY UNKNOWN\r\nhello\n"]) == b""


# ---------------------------------------------------------------- both at once


def _tls_after_header(port: int, header: bytes) -> bytes:
    """A PROXY header in clear, then TLS on the same connection (as a TCP load balancer in
    front of a TLS entrypoint sends it); GET / over it, answer read to the close."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(header)
        with context.wrap_socket(raw, server_hostname="app.test") as tls:
            tls.sendall(http_get())
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            return answer


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_before_tls_termination(side: str, start: Starter, echo: Echo) -> None:
    """An entrypoint with both `proxyProtocol` and `http.tls`: the header comes before the
    ClientHello; after termination the HTTPS router sees the header's source (X-Forwarded-For,
    X-Real-Ip), as Traefik 3.7 does (the PROXY listener wraps the TLS one)."""
    port = await echo.start(Echo.http)
    flags = [
        "--entryPoints.secure.http.tls",
        "--entryPoints.secure.proxyProtocol.trustedIPs=127.0.0.1/32",
    ]
    proxy = await start(http_config(port, "secure"), ["secure"], flags)
    for header in (v1(), v2()):
        answer = await asyncio.to_thread(_tls_after_header, proxy.port_of("secure"), header)
        assert status(answer) == 200, answer
        assert header_values(answer, "X-Forwarded-For") == [CLIENT]
        assert header_values(answer, "X-Real-Ip") == [CLIENT]


# ---------------------------------------------------------------- the parser's bounds


def test_parser_bounds_and_reassembly() -> None:
    """The header reader's parser (meshproxy.tcp.proxy_protocol.parse), HAProxy spec: a v1
    line is at most 107 bytes with its CRLF (§2.1), so 107 bytes without one are refused, not
    waited on; a v2 header's declared length is checked against its family's address size
    and capped (V2_MAX_BODY); bytes that cannot start a header are `NotProxyHeader` (the
    connection has none); every prefix of a valid header is `IncompleteHeader` (reassembly
    over any cut)."""
    from meshproxy.tcp.proxy_protocol import (
        V2_MAX_BODY,
        IncompleteHeader,
        NotProxyHeader,
        parse,
    )

    longest = b"PROXY TCP6 " + b"f" * 42 + b" " + b"f" * 39 + b" 65535 65535\r\n"
    assert len(longest) == 107
    with pytest.raises(ValueError) as whole:
        parse(longest)  # not IPv6 text, but read whole: refused as malformed, not incomplete
    assert not isinstance(whole.value, IncompleteHeader)
    with pytest.raises(ValueError) as too_long:
        parse(b"PROXY TCP4 " + b"1" * 200)
    assert not isinstance(too_long.value, IncompleteHeader)
    with pytest.raises(ValueError):
        parse(b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2\n")  # LF without CR
    for data in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PRI * HTTP/2.0", b"PROXZ"):
        with pytest.raises(NotProxyHeader):
            parse(data)
    short = v2()[:14] + struct.pack("!H", 8) + bytes(8)  # AF_INET with 8 address bytes
    with pytest.raises(ValueError) as caught:
        parse(short)
    assert not isinstance(caught.value, IncompleteHeader)
    with pytest.raises(ValueError) as caught:
        parse(v2()[:14] + struct.pack("!H", V2_MAX_BODY + 1))
    assert not isinstance(caught.value, IncompleteHeader)
    for header in (v1(), v2(), b"PROXY UNKNOWN\r\n"):
        for cut in range(len(header)):
            with pytest.raises(IncompleteHeader):
                parse(header[:cut])
        found, used = parse(header + b"rest")
        assert used == len(header)
    assert parse(v1())[0].source == (CLIENT, 5555)
    assert parse(v2())[0].source == (CLIENT, 5555)


def test_empty_tls_or_proxy_protocol_key_is_an_error() -> None:
    """`http: {tls: }` left empty in a YAML static file: Traefik 3.7 refuses to start
    ("http cannot be a standalone element", checked); meshproxy refuses too, naming the key,
    rather than reading it as "off" and serving the entrypoint in plaintext. Same for an
    empty `proxyProtocol:`. `tls: {}` is TLS with the defaults."""
    for text, path in (
        (
            "entryPoints:\n  secure:\n    address: ':443'\n    http:\n      tls:\n",
            "entryPoints.secure.http.tls",
        ),
        (
            "entryPoints:\n  lb:\n    address: ':80'\n    proxyProtocol:\n",
            "entryPoints.lb.proxyProtocol",
        ),
    ):
        with pytest.raises(ConfigDecodeError) as caught:
            build_static(text, [])
        assert path in str(caught.value)
    config, _ = build_static(
        "entryPoints:\n  secure:\n    address: ':443'\n    http:\n      tls: {}\n", []
    )
    http = config.entry_points["secure"].http
    assert http is not None and http.tls is not None


def _h2c_after_header(port: int, header: bytes) -> tuple[int, bytes]:
    """A PROXY header, then HTTP/2 with prior knowledge (RFC 9113 §3.3) written by the h2
    library: GET /who; returns (status, body)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", "/who"), (":scheme", "http"), (":authority", "app.test")],
        end_stream=True,
    )
    code, body = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(header + conn.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    code = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(conn.data_to_send())
    return code, body


@pytest.mark.parametrize("side", SIDES)
async def test_proxy_protocol_before_h2c(side: str, start: Starter, echo: Echo) -> None:
    """HTTP/2 prior knowledge after a trusted PROXY header: the HTTP/2 server's client is the
    header's source (the ClientIP router matches, X-Forwarded-For carries it), as Traefik 3.7."""
    port = await echo.start(Echo.http)
    proxy = await start(pp_http_config(port), ["web"], TRUSTED)
    code, body = await asyncio.to_thread(_h2c_after_header, proxy.port_of("web"), v2())
    answer = b"HTTP/1.1 200 OK\r\n\r\n" + body
    assert code == 200, body
    assert header_values(answer, "X-Forwarded-For") == [CLIENT]
    assert header_values(answer, "X-Matched") == ["clientip"]
