"""The differential harness's own parts, without Traefik: the tag it inserts into raw requests,
the recording backend and the raw client, over real loopback sockets.

If these are wrong, every differential verdict is: the tag must land at the end of the head
whatever the line endings or segmentation, and the backend must record exactly what it got.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.differential.harness import (
    HOLD_HEADER,
    INTERIM_HEADER,
    NO_CONTINUE_HEADER,
    STATUS_HEADER,
    TAG_HEADER,
    RecordingBackend,
    _tag_request,
    raw_request,
)


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    b = RecordingBackend().start()
    yield b
    b.close()


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        # CRLF head: the field goes before the blank line.
        ([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], b"GET / HTTP/1.1\r\nHost: a\r\nT: x\r\n\r\n"),
        # Bare-LF head whose body has a CRLF blank line: the head's own ending wins.
        (
            [b"GET / HTTP/1.1\nHost: a\n\n5\r\nhello\r\n0\r\n\r\n"],
            b"GET / HTTP/1.1\nHost: a\nT: x\n\n5\r\nhello\r\n0\r\n\r\n",
        ),
        # A body with LF LF after a CRLF head is left alone.
        ([b"GET / HTTP/1.1\r\n\r\nab\n\n"], b"GET / HTTP/1.1\r\nT: x\r\n\r\nab\n\n"),
        # The blank line split across two segments.
        (
            [b"GET / HTTP/1.1\r\nHost: a\r", b"\n\r\nbody"],
            b"GET / HTTP/1.1\r\nHost: a\r\nT: x\r\n\r\nbody",
        ),
    ],
)
def test_tag_goes_before_the_end_of_the_head(segments: list[bytes], expected: bytes) -> None:
    """The attribution field is inserted before the first blank line (RFC 9112 §2.1: the head
    ends there), keeping the segmentation; nothing else changes."""
    tagged = _tag_request(segments, "x")
    assert tagged is not None
    assert len(tagged) == len(segments)
    assert b"".join(tagged) == expected.replace(b"T: x", f"{TAG_HEADER}: x".encode())


def test_untaggable_request() -> None:
    """A head without an end (HTTP/0.9 style) cannot carry the field: None, sent untagged."""
    assert _tag_request([b"GET /\r\n"], "x") is None


def test_backend_records_exactly(backend: RecordingBackend) -> None:
    """The request line, field names (case kept), values and a chunked body as received."""
    raw = (
        b"POST /a%20b?q=1 HTTP/1.1\r\nHost: h.test\r\nX-Case: MiXeD\r\n"
        b"Transfer-Encoding: chunked\r\nX-Differential-Tag: t1\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    resp = raw_request(backend.port, [raw])
    assert resp.status == 200
    [rec] = backend.tagged("t1")
    assert rec.request_line == "POST /a%20b?q=1 HTTP/1.1"
    assert (rec.method, rec.target, rec.version) == ("POST", "/a%20b?q=1", "HTTP/1.1")
    assert ("X-Case", "MiXeD") in rec.headers
    assert rec.body == b"hello" and rec.body_complete


def test_backend_reports_a_malformed_body(backend: RecordingBackend) -> None:
    """A bad chunk size is recorded (the head counts as reached) and answered 400 + close."""
    raw = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"X-Differential-Tag: t2\r\n\r\nzz\r\n"
    )
    resp = raw_request(backend.port, [raw], await_close=True)
    assert resp.status == 400 and resp.closed
    [rec] = backend.tagged("t2")
    assert rec.body_error is not None and "zz" in rec.body_error


def test_backend_scripted_answers(backend: RecordingBackend) -> None:
    """STATUS_HEADER sets the status, INTERIM_HEADER sends 1xx first (the client reads past
    them, RFC 9110 §15.2), Expect gets 100 then the body is read; HOLD never answers."""
    head = f"GET / HTTP/1.1\r\nHost: h\r\n{STATUS_HEADER}: 418\r\n{INTERIM_HEADER}: 103,103\r\n"
    resp = raw_request(backend.port, [(head + "\r\n").encode()])
    assert (resp.status, resp.interim) == (418, [103, 103])

    expect = "POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
    resp = raw_request(backend.port, [(expect + "\r\n").encode()], body_after_continue=b"ok")
    assert (resp.status, resp.interim) == (200, [100])
    assert backend.requests[-1].body == b"ok"

    refused = expect + f"{STATUS_HEADER}: 401\r\n\r\n"
    resp = raw_request(backend.port, [refused.encode()], body_after_continue=b"ok")
    assert (resp.status, resp.interim) == (401, [])

    silent = expect + f"{NO_CONTINUE_HEADER}: 1\r\n\r\nok"
    resp = raw_request(backend.port, [silent.encode()])
    assert (resp.status, resp.interim) == (200, [])

    held = f"GET / HTTP/1.1\r\nHost: h\r\n{HOLD_HEADER}: 1\r\n\r\n"
    resp = raw_request(backend.port, [held.encode()], timeout=0.3)
    assert resp.status is None and resp.timed_out


def test_docs_table_lists_every_divergence() -> None:
    """docs/traefik-differences.md's table (written by `python -m tests.differential.report
    --write`) has exactly one row per divergence of test_http_vs_traefik.py, marked "to fix"
    for DIVERGENT and "deliberate" for DELIBERATE: a fix that removes a strict xfail, or a new
    divergence, must reach the doc too."""
    from tests.differential import report
    from tests.differential import test_http_vs_traefik as cases

    doc = report.DOC.read_text()
    table = doc[doc.index(report.BEGIN) : doc.index(report.END)]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| ") and len(cells) >= 6 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = cells[-1]
    to_fix = {cid for cid, status in rows.items() if "to fix" in status}
    deliberate = {cid for cid, status in rows.items() if status.startswith("deliberate")}
    assert to_fix == set(cases.DIVERGENT), "regenerate the table: report.py --write"
    assert deliberate == set(cases.DELIBERATE), "regenerate the table: report.py --write"
