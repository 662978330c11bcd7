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


@pytest.mark.parametrize(
    "block",
    [
        b"\nContent-Type: text/plain\r\nContent-Length: 13\r\nDate: d\r\n",  # length, Date
        b"\nContent-Type: text/plain\r\nContent-Length: 0\r\n",  # no Date: one added
        b"\nX-A: 1\r\n",  # no length (read until close), no Date
        b"\nDate: d\r\nX-B: 2\r\n",  # no length, Date
    ],
)
def test_a_head_seen_before_gives_the_same_answer(block):
    """The proxy remembers heads it has read (a backend repeats the same few): the second read
    of a head must give what the first gave, with a Date of now where one is added (RFC 9110
    §6.6.1), whatever Content-Length it carries (RFC 9112 §6.3)."""
    first, first_length, first_chunked = response_fields(block)
    second, second_length, second_chunked = response_fields(block)
    assert field_list(second) == field_list(first)
    assert (second_length, second_chunked) == (first_length, first_chunked)
    assert second_length == (13 if b"13" in block else 0 if b": 0" in block else None)
    assert [n for n, _ in field_list(second)].count(b"date") == 1
    assert isinstance(second, HeaderBlock) and second is not first  # never one shared object


def test_a_head_with_hop_by_hop_fields_is_cleaned_every_time():
    """RFC 9110 §7.6.1: hop-by-hop fields are removed from every response, not only the first
    one a backend sends with them."""
    block = b"\nConnection: X-Secret\r\nX-Secret: 1\r\nContent-Length: 2\r\nDate: d\r\n"
    for _ in range(3):
        fields, length, _ = response_fields(block)
        assert fields == [(b"content-length", b"2"), (b"date", b"d")] and length == 2
