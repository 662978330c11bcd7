"""Response header fields: passed through as the backend's block unless hop-by-hop ones need
removing (see meshproxy.http.fields)."""

from __future__ import annotations

import re

import pytest

from meshproxy.http.fields import (
    HeaderBlock,
    MalformedFields,
    field_lines,
    field_list,
    response_fields,
)


def test_clean_block_passes_through_untouched_with_its_content_length():
    block = b"\nContent-Type: text/plain\r\nCONTENT-LENGTH: 13\r\nX-Case: KeepMe\r\nDate: d\r\n"
    fields, length, chunked = response_fields(block)
    assert isinstance(fields, HeaderBlock) and fields.raw == block[1:]
    assert length == 13 and not chunked
    assert fields.pairs()[2] == (b"x-case", b"KeepMe")  # read as pairs when asked


def test_hop_by_hop_and_connection_listed_fields_are_removed():
    block = (
        b"\nConnection: keep-alive, X-Node-Secret\r\nX-Node-Secret: 42\r\n"
        b"Keep-Alive: timeout=5\r\nX-Kept: yes \r\nTransfer-Encoding: chunked\r\nDate: d\r\n"
    )
    fields, length, chunked = response_fields(block)
    assert fields == [(b"x-kept", b"yes"), (b"date", b"d")]
    assert length is None and chunked


def test_a_field_whose_name_only_starts_like_a_hop_by_hop_one_is_kept():
    block = b"\nTE-Like: 1\r\nUpgrade-Insecure: 2\r\ncontent-length: 0\r\nDATE: d\r\n"
    fields, length, _ = response_fields(block)
    assert isinstance(fields, HeaderBlock) and fields.raw == block[1:] and length == 0


def test_unreadable_content_length_is_an_error_not_a_guess():
    with pytest.raises(MalformedFields):
        response_fields(b"\ncontent-length: 12abc\r\n")


def test_block_and_list_forms_convert_both_ways():
    raw = b"A: 1\r\nB:\t two \r\n"
    block = HeaderBlock(raw)
    assert field_list(block) == [(b"a", b"1"), (b"b", b"two")]
    assert field_lines(field_list(block)) == b"a: 1\r\nb: two\r\n"
    assert field_lines(block) is raw
    assert field_list(HeaderBlock(b"")) == []
    edited = field_list(block)
    edited.append((b"c", b"3"))  # a caller's edit does not change the block
    assert len(block.pairs()) == 2


def test_a_response_without_date_gets_one():
    """RFC 9110 §6.6.1 (Date), as Go's server adds it, and so Traefik: the proxy has a clock."""
    fields, _, _ = response_fields(b"\ncontent-length: 0\r\n")
    (name, value) = field_list(fields)[-1]
    assert name == b"date"
    assert re.fullmatch(rb"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", value)
    fields, _, _ = response_fields(b"\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n")
    assert field_list(fields) == [(b"date", b"Sun, 06 Nov 1994 08:49:37 GMT")]  # kept as sent
