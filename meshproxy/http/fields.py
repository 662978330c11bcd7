"""Header fields of a response on its way from a backend to a client.

Across the exchange seam fields are always a sequence of (lower-case name, value) pairs: a
plain list, or a `HeaderBlock`, which is how an HTTP/1.1 backend's head travels when none of
its fields is hop-by-hop (the usual case). A HeaderBlock parses into pairs only when someone
asks (a middleware editing the response, an HTTP/2 writer); an HTTP/1.1 writer writes its
`raw` lines as they came: no per-field parsing, no rebuilding, names keep their case, as
HAProxy does.

Hand-written because llhttp (through httptools) reports fields one callback at a time, which
is the cost this avoids; llhttp still parses and checks every head first (CRLF line ends, no
folding, no space before a colon, one Content-Length), so the block is known to be well formed.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from typing import Final

from meshproxy.http.forwarding import HOP_BY_HOP, connection_tokens

FieldList = list[tuple[bytes, bytes]]
_CRLF: Final = b"\r\n"


class HeaderBlock:
    """Fields as an HTTP/1.1 peer sent them (`raw`: `name: value\\r\\n` lines, checked by
    llhttp), readable as (lower-case name, value) pairs with `pairs()`."""

    __slots__ = ("_pairs", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._pairs: FieldList | None = None

    def pairs(self) -> FieldList:
        """The fields as pairs (a new list each call: the caller may edit it)."""
        pairs = self._pairs
        if pairs is None:
            pairs = self._pairs = []
            for line in self.raw.split(_CRLF)[:-1]:
                name, _, value = line.partition(b":")
                pairs.append((name.lower(), value.strip(b" \t")))
        return list(pairs)


Fields = FieldList | HeaderBlock
"""Header fields across the exchange seam: (lower-case name, value) pairs, as a list or a
`HeaderBlock`."""

# The fields the proxy acts on: framing, and hop-by-hop ones it must not pass on.
_NOTED_FIELD: Final = re.compile(
    rb"\n(c(?:ontent-length|onnection)|t(?:e|railer|ransfer-encoding)|keep-alive|upgrade"
    rb"|proxy-(?:connection|authenticate|authorization)):[ \t]*([^\r]*)"
)


class MalformedFields(ValueError):
    pass


class _DateCache:
    """The current IMF-fixdate (RFC 9110 §5.6.7), made once a second."""

    __slots__ = ("line", "second", "value")

    def __init__(self) -> None:
        self.second = 0
        self.value = b""
        self.line = b""  # the whole field line: `date: <value>\r\n`

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True).encode()
            self.line = b"date: " + self.value + _CRLF
        return self.value

    def now_line(self) -> bytes:
        self.now()
        return self.line


_DATE: Final = _DateCache()
# Final response heads already read that need no rewriting (no hop-by-hop field), with what
# `response_fields` made of them: a backend answers with the same few heads, so the next one
# costs a dict lookup instead of a case fold, a regex scan and a search for Date (~1.5 us
# compiled, a tenth of the proxy's own work per request). Bounded in entries and key size.
_BLOCKS: Final[dict[bytes, tuple[bytes, int, bool]]] = {}  # block -> (raw, length or -1, has Date)
_BLOCK_CACHE_ENTRIES: Final = 256
_BLOCK_CACHE_MAX_BYTES: Final = 1024


def http_date() -> bytes:
    """Now as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`), for the Date field."""
    return _DATE.now()


def response_fields(block: bytes, final: bool = True) -> tuple[Fields, int | None, bool]:
    """End-to-end fields, Content-Length and whether the body is chunked, from `block`: the
    head from the LF that ends the status line to the CRLF that ends the last field. A
    response without Date gets one, as Go's server (and so Traefik) adds it (RFC 9110 §6.6.1:
    the proxy has a clock); an interim (1xx, `final` false) response does not."""
    if final:
        known = _BLOCKS.get(block)
        if known is not None:  # the same head as an earlier response: one dict lookup
            raw, size, has_date = known
            if not has_date:  # one is added, as of now
                raw = raw + _DATE.now_line()
            return HeaderBlock(raw), None if size < 0 else size, False
    lowered = block.lower()
    noted = _NOTED_FIELD.findall(lowered)
    dated = not final or lowered.find(b"\ndate:") >= 0  # find: `in` on bytes costs more
    length = None
    if not noted or (len(noted) == 1 and noted[0][0] == b"content-length"):
        if noted:  # the usual response: a Content-Length and no hop-by-hop field
            length = _content_length(noted[0][1])
        raw = block[1:]
        if final and len(block) <= _BLOCK_CACHE_MAX_BYTES:
            if len(_BLOCKS) >= _BLOCK_CACHE_ENTRIES:
                _BLOCKS.clear()
            _BLOCKS[block] = (raw, -1 if length is None else length, dated)
        if not dated:
            raw += _DATE.now_line()
        return HeaderBlock(raw), length, False
    if not dated:
        block += _DATE.now_line()
    fields = HeaderBlock(block[1:]).pairs()
    listed = set(HOP_BY_HOP)
    chunked = False
    for name, value in fields:
        if name == b"connection":
            listed.update(connection_tokens(value))
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            length = _content_length(value)
    return [(n, v) for n, v in fields if n not in listed], length, chunked


def _content_length(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise MalformedFields("invalid Content-Length") from None


def field_list(fields: Fields) -> FieldList:
    """The fields as (lower-case name, value) pairs, values without surrounding blanks."""
    if isinstance(fields, HeaderBlock):
        return fields.pairs()
    return fields


def field_lines(fields: Fields) -> bytes:
    """The fields as `name: value\\r\\n` lines."""
    if isinstance(fields, HeaderBlock):
        return fields.raw
    return b"".join([name + b": " + value + _CRLF for name, value in fields])
