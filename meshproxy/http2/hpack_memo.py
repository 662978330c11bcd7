"""HPACK field blocks remembered per connection while the dynamic table stands still.

On a busy HTTP/2 connection the same field blocks recur: once a client's request fields are in
the dynamic table, each request's block is the same few index bytes plus the literals it never
indexes (nghttp2 sends `:path` that way), and a backend's responses encode to the same bytes
until a field changes. hpack decodes and encodes each of them anew, field by field in Python:
a fifth to a quarter of the `h2` library's time per request (docs/http2-performance.md).

What a block decodes to is a function of the block and of the decoder's state (the dynamic
table, its size limits, the header list limit); what a field list encodes to is a function of
the list and of the encoder's state (the dynamic table, a pending size update). So a result
may be reused for as long as that state has not changed: these subclasses remember the last
few results of calls that left the table as it was, keyed by their input, and forget them all
as soon as the table changes (an entry added or evicted, a size changed). A changed table is
seen by identity, not by value: the newest entry is kept by reference, and every insertion
puts a new tuple object first (hpack's HeaderTable.add), so an unchanged first entry, length
and size mean an unchanged table. (The entries are read as `Any`: from hpack's typed deque,
mypyc would unbox each tuple and box a new one, defeating the identity check.) Calls that
raise are never remembered.

Written here because hpack has no such cache; the results are hpack's own (RFC 7541): a
remembered result is returned only where hpack would return the same. Bounded per connection:
at most MEMO_ENTRIES results of inputs up to MEMO_INPUT_BYTES each (blocks) or MEMO_FIELDS
fields (lists), so about 16 KiB at worst.
"""

from __future__ import annotations

from typing import Any

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

MEMO_ENTRIES = 16
MEMO_INPUT_BYTES = 512
MEMO_FIELDS = 24
# Fields never put in a dynamic table (RFC 7541 §7.1.3: credentials, and cookies short enough
# to guess): what h2's `secure_headers` does when it normalizes outbound fields, which the
# proxy's connections skip (they build their fields themselves).
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
SHORT_COOKIE = 20  # bytes: a shorter cookie is never indexed (h2's threshold)


def _never_indexed(headers: Any) -> Any:
    """`headers` with credentials and short cookies as never-indexed fields (RFC 7541
    §6.2.3: a peer's decoder, and every intermediary after it, keeps them out of its table)."""
    if type(headers) is not list:
        return headers
    out: list[Any] = []
    for field in headers:
        if type(field) is tuple and len(field) == 2 and _secret(field):
            field = NeverIndexedHeaderTuple(*field)
        out.append(field)
    return out


def _secret(field: Any) -> bool:
    name = field[0]
    return name in _SENSITIVE and (name != b"cookie" or len(field[1]) < SHORT_COOKIE)


class MemoDecoder(Decoder):
    """hpack's Decoder, remembering the fields of blocks that did not change the table."""

    def __init__(self, max_header_list_size: int, max_allowed_table_size: int) -> None:
        super().__init__()
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = max_allowed_table_size
        self._memo: dict[tuple[bytes, bool], list[Any]] | None = None
        self._first: Any = None  # the table's newest entry when the memo was valid
        self._state: tuple[int, int, int, int] = (-1, 0, 0, 0)

    def decode(self, data: bytes, raw: bool = False) -> Any:
        table = self.header_table
        entries: Any = table.dynamic_entries  # Any: see the module docstring on mypyc
        first = entries[0] if entries else None
        state = (
            len(entries),
            table.maxsize,
            self.max_allowed_table_size,
            self.max_header_list_size,
        )
        memo = self._memo
        if memo is not None:
            if first is self._first and state == self._state:
                hit = memo.get((data, raw))
                if hit is not None:
                    return list(hit)
            else:
                memo.clear()
        headers = super().decode(data, raw)
        if len(data) > MEMO_INPUT_BYTES:
            return headers
        after = entries[0] if entries else None
        if after is not first or len(entries) != state[0] or table.maxsize != state[1]:
            if memo:
                memo.clear()
            return headers  # the block changed the table: its result holds only once
        if memo is None:
            memo = self._memo = {}
        elif len(memo) >= MEMO_ENTRIES:
            memo.clear()
        self._first, self._state = first, state
        memo[(data, raw)] = list(headers)
        return headers


class MemoEncoder(Encoder):
    """hpack's Encoder, remembering the blocks of field lists that did not change the table.

    Only lists of plain 2- or 3-tuples are remembered (a NeverIndexedHeaderTuple compares
    equal to a plain tuple of the same fields but encodes differently); anything else is
    encoded every time."""

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[tuple[Any, ...], bytes] | None = None
        self._first: Any = None
        self._state: tuple[int, int] = (-1, 0)

    @property  # type: ignore[override]
    def header_table_size(self) -> int:
        return int(self.header_table.maxsize)

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE. A value equal to the current size changes
        nothing and is ignored: hpack (4.x) would clear its "resized" flag while the update of
        a first, equal-valued assignment is still pending, and so never send the dynamic table
        size update RFC 7541 §4.2 requires at the start of the next block (h2 assigns the size
        for every SETTINGS frame that carries it; nghttp2 sends it in HTTP2-Settings and again
        in its first SETTINGS, then ends the connection with COMPRESSION_ERROR)."""
        if value != self.header_table.maxsize:
            Encoder.header_table_size.fset(self, value)  # type: ignore[attr-defined]

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if type(headers) is not list or len(headers) > MEMO_FIELDS or self.table_size_changes:
            return super().encode(_never_indexed(headers), huffman)
        for field in headers:
            if type(field) is not tuple or _secret(field):
                return super().encode(_never_indexed(headers), huffman)
        table = self.header_table
        entries: Any = table.dynamic_entries  # Any: see the module docstring on mypyc
        first = entries[0] if entries else None
        state = (len(entries), table.maxsize)
        key = (huffman, *headers)
        memo = self._memo
        if memo is not None:
            if first is self._first and state == self._state:
                hit = memo.get(key)
                if hit is not None:
                    return hit
            else:
                memo.clear()
        block = super().encode(headers, huffman)
        after = entries[0] if entries else None
        if after is not first or len(entries) != state[0] or table.maxsize != state[1]:
            if memo:
                memo.clear()
            return block
        if memo is None:
            memo = self._memo = {}
        elif len(memo) >= MEMO_ENTRIES:
            memo.clear()
        self._first, self._state = first, state
        memo[key] = block
        return block
