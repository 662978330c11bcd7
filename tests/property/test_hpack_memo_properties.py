"""The remembering HPACK coders (meshproxy/http2/hpack_memo.py) say exactly what hpack says.

RFC 7541 makes a field block's meaning depend on the dynamic table (§2.3, §4): a remembered
result is only right while the table has not changed. These properties drive a remembering
coder and hpack's own side by side through generated sequences (recurring field lists, new
fields that get indexed, evictions under a small table, size updates, never-indexed fields,
header-list limits) and require byte-identical blocks and identical field lists (or the same
error) at every step.
"""

from __future__ import annotations

from typing import Any

import pytest
from hpack import Decoder, Encoder, HPACKError, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.http2.hpack_memo import MEMO_ENTRIES, MemoDecoder, MemoEncoder

NAMES = [b":method", b":path", b"content-type", b"x-a", b"date", b"cookie", b"authorization"]
VALUES = [b"GET", b"/", b"/a", b"text/plain", b"1", b"2", b"x" * 40, b"y" * 300]

field = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES))
field_list = st.lists(field, min_size=1, max_size=6)
# a step: encode one of a few recurring lists, maybe marked sensitive, or resize the table
step = st.one_of(
    st.tuples(st.just("fields"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("resize"), st.sampled_from([0, 64, 256, 4096]), st.just(False)),
)


def _fields(lists: list[list[tuple[bytes, bytes]]], index: int, sensitive: bool) -> list[Any]:
    fields: list[Any] = list(lists[index % len(lists)])
    if sensitive:  # RFC 7541 §7.1.3: never indexed; equal to a plain tuple, encoded otherwise
        fields[-1] = NeverIndexedHeaderTuple(*fields[-1])
    return fields


def _secured(fields: list[Any]) -> list[Any]:
    """The reference: hpack with RFC 7541 §7.1.3's never-indexed credentials and short
    cookies (h2's `secure_headers` rule, < 20 bytes), which the remembering encoder applies."""
    return [
        NeverIndexedHeaderTuple(*f)
        if type(f) is tuple
        and (
            f[0] in (b"authorization", b"proxy-authorization")
            or (f[0] == b"cookie" and len(f[1]) < 20)
        )
        else f
        for f in fields
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(field_list, min_size=1, max_size=4), st.lists(step, min_size=1, max_size=40))
def test_a_remembering_encoder_writes_what_hpack_writes(
    lists: list[list[tuple[bytes, bytes]]], steps: list[tuple[str, int, bool]]
) -> None:
    """Same blocks, byte for byte, through table growth, eviction and size updates (§4.2,
    §6.3)."""
    plain, memo = Encoder(), MemoEncoder()
    for kind, value, sensitive in steps:
        if kind == "resize":
            memo.header_table_size = value
            if value != plain.header_table_size:  # see the size-update test below
                plain.header_table_size = value
            continue
        fields = _fields(lists, value, sensitive)
        block = memo.encode(list(fields))
        assert block == plain.encode(_secured(fields))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(field_list, min_size=1, max_size=4),
    st.lists(step, min_size=1, max_size=40),
    st.sampled_from([200, 1000, 65536]),
)
def test_a_remembering_decoder_reads_what_hpack_reads(
    lists: list[list[tuple[bytes, bytes]]], steps: list[tuple[str, int, bool]], limit: int
) -> None:
    """Blocks from a real encoder (indexed, literal-with-indexing, never-indexed fields, size
    updates): the same fields (types included) or the same error as hpack's decoder, under a
    header-list limit that some lists exceed (RFC 9113 §6.5.2)."""
    encoder = Encoder()
    plain, memo = Decoder(max_header_list_size=limit), MemoDecoder(limit, 4096)
    for kind, value, sensitive in steps:
        if kind == "resize":
            encoder.header_table_size = value
            continue
        block = encoder.encode(_fields(lists, value, sensitive))
        for _ in range(2):  # the second time, from the memo when the table stood still
            outcomes = []
            for decoder in (plain, memo):
                try:
                    got = decoder.decode(block, raw=True)
                    outcomes.append([(type(f), f) for f in got])
                except HPACKError as exc:
                    outcomes.append(type(exc))
            assert outcomes[0] == outcomes[1]
            if isinstance(outcomes[0], type):
                return  # a decoding error ends the connection (RFC 7541 §2.3.2)


def test_a_block_that_changes_the_table_is_not_replayed() -> None:
    """A literal with incremental indexing adds an entry (RFC 7541 §6.2.1): the same block
    decoded again adds it again, so it must be decoded again, not remembered."""
    block = Encoder().encode([(b"x-new", b"1")])
    plain, memo = Decoder(), MemoDecoder(65536, 4096)
    for _ in range(3):
        assert memo.decode(block, raw=True) == plain.decode(block, raw=True)
        assert len(memo.header_table.dynamic_entries) == len(plain.header_table.dynamic_entries)


def test_a_lowered_limit_applies_to_a_remembered_block() -> None:
    """A block remembered under one header-list limit is refused once the limit drops below
    its size (the limit is part of the state a result depends on)."""
    encoder = Encoder()
    fields = [(b"x-a", b"y" * 300)]
    encoder.encode(fields)
    block = encoder.encode(fields)  # indexed now: decoding it leaves the table alone
    memo = MemoDecoder(65536, 4096)
    memo.decode(Encoder().encode(fields), raw=True)  # index it on the decoder's side too
    assert memo.decode(block, raw=True) == [(b"x-a", b"y" * 300)]
    memo.max_header_list_size = 100
    with pytest.raises(HPACKError):
        memo.decode(block, raw=True)


def test_the_memo_stays_bounded() -> None:
    """At most MEMO_ENTRIES results per connection, however many distinct blocks recur."""
    memo = MemoDecoder(65536, 4096)
    encoder = Encoder()
    for index in range(10 * MEMO_ENTRIES):
        # literals without indexing: the table never changes, every block is new
        block = encoder.encode([NeverIndexedHeaderTuple(b"x-a", b"%d" % index)])
        memo.decode(block, raw=True)
        assert memo._memo is None or len(memo._memo) <= MEMO_ENTRIES


def test_recurring_blocks_are_remembered_until_the_table_changes() -> None:
    """The point of the memo: a recurring list is encoded, and its block decoded, once while
    the table stands still; a new indexed field (§6.2.1) forgets everything remembered."""
    encoder, decoder = MemoEncoder(), MemoDecoder(65536, 4096)
    fields = [(b":method", b"GET"), (b"x-a", b"1")]
    decoder.decode(encoder.encode(fields), raw=True)  # indexes x-a on both sides
    block = encoder.encode(fields)
    assert encoder._memo == {(True, *fields): block}
    assert decoder.decode(block, raw=True) == fields
    assert decoder._memo is not None and (block, True) in decoder._memo
    decoder.decode(encoder.encode([(b"x-b", b"2")]), raw=True)  # both tables change
    assert not encoder._memo and not decoder._memo


def test_the_same_lowered_table_size_twice_still_sends_the_size_update() -> None:
    """RFC 7541 §4.2 (RFC 9113 §6.5.3): once the peer lowered SETTINGS_HEADER_TABLE_SIZE, the
    next field block starts with a dynamic table size update. h2 assigns the size for every
    SETTINGS frame carrying it, and nghttp2 states it twice on an h2c upgrade (HTTP2-Settings,
    then its first SETTINGS frame); hpack alone loses the pending update on the second, equal
    assignment, and nghttp2 then ends the connection with COMPRESSION_ERROR. A decoder
    decodes what the remembering encoder writes and ends with the table size last set."""
    for sizes in ([0, 0], [100, 100, 100], [0, 4096, 4096], [256, 0, 0]):
        encoder = MemoEncoder()
        for size in sizes:
            encoder.header_table_size = size
        block = encoder.encode([(b":status", b"200"), (b"x-a", b"1")])
        assert block[0] & 0xE0 == 0x20, (sizes, block)  # 001xxxxx: a size update first
        decoder = Decoder()
        decoder.max_allowed_table_size = max(sizes)  # hpack signals each change in turn
        assert decoder.decode(block, raw=True) == [(b":status", b"200"), (b"x-a", b"1")]
        assert decoder.header_table_size == sizes[-1]


def test_credentials_and_short_cookies_never_enter_the_peer_table() -> None:
    """RFC 7541 §7.1.3 (and §6.2.3 for what an intermediary receives so): `authorization`,
    `proxy-authorization` and a cookie under 20 bytes go out as never-indexed literals
    (0001xxxx), so neither the backend shared by every client nor any hop after it keeps a
    client's credentials in its dynamic table (fresh tester F2); a long cookie is indexed."""
    encoder, decoder = MemoEncoder(), Decoder()
    fields = [(b"authorization", b"Bearer SECRET"), (b"cookie", b"sid=1"), (b"x-a", b"1")]
    for _ in range(2):
        got = decoder.decode(encoder.encode(list(fields)), raw=True)
        assert got == fields
        assert [type(f) is NeverIndexedHeaderTuple for f in got] == [True, True, False]
    assert [entry[0] for entry in decoder.header_table.dynamic_entries] == [b"x-a"]
    long_cookie = [(b"cookie", b"s" * 40)]
    decoder.decode(encoder.encode(long_cookie), raw=True)
    assert decoder.header_table.dynamic_entries[0] == (b"cookie", b"s" * 40)
