"""Read a TLS ClientHello off the first bytes of a connection: the server name (SNI, RFC 6066
§3) and the offered application protocols (ALPN, RFC 7301 §3.1), for SNI routing and TLS
passthrough, without terminating TLS.

Hand-written, on purpose: Python's `ssl` only shows the SNI inside a handshake it terminates
(`sni_callback`), which passthrough must not do; the libraries that parse TLS (dpkt, scapy,
tlslite-ng, mitmproxy's kaitai structs) parse one record at a time from a complete buffer, are
large dependencies for ~150 lines of length-prefixed fields, and none bounds its memory or
reassembles a handshake message split across records. The format is small and fixed:

- TLS records (RFC 8446 §5.1): type (0x16 handshake) | legacy version (major 3) | length
  (1..2^14) | fragment. A handshake message may be split over several records (§5.1: "a
  single message MAY be fragmented across several records"), and the records over any number
  of TCP segments: `ClientHelloReader.feed` takes bytes as they come and answers once the
  whole message is there. Zero-length handshake fragments and other record types before the
  ClientHello is whole are refused (§5.1: "MUST NOT send zero-length fragments of Handshake
  types"; handshake messages "MUST NOT be interleaved with other record types").
- The handshake message (§4): type 1 (client_hello) | uint24 length | body; the body
  (§4.1.2): legacy_version, random[32], session id <0..32>, cipher suites <2..2^16-2>,
  compression methods <1..2^8-1>, extensions <0..2^16-1> (absent in old TLS 1.0 hellos).
- server_name (extension 0, RFC 6066 §3): a list of (name_type, name); only host_name (0)
  counts, at most one, non-empty, ASCII, no trailing dot — refused otherwise, as Go's
  crypto/tls (Traefik) does. Returned lower-cased, as Traefik compares it.
- application_layer_protocol_negotiation (extension 16, RFC 7301 §3.1): a non-empty list of
  non-empty protocol names.

Bounds: the ClientHello body may be at most `MAX_HELLO_BYTES` (16 KiB; real ones are 0.2 to
2 KiB, post-quantum key shares included) over at most `MAX_RECORDS` records, so a connection
holds at most the hello and one partial 16 KiB record before it is routed or refused. Each
byte is looked at a bounded number of times however it is split (no re-parse from the start
per segment).

Real Traefik 3.7 routes a ClientHello split over records by its SNI too
(tests/integration/test_tls_routing.py `test_sni_routing_matches_real_traefik`).
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
RECORD_HEADER = 5
MAX_RECORD = 1 << 14  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14
MAX_HELLO_BYTES = 16 * 1024
MAX_RECORDS = 64


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello within the bounds; the message says
    what was wrong (for the log). The connection should be closed."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing needs from a ClientHello.

    server_name: the SNI host name, lower-cased; "" when the client sent none.
    alpn: the offered protocols in the client's order (empty when no ALPN extension).
    legacy_version: the body's legacy_version (0x0303 for TLS 1.2 and 1.3).
    size: bytes of the connection consumed up to the end of the record that completed the
        ClientHello (what passthrough replays at the very least).
    """

    server_name: str
    alpn: tuple[str, ...]
    legacy_version: int
    size: int


class ClientHelloReader:
    """Incremental ClientHello reader: `feed` every chunk read from the connection, in order.

    `feed` returns None while more bytes are needed, the `ClientHello` once it is complete
    (later calls return the same object), and raises `ClientHelloError` as soon as the bytes
    cannot be a ClientHello within the bounds. The caller keeps the raw bytes itself (to
    replay them); this object keeps only the reassembled handshake bytes.
    """

    __slots__ = ("_handshake", "_pending", "_records", "_result", "_size")

    def __init__(self) -> None:
        self._pending = bytearray()  # raw bytes not yet consumed as whole records
        self._handshake = bytearray()  # handshake-layer bytes from whole records
        self._records = 0
        self._size = 0  # raw bytes consumed as whole records
        self._result: ClientHello | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        if self._result is not None:
            return self._result
        self._pending += data
        while self._pending:
            pending = self._pending
            # Checked as soon as the bytes are there, so garbage is refused at once.
            if pending[0] != RECORD_HANDSHAKE:
                raise ClientHelloError(f"record type {pending[0]} before the ClientHello ended")
            if len(pending) >= 2 and pending[1] != 3:
                raise ClientHelloError(f"record version {pending[1]}.x is not TLS")
            if len(pending) < RECORD_HEADER:
                break
            length = (pending[3] << 8) | pending[4]
            if length == 0:
                raise ClientHelloError("zero-length handshake record")
            if length > MAX_RECORD:
                raise ClientHelloError(f"record of {length} bytes exceeds 2^14")
            if len(pending) < RECORD_HEADER + length:
                break
            self._records += 1
            if self._records > MAX_RECORDS:
                raise ClientHelloError(f"ClientHello spread over more than {MAX_RECORDS} records")
            self._handshake += pending[RECORD_HEADER : RECORD_HEADER + length]
            del pending[: RECORD_HEADER + length]
            self._size += RECORD_HEADER + length
            hello = self._try_handshake()
            if hello is not None:
                self._result = hello
                self._pending = bytearray()
                return hello
        return None

    def _try_handshake(self) -> ClientHello | None:
        handshake = self._handshake
        if len(handshake) < 4:
            return None
        if handshake[0] != HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(f"handshake message type {handshake[0]} is not client_hello")
        length = (handshake[1] << 16) | (handshake[2] << 8) | handshake[3]
        if length > MAX_HELLO_BYTES:
            raise ClientHelloError(f"ClientHello of {length} bytes exceeds {MAX_HELLO_BYTES}")
        if len(handshake) < 4 + length:
            return None
        name, alpn, version = parse_client_hello_body(bytes(handshake[4 : 4 + length]))
        return ClientHello(name, alpn, version, self._size)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data` (raw connection bytes), None if `data` is a
    valid but incomplete start of one; raises `ClientHelloError` otherwise."""
    return ClientHelloReader().feed(data)


class _Cursor:
    """Reads big-endian length-prefixed fields from a bytes object, refusing any overrun."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def uint(self, size: int, what: str) -> int:
        if self.pos + size > self.end:
            raise ClientHelloError(f"truncated {what}")
        value = int.from_bytes(self.data[self.pos : self.pos + size], "big")
        self.pos += size
        return value

    def vector(self, length_size: int, what: str) -> _Cursor:
        """The next <length-prefixed> field as a cursor of its own; skips it here."""
        length = self.uint(length_size, what + " length")
        if self.pos + length > self.end:
            raise ClientHelloError(f"{what} overruns its container")
        inner = _Cursor(self.data, self.pos, self.pos + length)
        self.pos += length
        return inner

    def rest(self) -> bytes:
        value = self.data[self.pos : self.end]
        self.pos = self.end
        return value


def parse_client_hello_body(body: bytes) -> tuple[str, tuple[str, ...], int]:
    """(server name, ALPN protocols, legacy_version) of a ClientHello body (RFC 8446 §4.1.2,
    the bytes after the 4-byte handshake header); raises `ClientHelloError`."""
    cur = _Cursor(body)
    version = cur.uint(2, "legacy_version")
    if version >> 8 != 3:
        raise ClientHelloError(f"legacy_version {version:#06x} is not TLS")
    if cur.left() < 32:
        raise ClientHelloError("truncated random")
    cur.pos += 32
    session = cur.vector(1, "legacy_session_id")
    if session.left() > 32:
        raise ClientHelloError("legacy_session_id longer than 32 bytes")
    suites = cur.vector(2, "cipher_suites")
    if suites.left() < 2 or suites.left() % 2:
        raise ClientHelloError("cipher_suites length must be even and at least 2")
    if cur.vector(1, "legacy_compression_methods").left() < 1:
        raise ClientHelloError("no compression method")
    name = ""
    alpn: tuple[str, ...] = ()
    if cur.left() == 0:
        return name, alpn, version  # a hello without extensions (TLS 1.0-1.2 allow it)
    extensions = cur.vector(2, "extensions")
    if cur.left():
        raise ClientHelloError("bytes after the extensions")
    seen: set[int] = set()
    while extensions.left():
        kind = extensions.uint(2, "extension type")
        data = extensions.vector(2, "extension data")
        if kind in seen:  # RFC 8446 §4.2: at most one extension of each type
            raise ClientHelloError(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            name = _server_name(data)
        elif kind == EXT_ALPN:
            alpn = _alpn(data)
    return name, alpn, version


def _server_name(data: _Cursor) -> str:
    """RFC 6066 §3 ServerNameList; the host_name, lower-cased, or "" (an empty extension
    is what a server sends back, but a client's is refused below as Go does)."""
    names = data.vector(2, "server_name_list")
    if data.left():
        raise ClientHelloError("bytes after server_name_list")
    host = ""
    while names.left():
        name_type = names.uint(1, "name_type")
        raw = names.vector(2, "host_name").rest()
        if not raw:
            raise ClientHelloError("empty server name")
        if name_type != 0:
            continue  # unknown name types are skipped, as Go's crypto/tls does
        if host:
            raise ClientHelloError("two host_name entries in server_name")
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ClientHelloError("server name is not ASCII") from None
        if host.endswith("."):
            raise ClientHelloError("server name with a trailing dot")  # RFC 6066 §3
    return host.lower()


def _alpn(data: _Cursor) -> tuple[str, ...]:
    """RFC 7301 §3.1 ProtocolNameList: non-empty, of non-empty names (opaque bytes, decoded
    as Latin-1 so every byte string has one text form)."""
    names = data.vector(2, "protocol_name_list")
    if data.left():
        raise ClientHelloError("bytes after protocol_name_list")
    if not names.left():
        raise ClientHelloError("empty ALPN protocol list")
    protocols: list[str] = []
    while names.left():
        raw = names.vector(1, "protocol name").rest()
        if not raw:
            raise ClientHelloError("empty ALPN protocol name")
        protocols.append(raw.decode("latin-1"))
    return tuple(protocols)
