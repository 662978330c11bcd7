"""TCP services on a real proxy process: `weighted` splits, `proxyProtocol` v1/v2 to the server
(read back by a test server and by HAProxy's own `accept-proxy`), `terminationDelay`, TLS to
`tls: true` servers through `tcp.serversTransports`, the `inFlightConn` and `ipWhiteList`
middlewares, failover to the next server, and the RST a client gets when no server is
reachable. Where Traefik has the behaviour, the same config runs through the real Traefik."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections import Counter
from typing import Any

import pytest
import trustme

from meshproxy.tcp.proxy_protocol import IncompleteHeader, ProxyHeader, parse
from tests.helpers import free_port, wait_for


class Server:
    """A TCP server on 127.0.0.1 answering each chunk with `tag + chunk` (an echo), optionally
    reading a PROXY header first (`proxy_protocol`: the headers read are kept) or speaking TLS
    (`context`). It counts the connections it accepted."""

    def __init__(
        self, tag: bytes, proxy_protocol: bool = False, context: ssl.SSLContext | None = None
    ) -> None:
        self.tag = tag
        self.proxy_protocol = proxy_protocol
        self.context = context
        self.headers: list[ProxyHeader] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            buffered = b""
            if self.proxy_protocol:
                while True:
                    try:
                        header, length = parse(buffered)
                        break
                    except IncompleteHeader:
                        chunk = await reader.read(65536)
                        if not chunk:
                            return
                        buffered += chunk
                self.headers.append(header)
                buffered = buffered[length:]
            if self.context is not None:
                await writer.start_tls(self.context)
            if buffered:
                writer.write(self.tag + buffered)
            while data := await reader.read(65536):
                writer.write(self.tag + data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def servers():
    started: list[Server] = []

    async def make(*args: Any, **kwargs: Any) -> Server:
        server = await Server(*args, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def tcp_config(
    services: dict[str, Any],
    middlewares: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One catch-all TCP router on `tcp` to service `main`."""
    router: dict[str, Any] = {"entryPoints": ["tcp"], "rule": "HostSNI(`*`)", "service": "main"}
    if middlewares:
        router["middlewares"] = middlewares
    return {"tcp": {"routers": {"r": router}, "services": services, **(extra or {})}}


def lb(*addresses: str, **options: Any) -> dict[str, Any]:
    return {"loadBalancer": {"servers": [{"address": a} for a in addresses], **options}}


async def tcp_proxy(proxy_factory: Any, config: dict[str, Any], *flags: str) -> tuple[Any, int]:
    port = free_port()
    proxy = await proxy_factory(
        config,
        entrypoints={"web": f"127.0.0.1:{free_port()}", "tcp": f"127.0.0.1:{port}"},
        extra_flags=list(flags),
    )
    return proxy, port


async def talk(
    port: int, payload: bytes = b"hi", source: str = "127.0.0.1", until_eof: bool = False
) -> bytes:
    """Connect from `source`, send `payload`, return the first answer (or all of it until
    EOF); b"" when the proxy closed without answering. A reset raises ConnectionResetError."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(payload)
        if until_eof:
            writer.write_eof()
            return await asyncio.wait_for(reader.read(-1), 10)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


# ---------------------------------------------------------------- weighted, failover, reset


async def test_weighted_tcp_split_is_exact_over_bounded_connections(proxy_factory, servers):
    """Traefik's TCP `weighted` service: connections split by weight (3:1); smooth weighted
    round robin gives exactly 30 and 10 of 40 connections."""
    a, b = await servers(b"a:"), await servers(b"b:")
    config = tcp_config(
        {
            "main": {
                "weighted": {"services": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]}
            },
            "a": lb(a.address),
            "b": lb(b.address),
        }
    )
    proxy, port = await tcp_proxy(proxy_factory, config)
    counts = Counter([(await talk(port))[:2] for _ in range(40)])
    assert counts == {b"a:": 30, b"b:": 10}


async def test_no_reachable_server_resets_the_client_promptly(proxy_factory):
    """Issue 12 item 4: when no server is reachable the client connection is closed at once
    with an RST (SO_LINGER 0), which the client sees as ECONNRESET, not as an empty answer."""
    proxy, port = await tcp_proxy(
        proxy_factory, tcp_config({"main": lb(f"127.0.0.1:{free_port()}")})
    )
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            await talk(port)
        assert time.monotonic() - started < 5.0  # at once: not after a dial timeout (30 s)
    await wait_for(lambda: "no server of main@file reachable" in proxy.log_path.read_text(), 10)


async def test_failover_to_the_next_server_when_one_refuses(proxy_factory, servers):
    """A server that refuses does not fail the connection when another is configured: the next
    server of the loadBalancer is dialled (each connection ends on the live one), and so is
    another child of a weighted service whose picked child has no live server."""
    live = await servers(b"live:")
    dead = f"127.0.0.1:{free_port()}"
    proxy, port = await tcp_proxy(proxy_factory, tcp_config({"main": lb(dead, live.address)}))
    answers = [await talk(port) for _ in range(10)]
    assert answers == [b"live:hi"] * 10
    other = await servers(b"other:")
    proxy.write(
        tcp_config(
            {
                "main": {"weighted": {"services": [{"name": "down"}, {"name": "up"}]}},
                "down": lb(dead),
                "up": lb(other.address),
            }
        )
    )
    await wait_for(lambda: proxy.generation() >= 2, 10, "weighted config")
    answers = [await talk(port) for _ in range(6)]
    assert answers == [b"other:hi"] * 6


async def test_dial_timeout_of_the_transport_then_the_next_server(proxy_factory, servers):
    """`tcp.serversTransports.<name>.dialTimeout`: a server whose accept queue is full drops
    the SYN, so its dial hangs; after the transport's 300ms the next server is tried and
    answers (not after Traefik's default 30 s)."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(0)
    fillers = []
    for _ in range(3):  # fill the accept queue; later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(hung.getsockname())
        except BlockingIOError:
            pass
        fillers.append(filler)
    live = await servers(b"live:")
    hung_address = f"127.0.0.1:{hung.getsockname()[1]}"
    config = tcp_config(
        {"main": lb(hung_address, live.address, serversTransport="quick")},
        extra={"serversTransports": {"quick": {"dialTimeout": "300ms"}}},
    )
    proxy, port = await tcp_proxy(proxy_factory, config)
    try:
        for _ in range(2):  # the round robin starts on each server once
            started = time.monotonic()
            assert await talk(port) == b"live:hi"
            assert time.monotonic() - started < 5.0
        await wait_for(lambda: "dial timeout" in proxy.log_path.read_text(), 10, "log")
    finally:
        for filler in fillers:
            filler.close()
        hung.close()


async def test_static_tcp_servers_transport_is_the_default(proxy_factory, servers, tmp_path):
    """Traefik's static `tcpServersTransport.tls.rootCAs` verifies `tls: true` servers of
    loadBalancers without a serversTransport; without it the system CAs refuse the test CA
    (the client is reset)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = await servers(b"tls:", context=context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    service = {"loadBalancer": {"servers": [{"address": server.address, "tls": True}]}}
    proxy, port = await tcp_proxy(
        proxy_factory, tcp_config({"main": service}), f"--tcpServersTransport.tls.rootCAs={ca_file}"
    )
    assert await talk(port, b"x") == b"tls:x"
    plain, plain_port = await tcp_proxy(proxy_factory, tcp_config({"main": service}))
    with pytest.raises(ConnectionResetError):
        await talk(plain_port, b"x")


# ---------------------------------------------------------------- PROXY protocol


@pytest.mark.parametrize("version", [1, 2])
async def test_proxy_protocol_gives_the_server_the_real_client_address(
    proxy_factory, servers, version
):
    """`proxyProtocol: {version}` (on the serversTransport, as Traefik 3; and the deprecated
    loadBalancer option): the server reads a PROXY header whose source is the client's own
    address (127.0.0.2 here, not the proxy's 127.0.0.1) and whose destination is the address
    the client connected to; the bytes after it are relayed untouched both ways."""
    server = await servers(b"s:", proxy_protocol=True)
    config = tcp_config(
        {"main": lb(server.address, serversTransport="pp")},
        extra={"serversTransports": {"pp": {"proxyProtocol": {"version": version}}}},
    )
    proxy, port = await tcp_proxy(proxy_factory, config)
    assert await talk(port, b"payload", source="127.0.0.2") == b"s:payload"
    header = server.headers[0]
    assert header.version == version
    assert header.source is not None and header.source[0] == "127.0.0.2"
    assert header.destination == ("127.0.0.1", port)
    proxy.write(tcp_config({"main": lb(server.address, proxyProtocol={"version": version})}))
    await wait_for(lambda: proxy.generation() >= 2, 10, "deprecated loadBalancer option")
    assert await talk(port, b"again") == b"s:again"
    assert server.headers[1].version == version and server.headers[1].source[0] == "127.0.0.1"


async def test_proxy_protocol_version_defaults_to_2_and_bad_versions_disable(
    proxy_factory, servers
):
    """Traefik's ProxyProtocol SetDefaults: `proxyProtocol: {}` means version 2; version 3 is
    "unknown proxyProtocol version" and disables the service."""
    server = await servers(b"s:", proxy_protocol=True)
    proxy, port = await tcp_proxy(
        proxy_factory, tcp_config({"main": lb(server.address, proxyProtocol={})})
    )
    assert await talk(port) == b"s:hi"
    assert server.headers[0].version == 2
    proxy.write(tcp_config({"main": lb(server.address, proxyProtocol={"version": 3})}))
    await wait_for(lambda: proxy.generation() >= 2, 10, "bad version")
    errors = proxy.rawdata()["tcpServices"]["main@file"]["error"]
    assert any("unknown proxyProtocol version: 3" in e for e in errors)


HAPROXY_ACCEPT_PROXY = """
global
    maxconn 100
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port] %[dst] %[dst_port]"
"""


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
@pytest.mark.parametrize("version", [1, 2])
async def test_haproxy_accept_proxy_reads_the_header(proxy_factory, tmp_path, version):
    """Cross-check with an independent parser: HAProxy's `accept-proxy` takes the client
    address from meshproxy's PROXY header and reports it (`%[src]`, `%[dst]`)."""
    haproxy_port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_ACCEPT_PROXY.format(port=haproxy_port))
    process = subprocess.Popen(["haproxy", "-f", str(cfg)], stderr=subprocess.PIPE)
    try:
        await wait_for(lambda: _listening(haproxy_port), 10, "haproxy listening")
        config = tcp_config(
            {"main": lb(f"127.0.0.1:{haproxy_port}", proxyProtocol={"version": version})}
        )
        proxy, port = await tcp_proxy(proxy_factory, config)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
        client_port = writer.get_extra_info("sockname")[1]
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        body = answer.split(b"\r\n\r\n", 1)[1].decode()
        assert body == f"127.0.0.2 {client_port} 127.0.0.1 {port}"
    finally:
        process.terminate()
        process.wait(10)


def _traefik_has_tcp_router(traefik: Any) -> bool:
    """Traefik serves its TCP router (its API lists it): before that, a connection would go
    to its HTTP handler."""
    import json
    import urllib.request

    url = f"http://127.0.0.1:{traefik.api_port}/api/tcp/routers"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return any(r.get("status") == "enabled" for r in json.loads(response.read()))
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- termination delay


async def late_replier(delay: float) -> tuple[asyncio.AbstractServer, int]:
    """A server that reads until the client's EOF, then answers after `delay` seconds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        await asyncio.sleep(delay)  # the server's own pace, what terminationDelay bounds
        try:
            writer.write(b"late:" + data)
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_termination_delay_bounds_the_other_half(proxy_factory):
    """Traefik's `terminationDelay` (pkg/tcp/proxy.go: a read deadline on the other side once
    one side's copy ended): with 200ms, a client that half-closes gets EOF without the answer
    a server sends 1 s later; with -1 (no deadline) or unset (meshproxy's lasting half-close)
    it gets the answer. The deprecated loadBalancer option counts milliseconds."""
    server, server_port = await late_replier(1.0)
    address = f"127.0.0.1:{server_port}"

    def config(**transport: Any) -> dict[str, Any]:
        return tcp_config(
            {"main": lb(address, serversTransport="t")},
            extra={"serversTransports": {"t": transport}},
        )

    proxy, port = await tcp_proxy(proxy_factory, config(terminationDelay="200ms"))
    started = time.monotonic()
    # b"": the pipe ended before the server's answer at 1 s; and not by some later timeout
    assert await talk(port, b"q", until_eof=True) == b""
    assert time.monotonic() - started < 5
    proxy.write(config(terminationDelay="-1s"))
    await wait_for(lambda: proxy.generation() >= 2, 10, "no deadline")
    assert await talk(port, b"q", until_eof=True) == b"late:q"
    proxy.write(tcp_config({"main": lb(address, terminationDelay=200)}))
    await wait_for(lambda: proxy.generation() >= 3, 10, "deprecated option in ms")
    assert await talk(port, b"q", until_eof=True) == b""
    proxy.write(tcp_config({"main": lb(address)}))
    await wait_for(lambda: proxy.generation() >= 4, 10, "unset")
    assert await talk(port, b"q", until_eof=True) == b"late:q"
    server.close()


# ---------------------------------------------------------------- TLS to the server


async def test_tls_to_tcp_servers_through_the_servers_transport(proxy_factory, servers, tmp_path):
    """`servers[].tls: true` speaks TLS to that server with the transport's `tls` options:
    verified against `rootCAs` with `serverName`, a client certificate for a server that
    requires one; an unknown CA makes the dial fail, so the client is reset."""
    ca, client_ca = trustme.CA(), trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("db.test").configure_cert(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(server_context)
    server = await servers(b"tls:", context=server_context)
    client = client_ca.issue_cert("proxy.mesh")
    tls = {
        "serverName": "db.test",
        "rootCAs": [ca.cert_pem.bytes().decode()],
        "certificates": [
            {
                "certFile": client.cert_chain_pems[0].bytes().decode(),
                "keyFile": client.private_key_pem.bytes().decode(),
            }
        ],
    }

    def config(tls_options: dict[str, Any]) -> dict[str, Any]:
        service = {
            "loadBalancer": {
                "servers": [{"address": server.address, "tls": True}],
                "serversTransport": "t",
            }
        }
        return tcp_config(
            {"main": service}, extra={"serversTransports": {"t": {"tls": tls_options}}}
        )

    proxy, port = await tcp_proxy(proxy_factory, config(tls))
    assert await talk(port, b"secret") == b"tls:secret"
    proxy.write(config({**tls, "rootCAs": [trustme.CA().cert_pem.bytes().decode()]}))
    await wait_for(lambda: proxy.generation() >= 2, 10, "unknown CA")
    with pytest.raises(ConnectionResetError):
        await talk(port, b"secret")
    await wait_for(lambda: "certificate verify failed" in proxy.log_path.read_text(), 10)


async def test_a_client_half_close_over_a_tls_server_still_gets_the_answer(proxy_factory):
    """A client that half-closes after its request (`nc -N`, request/response scripts) over a
    route to a `tls: true` server gets the answer, even one sent 300 ms later: TLS can
    half-close (RFC 8446 §6.1) and Traefik 3.7 delivers it (fresh-tcp F-TCP-3, within its
    terminationDelay); asyncio's SSL transport cannot write_eof, so the EOF is not passed on
    but the server->client direction keeps flowing until the server closes. Before: 0 bytes."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("db.test").configure_cert(server_context)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            if b"/slow" in request:
                await asyncio.sleep(0.3)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + request[:9])
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    service = {"loadBalancer": {"servers": [{"address": address, "tls": True}]}}
    service["loadBalancer"]["serversTransport"] = "t"
    tls = {"serverName": "db.test", "rootCAs": [ca.cert_pem.bytes().decode()]}
    config = tcp_config({"main": service}, extra={"serversTransports": {"t": {"tls": tls}}})
    proxy, port = await tcp_proxy(proxy_factory, config)
    try:
        for path in (b"/", b"/slow"):
            request = b"GET " + path + b" HTTP/1.1\r\nHost: db.test\r\nConnection: close\r\n\r\n"
            got = await talk(port, request, until_eof=True)
            assert got == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + request[:9]
    finally:
        server.close()


# ---------------------------------------------------------------- middlewares


async def test_in_flight_conn_refuses_the_connection_over_the_limit(proxy_factory, servers):
    """Traefik's TCP `inFlightConn` {amount: 2}, counted per client IP: with two connections
    open from 127.0.0.1 a third is closed without a byte relayed, one from 127.0.0.2 is
    admitted; once one closes, 127.0.0.1 gets in again."""
    echo = await servers(b"e:")
    config = tcp_config(
        {"main": lb(echo.address)},
        middlewares=["limit"],
        extra={"middlewares": {"limit": {"inFlightConn": {"amount": 2}}}},
    )
    proxy, port = await tcp_proxy(proxy_factory, config)
    held = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.read(100), 10) == b"e:x"
        held.append(writer)
    try:
        third = await talk(port)
    except ConnectionResetError:
        third = b""
    assert third == b""
    assert echo.connections == 2
    assert await talk(port, source="127.0.0.2") == b"e:hi"
    held.pop().close()

    async def admitted() -> bool:
        try:
            return await talk(port) == b"e:hi"
        except ConnectionResetError:
            return False

    await wait_for(admitted, 10, "a slot freed")
    held.pop().close()


async def test_ip_white_list_is_the_deprecated_name_of_ip_allow_list(proxy_factory, servers):
    """Traefik's TCP `ipWhiteList` (deprecated) behaves as `ipAllowList`: a source outside
    `sourceRange` is closed without a byte relayed, one inside is relayed."""
    echo = await servers(b"e:")
    config = tcp_config(
        {"main": lb(echo.address)},
        middlewares=["only-2"],
        extra={"middlewares": {"only-2": {"ipWhiteList": {"sourceRange": ["127.0.0.2/32"]}}}},
    )
    proxy, port = await tcp_proxy(proxy_factory, config)
    assert await talk(port, source="127.0.0.2") == b"e:hi"
    try:
        refused = await talk(port, source="127.0.0.1")
    except ConnectionResetError:
        refused = b""
    assert refused == b"" and echo.connections == 1


# ---------------------------------------------------------------- against the real Traefik


async def test_traefik_sends_the_same_proxy_header_and_split(tmp_path, proxy_factory, servers):
    """The real Traefik with the same config: its PROXY v1 and v2 headers carry the same
    client address as meshproxy's, and its weighted split over 40 connections is 30/10."""
    try:
        from tests.differential.harness import TraefikProcess, TraefikUnavailable, traefik_binary

        traefik_binary()
    except (ImportError, TraefikUnavailable) as exc:
        pytest.skip(f"real Traefik not available: {exc}")
    v1, v2 = await servers(b"1:", proxy_protocol=True), await servers(b"2:", proxy_protocol=True)
    a, b = await servers(b"a:"), await servers(b"b:")
    services = {
        "v1": lb(v1.address, proxyProtocol={"version": 1}),
        "v2": lb(v2.address, proxyProtocol={"version": 2}),
        "main": {
            "weighted": {"services": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]}
        },
        "a": lb(a.address),
        "b": lb(b.address),
    }

    def config(entrypoint: str, service: str) -> dict[str, Any]:
        rule = {"entryPoints": [entrypoint], "rule": "HostSNI(`*`)", "service": service}
        return {"tcp": {"routers": {"r": rule}, "services": services}}

    for service in ("v1", "v2", "main"):
        workdir = tmp_path / service
        workdir.mkdir()
        traefik = await asyncio.to_thread(TraefikProcess(workdir, config("web", service)).start)
        try:
            await wait_for(lambda t=traefik: _traefik_has_tcp_router(t), 10, "traefik router")
            proxy, port = await tcp_proxy(proxy_factory, config("tcp", service))
            if service == "main":
                theirs = Counter([(await talk(traefik.port))[:2] for _ in range(40)])
                ours = Counter([(await talk(port))[:2] for _ in range(40)])
                assert theirs == ours == {b"a:": 30, b"b:": 10}
                continue
            recorder = v1 if service == "v1" else v2
            assert await talk(traefik.port, source="127.0.0.2") == f"{service[1]}:hi".encode()
            assert await talk(port, source="127.0.0.2") == f"{service[1]}:hi".encode()
            theirs_header, ours_header = recorder.headers[-2], recorder.headers[-1]
            assert theirs_header.version == ours_header.version == int(service[1])
            assert theirs_header.source[0] == ours_header.source[0] == "127.0.0.2"
            assert theirs_header.destination == ("127.0.0.1", traefik.port)
            assert ours_header.destination == ("127.0.0.1", port)
        finally:
            traefik.stop()


async def test_unreachable_server_traefik_closes_with_fin_we_reset(tmp_path, proxy_factory):
    """A documented difference (docs/tcp-services.md): with no reachable server the real
    Traefik closes the client with a FIN (a silent client reads an empty answer; one whose
    bytes Traefik left unread gets the kernel's RST), meshproxy always resets it (the client sees ECONNRESET: nobody answered, not an empty answer)."""
    try:
        from tests.differential.harness import TraefikProcess, TraefikUnavailable, traefik_binary

        traefik_binary()
    except (ImportError, TraefikUnavailable) as exc:
        pytest.skip(f"real Traefik not available: {exc}")
    dead = {"dead": lb(f"127.0.0.1:{free_port()}")}

    def config(entrypoint: str) -> dict[str, Any]:
        rule = {"entryPoints": [entrypoint], "rule": "HostSNI(`*`)", "service": "dead"}
        return {"tcp": {"routers": {"r": rule}, "services": dead}}

    traefik = await asyncio.to_thread(TraefikProcess(tmp_path, config("web")).start)
    try:
        await wait_for(lambda: _traefik_has_tcp_router(traefik), 10, "traefik TCP router")
        # A client that has sent nothing: the kernel turns a close into an RST when the
        # client's bytes are still unread, which would blur Traefik's FIN.
        assert await talk(traefik.port, b"") == b""
        proxy, port = await tcp_proxy(proxy_factory, config("tcp"))
        with pytest.raises(ConnectionResetError):
            await talk(port, b"")
    finally:
        traefik.stop()


async def test_traefik_mesh_tcp_fixture_relays_real_connections(proxy_factory, servers):
    """Traefik Mesh's `annotations-traffic-type-config.json` as served (a
    `mesh.traefik.io/traffic-type: tcp` Service: entrypoint tcp-5000, HostSNI(`*`), two
    servers), with its server addresses pointed at local test servers: connections alternate
    between them and the router is enabled (issue 12 item 7, the TCP half)."""
    import json

    from tests.helpers import FIXTURES

    config = json.loads((FIXTURES / "annotations-traffic-type-config.json").read_text())
    a, b = await servers(b"a:"), await servers(b"b:")
    for service in config["tcp"]["services"].values():
        service["loadBalancer"]["servers"] = [{"address": a.address}, {"address": b.address}]
    port = free_port()
    proxy = await proxy_factory(
        {"tcp": config["tcp"]},
        entrypoints={"web": f"127.0.0.1:{free_port()}", "tcp-5000": f"127.0.0.1:{port}"},
    )
    tags = Counter([(await talk(port, b"mesh"))[:2] for _ in range(4)])
    assert tags == {b"a:": 2, b"b:": 2}
    assert proxy.rawdata()["tcpRouters"]["my-ns-svc-a-8080@file"]["status"] == "enabled"
