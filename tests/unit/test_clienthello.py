"""The ClientHello reader (meshproxy.l4.clienthello) on real ClientHellos written by Python's
ssl (OpenSSL) through a MemoryBIO, split over every possible TCP segment boundary and over
several TLS records (RFC 8446 §5.1), checked against what OpenSSL's own server side reads
from the same bytes (sni_callback, selected ALPN); and on crafted and random bytes, which
must be refused with ClientHelloError and nothing else, within the bounds."""

from __future__ import annotations

import itertools
import ssl
import struct

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.l4.clienthello import (
    MAX_HELLO_BYTES,
    MAX_RECORD,
    MAX_RECORDS,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    parse_client_hello,
)


def real_client_hello(
    server_hostname: str | None = "api.example.com",
    alpn: list[str] | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight OpenSSL's client sends: one TLS record holding a ClientHello."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def openssl_server_view(data: bytes, alpn: list[str]) -> tuple[str | None, str | None]:
    """What OpenSSL's server side reads from the same bytes: the SNI its sni_callback gets
    and the protocol it selects from `alpn` (an independent parser to compare with)."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.example.com").configure_cert(ctx)
    ctx.set_alpn_protocols(alpn)
    seen: list[str | None] = []
    ctx.sni_callback = lambda obj, name, context: seen.append(name)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(data)
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    return (seen[0] if seen else None), server.selected_alpn_protocol()


def records_of(data: bytes) -> list[bytes]:
    """The fragments of the TLS records in `data`."""
    out = []
    while data:
        length = struct.unpack("!H", data[3:5])[0]
        out.append(data[5 : 5 + length])
        data = data[5 + length :]
    return out


def reframe(data: bytes, cuts: list[int]) -> bytes:
    """The same handshake bytes as `data`, re-split into records at the offsets `cuts` of
    the handshake layer (RFC 8446 §5.1 lets a message span records)."""
    handshake = b"".join(records_of(data))
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(handshake))), len(handshake)]
    return b"".join(
        b"\x16\x03\x01" + struct.pack("!H", b - a) + handshake[a:b]
        for a, b in itertools.pairwise(bounds)
    )


def record(fragment: bytes, kind: int = 0x16) -> bytes:
    return bytes([kind, 3, 1]) + struct.pack("!H", len(fragment)) + fragment


def crafted_hello(extensions: list[tuple[int, bytes]] | None, session: bytes = b"") -> bytes:
    """A ClientHello record built field by field (RFC 8446 §4.1.2), for inputs OpenSSL
    will not write."""
    body = b"\x03\x03" + b"\x11" * 32 + bytes([len(session)]) + session
    body += b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is not None:
        ext = b"".join(struct.pack("!HH", k, len(v)) + v for k, v in extensions)
        body += struct.pack("!H", len(ext)) + ext
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return record(message)


def sni_ext(*names: tuple[int, bytes]) -> tuple[int, bytes]:
    entries = b"".join(bytes([t]) + struct.pack("!H", len(n)) + n for t, n in names)
    return 0, struct.pack("!H", len(entries)) + entries


def alpn_ext(*protocols: bytes) -> tuple[int, bytes]:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    return 16, struct.pack("!H", len(entries)) + entries


HELLO = real_client_hello("api.example.com", ["h2", "http/1.1"])


def test_real_hello_gives_sni_and_alpn_as_openssl_reads_them():
    """RFC 6066 §3 / RFC 7301 §3.1: the names our reader finds are the ones OpenSSL's server
    side finds in the same bytes (its sni_callback and ALPN selection)."""
    hello = parse_client_hello(HELLO)
    assert hello == ClientHello("api.example.com", ("h2", "http/1.1"), 0x0303, len(HELLO))
    assert openssl_server_view(HELLO, ["h2", "http/1.1"]) == ("api.example.com", "h2")


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls12_and_tls13_hellos_and_no_extensions_of_interest(maximum):
    """Both versions' hellos (legacy_version 0x0303, RFC 8446 §4.1.2); no SNI (a client that
    connects by IP address, RFC 6066 §3: literal addresses are not sent) and no ALPN give
    "" and ()."""
    assert parse_client_hello(real_client_hello(None, None, maximum)).server_name == ""
    hello = parse_client_hello(real_client_hello("db.internal", ["postgresql"], maximum))
    assert (hello.server_name, hello.alpn) == ("db.internal", ("postgresql",))
    assert parse_client_hello(real_client_hello("127.0.0.1")).server_name == ""


def test_sni_lower_cased_as_traefik_reads_it():
    """Traefik lower-cases the SNI before matching HostSNI (pkg/muxer/tcp NewConnData)."""
    assert parse_client_hello(crafted_hello([sni_ext((0, b"API.Example.COM"))])).server_name == (
        "api.example.com"
    )


def test_every_tcp_segment_boundary():
    """A ClientHello may arrive in any number of TCP segments: cut at every byte, in two
    parts, and fed one byte at a time, the result is the same; before the last byte the
    reader always asks for more (None)."""
    expected = parse_client_hello(HELLO)
    for cut in range(1, len(HELLO)):
        reader = ClientHelloReader()
        assert reader.feed(HELLO[:cut]) is None
        assert reader.feed(HELLO[cut:]) == expected
    reader = ClientHelloReader()
    results = [reader.feed(HELLO[i : i + 1]) for i in range(len(HELLO))]
    assert results[:-1] == [None] * (len(HELLO) - 1)
    assert results[-1] == expected


def test_every_record_boundary_and_byte_by_byte_on_top():
    """RFC 8446 §5.1: a handshake message MAY be fragmented across several records. Cut
    into two records at every handshake offset, and into many small records, OpenSSL's
    server still reads it, and so do we; `size` counts the raw bytes of all records."""
    length = len(b"".join(records_of(HELLO)))
    for cut in range(1, length):
        data = reframe(HELLO, [cut])
        hello = parse_client_hello(data)
        assert hello is not None and hello.server_name == "api.example.com", cut
        assert hello.alpn == ("h2", "http/1.1") and hello.size == len(data)
    many = reframe(HELLO, list(range(0, length, 37)))
    assert openssl_server_view(many, ["h2"]) == ("api.example.com", "h2")
    reader = ClientHelloReader()
    results = [reader.feed(many[i : i + 1]) for i in range(len(many))]
    assert results[-1] is not None and results[-1].server_name == "api.example.com"
    assert results[:-1] == [None] * (len(many) - 1)


def test_bytes_after_the_hello_are_not_needed():
    """The reader answers at the end of the record that completes the ClientHello; what
    follows (early data, the next flight) is the caller's to replay."""
    hello = ClientHelloReader().feed(HELLO + b"\x17\x03\x03\x00\x05hello")
    assert hello is not None and hello.size == len(HELLO)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "record type"),
        (b"\x16\x02\x00", "not TLS"),
        (b"\x16\x03\x01\x00\x00", "zero-length"),
        (b"\x16\x03\x01" + struct.pack("!H", MAX_RECORD + 1), "exceeds 2\\^14"),
        (record(b"\x02\x00\x00\x00"), "not client_hello"),
        (record(b"\x01" + (MAX_HELLO_BYTES + 1).to_bytes(3, "big")), "exceeds"),
        (record(b"\x01\x00") + record(b"\x00\x30", kind=0x15), "record type 21"),
        (crafted_hello([sni_ext((0, b"a.example"), (0, b"b.example"))]), "two host_name"),
        (crafted_hello([sni_ext((0, b"a.example."))]), "trailing dot"),
        (crafted_hello([sni_ext((0, b""))]), "empty server name"),
        (crafted_hello([sni_ext((0, "b\u00fccher.example".encode()))]), "not ASCII"),
        (crafted_hello([alpn_ext()]), "empty ALPN protocol list"),
        (crafted_hello([alpn_ext(b"h2", b"")]), "empty ALPN protocol name"),
        (crafted_hello([alpn_ext(b"h2"), alpn_ext(b"h2")]), "appears twice"),
        (crafted_hello([], session=b"x" * 33), "longer than 32"),
        (crafted_hello([(0, b"\x00\x10\x00")]), "overruns"),
    ],
)
def test_malformed_hellos_are_refused(data, reason):
    """Go's crypto/tls (which reads Traefik's ClientHellos) refuses these too: more than one
    host_name, a trailing dot or an empty name (RFC 6066 §3), empty ALPN lists or names
    (RFC 7301 §3.1), duplicated extensions (RFC 8446 §4.2), other record types inside the
    hello and zero-length handshake records (§5.1), oversized records and hellos."""
    with pytest.raises(ClientHelloError, match=reason):
        parse_client_hello(data)


def test_unknown_name_types_are_skipped_and_old_hellos_without_extensions_read():
    """RFC 6066 §3 name types other than host_name are skipped (as Go does); a hello with
    no extensions block at all (TLS 1.0-1.2 allow it) has no SNI and no ALPN."""
    hello = parse_client_hello(crafted_hello([sni_ext((7, b"x"), (0, b"svc.local"))]))
    assert hello is not None and hello.server_name == "svc.local"
    hello = parse_client_hello(crafted_hello(None))
    assert hello is not None and (hello.server_name, hello.alpn) == ("", ())


def test_too_many_records_is_refused_before_the_hello_is_whole():
    """Bounded: a hello dribbled in one-byte records is refused after MAX_RECORDS records,
    whatever length it announces."""
    data = reframe(HELLO, list(range(1, MAX_RECORDS + 5)))
    reader = ClientHelloReader()
    with pytest.raises(ClientHelloError, match="more than"):
        reader.feed(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_else(data):
    """Garbage gets an answer (more needed, a hello, or ClientHelloError), never a crash."""
    try:
        parse_client_hello(data)
    except ClientHelloError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(HELLO) - 1), st.integers(0, 255), st.integers(1, len(HELLO) - 1))
def test_mutated_real_hellos_never_raise_anything_else(position, value, cut):
    """A real hello with one byte changed, fed in two segments: the same three outcomes,
    and a result, if any, that is self-consistent."""
    data = bytearray(HELLO)
    data[position] = value
    reader = ClientHelloReader()
    try:
        first = reader.feed(bytes(data[:cut]))
        hello = first or reader.feed(bytes(data[cut:]))
    except ClientHelloError:
        return
    if hello is not None:
        assert hello.size <= len(data)
        assert hello.server_name == hello.server_name.lower()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 400), max_size=8), st.lists(st.integers(1, 300), max_size=8))
def test_any_record_split_and_segment_split_agree(record_cuts, segment_sizes):
    """Any mix of record fragmentation and segmentation reads the same hello."""
    data = reframe(HELLO, record_cuts)
    reader = ClientHelloReader()
    result = None
    pos = 0
    for size in segment_sizes:
        result = reader.feed(data[pos : pos + size]) or result
        pos += size
    result = reader.feed(data[pos:]) or result
    assert result is not None
    assert (result.server_name, result.alpn) == ("api.example.com", ("h2", "http/1.1"))
