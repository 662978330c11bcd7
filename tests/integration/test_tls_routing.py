"""TLS on a real proxy process: SNI/ALPN routing of TCP routers (Traefik's HostSNI exact,
`*.domain` and `*`, HostSNIRegexp, ALPN, ClientIP, priorities), passthrough to backends that
terminate TLS themselves (the proxy holds no key), ClientHellos split over TCP segments and
TLS records, and what happens to non-TLS bytes and bad hellos on such an entrypoint.

Clients are Python's ssl (OpenSSL) with certificates made here by trustme, and
`openssl s_client`; the ClientHello bytes a backend receives are compared with the ones the
client wrote."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.helpers import free_port, raw_exchange, wait_for

CA = trustme.CA()


def client_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real OpenSSL client (one record with the ClientHello)."""
    ctx = client_context(alpn)
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def reframe(data: bytes, size: int) -> bytes:
    """The same handshake bytes in records of at most `size` bytes (RFC 8446 §5.1)."""
    handshake = b""
    while data:
        length = struct.unpack("!H", data[3:5])[0]
        handshake += data[5 : 5 + length]
        data = data[5 + length :]
    return b"".join(
        b"\x16\x03\x01" + struct.pack("!H", len(handshake[i : i + size])) + handshake[i : i + size]
        for i in range(0, len(handshake), size)
    )


class Recorder:
    """A raw TCP backend that keeps every byte each connection sent and answers `tag` once
    it has read `expect` bytes (or on EOF)."""

    def __init__(self, tag: bytes, expect: int = 1) -> None:
        self.tag = tag
        self.expect = expect
        self.received: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> Recorder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while len(data) < self.expect:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        self.received.append(data)
        writer.write(self.tag)
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class TLSBackend:
    """A backend that terminates TLS with its own certificate for `names` and answers
    `name:<sni>:<alpn>:<what it read>` (a plain echo inside TLS)."""

    def __init__(self, name: str, names: list[str], alpn: list[str] | None = None) -> None:
        self.name = name
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        CA.issue_cert(*names).configure_cert(self.ctx)
        if alpn:
            self.ctx.set_alpn_protocols(alpn)
        self.snis: list[str | None] = []  # what its sni_callback saw, per handshake
        self.ctx.sni_callback = lambda obj, name, ctx: self.snis.append(name)
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> TLSBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        line = await reader.readline()
        sni = self.snis[-1] if self.snis else None
        alpn = obj.selected_alpn_protocol() if obj is not None else None
        writer.write(f"{self.name}:{sni}:{alpn}:".encode() + line)
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def recorders() -> AsyncIterator[Any]:
    made: list[Any] = []

    async def make(tag: bytes, expect: int = 1) -> Recorder:
        recorder = await Recorder(tag, expect).start()
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        recorder.close()


def tcp_config(routers: dict[str, tuple[str, str, dict[str, Any]]], services: dict[str, str]):
    """routers: name -> (rule, service, tls options); services: name -> address."""
    return {
        "tcp": {
            "routers": {
                name: {"entryPoints": ["web"], "rule": rule, "service": service, "tls": tls}
                for name, (rule, service, tls) in routers.items()
            },
            "services": {
                name: {"loadBalancer": {"servers": [{"address": address}]}}
                for name, address in services.items()
            },
        }
    }


PASS = {"passthrough": True}


async def send_hello(port: int, data: bytes, chunk: int | None = None) -> bytes:
    """Write `data` (in `chunk`-byte writes, each sent before the next) and read the answer
    until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    step = chunk or len(data)
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
        if chunk:
            await asyncio.sleep(0)  # let each piece leave as its own segment
    try:
        return await asyncio.wait_for(reader.read(-1), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_sni_routes_two_passthrough_backends_on_one_port(proxy_factory):
    """Traefik `tls.passthrough: true` with HostSNI: two TLS services on one port, each
    reached by its SNI; the certificate the client verifies is the backend's own (the proxy
    holds no key), and ALPN is negotiated end to end with the backend."""
    a = await TLSBackend("a", ["a.mesh.test"], alpn=["h2", "http/1.1"]).start()
    b = await TLSBackend("b", ["b.mesh.test"]).start()
    config = tcp_config(
        {
            "ra": ("HostSNI(`a.mesh.test`)", "sa", PASS),
            "rb": ("HostSNI(`b.mesh.test`)", "sb", PASS),
        },
        {"sa": a.address, "sb": b.address},
    )
    proxy = await proxy_factory(config)
    for name, expected in (("a.mesh.test", b"a:a.mesh.test:h2:ping\n"), ("b.mesh.test", None)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=client_context(["h2"]), server_hostname=name
        )
        writer.write(b"ping\n")
        answer = await asyncio.wait_for(reader.read(-1), 10)
        cert = writer.get_extra_info("peercert")
        assert ("DNS", name) in cert["subjectAltName"]
        assert answer == (expected or b"b:b.mesh.test:None:ping\n")
        writer.close()
    assert proxy.rawdata()["tcpRouters"]["ra@file"]["status"] == "enabled"
    a.close()
    b.close()


async def test_passthrough_replays_the_client_hello_untouched(proxy_factory, recorders):
    """Passthrough means the backend gets the very bytes the client wrote (RFC 8446 §5.1
    records included): compared byte for byte, for a hello in one write, written one byte
    per segment, and split over several TLS records."""
    hello = client_hello("db.mesh.test", ["postgresql"])
    split = reframe(hello, 100)
    backend = await recorders(b"ok", expect=len(hello))
    split_backend = await recorders(b"ok", expect=len(split))
    config = tcp_config(
        {"r": ("HostSNI(`db.mesh.test`)", "s", PASS)},
        {"s": backend.address},
    )
    proxy = await proxy_factory(config)
    assert await send_hello(proxy.port, hello) == b"ok"
    assert await send_hello(proxy.port, hello, chunk=1) == b"ok"
    assert backend.received == [hello, hello]
    config["tcp"]["services"]["s"]["loadBalancer"]["servers"][0]["address"] = split_backend.address
    proxy.write(config)
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    assert await send_hello(proxy.port, split, chunk=7) == b"ok"
    assert split_backend.received == [split]


async def test_traefik_hostsni_wildcard_catch_all_regexp_alpn_and_priorities(
    proxy_factory, recorders
):
    """Traefik 3.7 TCP rules on the SNI: exact beats `*.domain` by default priority (rule
    length); `*.domain` matches one label only; `HostSNI(`*`)` (priority -1) takes the rest,
    an empty SNI included; HostSNIRegexp and ALPN rules; an explicit priority wins over
    length."""
    names = ["exact", "wild", "regexp", "alpn", "any"]
    backends = {n: await recorders(n.encode()) for n in names}
    config = tcp_config(
        {
            "exact": ("HostSNI(`api.svc.test`)", "exact", PASS),
            "wild": ("HostSNI(`*.svc.test`)", "wild", PASS),
            "regexp": ("HostSNIRegexp(`^db[0-9]+\\.internal$`)", "regexp", PASS),
            "alpn": ("ALPN(`mqtt`)", "alpn", PASS),
            "any": ("HostSNI(`*`)", "any", PASS),
        },
        {n: b.address for n, b in backends.items()},
    )
    proxy = await proxy_factory(config)
    cases = [
        (("api.svc.test", None), b"exact"),
        (("API.Svc.Test", None), b"exact"),  # the SNI is compared lower-cased
        (("web.svc.test", None), b"wild"),
        (("a.b.svc.test", None), b"any"),  # one label only
        (("svc.test", None), b"any"),
        (("db42.internal", None), b"regexp"),
        (("broker.local", ["mqtt"]), b"alpn"),
        ((None, None), b"any"),
    ]
    for (sni, alpn), expected in cases:
        assert await send_hello(proxy.port, client_hello(sni, alpn)) == expected, sni
    config["tcp"]["routers"]["alpn"]["priority"] = 1000  # now above `exact`
    proxy.write(config)
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    assert await send_hello(proxy.port, client_hello("api.svc.test", ["mqtt"])) == b"alpn"


async def test_client_ip_rule_and_unrouted_hellos_get_the_https_404(proxy_factory, recorders):
    """ClientIP on a TLS router matches the TCP peer. A hello no TCP router takes goes to the
    HTTPS handler, as in Traefik (router.go: `httpsForwarder`, there on every entrypoint):
    a handshake with the default certificate (generated: TRAEFIK DEFAULT CERT), then 404."""
    backend = await recorders(b"local")
    config = tcp_config(
        {"r": ("HostSNI(`x.test`) && ClientIP(`127.0.0.0/8`)", "s", PASS)},
        {"s": backend.address},
    )
    proxy = await proxy_factory(config)
    assert await send_hello(proxy.port, client_hello("x.test")) == b"local"
    insecure = client_context(["http/1.1"])
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    answer, _, _ = await https_get(proxy.port, "y.test", ctx=insecure)
    assert answer.startswith(b"HTTP/1.1 404 ")
    config["tcp"]["routers"]["r"]["rule"] = "HostSNI(`x.test`) && ClientIP(`10.0.0.0/8`)"
    proxy.write(config)
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    answer, _, _ = await https_get(proxy.port, "x.test", ctx=insecure)
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert len(backend.received) == 1


async def test_non_tls_bytes_go_to_plain_tcp_router_or_http(proxy_factory, recorders):
    """Traefik router.go: with a TLS router on the entrypoint the first bytes are peeked;
    non-TLS bytes go to the first non-TLS TCP router that matches, else to the HTTP handler
    (404 with no HTTP router); a HostSNI other than `*` without `tls` disables its router
    ("has HostSNI matcher, but no TLS on router")."""
    tls_backend = await recorders(b"tls")
    plain = await recorders(b"plain")
    config = tcp_config(
        {
            "t": ("HostSNI(`x.test`)", "t", PASS),
            "p": ("ClientIP(`10.0.0.0/8`)", "p", None),
            "bad": ("HostSNI(`y.test`)", "p", None),
        },
        {"t": tls_backend.address, "p": plain.address},
    )
    del config["tcp"]["routers"]["p"]["tls"]
    del config["tcp"]["routers"]["bad"]["tls"]
    proxy = await proxy_factory(config)
    answer = await raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert await send_hello(proxy.port, client_hello("x.test")) == b"tls"
    errors = proxy.rawdata()["tcpRouters"]["bad@file"]
    assert errors["status"] == "disabled" and "no TLS on router" in errors["error"][0]
    config["tcp"]["routers"]["p"]["rule"] = "HostSNI(`*`)"
    proxy.write(config)
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    assert await raw_exchange(proxy.port, b"hello") == b"plain"
    assert plain.received == [b"hello"]
    assert await send_hello(proxy.port, client_hello("x.test")) == b"tls"


async def test_server_speaks_first_still_routed_at_once(proxy_factory):
    """An entrypoint whose TCP routers are all non-TLS routes before reading (Traefik:
    server-speaks-first protocols such as SMTP work): the client reads the banner first."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 smtp.test ESMTP\r\n")
        await writer.drain()
        writer.write(b"echo:" + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(banner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tcp_config({"smtp": ("HostSNI(`*`)", "s", None)}, {"s": f"127.0.0.1:{port}"})
    del config["tcp"]["routers"]["smtp"]["tls"]
    proxy = await proxy_factory(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await asyncio.wait_for(reader.readline(), 10) == b"220 smtp.test ESMTP\r\n"
    writer.write(b"EHLO me\r\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"echo:EHLO me\r\n"
    writer.close()
    server.close()


async def test_bad_hellos_close_only_their_connection(proxy_factory, recorders):
    """Garbage after a handshake byte, an oversized hello and a hello cut short are closed;
    a client that stays silent after the first record byte is closed after the entrypoint's
    read timeout; a good hello on the same port meanwhile is routed."""
    backend = await recorders(b"ok")
    config = tcp_config({"r": ("HostSNI(`*`)", "s", PASS)}, {"s": backend.address})
    port = free_port()
    await proxy_factory(
        config,
        entrypoints={"web": f"127.0.0.1:{port}"},
        extra_flags=["--entryPoints.web.transport.respondingTimeouts.readTimeout=1s"],
    )
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
    slow_writer.write(b"\x16\x03\x01")
    assert await send_hello(port, b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == b""
    assert await send_hello(port, b"\x16\x03\x01\x00\x04\x01\x01\x00\x00" + b"\x16" * 10) == b""
    assert await send_hello(port, client_hello("a.test")) == b"ok"
    assert await asyncio.wait_for(slow_reader.read(-1), 10) == b""
    slow_writer.close()
    assert len(backend.received) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_openssl_s_client_sni_and_alpn_through_passthrough(proxy_factory):
    """`openssl s_client -servername -alpn` through passthrough: the backend's certificate
    and the backend's ALPN choice reach the client."""
    backend = await TLSBackend("pg", ["pg.mesh.test"], alpn=["postgresql"]).start()
    config = tcp_config(
        {"r": ("HostSNI(`pg.mesh.test`) && ALPN(`postgresql`)", "s", PASS)},
        {"s": backend.address},
    )
    proxy = await proxy_factory(config)
    process = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}",
        "-servername", "pg.mesh.test", "-alpn", "postgresql", "-quiet", "-verify_quiet",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(b"hello\n"), 20)
    assert out == b"pg:pg.mesh.test:postgresql:hello\n", err
    backend.close()


# ---------------------------------------------------------------- termination


def cert_files(tmp_path, name: str, *hosts: str, ca: trustme.CA = CA) -> dict[str, str]:
    """A certificate for `hosts` issued by `ca`, written as PEM files."""
    cert = ca.issue_cert(*hosts)
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return {"certFile": str(cert_path), "keyFile": str(key_path)}


def inline_cert(*hosts: str, ca: trustme.CA = CA, common_name: str | None = None) -> dict[str, str]:
    """A certificate for `hosts` given inline as PEM text (Traefik accepts both)."""
    cert = ca.issue_cert(*hosts, common_name=common_name)
    return {
        "certFile": cert.cert_chain_pems[0].bytes().decode(),
        "keyFile": cert.private_key_pem.bytes().decode(),
    }


async def https_get(
    port: int, sni: str, path: str = "/", ctx: ssl.SSLContext | None = None
) -> tuple[bytes, dict[str, Any], str | None]:
    """One HTTP/1.1 request over TLS: (response, peer certificate, negotiated ALPN)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx or client_context(["http/1.1"]), server_hostname=sni
    )
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(-1), 10)
    cert = writer.get_extra_info("peercert")
    alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    writer.close()
    return answer, cert, alpn


def served_names(cert: dict[str, Any]) -> list[str]:
    return [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]


async def test_https_routers_terminate_with_the_certificate_named_by_sni(
    proxy_factory, backends, tmp_path
):
    """`tls: {}` on HTTP routers: the proxy terminates with the certificate whose SAN names
    the SNI (files or inline PEM), the default store's certificate otherwise; requests are
    routed by Host among the HTTPS routers only, with X-Forwarded-Proto https; plain HTTP on
    the same port only sees the routers without tls (Traefik's HTTP/HTTPS split)."""
    a, b, plain = await backends("a"), await backends("b"), await backends("plain")
    config = {
        "http": {
            "routers": {
                "a": {"rule": "Host(`a.mesh.test`)", "service": "a", "tls": {}},
                "b": {"rule": "Host(`b.mesh.test`)", "service": "b", "tls": {}},
                "plain": {"rule": "Host(`a.mesh.test`)", "service": "plain"},
            },
            "services": {
                "a": {"loadBalancer": {"servers": [{"url": a.url}]}},
                "b": {"loadBalancer": {"servers": [{"url": b.url}]}},
                "plain": {"loadBalancer": {"servers": [{"url": plain.url}]}},
            },
        },
        "tls": {
            "certificates": [cert_files(tmp_path, "a", "a.mesh.test"), inline_cert("b.mesh.test")],
            "stores": {"default": {"defaultCertificate": inline_cert("fallback.mesh.test")}},
        },
    }
    proxy = await proxy_factory(config)
    answer, cert, alpn = await https_get(proxy.port, "a.mesh.test")
    assert answer.startswith(b"HTTP/1.1 200") and served_names(cert) == ["a.mesh.test"]
    assert alpn == "http/1.1"
    assert ("x-forwarded-proto", "https") in a.requests[-1]["headers"]
    assert ("x-forwarded-port", "443") in a.requests[-1]["headers"]
    answer, cert, _ = await https_get(proxy.port, "b.mesh.test")
    assert answer.startswith(b"HTTP/1.1 200") and served_names(cert) == ["b.mesh.test"]
    assert len(b.requests) == 1
    ctx = client_context(["http/1.1"])
    ctx.check_hostname = False
    answer, cert, _ = await https_get(proxy.port, "other.mesh.test", ctx=ctx)
    assert answer.startswith(b"HTTP/1.1 404") and served_names(cert) == ["fallback.mesh.test"]
    plain_answer = await raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: a.mesh.test\r\nConnection: close\r\n\r\n"
    )
    assert plain_answer.startswith(b"HTTP/1.1 200") and len(plain.requests) == 1
    assert len(a.requests) == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_resolve_https_route(proxy_factory, backends, tmp_path):
    """curl --resolve (a real HTTPS client, its own TLS stack) through a terminated route,
    verifying the certificate against the test CA."""
    backend = await backends("curl")
    ca_path = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca_path))
    config = {
        "http": {
            "routers": {"r": {"rule": "Host(`web.mesh.test`)", "service": "s", "tls": {}}},
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}},
        },
        "tls": {"certificates": [inline_cert("web.mesh.test")]},
    }
    proxy = await proxy_factory(config)
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http1.1", "--cacert", str(ca_path),
        "--resolve", f"web.mesh.test:{proxy.port}:127.0.0.1",
        "-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}",
        f"https://web.mesh.test:{proxy.port}/hello",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert out == b"200 0", err
    assert backend.requests[-1]["url"] == "/hello"


async def test_tcp_router_terminates_and_relays_decrypted_bytes(proxy_factory, recorders):
    """A TCP router with `tls: {}` (no passthrough): the proxy terminates TLS and the TCP
    backend gets the plaintext; the answer goes back encrypted."""
    backend = await recorders(b"pong", expect=5)
    config = tcp_config({"r": ("HostSNI(`db.mesh.test`)", "s", {})}, {"s": backend.address})
    config["tls"] = {"certificates": [inline_cert("db.mesh.test")]}
    proxy = await proxy_factory(config)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=client_context(), server_hostname="db.mesh.test"
    )
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.read(-1), 10) == b"pong"
    assert served_names(writer.get_extra_info("peercert")) == ["db.mesh.test"]
    writer.close()
    assert backend.received == [b"hello"]


async def test_mtls_accepts_verified_clients_and_refuses_others(proxy_factory, backends):
    """tls.options clientAuth RequireAndVerifyClientCert with caFiles: a client certificate
    from that CA gets through; none, or one from another CA, fails the handshake (Traefik's
    mTLS) with the certificate_required / unknown_ca alert; the refusal is logged with its
    reason."""
    backend = await backends("m")
    client_ca, other_ca = trustme.CA(), trustme.CA()
    config = {
        "http": {
            "routers": {
                "r": {
                    "rule": "Host(`m.mesh.test`)",
                    "service": "s",
                    "tls": {"options": "mtls"},
                }
            },
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}},
        },
        "tls": {
            "certificates": [inline_cert("m.mesh.test")],
            "options": {
                "mtls": {
                    "minVersion": "VersionTLS12",
                    "clientAuth": {
                        "caFiles": [client_ca.cert_pem.bytes().decode()],
                        "clientAuthType": "RequireAndVerifyClientCert",
                    },
                }
            },
        },
    }
    proxy = await proxy_factory(config)
    good = client_context(["http/1.1"])
    client_ca.issue_cert("client@mesh.test").configure_cert(good)
    answer, _, _ = await https_get(proxy.port, "m.mesh.test", ctx=good)
    assert answer.startswith(b"HTTP/1.1 200")
    wrong = client_context(["http/1.1"])
    other_ca.issue_cert("client@mesh.test").configure_cert(wrong)
    # TLS 1.3 (RFC 8446 §4.4.2.4, §6.2): the server's alert reaches the client on its first
    # read, after its side of the handshake is done.
    for ctx, alert in (
        (client_context(["http/1.1"]), "CERTIFICATE_REQUIRED"),
        (wrong, "UNKNOWN_CA"),
    ):
        with pytest.raises(ssl.SSLError, match=alert):
            await https_get(proxy.port, "m.mesh.test", ctx=ctx)
    assert len(backend.requests) == 1
    await wait_for(lambda: "handshake" in proxy.log_path.read_text(), 5, "refusal logged")


async def test_certificate_reload_applies_to_new_handshakes_only(proxy_factory, backends):
    """Hot reload: a new certificate for the same name is served to new handshakes while a
    connection opened before keeps working (its TLS session is untouched)."""
    backend = await backends("r")
    first, second = inline_cert("r.mesh.test"), inline_cert("r.mesh.test")
    config = {
        "http": {
            "routers": {"r": {"rule": "Host(`r.mesh.test`)", "service": "s", "tls": {}}},
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}},
        },
        "tls": {"certificates": [first]},
    }
    proxy = await proxy_factory(config)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=client_context(["http/1.1"]), server_hostname="r.mesh.test"
    )
    old_serial = writer.get_extra_info("peercert")["serialNumber"]
    request = b"GET / HTTP/1.1\r\nHost: r.mesh.test\r\n\r\n"
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    config["tls"] = {"certificates": [second]}
    proxy.write(config)
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    _, cert, _ = await https_get(proxy.port, "r.mesh.test")
    assert cert["serialNumber"] != old_serial
    writer.write(request)  # the connection opened before the reload still serves
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    assert writer.get_extra_info("peercert")["serialNumber"] == old_serial
    writer.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_openssl_s_client_alpn_on_terminated_route(proxy_factory, backends):
    """`openssl s_client -servername -alpn http/1.1`: the proxy's ALPN choice is http/1.1
    (h2 only once the HTTP/2 server is in), and the request is served."""
    backend = await backends("o")
    config = {
        "http": {
            "routers": {"r": {"rule": "Host(`o.mesh.test`)", "service": "s", "tls": {}}},
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}},
        },
        "tls": {"certificates": [inline_cert("o.mesh.test")]},
    }
    proxy = await proxy_factory(config)
    process = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}",
        "-servername", "o.mesh.test", "-alpn", "http/1.1", "-ign_eof",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(
        process.communicate(b"GET / HTTP/1.1\r\nHost: o.mesh.test\r\nConnection: close\r\n\r\n"),
        20,
    )
    assert b"ALPN protocol: http/1.1" in out
    assert b"HTTP/1.1 200" in out


# ---------------------------------------------------------------- the same config through Traefik


async def tls_probe(port: int, sni: str) -> tuple[bytes, str]:
    """A TLS client that verifies nothing: (the status line of GET /, the served
    certificate's CN, else its SAN DNS names), or (b"", "") if the handshake failed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni), 10
        )
    except (TimeoutError, OSError):
        return b"", ""
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    common = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    writer.write(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
    try:
        answer = await asyncio.wait_for(reader.read(-1), 10)
    except (TimeoutError, OSError):
        answer = b""
    writer.close()
    names = str(common[0].value) if common else ""
    if not names:  # trustme's certificates have no CN: their SAN names them
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        names = ",".join(san.value.get_values_for_type(x509.DNSName))
    return answer.split(b"\r\n", 1)[0], names


async def test_sni_routing_matches_real_traefik(tmp_path, recorders):
    """The same TCP routers through real Traefik 3.7 and meshproxy, the same ClientHellos:
    HostSNI exact / `*.domain` (one label) / HostSNIRegexp / ALPN pick the same backend;
    a hello no TCP router takes ends at the HTTPS handler on both (handshake with the
    generated default certificate, then 404); non-TLS bytes get HTTP's 404 on both; a
    ClientHello split over several TLS records (RFC 8446 §5.1) is routed by its SNI on both."""
    from tests.differential.harness import (
        MeshproxyProcess,
        TraefikProcess,
        TraefikUnavailable,
        traefik_binary,
    )

    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    names = ["exact", "wild", "regexp", "alpn"]
    backends = {n: await recorders(n.encode()) for n in names}
    config = tcp_config(
        {
            "exact": ("HostSNI(`api.svc.test`)", "exact", PASS),
            "wild": ("HostSNI(`*.svc.test`)", "wild", PASS),
            "regexp": ("HostSNIRegexp(`^db[0-9]+\\.internal$`)", "regexp", PASS),
            "alpn": ("ALPN(`mqtt`)", "alpn", PASS),
        },
        {n: b.address for n, b in backends.items()},
    )
    (tmp_path / "t").mkdir()
    (tmp_path / "m").mkdir()
    traefik = await asyncio.to_thread(TraefikProcess(tmp_path / "t", config).start)
    meshproxy = await asyncio.to_thread(MeshproxyProcess(tmp_path / "m", config).start)
    try:
        hello = client_hello("api.svc.test")
        # ready once a passthrough answers
        await wait_for(lambda: send_hello(traefik.port, hello), 15, "traefik's TCP routers")
        cases = [
            ("api.svc.test", None),
            ("web.svc.test", None),
            ("db7.internal", None),
            ("broker.local", ["mqtt"]),
        ]
        for sni, alpn in cases:
            data = client_hello(sni, alpn)
            ours, theirs = await asyncio.gather(
                send_hello(meshproxy.port, data), send_hello(traefik.port, data)
            )
            assert ours == theirs, (sni, ours, theirs)
        for sni in ("nobody.test", "a.b.svc.test"):
            ours, theirs = await asyncio.gather(
                tls_probe(meshproxy.port, sni), tls_probe(traefik.port, sni)
            )
            assert ours == theirs == (b"HTTP/1.1 404 Not Found", "TRAEFIK DEFAULT CERT")
        plain = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ours, theirs = await asyncio.gather(
            raw_exchange(meshproxy.port, plain), raw_exchange(traefik.port, plain)
        )
        assert ours.split(b"\r\n", 1)[0] == theirs.split(b"\r\n", 1)[0] == b"HTTP/1.1 404 Not Found"
        split = reframe(client_hello("api.svc.test"), 64)
        ours, theirs = await asyncio.gather(
            send_hello(meshproxy.port, split), send_hello(traefik.port, split)
        )
        assert ours == theirs == b"exact"
    finally:
        traefik.stop()
        meshproxy.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_alpn_h2_on_a_terminated_connection_is_served_as_http2(
    proxy_factory, backends, tmp_path
):
    """ALPN (RFC 7301) offers h2 then http/1.1 (Traefik's default alpnProtocols): a client
    that picks h2 is served HTTP/2 over the decrypted stream (RFC 9113 §3.2), one that
    picks http/1.1 gets HTTP/1.1; both reach the backend with X-Forwarded-Proto https."""
    backend = await backends("h2")
    ca_path = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca_path))
    config = {
        "http": {
            "routers": {"r": {"rule": "Host(`h2.mesh.test`)", "service": "s", "tls": {}}},
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}},
        },
        "tls": {"certificates": [inline_cert("h2.mesh.test")]},
    }
    proxy = await proxy_factory(config)
    for flag, version in (("--http2", b"2"), ("--http1.1", b"1.1")):
        process = await asyncio.create_subprocess_exec(
            "curl", "-sS", flag, "--cacert", str(ca_path),
            "--resolve", f"h2.mesh.test:{proxy.port}:127.0.0.1",
            "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
            f"https://h2.mesh.test:{proxy.port}/x",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 20)
        assert out == b"200 " + version, err
        assert ("x-forwarded-proto", "https") in backend.requests[-1]["headers"]
    assert len(backend.requests) == 2


async def test_tls_options_versions_ciphers_and_sni_strict(proxy_factory, backends):
    """tls.options: minVersion VersionTLS13 refuses a TLS 1.2-only client; maxVersion
    VersionTLS12 with a Go cipher suite name serves exactly that suite (mapped to OpenSSL's
    name); sniStrict refuses a handshake whose SNI no certificate names (Traefik: "strict SNI
    enabled"), with the unrecognized_name alert, while named hosts still work."""
    backend = await backends("opt")
    service = {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}}
    config = {
        "http": {
            "routers": {
                "new": {"rule": "Host(`new.mesh.test`)", "service": "s", "tls": {"options": "new"}},
                "old": {"rule": "Host(`old.mesh.test`)", "service": "s", "tls": {"options": "old"}},
            },
            "services": service,
        },
        "tls": {
            "certificates": [inline_cert("new.mesh.test", "old.mesh.test")],
            "options": {
                "new": {"minVersion": "VersionTLS13"},
                "old": {
                    "maxVersion": "VersionTLS12",
                    "cipherSuites": ["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"],
                },
                "default": {"sniStrict": True},
            },
        },
    }
    proxy = await proxy_factory(config)
    tls12 = client_context(["http/1.1"])
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        await https_get(proxy.port, "new.mesh.test", ctx=tls12)
    answer, _, _ = await https_get(proxy.port, "new.mesh.test")
    assert answer.startswith(b"HTTP/1.1 200")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=client_context(), server_hostname="old.mesh.test"
    )
    obj = writer.get_extra_info("ssl_object")
    assert obj.version() == "TLSv1.2" and obj.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    writer.close()
    insecure = client_context(["http/1.1"])
    insecure.check_hostname = False
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await https_get(proxy.port, "unknown.mesh.test", ctx=insecure)
    assert len(backend.requests) == 1


async def test_open_connections_gauge_back_to_zero_after_every_kind_of_tls_connection(
    proxy_factory, recorders, backends
):
    """traefik_open_connections counts a TLS connection once while it lives, whatever path
    it takes (hello being read, passthrough, handshake, HTTPS, terminated TCP, refused
    handshake, garbage), and is back at 0 once every connection is closed."""
    from tests.integration.test_tcp_proxying import open_connections

    passthrough = await recorders(b"p")
    terminated = await recorders(b"t")
    http_backend = await backends("h")
    config = tcp_config(
        {
            "p": ("HostSNI(`p.mesh.test`)", "p", PASS),
            "t": ("HostSNI(`t.mesh.test`)", "t", {}),
        },
        {"p": passthrough.address, "t": terminated.address},
    )
    config["http"] = {
        "routers": {"h": {"rule": "Host(`h.mesh.test`)", "service": "h", "tls": {}}},
        "services": {"h": {"loadBalancer": {"servers": [{"url": http_backend.url}]}}},
    }
    config["tls"] = {"certificates": [inline_cert("t.mesh.test", "h.mesh.test")]}
    proxy = await proxy_factory(config)
    held, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=client_context(["http/1.1"]), server_hostname="h.mesh.test"
    )
    await wait_for(lambda: open_connections(proxy, "web") == 1, 10, "one open")
    assert await send_hello(proxy.port, client_hello("p.mesh.test")) == b"p"
    reader, w2 = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=client_context(), server_hostname="t.mesh.test"
    )
    w2.write(b"x")
    assert await asyncio.wait_for(reader.read(-1), 10) == b"t"
    w2.close()
    assert (await https_get(proxy.port, "h.mesh.test"))[0].startswith(b"HTTP/1.1 200")
    untrusting = ssl.create_default_context()  # does not trust the test CA: aborts
    with pytest.raises(ssl.SSLError):
        await https_get(proxy.port, "h.mesh.test", ctx=untrusting)
    assert await send_hello(proxy.port, b"\x16\x03\x01\x00\x05garbage") == b""
    assert open_connections(proxy, "web") >= 1
    writer.close()
    await wait_for(lambda: open_connections(proxy, "web") == 0, 10, "gauge back to 0")
    log = proxy.log_path.read_text()
    assert " WARNING " not in log and " ERROR " not in log, log


async def test_https_termination_matches_real_traefik(tmp_path, backends):
    """HTTPS routers (`tls: {}`) with certificates from the dynamic config, through real
    Traefik 3.7 and meshproxy on the same config: the same certificate is served per SNI
    (named host, default store certificate for others), the same status per Host (200 for
    the routed ones, 404 otherwise), and plain HTTP on the same port does not see the
    HTTPS routers (404) on both."""
    from tests.differential.harness import (
        MeshproxyProcess,
        TraefikProcess,
        TraefikUnavailable,
        traefik_binary,
    )

    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    backend = await backends("s")
    config = {
        "http": {
            "routers": {
                "a": {"rule": "Host(`a.mesh.test`)", "service": "s", "tls": {}},
                "b": {"rule": "Host(`b.mesh.test`) && PathPrefix(`/`)", "service": "s", "tls": {}},
            },
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}},
        },
        "tls": {
            "certificates": [inline_cert("a.mesh.test"), inline_cert("b.mesh.test")],
            "stores": {
                "default": {
                    "defaultCertificate": inline_cert("fallback.mesh.test", common_name="dflt")
                }
            },
        },
    }
    (tmp_path / "t").mkdir()
    (tmp_path / "m").mkdir()
    traefik = await asyncio.to_thread(TraefikProcess(tmp_path / "t", config).start)
    meshproxy = await asyncio.to_thread(MeshproxyProcess(tmp_path / "m", config).start)
    seen: dict[str, tuple[bytes, str]] = {}
    try:
        for sni in ("a.mesh.test", "b.mesh.test", "c.mesh.test"):
            ours, theirs = await asyncio.gather(
                tls_probe(meshproxy.port, sni), tls_probe(traefik.port, sni)
            )
            assert ours == theirs, (sni, ours, theirs)
            seen[sni] = ours
        assert seen == {
            "a.mesh.test": (b"HTTP/1.1 200 OK", "a.mesh.test"),
            "b.mesh.test": (b"HTTP/1.1 200 OK", "b.mesh.test"),
            "c.mesh.test": (b"HTTP/1.1 404 Not Found", "dflt"),
        }
        plain = b"GET / HTTP/1.1\r\nHost: a.mesh.test\r\nConnection: close\r\n\r\n"
        ours_plain, theirs_plain = await asyncio.gather(
            raw_exchange(meshproxy.port, plain), raw_exchange(traefik.port, plain)
        )
        assert ours_plain.split(b"\r\n", 1)[0] == theirs_plain.split(b"\r\n", 1)[0]
        assert ours_plain.startswith(b"HTTP/1.1 404")
    finally:
        traefik.stop()
        meshproxy.stop()


async def test_immediate_routing_falls_back_to_http_when_no_tcp_router_matches(
    proxy_factory, backends, recorders
):
    """Traefik router.go: with only non-TLS TCP routers the connection is matched when it
    opens; when none matches (a ClientIP rule for other clients) Traefik goes on to peek and
    serves HTTP, rather than closing."""
    tcp_backend = await recorders(b"tcp")
    http_backend = await backends("web")
    config = tcp_config({"t": ("ClientIP(`10.0.0.0/8`)", "t", None)}, {"t": tcp_backend.address})
    del config["tcp"]["routers"]["t"]["tls"]
    config["http"] = {
        "routers": {"h": {"rule": "PathPrefix(`/`)", "service": "h"}},
        "services": {"h": {"loadBalancer": {"servers": [{"url": http_backend.url}]}}},
    }
    proxy = await proxy_factory(config)
    answer = await raw_exchange(
        proxy.port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200") and http_backend.requests[-1]["url"] == "/x"
    config["tcp"]["routers"]["t"]["rule"] = "ClientIP(`127.0.0.0/8`)"
    proxy.write(config)
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    assert await raw_exchange(proxy.port, b"anything") == b"tcp"
    assert tcp_backend.received == [b"anything"]


async def test_https_and_tcp_tls_routers_share_an_entrypoint_in_traefiks_order(tmp_path, backends):
    """Traefik router.go ServeTCP on one entrypoint with HTTPS routers and TCP TLS routers:
    an HTTPS router whose Host names the SNI beats a TCP router for the same SNI; a specific
    TCP router beats an HTTPS router without Host (a catch-all for TLS); that HTTPS
    catch-all beats a TCP HostSNI(`*`) router, which takes the rest once it is gone.
    Checked against real Traefik 3.7 on the same config."""
    from tests.differential.harness import (
        MeshproxyProcess,
        TraefikProcess,
        TraefikUnavailable,
        traefik_binary,
    )

    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    http_backend = await backends("web")
    tls_backends = {
        name: await TLSBackend(name, [f"{name}.tls.test"]).start() for name in ("tb", "tt", "ta")
    }
    config = tcp_config(
        {
            "tboth": ("HostSNI(`both.test`)", "tb", PASS),
            "tonly": ("HostSNI(`tcp.test`)", "tt", PASS),
            "tall": ("HostSNI(`*`)", "ta", PASS),
        },
        {name: backend.address for name, backend in tls_backends.items()},
    )
    config["http"] = {
        "routers": {
            "hs": {"rule": "Host(`both.test`)", "service": "h", "tls": {}},
            "hc": {"rule": "PathPrefix(`/`)", "service": "h", "tls": {}},
        },
        "services": {"h": {"loadBalancer": {"servers": [{"url": http_backend.url}]}}},
    }
    config["tls"] = {"certificates": [inline_cert("both.test")]}
    expected = {
        "both.test": (b"HTTP/1.1 200 OK", "both.test"),
        "tcp.test": (b"tt:tcp.test:None:GET / HTTP/1.1", "tt.tls.test"),
        "other.test": (b"HTTP/1.1 200 OK", "TRAEFIK DEFAULT CERT"),
    }
    for step in ("with the HTTPS catch-all", "without it"):
        (tmp_path / step / "t").mkdir(parents=True)
        (tmp_path / step / "m").mkdir()
        traefik = await asyncio.to_thread(TraefikProcess(tmp_path / step / "t", config).start)
        meshproxy = await asyncio.to_thread(MeshproxyProcess(tmp_path / step / "m", config).start)
        try:

            async def ready(port: int = traefik.port) -> bool:
                return (await tls_probe(port, "tcp.test"))[0].startswith(b"tt:")

            await wait_for(ready, 15, "traefik's TCP routers")
            for sni, want in expected.items():
                ours, theirs = await asyncio.gather(
                    tls_probe(meshproxy.port, sni), tls_probe(traefik.port, sni)
                )
                assert ours == theirs == want, (step, sni, ours, theirs)
        finally:
            traefik.stop()
            meshproxy.stop()
        config["http"]["routers"].pop("hc", None)
        expected["other.test"] = (b"ta:other.test:None:GET / HTTP/1.1", "ta.tls.test")
    for backend in tls_backends.values():
        backend.close()


async def test_domain_fronting_past_mtls_gets_421_as_in_traefik(tmp_path, backends):
    """Traefik's SNI check (pkg/middlewares/snicheck): a client makes the handshake for a
    host without client authentication, then asks by Host for the mTLS-protected router:
    421 Misdirected Request (RFC 9110 §15.5.20), on meshproxy and on real Traefik 3.7 alike;
    a Host whose TLS options are those of the handshake is served; a Host that only a
    `*.domain` mTLS router covers is refused too."""
    from tests.differential.harness import (
        MeshproxyProcess,
        TraefikProcess,
        TraefikUnavailable,
        traefik_binary,
    )

    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    backend = await backends("f")
    client_ca = trustme.CA()
    service = {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}}
    config = {
        "http": {
            "routers": {
                "secure": {
                    "rule": "Host(`secure.mesh.test`)",
                    "service": "s",
                    "tls": {"options": "mtls"},
                },
                "public": {"rule": "Host(`public.mesh.test`)", "service": "s", "tls": {}},
                "other": {"rule": "Host(`other.mesh.test`)", "service": "s", "tls": {}},
                "wild": {
                    "rule": "Host(`*.wild.mesh.test`)",
                    "service": "s",
                    "tls": {"options": "mtls"},
                },
            },
            "services": service,
        },
        "tls": {
            "certificates": [
                inline_cert("secure.mesh.test", "public.mesh.test", "other.mesh.test")
            ],
            "options": {
                "mtls": {
                    "clientAuth": {
                        "caFiles": [client_ca.cert_pem.bytes().decode()],
                        "clientAuthType": "RequireAndVerifyClientCert",
                    }
                }
            },
        },
    }
    (tmp_path / "t").mkdir()
    (tmp_path / "m").mkdir()
    traefik = await asyncio.to_thread(TraefikProcess(tmp_path / "t", config).start)
    meshproxy = await asyncio.to_thread(MeshproxyProcess(tmp_path / "m", config).start)

    async def fronted(port: int, host: str) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client_context(["http/1.1"]),
            server_hostname="public.mesh.test",
        )
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        return answer.split(b"\r\n", 1)[0]

    try:
        for host, status in (
            ("secure.mesh.test", b"HTTP/1.1 421 Misdirected Request"),
            ("other.mesh.test", b"HTTP/1.1 200 OK"),
        ):
            ours, theirs = await asyncio.gather(
                fronted(meshproxy.port, host), fronted(traefik.port, host)
            )
            assert ours == theirs == status, (host, ours, theirs)
        # A Host that only a `*.domain` mTLS router covers takes that router's options.
        ours, theirs = await asyncio.gather(
            fronted(meshproxy.port, "a.wild.mesh.test"), fronted(traefik.port, "a.wild.mesh.test")
        )
        assert ours == theirs == b"HTTP/1.1 421 Misdirected Request"
    finally:
        traefik.stop()
        meshproxy.stop()


async def test_passthrough_connection_survives_a_reload_that_removes_its_router(proxy_factory):
    """Issue 12 reload rule: a changed config applies to new connections while established
    ones keep what they started with. A passthrough TLS session (keys only at the client
    and the backend) keeps echoing after its router is removed; a new connection for that
    SNI then ends at the HTTPS handler (default certificate, 404)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert("echo.mesh.test").configure_cert(ctx)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"echo:" + line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = tcp_config({"r": ("HostSNI(`echo.mesh.test`)", "s", PASS)}, {"s": address})
    proxy = await proxy_factory(config)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=client_context(), server_hostname="echo.mesh.test"
    )
    writer.write(b"one\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"echo:one\n"
    proxy.write({"tcp": {}})
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    writer.write(b"two\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"echo:two\n"
    assert await tls_probe(proxy.port, "echo.mesh.test") == (
        b"HTTP/1.1 404 Not Found",
        "TRAEFIK DEFAULT CERT",
    )
    writer.close()
    server.close()


async def test_wss_through_an_https_router(proxy_factory):
    """A WebSocket over TLS (wss, RFC 6455 §3) on an HTTPS router: the handshake is an
    ordinary decrypted HTTP/1.1 exchange, then the TLS transport and the backend socket
    become one byte pipe; messages both ways, a 1 MiB one included, and a clean close."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def handler(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        config = {
            "http": {
                "routers": {"r": {"rule": "Host(`ws.mesh.test`)", "service": "s", "tls": {}}},
                "services": {
                    "s": {"loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{port}"}]}}
                },
            },
            "tls": {"certificates": [inline_cert("ws.mesh.test")]},
        }
        proxy = await proxy_factory(config)
        async with connect(
            f"wss://ws.mesh.test:{proxy.port}/chat",
            ssl=client_context(["http/1.1"]),
            host="127.0.0.1",
            port=proxy.port,
            server_hostname="ws.mesh.test",
            max_size=None,
        ) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 10) == "hello"
            big = bytes(range(256)) * 4096
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), 10) == big


async def test_h2c_prior_knowledge_goes_to_a_matching_plain_tcp_router_first(
    proxy_factory, recorders
):
    """Traefik router.go: every non-TLS connection on an entrypoint with TCP routers meets
    the TCP muxer before the HTTP handler, whatever its bytes; an HTTP/2 prior-knowledge
    preface (RFC 9113 §3.4) is no exception. With no plain TCP router matching, it is served
    by the HTTP/2 server (its SETTINGS frame, type 0x4, comes back)."""
    tls_backend = await recorders(b"tls")
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    plain = await recorders(b"plain", expect=len(preface))
    config = tcp_config(
        {"t": ("HostSNI(`x.test`)", "t", PASS), "p": ("ClientIP(`10.0.0.0/8`)", "p", None)},
        {"t": tls_backend.address, "p": plain.address},
    )
    del config["tcp"]["routers"]["p"]["tls"]
    proxy = await proxy_factory(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface + empty SETTINGS
    head = await asyncio.wait_for(reader.readexactly(9), 10)
    assert head[3] == 0x4  # the server's preface is a SETTINGS frame
    writer.close()
    config["tcp"]["routers"]["p"]["rule"] = "HostSNI(`*`)"
    proxy.write(config)
    await wait_for(lambda: proxy.generation() >= 2, 10, "reload")
    assert await raw_exchange(proxy.port, preface) == b"plain"
    assert plain.received == [preface]
