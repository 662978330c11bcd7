"""The path middlewares' helpers (meshproxy.middlewares.path_rewrite), against Go's `net/url`
and `regexp` semantics as Traefik 3.7 shows them (values read from the real binary)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.middlewares.base import MiddlewareConfigError
from meshproxy.middlewares.path_rewrite import (
    _compile,
    decode_path,
    decoded_prefix_end,
    encode_path,
    go_replace_all,
    parse_go_template,
)


def test_decoded_prefix_is_cut_from_the_raw_path_by_its_encoded_length():
    """Issue 9 / Traefik 3.7: prefix `/foo bar` matches `/foo%20bar/baz` (decoded `URL.Path`)
    and leaves `/baz`; a `%XX` is one decoded byte."""
    raw = "/foo%20bar/a%2Fb%3AA"
    end = decoded_prefix_end(raw, b"/foo bar")
    assert raw[end:] == "/a%2Fb%3AA"
    assert decoded_prefix_end("/foo%20barx/y", b"/foo bar") == len("/foo%20bar")
    assert decoded_prefix_end("/api%2Fx", b"/api/x") == len("/api%2Fx")  # %2F decodes to "/"
    assert decoded_prefix_end("/foo%20ba", b"/foo bar") == -1  # shorter than the prefix
    assert decoded_prefix_end("/foo+bar", b"/foo bar") == -1  # "+" is not a space in a path
    assert decoded_prefix_end("/%C3%A9t%C3%A9", "/été".encode()) == len("/%C3%A9t%C3%A9")
    assert decoded_prefix_end("/x", b"") == 0


def test_decode_path_is_go_url_path_and_round_trips_bytes():
    """Go's `URL.Path` decodes every triplet (`%2F` too); bytes that are not UTF-8 are kept
    (as surrogates) so that the matched prefix encodes back to the bytes received."""
    assert decode_path("/a%2Fb%20c") == "/a/b c"
    assert decode_path("/plain") == "/plain"
    odd = decode_path("/srh/%E9/c")
    assert odd.encode("utf-8", "surrogateescape") == b"/srh/\xe9/c"


@pytest.mark.parametrize(
    ("configured", "on_the_wire"),
    [
        ("/re placed", "/re%20placed"),  # Traefik 3.7 replacePath "/re placed"
        ("/pre fix", "/pre%20fix"),  # Traefik 3.7 addPrefix "/pre fix"
        ("/a%2Fb/%41", "/a%2Fb/%41"),  # valid triplets kept as written (Traefik 3.7)
        ("/x/a!b*'(c);d=e:f@g[h]", "/x/a!b*'(c);d=e:f@g[h]"),  # pchar and [] stay raw
        ('/a"b{c}|d^e`f\\g<h>', "/a%22b%7Bc%7D%7Cd%5Ee%60f%5Cg%3Ch%3E"),
        ("/é?#", "/%C3%A9%3F%23"),  # UTF-8, and "?" "#" cannot be part of a path raw
    ],
)
def test_encode_path_escapes_what_a_request_target_cannot_carry(configured, on_the_wire):
    """RFC 3986 §3.3 pchar / RFC 9112 §3.2: what Go's `URL.EscapedPath` would escape."""
    assert encode_path(configured) == on_the_wire


@pytest.mark.parametrize("broken", ["/%zz", "/a%", "/a%4"])
def test_encode_path_refuses_broken_triplets(broken):
    """Go's `url.PathUnescape` error (Traefik 3.7: `invalid URL escape "%zz"`, 500)."""
    with pytest.raises(ValueError):
        encode_path(broken)


def test_go_template_expansion_matches_traefik():
    """Go's `Regexp.Expand` (Traefik 3.7 replacePathRegex `^/rpn/(?P<x>[a-z]+)` with
    `/a$1x/${1}x/$x/$$/${x}/$-/${9}z$0` on `/rpn/abc/def` forwarded
    `/a/abcx/abc/$/abc/$-/z/rpn/abc/def`): `$1x` names group "1x" (empty), `$$` is `$`, a
    malformed `$` is text, a missing group is empty."""
    pattern = _compile("^/rpn/(?P<x>[a-z]+)", "regex")
    template = parse_go_template("/a$1x/${1}x/$x/$$/${x}/$-/${9}z$0")
    assert go_replace_all(pattern, "/rpn/abc/def", template) == "/a/abcx/abc/$/abc/$-/z/rpn/abc/def"


def test_go_replace_all_skips_an_empty_match_right_after_a_match():
    """Go's `ReplaceAllString` (Traefik 3.7: `a*` -> `<$0>` on `/rpg/baaac` gave
    `<>/<>r<>p<>g<>/<>b<aaa>c<>`, before escaping)."""
    pattern = _compile("a*", "regex")
    result = go_replace_all(pattern, "/rpg/baaac", parse_go_template("<$0>"))
    assert result == "<>/<>r<>p<>g<>/<>b<aaa>c<>"


def test_invalid_regexp_is_a_config_error_with_its_path():
    """Go's regexp.Compile rejects `(`; the middleware is refused at config time."""
    with pytest.raises(MiddlewareConfigError):
        _compile("(", "regex")


RAW_PIECES = st.sampled_from(["/", "a", "b", " ", "%20", "%2F", "%41", "%C3%A9", "%E9", "é"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(RAW_PIECES, max_size=10).map(lambda parts: "/" + "".join(parts)),
    st.lists(RAW_PIECES, max_size=6).map(lambda parts: "/" + "".join(parts)),
)
def test_decoded_prefix_end_agrees_with_the_decoded_path(raw, prefix_raw):
    """Issue 9: the prefix is found exactly when the decoded path starts with it, and the raw
    text cut off decodes to exactly the prefix (the cut falls on its encoded length)."""
    raw = encode_path(raw)  # a raw path as the proxy holds it (ASCII, valid triplets)
    prefix = decode_path(encode_path(prefix_raw)).encode("utf-8", "surrogateescape")
    decoded = decode_path(raw).encode("utf-8", "surrogateescape")
    end = decoded_prefix_end(raw, prefix)
    assert (end >= 0) == decoded.startswith(prefix)
    if end >= 0:
        assert decode_path(raw[:end]).encode("utf-8", "surrogateescape") == prefix
