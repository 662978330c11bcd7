"""Traefik's serversTransports: from the configuration to `TransportSettings` and SSL contexts.

A service's `loadBalancer.serversTransport` names an `http.serversTransports` entry (`name`,
`name@provider`, or `default@internal` for the static default); without one, the static
`serversTransport.*` options are the default transport, as in Traefik. Every option of a
transport is resolved here once per configuration, when it is compiled:

- `serverName`: the SNI sent and the name the server certificate must carry (Go's
  `tls.Config.ServerName` does both); unset, the server URL's host (no SNI for an IP address,
  whose certificate must then carry that IP, as Go does).
- `rootCAs`: the CAs that verify the server, *instead of* the system's (Go's `RootCAs` pool
  replaces the system pool). Each entry is Traefik's FileOrContent: a path to an existing file
  is read, any other value is the PEM itself. Unset: the system CAs (`load_default_certs`).
- `insecureSkipVerify`: no verification at all (neither chain nor name).
- `certificates`: `[{certFile, keyFile}]`, the client certificate presented to a server that
  asks for one (mTLS), FileOrContent each. Python's `ssl` holds one chain per context, so the
  first entry is presented (Go would pick among several by the server's accepted CAs).
- `minVersion`, `maxVersion`, `cipherSuites` (Go's names, as Traefik 3.7 accepts them).
- `peerCertURI`: the chain is verified (even with insecureSkipVerify) but not the name; the
  certificate must carry that URI SAN (a SPIFFE ID, typically), checked after the handshake.
- `maxIdleConnsPerHost` (200 when unset or 0; negative keeps none idle, as Go),
  `forwardingTimeouts` `dialTimeout` (30 s), `responseHeaderTimeout` (60 s, see
  `TransportSettings`), `idleConnTimeout` (90 s), `readIdleTimeout` and `pingTimeout` (HTTP/2
  health pings, for the h2 pools). A named transport starts from these defaults, not from the
  static transport's values, as Traefik's `SetDefaults` does.

A file that cannot be read, a PEM that does not parse, a key that does not match its
certificate, or an option meshproxy does not implement (`spiffe`) is a
`TransportError`: the compiler disables the services that use the transport (the static one
stops the start), instead of silently verifying against nothing.

SSL contexts are built once per distinct TLS setup and shared by every pool and connection that
uses it (`client_context`, `tls_context`): loading CAs costs milliseconds, a handshake must not.
Python's `ssl` cannot load a client certificate from memory, so `load_cert_chain` reads it from
a private temporary directory that is removed at once.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshproxy.http.upstream import TransportSettings

log = logging.getLogger("meshproxy.transports")

# Go's http.Transport and tls.Dialer give a TLS handshake 10 s (Traefik's transport.go).
TLS_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_IDLE_PER_HOST = 200  # Traefik's static serversTransport.maxIdleConnsPerHost
HTTP1_ALPN = ("http/1.1",)

_MAX_CONTEXTS = 128  # distinct TLS setups kept; a config has a handful
_CONTEXTS: OrderedDict[tuple[Any, ...], ssl.SSLContext] = OrderedDict()


class TransportError(ValueError):
    """A serversTransport that cannot be used; the message names the option's path."""


@dataclass(frozen=True)
class ClientTLS:
    """TLS from the proxy to a server, resolved (PEM texts, not file names): what an SSL
    context is built from, plus the name to send and verify. Hashable."""

    server_name: str | None = None
    insecure_skip_verify: bool = False
    root_cas: tuple[str, ...] = ()
    certificates: tuple[tuple[str, str], ...] = ()
    min_version: str = ""
    max_version: str = ""
    cipher_suites: tuple[str, ...] = ()
    peer_cert_uri: str = ""


def file_or_content(value: str, path: str) -> str:
    """Traefik's FileOrContent (pkg/types/file_or_content.go): a value naming an existing file
    is that file's content, any other value is the content itself. Raises TransportError."""
    if not value:
        raise TransportError(f"{path}: empty value")
    if os.path.isfile(value):  # False (not an error) for a PEM text, however long
        try:
            with open(value, encoding="utf-8") as file:
                return file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise TransportError(f"{path}: cannot read {value}: {exc}") from None
    if value.lstrip().startswith("-----BEGIN"):
        return value
    raise TransportError(f"{path}: {value!r} is neither an existing file nor PEM content")


def resolve_root_cas(values: Sequence[str] | None, path: str) -> tuple[str, ...]:
    return tuple(file_or_content(v, f"{path}[{i}]") for i, v in enumerate(values or ()))


def resolve_certificates(
    certificates: Sequence[Any] | None, path: str
) -> tuple[tuple[str, str], ...]:
    """`[{certFile, keyFile}]` -> ((certificate PEM, key PEM), ...)."""
    out = []
    for index, cert in enumerate(certificates or ()):
        where = f"{path}[{index}]"
        out.append(
            (
                file_or_content(cert.cert_file, f"{where}.certFile"),
                file_or_content(cert.key_file, f"{where}.keyFile"),
            )
        )
    return tuple(out)


def _unsupported(options: Any, path: str) -> None:
    if getattr(options, "spiffe", None) is not None:
        raise TransportError(f"{path}.spiffe: SPIFFE is not supported by meshproxy")


def _seconds(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def http_transport(options: Any, path: str) -> TransportSettings:
    """An `http.serversTransports` entry (config.dynamic.ServersTransport) as settings; its
    SSL context is built now, so a broken CA or key is reported with the config. Raises
    TransportError naming `path` and the option."""
    _unsupported(options, path)
    defaults = TransportSettings()
    timeouts = options.forwarding_timeouts
    tls = ClientTLS(
        server_name=options.server_name or None,
        insecure_skip_verify=bool(options.insecure_skip_verify),
        root_cas=resolve_root_cas(options.root_c_as, f"{path}.rootCAs"),
        certificates=resolve_certificates(options.certificates, f"{path}.certificates"),
        min_version=options.min_version or "",
        max_version=options.max_version or "",
        cipher_suites=tuple(options.cipher_suites or ()),
        peer_cert_uri=options.peer_cert_uri or "",
    )
    settings = TransportSettings(
        dial_timeout=_seconds(timeouts and timeouts.dial_timeout, defaults.dial_timeout),
        response_header_timeout=_seconds(
            timeouts and timeouts.response_header_timeout, defaults.response_header_timeout
        ),
        idle_conn_timeout=_seconds(
            timeouts and timeouts.idle_conn_timeout, defaults.idle_conn_timeout
        ),
        read_idle_timeout=_seconds(
            timeouts and timeouts.read_idle_timeout, defaults.read_idle_timeout
        ),
        ping_timeout=_seconds(timeouts and timeouts.ping_timeout, defaults.ping_timeout),
        max_idle_per_host=options.max_idle_conns_per_host or DEFAULT_MAX_IDLE_PER_HOST,
        insecure_skip_verify=tls.insecure_skip_verify,
        server_name=tls.server_name,
        root_cas=tls.root_cas,
        certificates=tls.certificates,
        min_version=tls.min_version,
        max_version=tls.max_version,
        cipher_suites=tls.cipher_suites,
        peer_cert_uri=tls.peer_cert_uri,
        disable_http2=bool(options.disable_http2),
    )
    tls_context(tls, HTTP1_ALPN, path)
    return settings


def default_transport(static: Any) -> TransportSettings:
    """The static `serversTransport` (config.static.ServersTransportStatic or None): the
    transport of every loadBalancer without a `serversTransport`, and `default@internal`.
    Raises TransportError (a start-up error)."""
    defaults = TransportSettings()
    if static is None:
        return defaults
    _unsupported(static, "serversTransport")
    timeouts = static.forwarding_timeouts
    root_cas = resolve_root_cas(static.root_c_as, "serversTransport.rootCAs")
    settings = TransportSettings(
        dial_timeout=_seconds(timeouts and timeouts.dial_timeout, defaults.dial_timeout),
        response_header_timeout=_seconds(
            timeouts and timeouts.response_header_timeout, defaults.response_header_timeout
        ),
        idle_conn_timeout=_seconds(
            timeouts and timeouts.idle_conn_timeout, defaults.idle_conn_timeout
        ),
        read_idle_timeout=_seconds(
            timeouts and timeouts.read_idle_timeout, defaults.read_idle_timeout
        ),
        ping_timeout=_seconds(timeouts and timeouts.ping_timeout, defaults.ping_timeout),
        max_idle_per_host=static.max_idle_conns_per_host or DEFAULT_MAX_IDLE_PER_HOST,
        insecure_skip_verify=bool(static.insecure_skip_verify),
        root_cas=root_cas,
    )
    tls_context(client_tls(settings), HTTP1_ALPN, "serversTransport")
    return settings


def client_tls(settings: TransportSettings) -> ClientTLS:
    return ClientTLS(
        settings.server_name,
        settings.insecure_skip_verify,
        settings.root_cas,
        settings.certificates,
        settings.min_version,
        settings.max_version,
        settings.cipher_suites,
        settings.peer_cert_uri,
    )


def client_context(
    settings: TransportSettings, alpn: tuple[str, ...] = HTTP1_ALPN
) -> ssl.SSLContext:
    """The SSL context of an HTTPS pool with these settings (shared, built once). `alpn`:
    the protocols offered (HTTP/1.1 pools offer only `http/1.1`; an h2 pool passes its own)."""
    return tls_context(client_tls(settings), alpn, "serversTransport")


def tls_context(tls: ClientTLS, alpn: tuple[str, ...] = (), path: str = "tls") -> ssl.SSLContext:
    """The client SSL context for `tls` offering `alpn` (none: no ALPN extension), from the
    cache or built now. Raises TransportError naming `path`."""
    key = (
        tls.insecure_skip_verify,
        tls.root_cas,
        tls.certificates,
        tls.min_version,
        tls.max_version,
        tls.cipher_suites,
        bool(tls.peer_cert_uri),
        alpn,
    )
    context = _CONTEXTS.get(key)
    if context is not None:
        _CONTEXTS.move_to_end(key)
        return context
    context = _build_context(tls, alpn, path)
    _CONTEXTS[key] = context
    if len(_CONTEXTS) > _MAX_CONTEXTS:
        _CONTEXTS.popitem(last=False)
    return context


def _build_context(tls: ClientTLS, alpn: tuple[str, ...], path: str) -> ssl.SSLContext:
    # PROTOCOL_TLS_CLIENT: hostname checking and CERT_REQUIRED on, TLS 1.2 minimum, as Go.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.peer_cert_uri:
        # Traefik's peerCertURI: the chain is verified (even with insecureSkipVerify), the
        # name is not; the URI SAN is checked after the handshake (check_peer_uri).
        context.check_hostname = False
    if tls.insecure_skip_verify and not tls.peer_cert_uri:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.root_cas:
        for index, pem in enumerate(tls.root_cas):
            try:
                context.load_verify_locations(cadata=pem)
            except (ssl.SSLError, ValueError) as exc:
                raise TransportError(
                    f"{path}.rootCAs[{index}]: not a PEM certificate: {exc}"
                ) from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificates:
        if len(tls.certificates) > 1:
            log.warning(
                "%s.certificates: %d client certificates given; the first is presented",
                path,
                len(tls.certificates),
            )
        cert, key = tls.certificates[0]
        _load_chain(context, cert, key, f"{path}.certificates[0]")
    _versions_and_ciphers(context, tls, path)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def check_peer_uri(transport: Any, uri: str) -> None:
    """Traefik's peerCertURI (pkg/tls VerifyPeerCertificate): the server certificate must carry
    a URI SAN equal to `uri` (case-insensitive). Raises ssl.SSLCertVerificationError."""
    cert = transport.get_extra_info("peercert") or {}
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    if not any(value.lower() == uri.lower() for value in uris):
        raise ssl.SSLCertVerificationError(
            f"peer certificate mismatch: no URI SAN {uri!r} (has {uris or 'none'})"
        )


def _versions_and_ciphers(context: ssl.SSLContext, tls: ClientTLS, path: str) -> None:
    """`minVersion`, `maxVersion`, `cipherSuites` with Go's names (the tables E's server side
    uses, meshproxy.l4.certificates); TLS 1.3 suites are not configurable, as in Go."""
    from meshproxy.l4.certificates import GO_CIPHERS, TLS13_SUITES, VERSIONS

    for option, value in (("minVersion", tls.min_version), ("maxVersion", tls.max_version)):
        if not value:
            continue
        version = VERSIONS.get(value.lower())
        if version is None:
            raise TransportError(f"{path}.{option}: unknown version {value!r}")
        if option == "minVersion":
            context.minimum_version = version
        else:
            context.maximum_version = version
    names = []
    for suite in tls.cipher_suites:
        if suite in TLS13_SUITES:
            continue
        mapped = GO_CIPHERS.get(suite)
        if mapped is None:
            raise TransportError(f"{path}.cipherSuites: unknown cipher suite {suite!r}")
        names.append(mapped)
    if names:
        try:
            context.set_ciphers(":".join(names))
        except ssl.SSLError:
            raise TransportError(f"{path}.cipherSuites: none of them is available") from None


def _load_chain(context: ssl.SSLContext, cert: str, key: str, path: str) -> None:
    """`load_cert_chain` from PEM texts: ssl reads only files, so they are written to a
    directory only this process can read, and removed right after."""
    with tempfile.TemporaryDirectory(prefix="meshproxy-tls-") as directory:
        cert_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        for name, text in ((cert_path, cert), (key_path, key)):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise TransportError(
                f"{path}: the certificate and key cannot be used together: {exc}"
            ) from None
