"""meshproxy.networks: the one "is this IP in these networks" every allow-list uses."""

from __future__ import annotations

import ipaddress

from meshproxy.networks import NetworkSet, parse_address


def nets(*values: str) -> NetworkSet:
    return NetworkSet(ipaddress.ip_network(v, strict=False) for v in values)


def test_v4_v6_and_mapped_addresses():
    """An IPv4-mapped IPv6 address is its IPv4 address (Go's net.IP.To4), so IPv4 ranges
    match clients seen through a dual-stack listener."""
    allowed = nets("10.1.0.0/16", "fd00::/8")
    assert allowed.contains("10.1.2.3")
    assert allowed.contains("::ffff:10.1.2.3")
    assert allowed.contains("fd00::1")
    assert not allowed.contains("10.2.0.1")
    assert not allowed.contains("::1")


def test_what_is_not_an_address_is_never_in():
    allowed = nets("0.0.0.0/0", "::/0")
    for text in ("", "unknown", "10.0.0.1:80", "[::1]", "fe80::1%eth0x", "10.0.0.256"):
        assert not allowed.contains(text), text
    assert parse_address(" 10.0.0.1 ") == ipaddress.ip_address("10.0.0.1")


def test_empty_set_holds_nothing_and_memo_stays_bounded():
    empty = nets()
    assert not empty and not empty.contains("127.0.0.1")
    allowed = nets("127.0.0.0/8")
    for i in range(10_000):
        allowed.contains(f"127.0.{i // 256 % 256}.{i % 256}")
    assert len(allowed._memo) <= 4096
