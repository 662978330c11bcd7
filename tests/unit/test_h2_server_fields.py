"""The fast check of HTTP/2 request field blocks (meshproxy.http2.server_fields) never accepts
what h2's own validator refuses (RFC 9113 §8.2, §8.3), and accepts the usual requests."""

from __future__ import annotations

import h2.exceptions
import h2.utilities
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.http2.server_fields import plainly_valid

FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
NAMES = [
    b":method", b":scheme", b":authority", b":path", b":protocol", b":status", b":foo",
    b"accept", b"Accept", b"x-a", b"x a", b"x:a", b"", b"host", b"te", b"connection",
    b"upgrade", b"keep-alive", b"transfer-encoding", b"cookie", b"x-\xff",
]  # fmt: skip
VALUES = [
    b"", b"GET", b"CONNECT", b"/", b"a.test", b"b.test", b"trailers", b"gzip", b" x", b"x\t",
    b"a\rb", b"a\nb", b"a\x00b", b"http", b"v\x01",
]  # fmt: skip


def h2_accepts(headers: list[tuple[bytes, bytes]]) -> bool:
    try:
        list(h2.utilities.validate_headers(headers, FLAGS))
    except h2.exceptions.ProtocolError:
        return False
    return True


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=8))
def test_nothing_accepted_fast_is_refused_by_h2(headers):
    """A subset of h2's rules: what the fast check accepts, h2 accepts."""
    if plainly_valid(headers):
        assert h2_accepts(headers), headers


@settings(max_examples=500, deadline=None)
@given(
    st.permutations(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"/")]
    ),
    st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=4),
)
def test_valid_requests_around_a_well_formed_head(pseudo, extra):
    """Generated near a valid request (so acceptance is common): still never looser than h2."""
    headers = list(pseudo) + extra
    if plainly_valid(headers):
        assert h2_accepts(headers), headers


def test_the_usual_requests_take_the_fast_path():
    """What curl, h2load and grpcio send is accepted without h2's byte-by-byte walk."""
    base = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a:80")]
    assert plainly_valid(base + [(b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*")])
    grpc = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pkg.Svc/Method"),
        (b":authority", b"svc:50051"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (b"grpc-timeout", b"10S"),
        (b"x-bin", b"AAEC"),
    ]
    assert plainly_valid(grpc)
    assert not plainly_valid(base + [(b"Accept", b"*/*")])
    assert not plainly_valid(base + [(b"connection", b"close")])
    assert not plainly_valid(base[1:])
