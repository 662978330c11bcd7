"""PROXY protocol headers (HAProxy's spec, "The PROXY protocol", versions 1 and 2), written by
the proxy at the start of a connection to a TCP server so that the server sees the real client
address instead of the proxy's: Traefik's `proxyProtocol: {version: 1|2}` on a TCP service's
loadBalancer (deprecated) or on its `tcp.serversTransports` entry (pkg/tcp/proxy.go writes
`proxyproto.HeaderProxyFromAddrs(version, client remote, client local)`).

Written by hand: the header is a few dozen bytes of fixed layout, and the Python packages for it
are small, little-used and not maintained (the one on PyPI last released in 2024); `parse`
exists for tests and is checked against HAProxy's own `accept-proxy` parser there.

What goes in the header, as go-proxyproto's `HeaderProxyFromAddrs`:

- source = the client's address and port as the proxy's socket sees it, destination = the
  address and port the client connected to (the proxy's listening side);
- both IPv4 (IPv4-mapped IPv6 addresses, from a dual-stack listener, count as IPv4):
  `TCP4` / family `AF_INET`; otherwise `TCP6` / `AF_INET6`, an IPv4 address written as its
  IPv4-mapped IPv6 form;
- an address that is not IP (a Unix socket, unknown): v1 `PROXY UNKNOWN\\r\\n`, v2 the `LOCAL`
  command with no address, which tells the server to use the connection's own addresses.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # spec §2.2: 12 bytes
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL
_AF_INET_STREAM = 0x11
_AF_INET6_STREAM = 0x21
_UNSPEC = 0x00
V1_MAX_LENGTH = 107  # spec §2.1: the longest v1 line, CRLF included

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ProxyHeader:
    """What a PROXY header says: `None` addresses for v1 UNKNOWN or the v2 LOCAL command."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def _ip(address: Any) -> IPAddress | None:
    """An (host, port, ...) socket address's IP, IPv4-mapped IPv6 unmapped; None if not IP."""
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])  # drop a v6 scope id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def header(version: int, source: Any, destination: Any) -> bytes:
    """The PROXY header of `version` (1 or 2) for a client at `source` that connected to
    `destination` (socket addresses as asyncio's `peername`/`sockname` give them).
    Raises ValueError for another version."""
    if version not in (1, 2):
        raise ValueError(f"unknown proxyProtocol version: {version}")
    src, dst = _ip(source), _ip(destination)
    if src is None or dst is None:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return V2_SIGNATURE + bytes((_V2_LOCAL, _UNSPEC)) + b"\x00\x00"
    src_port, dst_port = int(source[1]), int(destination[1])
    v4 = isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address)
    if not v4:
        src = _as_v6(src)
        dst = _as_v6(dst)
    if version == 1:
        family = "TCP4" if v4 else "TCP6"
        line = f"PROXY {family} {_text(src)} {_text(dst)} {src_port} {dst_port}\r\n"
        return line.encode("ascii")
    addresses = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    family_byte = _AF_INET_STREAM if v4 else _AF_INET6_STREAM
    return (
        V2_SIGNATURE
        + bytes((_V2_PROXY, family_byte))
        + struct.pack("!H", len(addresses))
        + addresses
    )


def _text(ip: IPAddress) -> str:
    """An address as text; IPv4-mapped IPv6 in the mixed notation of RFC 5952 §5."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _as_v6(ip: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address("::ffff:" + str(ip))


class IncompleteHeader(ValueError):
    """More bytes are needed to read the header."""


def parse(data: bytes) -> tuple[ProxyHeader, int]:
    """Read a PROXY header (v1 or v2) at the start of `data`: (header, its length in bytes).
    Raises IncompleteHeader when `data` stops inside it, ValueError when it is malformed."""
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        raise IncompleteHeader("PROXY v2 header incomplete")
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if b"PROXY "[: len(data)] == data[:6] and len(data) < 6:
        raise IncompleteHeader("PROXY v1 header incomplete")
    if not data.startswith(b"PROXY "):
        raise ValueError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) < V1_MAX_LENGTH:
            raise IncompleteHeader("PROXY v1 line incomplete")
        raise ValueError("PROXY v1 line longer than 107 bytes")
    fields = data[:end].decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":
        return ProxyHeader(1, None, None), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ValueError(f"malformed PROXY v1 line {data[:end]!r}")
    src, dst = ipaddress.ip_address(fields[2]), ipaddress.ip_address(fields[3])
    if (fields[1] == "TCP4") != isinstance(src, ipaddress.IPv4Address) or type(src) is not type(
        dst
    ):
        raise ValueError(f"PROXY v1 addresses do not match {fields[1]}")
    ports = int(fields[4]), int(fields[5])
    if not all(0 <= p <= 65535 for p in ports) or any(f != str(int(f)) for f in fields[4:]):
        raise ValueError("PROXY v1 ports out of range or not canonical")
    return ProxyHeader(1, (str(src), ports[0]), (str(dst), ports[1])), end + 2


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int]:
    version_command, family = data[12], data[13]
    (length,) = struct.unpack("!H", data[14:16])
    total = 16 + length
    if len(data) < total:
        raise IncompleteHeader("PROXY v2 addresses incomplete")
    if version_command >> 4 != 2:
        raise ValueError(f"PROXY v2 header with version {version_command >> 4}")
    if version_command == _V2_LOCAL:
        return ProxyHeader(2, None, None), total
    if version_command != _V2_PROXY:
        raise ValueError(f"PROXY v2 command {version_command & 0xF} unknown")
    body = data[16:total]
    if family == _AF_INET_STREAM and length >= 12:
        src4 = ipaddress.IPv4Address(body[0:4])
        dst4 = ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        return ProxyHeader(2, (str(src4), sport), (str(dst4), dport)), total
    if family == _AF_INET6_STREAM and length >= 36:
        src6 = ipaddress.IPv6Address(body[0:16])
        dst6 = ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        return ProxyHeader(2, (str(src6), sport), (str(dst6), dport)), total
    if family == _UNSPEC:
        return ProxyHeader(2, None, None), total
    raise ValueError(f"PROXY v2 family 0x{family:02x} with {length} address bytes not supported")
