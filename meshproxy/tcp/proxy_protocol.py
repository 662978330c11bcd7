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

Read, on an entrypoint with Traefik's `proxyProtocol` (`trustedIPs`, `insecure`), by
`ProxyHeaderReader`, the first protocol of every connection there, as Traefik's go-proxyproto
listener with its policy (pkg/server/server_entrypoint_tcp.go `buildProxyProtocolListener`):

- from a trusted peer (in `trustedIPs`, or any with `insecure`) the header's source and
  destination become the connection's `peername` and `sockname` (`ProxiedTransport`): what
  ClientIP rules, ipAllowList, X-Forwarded-For / X-Real-Ip, forwardedHeaders trust and the
  PROXY header written to TCP servers see;
- from another peer a header is still read and taken off the stream, and its addresses are
  ignored (go-proxyproto's IGNORE policy; checked against Traefik 3.7: the backend never sees
  the header, and the client is the peer);
- no header (the first bytes cannot start one, or nothing came within the read timeout): the
  connection goes on as it is;
- a malformed header (from any peer, as Traefik): the connection is closed, nothing relayed.

The header is parsed here by hand for the same reason as above. Bounded: a v1 line is at most
107 bytes (spec §2.1) and a v2 header 16 bytes plus its declared length (at most
`V2_MAX_BODY`), read across any number of segments (Traefik's go-proxyproto 0.8 refuses a v1
line split after `PROXY TCP4`; the spec asks receivers to wait for the whole header), within
the entrypoint's read timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshproxy.networks import NetworkSet

log = logging.getLogger("meshproxy.tcp")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # spec §2.2: 12 bytes
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL
_AF_INET_STREAM = 0x11
_AF_INET6_STREAM = 0x21
_UNSPEC = 0x00
V1_MAX_LENGTH = 107  # spec §2.1: the longest v1 line, CRLF included
# A v2 header's body: the addresses (at most 216 bytes, AF_UNIX) and TLVs. The spec's
# "a receiver should not need more than 536 bytes" (§2.2) rounded up for cloud load balancers'
# TLVs (AWS adds a VPC endpoint id, GCP a PSC connection id); past it the header is refused.
V2_MAX_BODY = 4096

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


class NotProxyHeader(ValueError):
    """The bytes cannot start a PROXY header: the connection has none."""


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
        raise NotProxyHeader("not a PROXY protocol header")
    newline = data.find(b"\n", 0, V1_MAX_LENGTH)
    if newline < 0:
        if len(data) < V1_MAX_LENGTH:
            raise IncompleteHeader("PROXY v1 line incomplete")
        raise ValueError("PROXY v1 line longer than 107 bytes")
    if newline == 0 or data[newline - 1] != 0x0D:
        raise ValueError("PROXY v1 line not ended by CRLF")
    end = newline - 1
    fields = data[:end].decode("ascii").split(" ")  # UnicodeDecodeError is a ValueError
    if fields[1] == "UNKNOWN":
        return ProxyHeader(1, None, None), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ValueError(f"malformed PROXY v1 line {data[:end]!r}")
    if not all(f.isascii() and f.isdigit() for f in fields[4:]):
        raise ValueError("PROXY v1 ports are not decimal numbers")
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
    if version_command >> 4 != 2:
        raise ValueError(f"PROXY v2 header with version {version_command >> 4}")
    if version_command not in (_V2_LOCAL, _V2_PROXY):
        raise ValueError(f"PROXY v2 command {version_command & 0xF} unknown")
    (length,) = struct.unpack("!H", data[14:16])
    if length > V2_MAX_BODY:
        raise ValueError(f"PROXY v2 header of {length} bytes (more than {V2_MAX_BODY})")
    total = 16 + length
    if len(data) < total:
        raise IncompleteHeader("PROXY v2 addresses incomplete")
    if version_command == _V2_LOCAL:
        return ProxyHeader(2, None, None), total
    body = data[16:total]
    # The high nibble is the address family, the low one the transport (STREAM or DGRAM):
    # go-proxyproto takes both transports, so does this.
    if family >> 4 == 1:
        if length < 12:
            raise ValueError(f"PROXY v2 AF_INET header with {length} address bytes")
        src4 = ipaddress.IPv4Address(body[0:4])
        dst4 = ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        return ProxyHeader(2, (str(src4), sport), (str(dst4), dport)), total
    if family >> 4 == 2:
        if length < 36:
            raise ValueError(f"PROXY v2 AF_INET6 header with {length} address bytes")
        src6 = ipaddress.IPv6Address(body[0:16])
        dst6 = ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        return ProxyHeader(2, (_unmapped(src6), sport), (_unmapped(dst6), dport)), total
    if family == _UNSPEC or family >> 4 == 3:  # AF_UNIX: no IP, the connection's own
        return ProxyHeader(2, None, None), total
    raise ValueError(f"PROXY v2 family 0x{family:02x} unknown")


def _unmapped(ip: ipaddress.IPv6Address) -> str:
    """An IPv6 address as text, an IPv4-mapped one as its IPv4 (as the stack's client_ip)."""
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


# ------------------------------------------------------------------ reading, on an entrypoint


class ProxyProtocolPolicy:
    """An entrypoint's `proxyProtocol`: whom to believe, and how long to wait for a header.

    `trusted`: the networks of `trustedIPs`; `insecure`: believe every peer; `timeout`:
    seconds to wait for the whole header (the entrypoint's read timeout, as Traefik's
    `ReadHeaderTimeout`; 0: no limit)."""

    __slots__ = ("insecure", "timeout", "trusted")

    def __init__(self, trusted: NetworkSet, insecure: bool, timeout: float) -> None:
        self.trusted = trusted
        self.insecure = insecure
        self.timeout = timeout

    def trusts(self, ip: str) -> bool:
        return self.insecure or self.trusted.contains(ip)


def _peer_ip(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername") or ("", 0)
    ip: str = peer[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip


def _socket_address(address: tuple[str, int]) -> tuple[Any, ...]:
    """The header's (ip, port) in the form asyncio gives `peername`: 4 items for IPv6."""
    host, port = address
    return (host, port, 0, 0) if ":" in host else (host, port)


class ProxiedTransport(asyncio.Transport):
    """A client connection whose addresses are the PROXY header's: `peername` is the header's
    source, `sockname` its destination (go-proxyproto's Conn.RemoteAddr / LocalAddr); every
    other call goes to the real transport. Only connections from a trusted peer that sent a
    header with addresses are wrapped, so other connections pay nothing."""

    __slots__ = ("_inner", "_peername", "_sockname")

    def __init__(
        self, inner: asyncio.Transport, peername: tuple[Any, ...], sockname: tuple[Any, ...]
    ) -> None:
        super().__init__()
        self._inner = inner
        self._peername = peername
        self._sockname = sockname

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        if name == "sockname":
            return self._sockname
        return self._inner.get_extra_info(name, default)

    def write(self, data: Any) -> None:
        self._inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def abort(self) -> None:
        self._inner.abort()

    def close(self) -> None:
        self._inner.close()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)


class ProxyHeaderReader(asyncio.Protocol):
    """The first protocol of a connection on an entrypoint with `proxyProtocol`: reads the
    PROXY header (if the connection starts with one), then hands the connection, with the
    bytes after the header, to the protocol `next_protocol()` makes (the entrypoint's usual
    first protocol: immediate TCP routing or the sniffer), as described in the module
    docstring. Counts the connection as open (`on_open(+1/-1)`) until the hand-over."""

    __slots__ = ("buffer", "counted", "next_protocol", "on_open", "policy", "timer", "transport")

    def __init__(
        self,
        policy: ProxyProtocolPolicy,
        next_protocol: Callable[[], asyncio.BaseProtocol],
        on_open: Callable[[int], None],
    ) -> None:
        self.policy = policy
        self.next_protocol = next_protocol
        self.on_open = on_open
        self.buffer = b""
        self.counted = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.on_open(1)
        self.counted = True
        if self.policy.timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(self.policy.timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        buffered = self.buffer + data if self.buffer else data
        try:
            found, used = parse(buffered)
        except IncompleteHeader:
            self.buffer = buffered  # bounded by parse: 107 bytes (v1), 16 + V2_MAX_BODY (v2)
            return
        except NotProxyHeader:
            self._hand_over(transport, None, buffered)
            return
        except ValueError as exc:
            log.debug("PROXY header from %s: %s; closed", _peer_ip(transport), exc)
            self._done()
            transport.close()
            return
        self._hand_over(transport, found, buffered[used:])

    def eof_received(self) -> bool | None:
        return None  # closed before its header was whole: nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()

    def _expired(self) -> None:
        """The read timeout passed. Nothing read: the connection has no header and goes on
        (a client waiting for the server to speak first; Traefik 3.7 relays it then too).
        Part of a header: closed, as a malformed one."""
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        if not self.buffer:
            self._hand_over(transport, None, b"")
            return
        log.debug("PROXY header from %s: not whole in time; closed", _peer_ip(transport))
        self._done()
        transport.close()

    def _done(self) -> None:
        self.transport = None
        self.buffer = b""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.on_open(-1)

    def _hand_over(
        self, transport: asyncio.Transport, found: ProxyHeader | None, rest: bytes
    ) -> None:
        trusted = self.policy.trusts(_peer_ip(transport))
        self._done()
        if found is not None and not trusted:
            log.debug(
                "PROXY header from %s, not in trustedIPs: addresses ignored", _peer_ip(transport)
            )
        if found is not None and trusted and found.source is not None:
            destination = found.destination or found.source
            transport = ProxiedTransport(
                transport, _socket_address(found.source), _socket_address(destination)
            )
        protocol = self.next_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not rest or transport.is_closing():
            return
        # The protocol may have handed the connection on already (immediate TCP routing
        # falling back to the sniffer): the bytes go to whichever protocol reads now.
        current = transport.get_protocol()
        if isinstance(current, asyncio.BufferedProtocol):
            view = memoryview(rest)
            while view:
                buffer = memoryview(current.get_buffer(len(view)))
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                current.buffer_updated(size)
                view = view[size:]
        elif isinstance(current, asyncio.Protocol):
            current.data_received(rest)
