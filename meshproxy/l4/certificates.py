"""The certificate store and TLS options of one dynamic configuration: what the proxy serves
when it terminates TLS (meshproxy.l4.tls).

From Traefik's dynamic `tls` section (docs: https/tls.md; pkg/tls/tlsmanager.go):

- `tls.certificates[]`: `certFile`/`keyFile` as paths or as the PEM text itself. Only the
  `default` store exists (as in Traefik, other store names are ignored with a warning).
- `tls.stores.default.defaultCertificate`: served when no certificate names the SNI. Without
  one, a self-signed certificate is generated once per process, as Traefik's
  "TRAEFIK DEFAULT CERT" (so a TLS client always gets a handshake, then a 404).
- `tls.options.<name>`: `minVersion` (default TLS 1.2, as Traefik), `maxVersion`,
  `cipherSuites` (Go's names, mapped to OpenSSL's; they apply to TLS 1.2 and below, as in Go),
  `alpnProtocols` (default `h2`, `http/1.1`; `h2` only when the HTTP/2 server is there),
  `clientAuth` (`caFiles` as paths or PEM, `clientAuthType`: NoClientCert,
  VerifyClientCertIfGiven, RequireAndVerifyClientCert), `sniStrict` (no certificate for the
  SNI: the handshake fails with `unrecognized_name`), `disableSessionTickets`. An option set
  that cannot be built (unknown version or cipher, unreadable CA, a client auth type Python's
  ssl cannot do) is broken: connections that would use it are closed (Traefik's "closing
  route" for broken TLS options), and the error is logged.

Certificate choice per connection: one `ssl.SSLContext` per (options, certificate); the
handshake starts on the options' context holding the default certificate and the
`sni_callback` switches the connection to the context of the certificate that names the SNI:
exact SAN/CN first, then a `*.domain` SAN for one label (RFC 6125 §6.4.3), as Traefik's
`CertificateStore.GetBestCertificate`.

Hot reload: each snapshot has its own store; a connection keeps the context it started its
handshake with, so established connections are untouched and new handshakes use the new
certificates. A store whose inputs (the `tls` section and the files' size and mtime) did not
change is reused, so a reload of unrelated routers does not rebuild contexts.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshproxy.config.dynamic import TLSCertificate, TLSConfig, TLSOptions

log = logging.getLogger("meshproxy.tls")

DEFAULT_OPTIONS = "default"

VERSIONS = {
    "versiontls10": ssl.TLSVersion.TLSv1,
    "versiontls11": ssl.TLSVersion.TLSv1_1,
    "versiontls12": ssl.TLSVersion.TLSv1_2,
    "versiontls13": ssl.TLSVersion.TLSv1_3,
}

# Go's crypto/tls cipher suite names -> OpenSSL's (TLS 1.0-1.2 suites; TLS 1.3 suites are not
# configurable in Go, and their names are accepted and ignored as Go does).
GO_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}

CLIENT_AUTH = {
    "": ssl.CERT_NONE,
    "noclientcert": ssl.CERT_NONE,
    "verifyclientcertifgiven": ssl.CERT_OPTIONAL,
    "requireandverifyclientcert": ssl.CERT_REQUIRED,
}


class CertificateError(Exception):
    """A certificate, key or TLS option set that cannot be used; the message names it."""


def read_pem(value: str, what: str) -> bytes:
    """`value` is PEM text (starts with `-----BEGIN`) or a path to a PEM file."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise CertificateError(f"{what}: cannot read {value!r}: {exc.strerror}") from None


class Certificate:
    """One certificate chain and key, with the names it serves (SAN DNS names, else CN)."""

    __slots__ = ("chain", "key", "names")

    def __init__(self, chain: bytes, key: bytes, what: str) -> None:
        self.chain = chain
        self.key = key
        try:
            leaf = x509.load_pem_x509_certificate(chain)
        except ValueError as exc:
            raise CertificateError(f"{what}: not a PEM certificate: {exc}") from None
        names: list[str] = []
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
        except x509.ExtensionNotFound:
            pass
        if not names:
            names = [
                str(a.value).lower()
                for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            ]
        self.names = tuple(names)

    def load_into(self, ctx: ssl.SSLContext, what: str) -> None:
        """`load_cert_chain` reads files only: PEM text goes through a private temp file."""
        with tempfile.TemporaryDirectory() as tmp:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            with open(cert_path, "wb") as handle:
                handle.write(self.chain)
            with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as handle:
                handle.write(self.key)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise CertificateError(f"{what}: certificate and key unusable: {exc}") from None


_GENERATED: Certificate | None = None


def generated_default() -> Certificate:
    """Traefik's fallback: a self-signed certificate made once per process (EC P-256)."""
    global _GENERATED
    if _GENERATED is None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TRAEFIK DEFAULT CERT")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(key, hashes.SHA256())
        )
        _GENERATED = Certificate(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "generated default certificate",
        )
        _GENERATED.names = ()  # names nothing: only ever the fallback
    return _GENERATED


class OptionContexts:
    """The contexts of one TLS options name: `default` (holding the default certificate,
    where every handshake starts) and one per certificate for the SNI switch."""

    __slots__ = ("by_cert", "default", "exact", "strict", "wildcard")

    def __init__(self, default: ssl.SSLContext, strict: bool) -> None:
        self.default = default
        self.strict = strict
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # ".example.com" -> context
        self.by_cert: list[ssl.SSLContext] = []

    def for_sni(self, name: str) -> ssl.SSLContext | None:
        found = self.exact.get(name)
        if found is None:
            dot = name.find(".")
            if dot > 0:
                found = self.wildcard.get(name[dot:])
        return found

    def sni_callback(self, obj: Any, name: str | None, ctx: ssl.SSLContext) -> int | None:
        """OpenSSL's servername callback: switch to the certificate naming the SNI."""
        chosen = self.for_sni(name.lower()) if name else None
        if chosen is not None:
            obj.context = chosen
            return None
        if self.strict:
            log.info("strict SNI enabled - no certificate found for domain %r", name)
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None


class CertificateStore:
    """Everything TLS termination needs from one dynamic config; see the module docstring.

    `context(options)` gives the SSLContext a handshake starts with (None: those options are
    broken or unknown, close the connection); `errors` lists what was wrong (for logs and the
    API). `h2` says whether `h2` may be offered by ALPN (the HTTP/2 server exists).
    """

    def __init__(self, tls: TLSConfig | None, provider: str, h2: bool = False) -> None:
        self.errors: list[str] = []
        self.h2 = h2
        tls = tls or TLSConfig()
        certificates: list[Certificate] = []
        for i, cert_spec in enumerate(tls.certificates):
            what = f"tls.certificates[{i}]"
            for store in cert_spec.stores:
                if store != "default":
                    self.errors.append(f"{what}: store {store!r} ignored (only default exists)")
            try:
                certificates.append(_load(cert_spec, what))
            except CertificateError as exc:
                self.errors.append(str(exc))
        default_cert: Certificate | None = None
        default_store = tls.stores.get("default")
        for store_name in tls.stores:
            if store_name != "default":
                self.errors.append(
                    f"tls.stores.{store_name}: ignored (only the default store exists)"
                )
        if default_store is not None and default_store.default_certificate is not None:
            try:
                default_cert = _load(
                    default_store.default_certificate, "tls.stores.default.defaultCertificate"
                )
            except CertificateError as exc:
                self.errors.append(str(exc))
        self.has_default = True
        self.default_certificate = default_cert or generated_default()
        self.certificates = certificates
        self.options: dict[str, OptionContexts | None] = {}
        specs = dict(tls.options)
        specs.setdefault(DEFAULT_OPTIONS, TLSOptions())
        for name, spec in specs.items():
            qualified = name if name == DEFAULT_OPTIONS else f"{name}@{provider}"
            try:
                self.options[qualified] = self._build(spec, f"tls.options.{name}")
            except CertificateError as exc:
                self.errors.append(str(exc))
                self.options[qualified] = None
        for error in self.errors:
            log.error("%s", error)

    def context(self, options: str) -> OptionContexts | None:
        return self.options.get(options)

    def _build(self, spec: TLSOptions, what: str) -> OptionContexts:
        def make(cert: Certificate) -> ssl.SSLContext:
            ctx = _context(spec, what, self.h2)
            cert.load_into(ctx, what)
            return ctx

        contexts = OptionContexts(make(self.default_certificate), bool(spec.sni_strict))
        for cert in self.certificates:
            ctx = make(cert)
            ctx.sni_callback = None
            contexts.by_cert.append(ctx)
            for name in cert.names:
                if name.startswith("*."):
                    contexts.wildcard.setdefault(name[1:], ctx)
                else:
                    contexts.exact.setdefault(name, ctx)
        contexts.default.sni_callback = contexts.sni_callback
        return contexts


def _load(spec: TLSCertificate, what: str) -> Certificate:
    if not spec.cert_file or not spec.key_file:
        raise CertificateError(f"{what}: certFile and keyFile are both required")
    chain = read_pem(spec.cert_file, f"{what}.certFile")
    key = read_pem(spec.key_file, f"{what}.keyFile")
    cert = Certificate(chain, key, what)
    # Checked here, alone, so a bad pair is dropped with its own path instead of breaking
    # every option set it would be loaded into.
    cert.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), what)
    return cert


def _context(spec: TLSOptions, what: str, h2: bool) -> ssl.SSLContext:
    """An SSLContext for server-side termination with the options `spec`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    minimum = VERSIONS.get((spec.min_version or "VersionTLS12").lower())
    if minimum is None:
        raise CertificateError(f"{what}.minVersion: unknown version {spec.min_version!r}")
    ctx.minimum_version = minimum
    if spec.max_version:
        maximum = VERSIONS.get(spec.max_version.lower())
        if maximum is None:
            raise CertificateError(f"{what}.maxVersion: unknown version {spec.max_version!r}")
        ctx.maximum_version = maximum
    if spec.cipher_suites:
        names = []
        for suite in spec.cipher_suites:
            if suite in TLS13_SUITES:
                continue
            mapped = GO_CIPHERS.get(suite)
            if mapped is None:
                raise CertificateError(f"{what}.cipherSuites: unknown cipher suite {suite!r}")
            names.append(mapped)
        if names:
            try:
                ctx.set_ciphers(":".join(names))
            except ssl.SSLError:
                raise CertificateError(
                    f"{what}.cipherSuites: none of {spec.cipher_suites} is available"
                ) from None
    alpn = spec.alpn_protocols if spec.alpn_protocols is not None else ["h2", "http/1.1"]
    offered = [p for p in alpn if p != "acme-tls/1" and (h2 or p != "h2")]
    if offered:
        ctx.set_alpn_protocols(offered)
    if spec.disable_session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    auth = spec.client_auth
    if auth is not None:
        kind = (auth.client_auth_type or "").lower()
        mode = CLIENT_AUTH.get(kind)
        if mode is None:
            raise CertificateError(
                f"{what}.clientAuth.clientAuthType: {auth.client_auth_type!r} is not supported "
                "(NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert are)"
            )
        if mode != ssl.CERT_NONE:
            if not auth.ca_files:
                raise CertificateError(f"{what}.clientAuth.caFiles: required to verify clients")
            for i, ca in enumerate(auth.ca_files):
                pem = read_pem(ca, f"{what}.clientAuth.caFiles[{i}]")
                try:
                    ctx.load_verify_locations(cadata=pem.decode())
                except (ssl.SSLError, ValueError) as exc:
                    raise CertificateError(
                        f"{what}.clientAuth.caFiles[{i}]: not PEM certificates: {exc}"
                    ) from None
        ctx.verify_mode = mode
    if spec.curve_preferences:
        log.warning("%s.curvePreferences: not applied (OpenSSL's defaults are used)", what)
    return ctx


_CACHE: dict[str, tuple[bytes, tuple[Any, ...], CertificateStore]] = {}


def store_for(tls: TLSConfig | None, provider: str, h2: bool) -> CertificateStore:
    """The store of a config's `tls` section: reused while the section and the files it
    names (size, mtime) are unchanged, rebuilt otherwise (hot reload)."""
    key = msgspec.json.encode(tls) + (b"h2" if h2 else b"")
    stamps = tuple(_stamp(path) for path in _paths(tls))
    cached = _CACHE.get(provider)
    if cached is not None and cached[0] == key and cached[1] == stamps:
        return cached[2]
    store = CertificateStore(tls, provider, h2)
    _CACHE[provider] = (key, stamps, store)
    return store


def _paths(tls: TLSConfig | None) -> Sequence[str]:
    if tls is None:
        return ()
    specs = list(tls.certificates)
    specs += [s.default_certificate for s in tls.stores.values() if s.default_certificate]
    paths = [p for s in specs for p in (s.cert_file, s.key_file)]
    paths += [ca for o in tls.options.values() if o.client_auth for ca in o.client_auth.ca_files]
    return [p for p in paths if p and not p.lstrip().startswith("-----BEGIN")]


def _stamp(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, st.st_size, st.st_mtime_ns)
