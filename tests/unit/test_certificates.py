"""The certificate store (meshproxy.l4.certificates) built from Traefik's dynamic `tls`
section: certificates from files or inline PEM, the names they serve, certificate choice by
SNI (exact, then `*.domain` for one label: RFC 6125 §6.4.3), TLS options mapped to OpenSSL,
every error naming its option path, and reuse/rebuild across reloads. Handshakes are real
(OpenSSL through MemoryBIO pairs), never mocked."""

from __future__ import annotations

import os
import ssl

import pytest
import trustme

from meshproxy.config.decode import ConfigDecodeError
from meshproxy.config.dynamic import decode_dynamic_obj
from meshproxy.l4.certificates import CertificateStore, store_for

CA = trustme.CA()


def inline(*hosts: str, ca: trustme.CA = CA, common_name: str | None = None) -> dict[str, str]:
    cert = ca.issue_cert(*hosts, common_name=common_name)
    return {
        "certFile": cert.cert_chain_pems[0].bytes().decode(),
        "keyFile": cert.private_key_pem.bytes().decode(),
    }


def store(tls: dict) -> CertificateStore:
    config = decode_dynamic_obj({"tls": tls})
    return CertificateStore(config.tls, "file")


def handshake(
    context: ssl.SSLContext, sni: str | None, client: ssl.SSLContext | None = None
) -> ssl.SSLObject:
    """A full handshake between a client and `context` over memory BIOs; returns the
    client's SSLObject (its peer certificate, version, cipher)."""
    if client is None:
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname=sni)
    srv = context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (cli, srv):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if cli.version() and srv.version():
            try:
                cli.do_handshake()
                srv.do_handshake()
            except ssl.SSLWantReadError:
                continue
            return cli
    raise AssertionError("handshake did not finish")


def served(obj: ssl.SSLObject) -> list[str]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(obj.getpeercert(binary_form=True))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.DNSName)


def test_certificate_by_sni_exact_then_one_label_wildcard_else_default(tmp_path):
    """Traefik's GetBestCertificate: an exact SAN wins over a wildcard; `*.svc.test`
    serves one label only; no match gets the default store's certificate. certFile/keyFile
    as files and as inline PEM."""
    files = CA.issue_cert("api.svc.test")
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    files.cert_chain_pems[0].write_to_path(str(cert_path))
    files.private_key_pem.write_to_path(str(key_path))
    s = store(
        {
            "certificates": [
                {"certFile": str(cert_path), "keyFile": str(key_path)},
                inline("*.svc.test"),
            ],
            "stores": {"default": {"defaultCertificate": inline("fallback.test")}},
        }
    )
    assert s.errors == []
    contexts = s.context("default")
    assert contexts is not None
    assert served(handshake(contexts.default, "api.svc.test")) == ["api.svc.test"]
    assert served(handshake(contexts.default, "web.svc.test")) == ["*.svc.test"]
    assert served(handshake(contexts.default, "a.b.svc.test")) == ["fallback.test"]
    assert served(handshake(contexts.default, None)) == ["fallback.test"]


def test_common_name_serves_when_there_is_no_san():
    """A certificate without SAN DNS names is chosen by its CN (as Go's x509 names
    it in Traefik's store)."""
    cert = CA.issue_cert("127.0.0.1", common_name="legacy.test")  # an IP SAN only
    s = store(
        {
            "certificates": [
                {
                    "certFile": cert.cert_chain_pems[0].bytes().decode(),
                    "keyFile": cert.private_key_pem.bytes().decode(),
                }
            ]
        }
    )
    contexts = s.context("default")
    assert contexts is not None and contexts.for_sni("legacy.test") is not None


def test_without_a_default_certificate_one_is_generated_as_traefik():
    """No defaultCertificate: a self-signed TRAEFIK DEFAULT CERT, made once per process."""
    s = store({})
    contexts = s.context("default")
    assert contexts is not None
    obj = handshake(contexts.default, "x.test")
    from cryptography import x509

    cert = x509.load_der_x509_certificate(obj.getpeercert(binary_form=True))
    assert "TRAEFIK DEFAULT CERT" in cert.subject.rfc4514_string()
    assert store({}).default_certificate is s.default_certificate


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"certificates": [{"certFile": "/nonexistent.pem", "keyFile": "/k"}]},
         "tls.certificates[0].certFile: cannot read '/nonexistent.pem'"),
        ({"certificates": [{"certFile": "-----BEGIN CERTIFICATE-----\nxx", "keyFile": "x"}]},
         "tls.certificates[0].keyFile: cannot read"),
        ({"certificates": [{"certFile": inline("a.test")["certFile"],
                            "keyFile": inline("b.test")["keyFile"]}]},
         "certificate and key unusable"),
        ({"options": {"o": {"minVersion": "VersionTLS14"}}},
         "tls.options.o.minVersion: unknown version 'VersionTLS14'"),
        ({"options": {"o": {"cipherSuites": ["TLS_FAKE"]}}},
         "tls.options.o.cipherSuites: unknown cipher suite 'TLS_FAKE'"),
        ({"options": {"o": {"clientAuth": {"clientAuthType": "RequireAnyClientCert"}}}},
         "tls.options.o.clientAuth.clientAuthType: 'RequireAnyClientCert' is not supported"),
        ({"options": {"o": {"clientAuth": {"clientAuthType": "RequireAndVerifyClientCert"}}}},
         "tls.options.o.clientAuth.caFiles: required"),
        ({"stores": {"other": {}}}, "tls.stores.other: ignored"),
    ],
)  # fmt: skip
def test_errors_name_their_option(tls, error):
    """Every problem names the option it comes from; broken options give no context (their
    connections are closed), the others keep working."""
    s = store(tls)
    assert any(error in e for e in s.errors), s.errors
    assert s.context("default") is not None
    if "options" in tls:
        assert s.context("o@file") is None


def test_options_are_qualified_and_client_auth_verifies():
    """Options other than `default` are named per provider (`o@file`); clientAuth
    RequireAndVerifyClientCert refuses a client without a certificate from caFiles."""
    client_ca = trustme.CA()
    s = store(
        {
            "certificates": [inline("m.test")],
            "options": {
                "o": {
                    "clientAuth": {
                        "caFiles": [client_ca.cert_pem.bytes().decode()],
                        "clientAuthType": "RequireAndVerifyClientCert",
                    }
                }
            },
        }
    )
    contexts = s.context("o@file")
    assert contexts is not None and s.context("o") is None
    good = ssl.create_default_context()
    CA.configure_trust(good)
    client_ca.issue_cert("client.test").configure_cert(good)
    assert served(handshake(contexts.default, "m.test", good)) == ["m.test"]
    assert contexts.for_sni("m.test").verify_mode == ssl.CERT_REQUIRED


def test_store_reused_while_unchanged_rebuilt_when_a_file_changes(tmp_path):
    """Hot reload: an unchanged tls section and unchanged files give the same store (its
    contexts and session keys kept); a certificate file rewritten gives a new one."""
    cert = CA.issue_cert("r.test")
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    tls = decode_dynamic_obj(
        {"tls": {"certificates": [{"certFile": str(cert_path), "keyFile": str(key_path)}]}}
    ).tls
    first = store_for(tls, "reuse-test", False)
    assert store_for(tls, "reuse-test", False) is first
    other = CA.issue_cert("r.test")
    other.cert_chain_pems[0].write_to_path(str(cert_path))
    other.private_key_pem.write_to_path(str(key_path))
    stat = os.stat(cert_path)
    os.utime(cert_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert store_for(tls, "reuse-test", False) is not first


def test_tls_section_decoding_errors_have_their_path():
    """The typed `tls` section: unknown keys and wrong types are rejected with their
    JSON path, like the rest of the dynamic config."""
    with pytest.raises(ConfigDecodeError) as info:
        decode_dynamic_obj({"tls": {"options": {"x": {"sniStrict": True, "bogus": 1}}}})
    assert "tls.options.x.bogus" in str(info.value)
    with pytest.raises(ConfigDecodeError) as info:
        decode_dynamic_obj({"tls": {"certificates": "nope"}})
    assert "tls" in str(info.value)
