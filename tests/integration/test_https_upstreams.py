"""HTTPS upstreams on a real proxy process: servers with `https://` URLs, Traefik's
serversTransports (serverName, rootCAs, insecureSkipVerify, certificates, maxIdleConnsPerHost,
forwardingTimeouts) referenced by `loadBalancer.serversTransport`, the static
`--serversTransport.*` flags as the default transport, and Traefik Mesh's
`mesh.traefik.io/scheme: https` annotation. The backends are real TLS servers (Python's `ssl`
over asyncio) with certificates made in the test by trustme; where Traefik has the behaviour,
the same config runs through the real Traefik binary too."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import h11
import pytest
import trustme

from meshproxy.controller.config_builder import build_config
from meshproxy.controller.ports import PortTable
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.sources.manifests import load_manifests
from meshproxy.controller.topology import build_topology
from tests.helpers import free_port, request, router, wait_for


class TLSBackend:
    """A real HTTPS/1.1 server with keep-alive (h11 on Python's ssl). Each answer is JSON
    describing the connection it came on: the SNI the client sent, the subject of the client
    certificate (when `client_ca` makes one required), and the connection's number, so tests
    see what the proxy's TLS client did. `hold`: seconds to wait before each answer."""

    def __init__(
        self,
        cert: trustme.LeafCert,
        client_ca: trustme.CA | None = None,
        hold: float = 0.0,
        max_version: ssl.TLSVersion | None = None,
    ) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if max_version is not None:
            context.maximum_version = max_version
        cert.configure_cert(context)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            client_ca.configure_trust(context)
        context.sni_callback = self._sni
        self.context = context
        self.hold = hold
        self.snis: dict[int, str | None] = {}
        self.connections = 0  # TCP connections accepted (handshakes that completed)
        self.handshake_failures = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def _sni(self, ssl_object: Any, name: str | None, context: ssl.SSLContext) -> None:
        self.snis[id(ssl_object)] = name

    async def start(self) -> TLSBackend:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=5
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        ssl_object = writer.get_extra_info("ssl_object")
        peer = writer.get_extra_info("peercert") or {}
        subject = dict(item for rdn in peer.get("subject", ()) for item in rdn)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        break
                    continue
                if isinstance(event, h11.EndOfMessage):
                    if self.hold:
                        await asyncio.sleep(self.hold)
                    body = json.dumps(
                        {
                            "sni": self.snis.get(id(ssl_object)),
                            "client": subject.get("organizationalUnitName")
                            or subject.get("commonName"),
                            "connection": number,
                            "version": ssl_object.version(),
                            "cipher": ssl_object.cipher()[0],
                        }
                    ).encode()
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=200,
                                headers=[("Content-Length", str(len(body)))],
                            )
                        )
                    )
                    writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except (ConnectionError, ssl.SSLError, h11.RemoteProtocolError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_backends():
    started: list[TLSBackend] = []

    async def make(*args: Any, **kwargs: Any) -> TLSBackend:
        backend = await TLSBackend(*args, **kwargs).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.close()


def https_config(url: str, transport: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every request on `web` to one https server, through serversTransport `t` if given."""
    service: dict[str, Any] = {"servers": [{"url": url}]}
    config: dict[str, Any] = {
        "http": {
            "routers": {"r": router("PathPrefix(`/`)", "s")},
            "services": {"s": {"loadBalancer": service}},
        }
    }
    if transport is not None:
        service["serversTransport"] = "t"
        config["http"]["serversTransports"] = {"t": transport}
    return config


def pem(blob: trustme.Blob) -> str:
    return blob.bytes().decode()


async def get_json(port: int) -> tuple[int, dict[str, Any] | None]:
    response = await request(port, host="app.test")
    if response.status != 200:
        return response.status, None
    return 200, json.loads(response.body)


async def test_https_server_verified_against_root_cas_from_a_file_and_inline(
    proxy_factory, tls_backends, ca, tmp_path
):
    """Traefik's `rootCAs` (FileOrContent: a file path, or the PEM itself) verify the server
    in place of the system CAs; the URL's host is the name checked (an IP here, which the
    certificate carries as an IP SAN, as Go's verification requires)."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1", "backend.test"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = await proxy_factory(https_config(backend.url, {"rootCAs": [str(ca_file)]}))
    status, info = await get_json(proxy.port)
    assert status == 200 and info is not None
    assert info["sni"] is None  # no SNI for an IP address (RFC 6066 §3), as Go
    proxy.write(https_config(backend.url, {"rootCAs": [pem(ca.cert_pem)]}))
    await wait_for(lambda: proxy.generation() >= 2, 10, "inline PEM config applied")
    assert (await get_json(proxy.port))[0] == 200


async def test_unknown_ca_is_a_502_and_a_log_line(proxy_factory, tls_backends, ca):
    """Without rootCAs the system CAs verify (Traefik's default transport): a certificate from
    the test's own CA fails verification, the client gets 502 and the log says why (issue 12,
    bad input: 'A backend certificate that fails verification: 502, and the reason in the
    log')."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1"))
    proxy = await proxy_factory(https_config(backend.url))
    assert (await request(proxy.port, host="app.test")).status == 502
    await wait_for(
        lambda: "certificate verify failed" in proxy.log_path.read_text(), 10, "the log line"
    )
    assert backend.connections == 0  # the handshake never completed: nothing was sent


async def test_a_hung_tls_handshake_is_a_504_after_10s_with_a_log_line(proxy_factory, ca):
    """A backend that accepts TCP and never speaks TLS: as Traefik 3.7 (checked with the real
    binary, fresh-tcp F-TLS-3: 504 after 10.0 s, with `dialTimeout: 2s` too, Go's
    TLSHandshakeTimeout), the handshake has its own 10 s after the connect that dialTimeout
    bounds, and its timeout is a 504 (it was a silent 502), logged at ERROR."""
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    transport = {"rootCAs": [pem(ca.cert_pem)], "forwardingTimeouts": {"dialTimeout": "2s"}}
    proxy = await proxy_factory(https_config(url, transport))
    try:
        started = asyncio.get_running_loop().time()
        assert (await request(proxy.port, host="app.test", timeout=30)).status == 504
        elapsed = asyncio.get_running_loop().time() - started
        assert 9.5 <= elapsed < 15, elapsed
        await wait_for(
            lambda: (
                " ERROR " in proxy.log_path.read_text()
                and "TLS handshake timeout" in proxy.log_path.read_text()
            ),
            5,
            "the log line",
        )
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_a_tls13_refusal_of_our_missing_client_certificate_is_logged(
    proxy_factory, tls_backends, ca
):
    """Under TLS 1.3 the client's handshake completes before the server checks the client
    certificate (RFC 8446 §4.4.2.4): a server requiring one refuses with a
    `certificate_required` alert that arrives after the request was sent. The client gets
    502 (Traefik 3.7: 502 too) and the log says why at ERROR (Traefik: DEBUG only; it was
    silent here)."""
    # A blocking `ssl` server, as the reporter's: it sends the alert before closing
    # (asyncio's server side aborts a failed handshake without flushing it).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.verify_mode = ssl.CERT_REQUIRED
    trustme.CA().configure_trust(context)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    refused: list[str] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(100)
        except (OSError, ssl.SSLError) as exc:
            refused.append(str(exc))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    try:
        proxy = await proxy_factory(https_config(url, {"rootCAs": [pem(ca.cert_pem)]}))
        assert (await request(proxy.port, host="app.test")).status == 502
        await wait_for(
            lambda: "alert certificate required" in proxy.log_path.read_text(), 10, "the alert"
        )
        log = proxy.log_path.read_text()
        assert " ERROR meshproxy.upstream: backend https://127.0.0.1:" in log
        await asyncio.to_thread(thread.join, 10)
        assert refused and "did not return a certificate" in refused[0]
    finally:
        listener.close()


async def test_insecure_skip_verify_accepts_any_certificate(proxy_factory, tls_backends, ca):
    """`insecureSkipVerify: true` skips chain and name checks (Go's InsecureSkipVerify)."""
    backend = await tls_backends(trustme.CA().issue_cert("somewhere-else.test"))
    proxy = await proxy_factory(https_config(backend.url, {"insecureSkipVerify": True}))
    assert (await get_json(proxy.port))[0] == 200


async def test_server_name_is_the_sni_and_the_verified_name(proxy_factory, tls_backends, ca):
    """`serverName` is both the SNI sent and the name the certificate must carry (Go's
    tls.Config.ServerName): a certificate for `backend.test` only fails for the IP URL
    without it, passes with `serverName: backend.test` (which the backend receives as SNI),
    and fails with another name."""
    backend = await tls_backends(ca.issue_cert("backend.test"))
    roots = [pem(ca.cert_pem)]
    proxy = await proxy_factory(https_config(backend.url, {"rootCAs": roots}))
    assert (await request(proxy.port, host="app.test")).status == 502
    proxy.write(https_config(backend.url, {"rootCAs": roots, "serverName": "backend.test"}))
    await wait_for(lambda: proxy.generation() >= 2, 10, "serverName config applied")
    status, info = await get_json(proxy.port)
    assert status == 200 and info is not None and info["sni"] == "backend.test"
    proxy.write(https_config(backend.url, {"rootCAs": roots, "serverName": "other.test"}))
    await wait_for(lambda: proxy.generation() >= 3, 10, "wrong serverName applied")
    assert (await request(proxy.port, host="app.test")).status == 502
    await wait_for(lambda: "Hostname mismatch" in proxy.log_path.read_text(), 10, "mismatch log")


async def test_client_certificate_for_a_backend_that_requires_one(
    proxy_factory, tls_backends, ca, tmp_path
):
    """mTLS to the backend: a server requiring a client certificate refuses the proxy without
    `certificates` (502), and accepts the one configured (files here), whose subject it
    sees."""
    client_ca = trustme.CA()
    client = client_ca.issue_cert("proxy.mesh", organization_unit_name="mesh-proxy")
    backend = await tls_backends(ca.issue_cert("127.0.0.1"), client_ca=client_ca)
    roots = [pem(ca.cert_pem)]
    proxy = await proxy_factory(https_config(backend.url, {"rootCAs": roots}))
    assert (await request(proxy.port, host="app.test")).status == 502
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    transport = {
        "rootCAs": roots,
        "certificates": [{"certFile": str(cert_file), "keyFile": str(key_file)}],
    }
    proxy.write(https_config(backend.url, transport))
    await wait_for(lambda: proxy.generation() >= 2, 10, "certificates applied")
    status, info = await get_json(proxy.port)
    assert status == 200 and info is not None and info["client"] == "mesh-proxy"


async def test_min_max_version_and_cipher_suites(proxy_factory, tls_backends, ca):
    """Traefik 3.7's `minVersion`, `maxVersion` and `cipherSuites` (Go's names) on a
    serversTransport: against a server that stops at TLS 1.2, `minVersion: VersionTLS13`
    fails (502); `maxVersion: VersionTLS12` with one suite negotiates exactly that suite; an
    unknown version disables the service with the option's path."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1"), max_version=ssl.TLSVersion.TLSv1_2)
    roots = [pem(ca.cert_pem)]
    proxy = await proxy_factory(
        https_config(backend.url, {"rootCAs": roots, "minVersion": "VersionTLS13"})
    )
    assert (await request(proxy.port, host="app.test")).status == 502
    suite = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"  # trustme keys are ECDSA
    transport = {"rootCAs": roots, "maxVersion": "VersionTLS12", "cipherSuites": [suite]}
    proxy.write(https_config(backend.url, transport))
    await wait_for(lambda: proxy.generation() >= 2, 10, "suite config applied")
    status, info = await get_json(proxy.port)
    assert status == 200 and info is not None
    assert (info["version"], info["cipher"]) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    proxy.write(https_config(backend.url, {"rootCAs": roots, "minVersion": "VersionTLS99"}))
    await wait_for(lambda: proxy.generation() >= 3, 10, "bad version applied")
    errors = " ".join(proxy.rawdata()["services"]["s@file"]["error"])
    assert "minVersion: unknown version 'VersionTLS99'" in errors


def uri_cert(ca: trustme.CA, uri: str) -> tuple[str, str]:
    """A server certificate whose only SAN is the URI `uri` (a SPIFFE ID), signed by `ca`;
    (certificate PEM, key PEM). trustme issues DNS, IP and e-mail SANs only."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


class URIBackend(TLSBackend):
    """A TLSBackend whose certificate carries only a URI SAN."""

    def __init__(self, cert_pem: str, key_pem: str, directory: Path) -> None:
        super().__init__(trustme.CA().issue_cert("unused.test"))
        cert_file, key_file = directory / "uri.pem", directory / "uri.key"
        cert_file.write_text(cert_pem)
        key_file.write_text(key_pem)
        self.context.load_cert_chain(str(cert_file), str(key_file))


async def test_peer_cert_uri_checks_the_uri_san_and_the_chain_not_the_name(
    proxy_factory, ca, tmp_path
):
    """Traefik's `peerCertURI` (pkg/tls VerifyPeerCertificate): the certificate must carry that
    URI SAN (a SPIFFE ID here) and chain to the CAs; the host name is not checked (the URL's
    127.0.0.1 is not in the certificate). Another URI fails (502), and so does an unknown CA
    even with insecureSkipVerify, which peerCertURI does not relax."""
    spiffe = "spiffe://mesh.test/ns/demo/sa/web"
    backend = await URIBackend(*uri_cert(ca, spiffe), tmp_path).start()
    roots = [pem(ca.cert_pem)]
    try:
        proxy = await proxy_factory(
            https_config(backend.url, {"rootCAs": roots, "peerCertURI": spiffe})
        )
        assert (await get_json(proxy.port))[0] == 200
        proxy.write(https_config(backend.url, {"rootCAs": roots, "peerCertURI": spiffe + "-other"}))
        await wait_for(lambda: proxy.generation() >= 2, 10, "other URI applied")
        assert (await request(proxy.port, host="app.test")).status == 502
        await wait_for(lambda: "peer certificate mismatch" in proxy.log_path.read_text(), 10)
        proxy.write(https_config(backend.url, {"insecureSkipVerify": True, "peerCertURI": spiffe}))
        await wait_for(lambda: proxy.generation() >= 3, 10, "insecure + URI applied")
        assert (await request(proxy.port, host="app.test")).status == 502
    finally:
        backend.close()


async def test_static_server_transport_flags_are_the_default_transport(
    proxy_factory, tls_backends, ca, tmp_path
):
    """Traefik's static `--serversTransport.rootCAs` applies to every loadBalancer without a
    `serversTransport` and to one naming `default@internal`; a named transport does not
    inherit it (Traefik builds named transports from their own options)."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = https_config(backend.url)
    services = config["http"]["services"]
    services["internal"] = {
        "loadBalancer": {"servers": [{"url": backend.url}], "serversTransport": "default@internal"}
    }
    services["named"] = {
        "loadBalancer": {"servers": [{"url": backend.url}], "serversTransport": "t"}
    }
    config["http"]["serversTransports"] = {"t": {"maxIdleConnsPerHost": 4}}
    routers = config["http"]["routers"]
    routers["internal"] = router("Host(`internal.test`)", "internal")
    routers["named"] = router("Host(`named.test`)", "named")
    proxy = await proxy_factory(config, extra_flags=[f"--serversTransport.rootCAs={ca_file}"])
    assert (await request(proxy.port, host="app.test")).status == 200
    assert (await request(proxy.port, host="internal.test")).status == 200
    assert (await request(proxy.port, host="named.test")).status == 502  # system CAs only


async def test_static_insecure_skip_verify_flag(proxy_factory, tls_backends):
    """`--serversTransport.insecureSkipVerify=true`, Traefik's usual answer for self-signed
    pods, makes the default transport skip verification."""
    backend = await tls_backends(trustme.CA().issue_cert("127.0.0.1"))
    proxy = await proxy_factory(
        https_config(backend.url), extra_flags=["--serversTransport.insecureSkipVerify=true"]
    )
    assert (await get_json(proxy.port))[0] == 200


async def test_a_broken_transport_disables_its_services_with_the_reason(
    proxy_factory, tls_backends, ca
):
    """A rootCAs entry that is neither a file nor PEM, or a key that does not match its
    certificate, disables the services using that transport (their routers: 404), with the
    option's path in /api/rawdata; nothing is verified against an empty pool."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1"))
    proxy = await proxy_factory(https_config(backend.url, {"rootCAs": ["/no/such/ca.pem"]}))
    assert (await request(proxy.port, host="app.test")).status == 404
    errors = proxy.rawdata()["services"]["s@file"]["error"]
    assert "rootCAs[0]" in " ".join(errors) and "/no/such/ca.pem" in " ".join(errors)
    other = trustme.CA().issue_cert("x.test")
    mismatched = {
        "rootCAs": [pem(ca.cert_pem)],
        "certificates": [
            {"certFile": pem(other.cert_chain_pems[0]), "keyFile": pem(ca.private_key_pem)}
        ],
    }
    proxy.write(https_config(backend.url, mismatched))
    await wait_for(lambda: proxy.generation() >= 2, 10, "second config applied")
    errors = proxy.rawdata()["services"]["s@file"]["error"]
    assert "certificates[0]" in " ".join(errors)


async def test_max_idle_conns_per_host_bounds_the_kept_connections(proxy_factory, tls_backends, ca):
    """`maxIdleConnsPerHost` (Go's MaxIdleConnsPerHost): after 4 concurrent requests only that
    many TLS connections stay idle, so a second burst of 4 opens 4 - 1 new ones with 1, and
    none with the default (200)."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1"), hold=0.3)
    roots = [pem(ca.cert_pem)]

    async def burst(port: int) -> None:
        replies = await asyncio.gather(*(request(port, host="app.test") for _ in range(4)))
        assert [r.status for r in replies] == [200] * 4

    proxy = await proxy_factory(
        https_config(backend.url, {"rootCAs": roots, "maxIdleConnsPerHost": 1})
    )
    await burst(proxy.port)
    assert backend.connections == 4
    await burst(proxy.port)
    assert backend.connections == 7
    proxy.write(https_config(backend.url, {"rootCAs": roots}))
    await wait_for(lambda: proxy.generation() >= 2, 10, "default pool size applied")
    await burst(proxy.port)
    opened = backend.connections
    await burst(proxy.port)
    assert backend.connections == opened  # all 4 were kept and reused


async def test_forwarding_timeouts_of_an_https_transport(proxy_factory, tls_backends, ca):
    """`forwardingTimeouts.responseHeaderTimeout` on the transport: a backend slower than it
    is a 504 (Traefik: a timeout net.Error), a faster one a 200."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1"), hold=2.5)
    transport = {
        "rootCAs": [pem(ca.cert_pem)],
        "forwardingTimeouts": {"responseHeaderTimeout": "1s", "dialTimeout": "2s"},
    }
    proxy = await proxy_factory(https_config(backend.url, transport))
    assert (await request(proxy.port, host="app.test", timeout=15)).status == 504
    transport["forwardingTimeouts"]["responseHeaderTimeout"] = "10s"
    proxy.write(https_config(backend.url, transport))
    await wait_for(lambda: proxy.generation() >= 2, 10, "longer timeout applied")
    assert (await request(proxy.port, host="app.test", timeout=15)).status == 200


MESH_MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {{name: secure, namespace: demo, annotations: {{mesh.traefik.io/scheme: https}}}}
spec:
  clusterIP: 10.10.14.9
  ports: [{{name: web, protocol: TCP, port: 443, targetPort: {port}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: secure, namespace: demo}}
subsets:
  - addresses: [{{ip: 127.0.0.1, targetRef: {{kind: Pod, name: pod-s, namespace: demo}}}}]
    ports: [{{name: web, port: {port}, protocol: TCP}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: pod-s, namespace: demo}}
spec: {{serviceAccountName: default, containers: [{{name: app}}]}}
status: {{podIP: 127.0.0.1}}
"""


async def test_mesh_scheme_https_annotation_through_the_default_transport(
    proxy_factory, tls_backends, ca, tmp_path
):
    """Traefik Mesh's `mesh.traefik.io/scheme: https` makes the controller emit `https://`
    server URLs and no TLS options of its own: the proxy's default transport verifies them
    (here with `--serversTransport.rootCAs`), and without it the system CAs refuse the pod's
    certificate (502)."""
    backend = await tls_backends(ca.issue_cert("127.0.0.1"))
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(MESH_MANIFESTS.format(port=backend.port))
    state, errors = load_manifests(manifests)
    assert errors == []
    settings = ControllerSettings()
    tables = {
        "tcp": PortTable(settings.min_tcp_port, settings.max_tcp_port),
        "udp": PortTable(settings.min_udp_port, settings.max_udp_port),
    }
    config = build_config(build_topology(state, settings), settings, tables)
    urls = [
        server["url"]
        for name, service in config["http"]["services"].items()
        if "secure" in name  # the controller's own readiness service is plain http
        for server in service.get("loadBalancer", {}).get("servers", [])
    ]
    assert urls and all(url == backend.url for url in urls)
    assert "serversTransports" not in config["http"]
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    entrypoint = f"127.0.0.1:{free_port()}"
    proxy = await proxy_factory(
        config,
        entrypoints={"http-5000": entrypoint},
        extra_flags=[f"--serversTransport.rootCAs={ca_file}"],
    )
    port = proxy.port_of("http-5000")
    host = "secure.demo.traefik.mesh"
    assert (await request(port, host=host)).status == 200
    unverified = await proxy_factory(config, entrypoints={"http-5000": f"127.0.0.1:{free_port()}"})
    assert (await request(unverified.port_of("http-5000"), host=host)).status == 502


# ---------------------------------------------------------------- against the real Traefik


async def test_same_statuses_as_traefik(tls_backends, ca, tmp_path, proxy_factory):
    """The real Traefik with the same configs: the same answers where the server is accepted
    (rootCAs + serverName, insecureSkipVerify: 200). Where verification fails (unknown CA,
    wrong serverName) Traefik answers 500 (Go's x509 errors are not net.Errors, so its
    ComputeStatusCode falls to 500); meshproxy answers 502, as issue 12 asks and RFC 9110
    §15.6.3 describes (no valid response from the upstream): a documented difference."""
    try:
        from tests.differential.harness import TraefikProcess, TraefikUnavailable, traefik_binary

        traefik_binary()
    except (ImportError, TraefikUnavailable) as exc:
        pytest.skip(f"real Traefik not available: {exc}")
    backend = await tls_backends(ca.issue_cert("backend.test"))
    roots = [pem(ca.cert_pem)]
    cases = {
        "verified": {"rootCAs": roots, "serverName": "backend.test"},
        "unknown-ca": {"serverName": "backend.test"},
        "wrong-name": {"rootCAs": roots, "serverName": "other.test"},
        "insecure": {"insecureSkipVerify": True},
    }
    config: dict[str, Any] = {"http": {"routers": {}, "services": {}, "serversTransports": {}}}
    for name, transport in cases.items():
        config["http"]["routers"][name] = router(f"Host(`{name}.test`)", name)
        config["http"]["services"][name] = {
            "loadBalancer": {"servers": [{"url": backend.url}], "serversTransport": name}
        }
        config["http"]["serversTransports"][name] = transport
    workdir = tmp_path / "traefik"
    workdir.mkdir()
    traefik = await asyncio.to_thread(TraefikProcess(workdir, config).start)
    try:
        proxy = await proxy_factory(config)
        theirs = {n: (await request(traefik.port, host=f"{n}.test")).status for n in cases}
        ours = {n: (await request(proxy.port, host=f"{n}.test")).status for n in cases}
        assert theirs == {"verified": 200, "unknown-ca": 500, "wrong-name": 500, "insecure": 200}
        assert ours == {"verified": 200, "unknown-ca": 502, "wrong-name": 502, "insecure": 200}
    finally:
        traefik.stop()
