"""PROXY protocol headers (HAProxy's "The PROXY protocol" spec, v1 §2.1 and v2 §2.2), as
Traefik writes them to TCP servers (go-proxyproto's HeaderProxyFromAddrs). The byte layouts are
checked field by field against the spec; HAProxy's own parser reads them in
tests/integration/test_tcp_services.py."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.tcp.proxy_protocol import V2_SIGNATURE, IncompleteHeader, ProxyHeader, header, parse


def test_v1_tcp4_line_as_in_the_spec():
    """§2.1: "PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n", single spaces, decimal ports."""
    line = header(1, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert line == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_tcp6_and_ipv4_mapped_addresses():
    """A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d: both sides IPv4 -> TCP4
    (as Go's To4()); a real IPv6 pair -> TCP6 in the compressed form."""
    assert header(1, ("::ffff:10.0.0.7", 4000), ("::ffff:10.0.0.1", 80)) == (
        b"PROXY TCP4 10.0.0.7 10.0.0.1 4000 80\r\n"
    )
    assert header(1, ("2001:db8::1", 4000, 0, 0), ("2001:db8::2", 80, 0, 0)) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 80\r\n"
    )


def test_mixed_families_are_written_as_tcp6():
    """An IPv4 source with an IPv6 destination cannot be TCP4: both as IPv6, the IPv4 one
    IPv4-mapped (the spec's TCP6 carries any pair of IPv6 addresses)."""
    line = header(1, ("10.0.0.7", 4000), ("2001:db8::2", 80))
    assert line == b"PROXY TCP6 ::ffff:10.0.0.7 2001:db8::2 4000 80\r\n"


def test_v1_unknown_and_v2_local_without_ip_addresses():
    """Not an IP pair (a Unix socket): v1 "PROXY UNKNOWN" (§2.1), v2 the LOCAL command with
    AF_UNSPEC and no address block (§2.2)."""
    assert header(1, "/run/sock", "/run/sock") == b"PROXY UNKNOWN\r\n"
    local = header(2, None, None)
    assert local == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(local) == (ProxyHeader(2, None, None), 16)


def test_v2_ipv4_layout():
    """§2.2: 12-byte signature, 0x21 (version 2, PROXY), 0x11 (AF_INET, STREAM), length 12
    (network order), then source and destination addresses and ports, network order."""
    data = header(2, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert data[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
    assert data[12:16] == b"\x21\x11\x00\x0c"
    assert data[16:20] == bytes((192, 168, 0, 1)) and data[20:24] == bytes((192, 168, 0, 11))
    assert struct.unpack("!HH", data[24:28]) == (56324, 443)
    assert len(data) == 28


def test_v2_ipv6_layout():
    """§2.2: 0x21 (AF_INET6, STREAM), length 36: two 16-byte addresses and two ports."""
    data = header(2, ("2001:db8::1", 1), ("2001:db8::2", 65535))
    assert data[12:16] == b"\x21\x21\x00\x24"
    assert data[16:32] == ipaddress.IPv6Address("2001:db8::1").packed
    assert data[32:48] == ipaddress.IPv6Address("2001:db8::2").packed
    assert data[48:52] == b"\x00\x01\xff\xff"


def test_unknown_version_is_refused():
    """Traefik: "unknown proxyProtocol version" for anything but 1 and 2."""
    with pytest.raises(ValueError, match="unknown proxyProtocol version"):
        header(3, ("10.0.0.1", 1), ("10.0.0.2", 2))


def test_parse_reports_incomplete_headers_and_leaves_the_payload():
    """A header split over reads is incomplete until whole; what follows it is payload."""
    for version in (1, 2):
        data = header(version, ("10.1.2.3", 5555), ("10.9.8.7", 80)) + b"payload"
        for cut in range(1, len(data) - len(b"payload")):
            with pytest.raises(IncompleteHeader):
                parse(data[:cut])
        parsed, length = parse(data)
        assert parsed == ProxyHeader(version, ("10.1.2.3", 5555), ("10.9.8.7", 80))
        assert data[length:] == b"payload"


def test_parse_refuses_malformed_lines():
    """§2.1: a v1 line is at most 107 bytes; families, addresses and ports must agree."""
    with pytest.raises(ValueError):
        parse(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ValueError, match="longer"):
        parse(b"PROXY TCP4 " + b"1" * 120)
    with pytest.raises(ValueError):
        parse(b"PROXY TCP4 ::1 ::1 1 2\r\n")
    with pytest.raises(ValueError):
        parse(b"PROXY TCP4 1.2.3.4 1.2.3.5 70000 2\r\n")


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@given(st.sampled_from((1, 2)), st.one_of(ipv4, ipv6), port, st.one_of(ipv4, ipv6), port)
def test_round_trip(version, src, sport, dst, dport):
    """Whatever pair of addresses: the header parses back to the same addresses (an IPv4
    address in a TCP6 header comes back IPv4-mapped), and fits the spec's v1 limit."""
    data = header(version, (src, sport), (dst, dport))
    parsed, length = parse(data + b"x")
    assert length == len(data)
    if version == 1:
        assert len(data) <= 107

    def back(address: str) -> str:
        ip = ipaddress.ip_address(address)
        return (
            str(ip.ipv4_mapped)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped
            else str(ip)
        )

    assert parsed.source is not None and parsed.destination is not None
    assert (back(parsed.source[0]), parsed.source[1]) == (back(src), sport)
    assert (back(parsed.destination[0]), parsed.destination[1]) == (back(dst), dport)
