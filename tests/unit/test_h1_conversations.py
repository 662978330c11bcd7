"""HTTP/1.1 hardening, as scripted conversations over in-memory transports (tests/conversation.py).

Each test names the rule it holds the proxy to. "Nothing forwarded" means the backend's
transport received no byte; "released" means the upstream connection was closed (never put
back in the pool) or returned clean.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from meshproxy.http.server import EntryPointSettings
from meshproxy.http.upstream import TransportSettings
from tests.conversation import conversation, head_of
from tests.helpers import wait_for

GET = b"GET /x HTTP/1.1\r\nHost: svc.ns.traefik.mesh\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def settle() -> None:
    """One loop turn: the server starts an exchange with a body on the next turn."""
    await asyncio.sleep(0)


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


# -- item 4: a body whose framing breaks mid-stream (RFC 9112 §7.1) ---------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"zz\r\n",  # chunk size not hex
        b"5\r\nhelloXX",  # chunk data not followed by CRLF
        b"ffffffffffffffffffff\r\n",  # chunk size overflows
        b"5 x\r\nhello\r\n",  # junk after the size
        b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",  # malformed trailer field
    ],
    ids=["bad-size", "no-crlf-after-data", "size-overflow", "junk-after-size", "bad-trailer"],
)
async def test_malformed_chunked_body_answers_400_and_releases_both_connections(bad):
    """RFC 9112 §7.1: a chunked body that cannot be parsed makes the message's framing
    untrustworthy. The head already went upstream: the client gets 400 (no response had
    started), both connections close, the upstream connection is not reused, it is counted."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(
        b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    await settle()
    assert upstream.take().startswith(b"POST /up HTTP/1.1\r\n")
    answer = conv.send(bad)
    assert status_of(answer) == 400 and b"connection: close" in answer
    assert conv.client_transport.done
    assert upstream.closed and conv.pool.idle == []
    assert conv.protocol_errors == [400]
    assert conv.entrypoint_requests() == {400: 1}
    conv.client.connection_lost(None)  # what the event loop then does: nothing left to release
    assert conv.entry.connections == set()


async def test_malformed_body_after_the_response_started_cuts_both_connections():
    """RFC 9112 §7.1 and §9.6: once a response has started, the proxy cannot answer 400; the
    client connection is aborted and the upstream one closed."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(
        b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    await settle()
    upstream.take()
    started = conv.backend_sends(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"
    )
    assert started.startswith(b"HTTP/1.1 200 OK")
    conv.send(b"zz\r\n")
    assert conv.client_transport.aborted
    assert upstream.closed and conv.pool.idle == []


async def test_body_shorter_than_content_length_hits_the_read_timeout_with_408():
    """Traefik's readTimeout covers the whole request, body included: a client that stops
    mid-body gets 408 (RFC 9110 §15.5.9) and the upstream connection is released."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nabc")
    await settle()
    assert upstream.take().endswith(b"abc")
    conv.entry.sweep()  # within the timeout: nothing happens
    assert not conv.client_transport.done
    conv.client.check_timeouts(time.perf_counter() + 61, 180.0, 60.0)
    assert status_of(conv.client_transport.take()) == 408
    assert conv.client_transport.done and upstream.closed
    assert conv.entrypoint_requests() == {408: 1}


async def test_exchange_that_stalls_after_its_head_is_cut_after_the_idle_timeout():
    """An exchange that moves no byte either way (a backend that stopped sending its body, a
    client that stopped reading) for the idle timeout is cut, and both sides released."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(GET)
    conv.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    now = time.perf_counter()
    conv.client.check_timeouts(now, 180.0, 60.0)  # progress seen: the stall clock starts
    conv.client.check_timeouts(now + 100, 180.0, 60.0)
    assert not conv.client_transport.done
    conv.client.check_timeouts(now + 181, 180.0, 60.0)
    assert conv.client_transport.aborted and upstream.closed


async def test_backend_that_never_answers_gets_504_after_the_response_header_timeout():
    """Traefik's responseHeaderTimeout, on by default here (60 s, configurable; Traefik's
    default is none): the pool's sweep gives up on the backend with 504 and closes the
    upstream connection, never reusing it."""
    assert TransportSettings().response_header_timeout == 60.0
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(GET)
    assert upstream.take().startswith(b"GET /x")
    now = asyncio.get_running_loop().time()
    conv.pool.sweep(now + 59)
    assert conv.client_transport.take() == b"" and not upstream.closed
    conv.pool.sweep(now + 61)
    assert status_of(conv.client_transport.take()) == 504
    assert upstream.closed and conv.pool.idle == [] and conv.pool.busy == set()


async def test_response_header_timeout_starts_when_the_request_body_is_sent():
    """As Go's transport: the wait for the response head starts once the whole request is
    written; a slow upload is the read timeout's business, not this one's."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    await settle()
    now = asyncio.get_running_loop().time()
    conv.pool.sweep(now + 3600)
    assert not upstream.closed  # the body is not all sent: no header timeout yet
    conv.send(b"cd")
    conv.pool.sweep(asyncio.get_running_loop().time() + 61)
    assert status_of(conv.client_transport.take()) == 504 and upstream.closed


# -- item 5: transfer codings (RFC 9112 §6.1, §6.3) --------------------------------------------


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        (b"Transfer-Encoding: xchunked\r\n", 501),
        (b"Transfer-Encoding: gzip\r\n", 501),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked, gzip\r\n", 400),  # chunked not final: §6.3
        (b"Transfer-Encoding: identity\r\n", 501),
        (b"Transfer-Encoding: chunked, chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", 400),
    ],
)
async def test_transfer_codings_other_than_one_chunked_are_refused(fields, status):
    """RFC 9112 §6.1: 501 for a transfer coding the proxy does not implement; §6.3: 400 when
    chunked is not the final coding or the framing is ambiguous (TE with CL). Nothing is
    forwarded and the connection closes."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(b"POST / HTTP/1.1\r\nHost: a.test\r\n" + fields + b"\r\n0\r\n\r\n")
    await settle()
    assert status_of(answer) == status
    assert upstream.take() == b""
    assert conv.client_transport.done


async def test_transfer_encoding_in_an_http10_request_is_faulty_framing():
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing: 400."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status_of(answer) == 400 and upstream.take() == b""


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED"])
async def test_chunked_in_any_case_is_read(coding):
    """RFC 9112 §7: transfer-coding names are case-insensitive."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding + b"\r\n\r\n")
    await settle()
    conv.send(b"2\r\nhi\r\n0\r\n\r\n")
    assert upstream.take().endswith(b"2\r\nhi\r\n0\r\n\r\n")
    assert conv.backend_sends(OK).startswith(b"HTTP/1.1 200 OK")


# -- item 10 and the request-target forms (RFC 9112 §3.2) ---------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/public#/../admin",
        b"/#",
        b"/a?b=c#frag",
        b"http://a.test/x#frag",
        b"public",
        b"*",
        b"ftp://a.test/x",
        b"http://user@a.test/x",
        b"http:///x",
    ],
)
async def test_request_targets_outside_rfc9112_forms_get_400(target):
    """RFC 9112 §3.2: origin-form, absolute-form (http/https, a valid authority, no
    userinfo per RFC 9110 §4.2.4) and asterisk-form (OPTIONS only); never a fragment
    (CVE-2023-47106). Nothing is forwarded."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert status_of(answer) == 400
    assert upstream.take() == b""


@pytest.mark.parametrize(
    "line",
    [
        b"GET  /x HTTP/1.1",
        b"GET /x  HTTP/1.1",
        b"GET\t/x HTTP/1.1",
        b"GET /x\tHTTP/1.1",
        b"GET  /  HTTP/1.1",
    ],
)
async def test_request_line_with_other_blanks_than_two_spaces_gets_400(line):
    """RFC 9112 §3: request-line = method SP request-target SP HTTP-version, one space each
    (llhttp takes more; Go, so Traefik, refuses them). Nothing is forwarded; the same line
    with single spaces is served."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(line + b"\r\nHost: a.test\r\n\r\n")
    assert status_of(answer) == 400
    assert upstream.take() == b""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b" ".join(line.replace(b"\t", b" ").split()) + b"\r\nHost: a.test\r\n\r\n")
    assert upstream.take().startswith(b"GET /")


async def test_absolute_form_authority_wins_over_host():
    """RFC 9112 §3.2.2: with an absolute-form target the Host field is replaced by its
    authority."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"GET http://b.test:8080/x?y HTTP/1.1\r\nHost: a.test\r\n\r\n")
    line, fields = head_of(upstream.take())
    assert line == b"GET /x?y HTTP/1.1"
    assert fields[b"host"] == b"b.test:8080"


# -- item 11: Host (RFC 9112 §3.2, RFC 3986 §3.2.2) ------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        b"internal.test@public.test",
        b"a.test/admin",
        b"a test",
        b"a.test:80x",
        b"[::1",
        b"a.test\\b",
        b"a.test?x",
        b"a.test#x",
        b"%zz.test",
        b'a"b',
    ],
)
async def test_invalid_host_values_get_400(host):
    """RFC 9112 §3.2: a Host that is not `uri-host [":" port]` gets 400 and is not forwarded."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status_of(answer) == 400
    assert upstream.take() == b""


@pytest.mark.parametrize(
    "host",
    [b"a.test", b"A.Test:8080", b"127.0.0.1", b"[::1]:80", b"[::1]", b"a-b_c~d.test", b"x.test."],
)
async def test_valid_host_values_are_served(host):
    """RFC 3986 §3.2.2: reg-name, IPv4 and IP-literal hosts with an optional port."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert upstream.take().startswith(b"GET / HTTP/1.1")


# -- item 12: head limits, however the head is split over reads ------------------------------


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("segment", [1 << 20, 1000, 7])
async def test_long_request_target_gets_414_in_any_segmentation(segment):
    """RFC 9110 §15.5.15: a request-target longer than the limit (16 KiB by default) gets 414
    and is not forwarded, whether it arrives in one read or many."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    raw = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    answer = b"".join(conv.send(part) for part in split(raw, segment))
    assert status_of(answer) == 414
    assert upstream.take() == b"" and conv.client_transport.done


@pytest.mark.parametrize("segment", [1 << 20, 1000, 13])
async def test_large_header_section_gets_431_in_any_segmentation(segment):
    """RFC 6585 §5: fields over the limit (60 KiB by default, as Envoy) get 431, never
    forwarded, in whatever pieces the head arrives."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n"
    answer = b"".join(conv.send(part) for part in split(raw, segment))
    assert status_of(answer) == 431
    assert upstream.take() == b"" and conv.client_transport.done


async def test_many_small_fields_count_towards_the_limit():
    """RFC 6585 §5: the limit is on the whole header section, not per field."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 100) for i in range(700))
    answer = conv.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert status_of(answer) == 431 and upstream.take() == b""


async def test_unterminated_field_value_is_bounded_before_it_ends():
    """A field value that never ends must not grow in memory: the head is refused once the
    bytes read for it pass the limits, before its end arrives."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    answer = b""
    for _ in range(100):  # 100 x 4 KiB, far past the 76 KiB the head may take
        answer += conv.send(b"c" * 4096)
        if conv.client_transport.done:
            break
    assert status_of(answer) == 431 and upstream.take() == b""


async def test_head_limits_are_configurable():
    """Traefik's entryPoints.X.http.maxHeaderBytes raises the limit."""
    conv = conversation(
        settings=EntryPointSettings(name="web", port=5000, max_header_bytes=200_000)
    )
    _, upstream = conv.add_upstream()
    conv.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n")
    assert upstream.take().startswith(b"GET / HTTP/1.1")


# -- item 13: the HTTP version (RFC 9110 §6.2) ------------------------------------------------


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.9", b"HTTP/9.1"])
async def test_major_version_other_than_1_gets_505(version):
    """RFC 9110 §6.2 and §15.6.6: 505 for a major version the proxy does not speak."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(b"GET / " + version + b"\r\nHost: a\r\n\r\n")
    assert status_of(answer) == 505 and upstream.take() == b""


@pytest.mark.parametrize("version", [b"HTTP/1.2", b"HTTP/1.9"])
async def test_higher_minor_version_is_served_as_http11(version):
    """RFC 9110 §6.2: a recipient treats a higher minor version as the highest it supports."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"GET / " + version + b"\r\nHost: a\r\n\r\n")
    assert upstream.take().startswith(b"GET / HTTP/1.1\r\n")
    answer = conv.backend_sends(OK)
    assert answer.startswith(b"HTTP/1.1 200 OK") and not conv.client_transport.done


# -- item 14: X-Forwarded-Port --------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "port"),
    [
        (b"GET / HTTP/1.1\r\nHost: svc.ns.traefik.mesh\r\n\r\n", b"80"),
        (b"GET / HTTP/1.1\r\nHost: svc.ns.traefik.mesh:8080\r\n\r\n", b"8080"),
        (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", b"80"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", b"80"),  # rebuilt path
        (b"GET / HTTP/1.0\r\n\r\n", b"80"),
    ],
)
async def test_x_forwarded_port_is_the_port_the_client_addressed(request_, port):
    """As Traefik: the port from Host, else the scheme's default (80 for http), never the
    proxy's listener port (5000 here)."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(request_)
    _, fields = head_of(upstream.take())
    assert fields[b"x-forwarded-port"] == port


# -- item 15: interim responses (RFC 9110 §15.2) ------------------------------------------------


async def test_103_early_hints_reach_the_client_before_the_final_response():
    """RFC 9110 §15.2 and RFC 8297: a proxy forwards 1xx responses."""
    conv = conversation()
    conv.add_upstream()
    conv.send(GET)
    answer = conv.backend_sends(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n" + OK
    )
    hints, rest = answer.split(b"\r\n\r\n", 1)
    assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"</s.css>; rel=preload" in hints
    assert rest.startswith(b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK")


async def test_interim_responses_are_not_sent_to_http10_clients():
    """RFC 9110 §15.2: a server must not send a 1xx response to an HTTP/1.0 client."""
    conv = conversation()
    conv.add_upstream()
    conv.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    answer = conv.backend_sends(b"HTTP/1.1 103 Early Hints\r\nLink: <x>\r\n\r\n" + OK)
    assert answer.startswith(b"HTTP/1.1 200 OK")


async def test_unsolicited_101_is_a_bad_gateway():
    """RFC 9110 §15.2.2: 101 answers an Upgrade; to any other request it is an invalid
    response (502), not an interim one, and the upstream connection is dropped."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(GET)
    answer = conv.backend_sends(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
    assert status_of(answer) == 502 and upstream.closed


async def test_unsolicited_100_is_not_relayed():
    """RFC 9110 §15.2.1: 100 answers an Expect; a client that did not ask gets only the final
    response."""
    conv = conversation()
    conv.add_upstream()
    conv.send(GET)
    assert conv.backend_sends(b"HTTP/1.1 100 Continue\r\n\r\n" + OK).startswith(b"HTTP/1.1 200")


# -- item 16: Expect: 100-continue (RFC 9110 §10.1.1) -------------------------------------------

EXPECT = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"


async def test_expect_is_forwarded_and_the_backends_100_relayed():
    """RFC 9110 §10.1.1: the expectation goes to the backend, whose 100 reaches the client;
    the proxy sends none of its own."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    assert conv.send(EXPECT) == b""
    await settle()
    _, fields = head_of(upstream.take())
    assert fields[b"expect"] == b"100-continue"
    assert conv.client_transport.take() == b""
    assert conv.backend_sends(b"HTTP/1.1 100 Continue\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    conv.send(b"hello")
    assert upstream.take() == b"hello"
    assert conv.backend_sends(OK).startswith(b"HTTP/1.1 200 OK")


async def test_backend_refusing_the_upload_answers_before_the_body_is_sent():
    """RFC 9110 §10.1.1: a backend may answer a final status instead of 100 (401, 413); the
    client gets it before sending its body, and since the body never came both connections
    close (the rest would be read as a new request otherwise)."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(EXPECT)
    await settle()
    upstream.take()
    answer = conv.backend_sends(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert status_of(answer) == 413 and b"connection: close" in answer
    assert conv.client_transport.done
    conv.client.connection_lost(None)
    assert upstream.closed and conv.pool.idle == []


async def test_proxy_answers_100_when_the_backend_stays_silent():
    """RFC 9110 §10.1.1: the proxy may send 100 itself when the backend does not answer
    within a short delay (`expect_continue_timeout`, 1 s by default, as Go's transport)."""
    conv = conversation(transport=TransportSettings(expect_continue_timeout=0.01))
    _, upstream = conv.add_upstream()
    conv.send(EXPECT)
    await settle()
    await wait_for(lambda: conv.client_transport.written, 5, "the proxy's 100")
    assert conv.client_transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conv.backend_sends(b"HTTP/1.1 100 Continue\r\n\r\n")  # the backend's own, late: not twice
    assert conv.client_transport.take() == b""


async def test_proxy_answers_100_itself_for_an_http10_backend():
    """RFC 9110 §10.1.1: an HTTP/1.0 server ignores Expect; once the proxy knows the backend
    speaks 1.0, it sends 100 itself and does not forward the expectation."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(EXPECT)
    await settle()
    upstream.take()
    conv.send(b"hello")
    conv.backend_sends(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
    assert conv.pool.http10
    conv.add_upstream()
    answer = conv.send(EXPECT)
    await settle()
    answer += conv.client_transport.take()
    assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"expect" not in conv.upstream_received().lower()


async def test_a_local_answer_to_an_expect_request_sends_no_100():
    """RFC 9110 §10.1.1: a final status instead of 100; the unsent body ends the connection."""
    conv = conversation(
        {
            "http": {
                "routers": {"r": {"entryPoints": ["web"], "service": "s", "rule": "Path(`/x`)"}},
                "services": {"s": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:9"}]}}},
            }
        }
    )
    conv.send(EXPECT)
    await settle()
    answer = conv.client_transport.take()
    assert status_of(answer) == 404 and b"100 Continue" not in answer


# -- trailers (RFC 9112 §7.1.2, RFC 9110 §6.5) -------------------------------------------------


async def test_request_trailers_reach_the_backend_allowed_ones_only():
    """RFC 9110 §6.5.1: trailers travel with a chunked body; fields that may not be trailers
    (framing, routing, authentication: RFC 9110 §6.5.1) are dropped on the way."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    await settle()
    conv.send(b"2\r\nhi\r\n0\r\nX-Checksum: abc\r\nAuthorization: x\r\n\r\n")
    sent = upstream.take()
    assert sent.endswith(b"2\r\nhi\r\n0\r\nx-checksum: abc\r\n\r\n")


async def test_response_trailers_reach_a_client_that_accepts_them():
    """RFC 9110 §10.1.4: `TE: trailers` says the client reads trailers; it is passed to the
    backend, and the backend's trailers (gRPC's grpc-status, say) reach the client."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
    _, fields = head_of(upstream.take())
    assert fields[b"te"] == b"trailers"
    answer = conv.backend_sends(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
        b"2\r\nok\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n"
    )
    assert answer.endswith(b"2\r\nok\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n")


async def test_response_trailers_are_dropped_for_a_client_that_did_not_ask():
    """RFC 9110 §6.5.1: a recipient may discard trailers; one that did not send `TE:
    trailers` gets the body and a plain last chunk."""
    conv = conversation()
    conv.add_upstream()
    conv.send(GET)
    answer = conv.backend_sends(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"
    )
    assert answer.endswith(b"2\r\nok\r\n0\r\n\r\n")


async def test_request_body_backpressure_pauses_only_that_exchange():
    """Per-exchange flow control: a body outgrowing what may be buffered while no upstream is
    attached yet (here: a connection is being dialled) pauses that exchange's body, which on
    HTTP/1.1 is its connection's reading; attaching the upstream resumes it."""
    from meshproxy.http.exchange import BODY_BUFFER_HIGH_WATER

    conv = conversation()  # no idle upstream connection: the pool dials
    conv.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 400000\r\n\r\n")
    await settle()
    ex = conv.client.current
    assert ex is not None and ex.body_target is None
    conv.send(b"x" * (BODY_BUFFER_HIGH_WATER - 10))
    assert conv.client_transport.reading
    conv.send(b"x" * 20)
    assert not conv.client_transport.reading
    _, upstream = conv.add_upstream()
    conn, _ = conv.upstreams[-1]
    conv.pool.idle.remove(conn)
    conn.start(ex, b"POST / HTTP/1.1\r\n\r\n", False, lambda exc: None)
    assert conv.client_transport.reading  # the buffered body left: reading resumes
    assert len(upstream.take()) == len(b"POST / HTTP/1.1\r\n\r\n") + BODY_BUFFER_HIGH_WATER + 10


# -- Connection cannot make framing or the proxy's own fields hop-by-hop (RFC 9110 §7.6.1) ------


@pytest.mark.parametrize(
    "connection", [b"Content-Length", b"keep-alive, Content-Length", b"close, content-length"]
)
async def test_connection_naming_content_length_cannot_smuggle_a_request(connection):
    """RFC 9110 §7.6.1: Connection lists the sender's hop-by-hop fields, not the framing:
    the body stays framed by its Content-Length, so the bytes of a request hidden in it reach
    the backend as one POST's body, never as a second request past the routers."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    hidden = b"GET /admin/secret HTTP/1.1\r\nHost: a\r\n\r\n"
    conv.send(
        b"POST /public HTTP/1.1\r\nHost: a\r\nConnection: " + connection + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden
    )
    await settle()
    sent = upstream.take()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert b"\r\ncontent-length: %d" % len(hidden) in head.lower()
    assert body == hidden


async def test_connection_naming_forwarded_fields_cannot_hide_the_client():
    """As Traefik since CVE-2024-45410: X-Forwarded-* and X-Real-Ip named in Connection are
    still set by the proxy."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(
        b"GET /hop HTTP/1.1\r\nHost: evil\r\nConnection: close, X-Forwarded-For, X-Real-Ip, "
        b"X-Forwarded-Host, X-Forwarded-Proto, X-Forwarded-Port, X-Forwarded-Server\r\n"
        b"X-Real-Ip: 6.6.6.6\r\n\r\n"
    )
    _, fields = head_of(upstream.take())
    assert fields[b"x-real-ip"] == b"127.0.0.7" and fields[b"x-forwarded-for"] == b"127.0.0.7"
    assert fields[b"x-forwarded-host"] == b"evil" and fields[b"x-forwarded-proto"] == b"http"
    assert fields[b"x-forwarded-port"] == b"80" and b"x-forwarded-server" in fields


async def test_a_backend_naming_content_length_in_connection_keeps_the_response_framed():
    """The same rule on the way back: the client's framing must survive the backend's
    Connection field."""
    conv = conversation()
    conv.add_upstream()
    conv.send(GET)
    answer = conv.backend_sends(
        b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok"
    )
    assert b"content-length: 2" in answer.lower() and answer.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("size", [900, 100])
async def test_many_pipelined_requests_in_one_read_are_not_one_big_head(size):
    """RFC 9112 §9.3.2: pipelined requests are separate messages; 140+ KB of small heads in
    one read (a head left unfinished at its end) is not a 431."""
    conv = conversation()
    for _ in range(3):
        conv.add_upstream()
    one = b"GET /a HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * size + b"\r\n\r\n"
    stream = one * (150_000 // len(one))
    cut = len(stream) - 20  # the last head is cut: it finishes in the next read
    answered = conv.send(stream[:cut])
    for _ in range(len(stream) // len(one) + 1):
        for conn, transport in conv.upstreams:
            if conn.ex is not None and transport.take():
                answered += conv.backend_sends(OK, conv.upstreams.index((conn, transport)))
        if conv.client.current is None and not conv.client.pipeline:
            break
    answered += conv.send(stream[cut:])
    for conn, transport in conv.upstreams:
        if conn.ex is not None and transport.take():
            answered += conv.backend_sends(OK, conv.upstreams.index((conn, transport)))
    assert b" 431 " not in answered and conv.protocol_errors == []
    assert answered.count(b"HTTP/1.1 200 OK") == len(stream) // len(one)


async def test_a_backend_head_that_never_ends_is_bounded():
    """A backend streaming one endless field must not grow the proxy's memory: past 1 MiB of
    head the client gets 502 and the backend connection is closed."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(GET)
    answer = conv.backend_sends(b"HTTP/1.1 200 OK\r\nX-Big: ")
    for _ in range(10):  # 10 x 256 KiB: past the bound after four
        if upstream.closed:
            break
        answer += conv.backend_sends(b"v" * (256 * 1024))
    assert status_of(answer) == 502 and upstream.closed
