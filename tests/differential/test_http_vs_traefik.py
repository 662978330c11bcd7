"""Differential tests: the same raw request through real Traefik 3.7 and through meshproxy.

Each case of issue 9 (items 4-16) and its neighbouring variants, the rule language and the
middlewares meshproxy supports (docs/middlewares.md), sent as raw bytes through both proxies
configured by the same dynamic config, to one recording backend (tests/differential/harness.py).
A case passes when meshproxy does what Traefik does in the compared projection (the client's
status, whether anything reached the backend, the forwarded request line and the fields in
`COMPARED_HEADERS`), and Traefik's own answer is the one recorded in the case (so a change of
the reference, or a harness that stopped reaching Traefik, fails too).

Where meshproxy is deliberately different (mostly stricter framing: items 4, 5, 10, 11, 12 and
the head's syntax), the case says what meshproxy must do instead and `DELIBERATE` says why.
Where meshproxy diverges today and should not, the case is in `DIVERGENT`, i.e.
`xfail(strict=True)` with the divergence as its reason: a fix turns it into an XPASS, which
fails the run until the entry is removed. After changing either list, regenerate the table of
docs/traefik-differences.md with `.venv/bin/python -m tests.differential.report --write`
(test_harness.py checks that the table and the lists agree).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pytest
import yaml

from tests.differential.harness import (
    COMPARED_HEADERS,
    HOLD_HEADER,
    INTERIM_HEADER,
    NO_CONTINUE_HEADER,
    STATUS_HEADER,
    Comparison,
    Differential,
    raw_request,
)

DifferentialFactory = Callable[..., Differential]


# ---------------------------------------------------------------- configs


def _router(rule: str, middlewares: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"rule": rule, "service": "s", "entryPoints": ["web"], **extra}
    if middlewares:
        r["middlewares"] = middlewares
    return r


def main_config(backend_url: str) -> dict[str, Any]:
    """Issue 9's scenario (items 8, 9) plus one router per path middleware, and /slow whose
    service has a 1 s response-header timeout (item 6).

    /api strips /api; /admin is behind an ipAllowList that refuses loopback (403); a catch-all
    router (explicit priority 1) takes everything else.
    """
    return {
        "http": {
            "routers": {
                "api": _router("PathPrefix(`/api`)", ["strip-api"]),
                "admin": _router("PathPrefix(`/admin`)", ["admin-only"]),
                "public": _router("PathPrefix(`/public`)"),
                "foobar": _router("PathPrefix(`/foo bar`)", ["strip-foobar"]),
                "rx": _router("PathPrefix(`/rx`)", ["strip-rx"]),
                "repl": _router("PathPrefix(`/repl`)", ["repl"]),
                "add": _router("PathPrefix(`/add`)", ["add"]),
                "rp": _router("PathPrefix(`/rp`)", ["rp"]),
                "hdr": _router("PathPrefix(`/hdr`)", ["hdr"]),
                "allowed": _router("PathPrefix(`/allowed`)", ["allow-local"]),
                "xff": _router("PathPrefix(`/xff`)", ["allow-depth"]),
                "chain": _router("PathPrefix(`/chain`)", ["chained"]),
                "buf": _router("PathPrefix(`/buf`)", ["buffer-10"]),
                "catchall": _router("PathPrefix(`/`)", priority=1),
                "slow": {
                    "rule": "PathPrefix(`/slow`)",
                    "service": "slow",
                    "entryPoints": ["web"],
                },
            },
            "middlewares": {
                "strip-api": {"stripPrefix": {"prefixes": ["/api"]}},
                "admin-only": {"ipAllowList": {"sourceRange": ["192.0.2.0/24"]}},
                "strip-foobar": {"stripPrefix": {"prefixes": ["/foo bar"]}},
                "strip-rx": {"stripPrefixRegex": {"regex": ["/rx/[a-z0-9]+"]}},
                "repl": {"replacePathRegex": {"regex": "^/repl/(.*)", "replacement": "/new/$1"}},
                "add": {"addPrefix": {"prefix": "/added"}},
                "rp": {"replacePath": {"path": "/replaced"}},
                "hdr": {
                    "headers": {
                        "customRequestHeaders": {"X-Custom": "set", "X-Drop": ""},
                        "customResponseHeaders": {"X-Resp": "r"},
                        "frameDeny": True,
                        "contentTypeNosniff": True,
                    }
                },
                "allow-local": {"ipAllowList": {"sourceRange": ["127.0.0.1/32"]}},
                "strip-chain": {"stripPrefix": {"prefixes": ["/chain"]}},
                "chained": {"chain": {"middlewares": ["strip-chain", "add", "hdr"]}},
                "buffer-10": {"buffering": {"maxRequestBodyBytes": 10}},
                "allow-depth": {
                    "ipAllowList": {
                        "sourceRange": ["192.0.2.0/24"],
                        "ipStrategy": {"depth": 1},
                    }
                },
            },
            "services": {
                "s": {"loadBalancer": {"servers": [{"url": backend_url}]}},
                "slow": {
                    "loadBalancer": {
                        "servers": [{"url": backend_url}],
                        "serversTransport": "short",
                    }
                },
            },
            # Item 6: a response-header timeout, as Traefik's serversTransports configure it.
            "serversTransports": {"short": {"forwardingTimeouts": {"responseHeaderTimeout": "1s"}}},
        }
    }


RULE_ROUTERS = {
    # name: (rule, extra router options). Each router tags the request with X-Router.
    "host": ("Host(`rules.test`)", {}),
    "host-v2": ("Host(`rules.test`) && PathPrefix(`/v2`)", {}),
    "canary": ("Host(`rules.test`) && Header(`X-Env`, `canary`)", {}),
    "debug": ("Host(`rules.test`) && Query(`debug`, `1`)", {}),
    "post": ("Host(`rules.test`) && Method(`POST`)", {}),
    "not-delete": ("Host(`rules.test`) && PathPrefix(`/v2`) && !Method(`DELETE`)", {}),
    "items": ("Host(`rules.test`) && PathRegexp(`^/items/[0-9]+$`)", {}),
    "wild": ("HostRegexp(`^[a-z]+\\.wild\\.test$`)", {}),
    "prio-high": ("Host(`prio.test`)", {"priority": 100}),
    "prio-low": ("Host(`prio.test`) && Path(`/x`)", {"priority": 1}),
    "either": ("Host(`or.test`) && (Path(`/a`) || Path(`/b`))", {}),
}


def rules_config(backend_url: str) -> dict[str, Any]:
    """A handful of routers over Host/PathPrefix/Header/Query/Method rules; which one won is
    told to the backend by a headers middleware setting X-Router."""
    routers = {}
    middlewares = {}
    for name, (rule, extra) in RULE_ROUTERS.items():
        routers[name] = _router(rule, [f"tag-{name}"], **extra)
        middlewares[f"tag-{name}"] = {"headers": {"customRequestHeaders": {"X-Router": name}}}
    return {
        "http": {
            "routers": routers,
            "middlewares": middlewares,
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend_url}]}}},
        }
    }


@pytest.fixture(scope="module", autouse=True)
def _start_pairs_together(differential: DifferentialFactory) -> None:
    """Start every pair of this module at once (`pair_specs()`): their start-ups (process
    imports, config loads, readiness probes) overlap instead of adding up."""
    with ThreadPoolExecutor(max_workers=len(pair_specs())) as pool:
        started = [
            pool.submit(differential, name, make, flags)
            for name, (make, flags) in pair_specs().items()
        ]
        for future in started:
            future.result()


def pair_specs() -> dict[str, tuple[Callable[[str], dict[str, Any]], tuple[str, ...]]]:
    """name -> (dynamic config factory, static flags) of every pair this module uses."""
    return {
        "http-main": (main_config, ()),
        "http-trusted": (main_config, TRUSTED_FLAGS),
        "http-strict": (main_config, STRICT_FLAGS),
        "http-raised": (main_config, RAISED_FLAGS),
        "http-rules": (rules_config, ()),
        "http-reload": (reload_config, ()),
    }


@pytest.fixture(scope="module")
def main_pair(differential: DifferentialFactory) -> Differential:
    return differential("http-main", main_config)


@pytest.fixture(scope="module")
def trusted_pair(differential: DifferentialFactory) -> Differential:
    return differential("http-trusted", main_config, TRUSTED_FLAGS)


@pytest.fixture(scope="module")
def strict_pair(differential: DifferentialFactory) -> Differential:
    return differential("http-strict", main_config, STRICT_FLAGS)


@pytest.fixture(scope="module")
def raised_pair(differential: DifferentialFactory) -> Differential:
    return differential("http-raised", main_config, RAISED_FLAGS)


@pytest.fixture(scope="module")
def rules_pair(differential: DifferentialFactory) -> Differential:
    return differential("http-rules", rules_config)


# ---------------------------------------------------------------- cases


def req(
    target: str = "/public",
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    version: str = "HTTP/1.1",
    host: str | None = "a.test",
) -> bytes:
    """A raw request head (latin-1, so any byte can be written) followed by `body` as is."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, method: str = "POST", target: str = "/public", **kw: Any) -> bytes:
    """A request declaring `Transfer-Encoding: chunked` followed by `body` verbatim."""
    return req(target, method, (("Transfer-Encoding", "chunked"),), body, **kw)


def te(value: str, body: bytes = b"5\r\nhello\r\n0\r\n\r\n", *extra: tuple[str, str]) -> bytes:
    """A POST with `Transfer-Encoding: value` (and `extra` fields) followed by `body`."""
    return req("/public", "POST", (("Transfer-Encoding", value), *extra), body)


@dataclass(frozen=True)
class Case:
    """One raw request and what is expected of both proxies.

    `traefik`: Traefik 3.7's status, as observed (and, for the items the issue lists, as its
    author checked); asserted, so the reference is pinned and a harness that stopped reaching
    Traefik fails. `meshproxy`, when set, is a deliberate difference: meshproxy's required status
    instead of Traefik's (docs/traefik-differences.md says why); `forwards` then says whether
    meshproxy may reach the backend (False: it must not; None: not checked). `headers` are the
    request fields compared on what reached the backend. `closes`: meshproxy must close the
    connection after answering (the framing can no longer be trusted, RFC 9112 §6.3); when
    Traefik refuses too, its close is checked as well.
    """

    id: str
    raw: bytes | tuple[bytes, ...]
    traefik: int | None
    meshproxy: int | None = None
    forwards: bool | None = False
    headers: tuple[str, ...] = COMPARED_HEADERS
    closes: bool = False


# Divergences found by running this suite (case id -> what differs), status "to fix". Each
# becomes xfail(strict=True): a fix makes it XPASS, which fails the run until the entry goes.
# docs/traefik-differences.md has the table (raw request, Traefik, meshproxy).
DIVERGENT: dict[str, str] = {}

# Why meshproxy deliberately answers otherwise than Traefik (every Case with `meshproxy` set).
_ITEM4_WHY = (
    "RFC 9112 §7.1 and issue 9 item 4: a malformed chunked body is a client error (400) "
    "answered before any response started, and nothing half-framed reaches the backend; Traefik "
    "forwards the head, then fails the body read and answers 500"
)
_EXT_WHY = (
    "RFC 9112 §7.1.1 chunk-ext grammar: an extension that is not token[=token|quoted-string] is "
    "a framing error; Go ignores everything after `;`, a parser-differential smuggling vector"
)
_TE_WHY = (
    "RFC 9112 §6.3 item 4 / §7: chunked not final (or applied twice) MUST be answered 400; "
    "Traefik answers 501 to any coding list but a lone chunked"
)
_HOST_WHY = (
    'issue 9 item 11, RFC 9112 §3.2: a Host that is not uri-host [":" port] is refused with '
    "400; Go only checks the field-value characters"
)
_HEAD_WHY = (
    "issue 9 item 12: a mesh proxy should not hold 1 MiB per connection for a head; limits "
    "(60 KiB of head, 16 KiB of target, as Envoy and HAProxy) are configurable"
)
_FRAGMENT_WHY = (
    "RFC 9112 §3.2: the request-target has no fragment, in the path or in the query; Traefik's "
    "CVE-2023-47106 check looks at the path only"
)
_OBS_WHY = (
    "RFC 9112 §5.2: a server MUST either reject obs-fold with 400 or unfold it; rejecting leaves "
    "no line-folding differences between the proxy and the backend"
)
_TARGET_WHY = (
    "issue 9 item 12: the request target has its own limit (16 KiB, 414 URI Too Long, RFC 9110 "
    "§15.5.15) instead of counting against maxHeaderBytes (Go answers 431 for both)"
)
_METHOD_WHY = (
    "llhttp (through httptools, the HTTP/1.1 parser on the hot path) accepts only the methods "
    "it knows (IANA-registered, upper case): others are refused with 400 before anything is "
    "forwarded; Go forwards any token (RFC 9110 §9.1 lets methods be extended)"
)

DELIBERATE: dict[str, str] = {
    "te-trailing-comma": "llhttp refuses a Transfer-Encoding list with a trailing empty element "
    "(400); RFC 9110 §5.6.1.2 would ignore it, Traefik answers 501 (unsupported coding): either "
    "way nothing is forwarded",
    "method-lowercase": _METHOD_WHY,
    "method-extension": _METHOD_WHY,
    "strict-head-12k-go-slack": "the configured maxHeaderBytes is enforced exactly; Go's server "
    "lets up to 4096 bytes more through (its read-buffer slack), which no Traefik doc promises",
    "strict-target-20k": _TARGET_WHY,
    "raised-target-20k": _TARGET_WHY,
    "obs-fold": _OBS_WHY,
    "bare-lf-head": "RFC 9112 §2.2 only allows (MAY) a bare LF as line terminator; refusing it "
    "removes a classic parser-differential smuggling vector (Go accepts it)",
    "asterisk-form-get": "RFC 9112 §3.2.4: the asterisk-form is only for OPTIONS; any other "
    "method with `*` is a malformed request (400), not Traefik's 404",
    "absolute-form-ftp": "a mesh proxy serves http and https only: an absolute-form target with "
    "another scheme is refused (400) rather than served as if it were http",
    **{
        cid: _ITEM4_WHY
        for cid in (
            "bad-size-zz",
            "bad-size-zz-then-data",
            "negative-size",
            "size-overflow",
            "size-0x-prefix",
            "missing-crlf-after-data",
            "bare-lf-chunk-lines",
            "space-in-size",
        )
    },
    "bad-extension-ctl": _EXT_WHY,
    "bad-extension-unterminated-quote": _EXT_WHY,
    "cl-two-same": "RFC 9110 §8.6 lets a recipient either reject or merge duplicate "
    "Content-Length fields; rejecting closes a request-smuggling vector",
    "chunked-gzip": _TE_WHY,
    "chunked-chunked": _TE_WHY,
    "two-te-fields": _TE_WHY,
    "te-empty": "an empty Transfer-Encoding is not a valid field value (RFC 9112 §6.1): 400, "
    "not Traefik's 501 for an unknown coding",
    "te-xchunked-and-cl": "Transfer-Encoding with Content-Length is refused first (400, as "
    "te-and-cl), before the unknown coding would be (Traefik's 501): nothing forwarded either way",
    "te-leading-comma": "RFC 9110 §5.6.1.2: a recipient MUST ignore empty list elements, so "
    "`, chunked` is chunked and served; Traefik (Go) answers 501",
    "te-and-cl": "RFC 9112 §6.3 item 3 allows rejecting a request with both Transfer-Encoding "
    "and Content-Length: the classic smuggling shape",
    "te-in-http10": "RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request MUST be treated as "
    "faulty framing",
    "fragment-after-query": _FRAGMENT_WHY,
    "fragment-in-query-value": _FRAGMENT_WHY,
    "bad-port": _HOST_WHY,
    "ipv6-unclosed": _HOST_WHY,
    "ipv6-unbracketed": _HOST_WHY,
    "absolute-form-userinfo": "RFC 9110 §4.2.4: userinfo in an http(s) URI from an untrusted "
    "source SHOULD be treated as an error (the same trick as item 11's Host)",
    "target-100k": _HEAD_WHY + "; 414 for the target (RFC 9110 §15.5.15)",
    "target-20k": _HEAD_WHY + "; 414 for the target (RFC 9110 §15.5.15)",
    "header-70k": _HEAD_WHY + "; 431 for the fields (RFC 6585 §5)",
    "header-70k-4k-segments": _HEAD_WHY + "; enforced on the whole head, however segmented",
    "header-70k-first-byte-apart": _HEAD_WHY + "; enforced on the whole head, however segmented",
    "header-70k-many-fields": _HEAD_WHY + "; the limit is on the head, not one field",
}


def params(cases: list[Case]) -> list[Any]:
    """pytest params for `cases`, with the strict xfail of every case listed in DIVERGENT."""
    out = []
    for case in cases:
        marks = []
        if case.id in DIVERGENT:
            marks.append(pytest.mark.xfail(strict=True, reason=f"divergence: {DIVERGENT[case.id]}"))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def check(pair: Differential, case: Case, **kw: Any) -> Comparison:
    """Run `case` through both proxies and assert the expectation described on `Case`."""
    refused = case.traefik is not None and case.traefik >= 400
    if case.closes:
        kw["await_close"] = ("meshproxy", "traefik") if refused else ("meshproxy",)
    cmp = pair.compare(case.raw, **kw)
    assert cmp.traefik.status == case.traefik, (
        f"Traefik's answer changed for {case.id}: {cmp.traefik.summary()} "
        f"(expected {case.traefik}); raw {cmp.raw[:200]!r}"
    )
    if case.meshproxy is None:
        cmp.assert_same(case.headers)
    else:
        assert case.id in DELIBERATE, f"{case.id}: a deliberate difference needs its why"
        assert cmp.meshproxy.status == case.meshproxy, (
            f"{case.id}: meshproxy should answer {case.meshproxy} (deliberate difference), got "
            f"{cmp.meshproxy.summary()}"
        )
        if case.forwards is False:
            assert not cmp.meshproxy.reached_backend, (
                f"{case.id}: meshproxy forwarded `{cmp.meshproxy.summary()}`"
            )
    if case.closes:
        assert cmp.meshproxy.response.closed, f"{case.id}: meshproxy kept the connection open"
        if refused:
            assert cmp.traefik.response.closed, f"{case.id}: Traefik kept the connection open"
    return cmp


def _closing(cases: list[Case]) -> list[Case]:
    """`cases` where every refused request also requires the connection to be closed: after a
    body framing error the next message's start is unknown (RFC 9112 §6.3, §7.1)."""
    refused = [(c.meshproxy if c.meshproxy is not None else c.traefik or 0) >= 400 for c in cases]
    return [replace(c, closes=True) if r else c for c, r in zip(cases, refused, strict=True)]


# Item 4: malformed chunked bodies (RFC 9112 §7.1). Traefik forwards the head at once (Go's
# ReverseProxy streams the body), the body read then fails and the client gets 500; Go ignores
# chunk extensions entirely. meshproxy answers 400 (the requirement).
ITEM4 = [
    Case("bad-size-zz", chunked(b"zz\r\n"), 500, 400, None),
    Case("bad-size-zz-then-data", chunked(b"zz\r\nhello\r\n0\r\n\r\n"), 500, 400, None),
    Case("negative-size", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), 500, 400, None),
    Case("size-overflow", chunked(b"1ffffffffffffffff\r\nhello\r\n0\r\n\r\n"), 500, 400, None),
    Case("size-0x-prefix", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 500, 400, None),
    Case("bad-extension-ctl", chunked(b"5;\x01\r\nhello\r\n0\r\n\r\n"), 200, 400, None),
    Case(
        "bad-extension-unterminated-quote",
        chunked(b'5;a="x\r\nhello\r\n0\r\n\r\n'),
        200,
        400,
        None,
    ),
    Case("missing-crlf-after-data", chunked(b"5\r\nhelloXX0\r\n\r\n"), 500, 400, None),
    Case("bare-lf-chunk-lines", chunked(b"5\nhello\n0\n\n"), 500, 400, None),
    Case("space-in-size", chunked(b"5 5\r\nhello\r\n0\r\n\r\n"), 500, 400, None),
    Case("good-chunked-control", chunked(b"5\r\nhello\r\n0\r\n\r\n"), 200),
    Case("good-chunked-extension", chunked(b"5;name=value\r\nhello\r\n0\r\n\r\n"), 200),
    Case("good-chunked-trailer", chunked(b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), 200),
]

# Content-Length framing errors, the same family (RFC 9112 §6.3 items 4-5, RFC 9110 §8.6).
FRAMING = [
    Case("cl-not-a-number", req("/public", "POST", (("Content-Length", "abc"),)), 400),
    Case("cl-negative", req("/public", "POST", (("Content-Length", "-1"),)), 400),
    Case("cl-plus-sign", req("/public", "POST", (("Content-Length", "+5"),), b"hello"), 400),
    Case(
        "cl-two-different",
        req("/public", "POST", (("Content-Length", "5"), ("Content-Length", "6")), b"hello!"),
        400,
    ),
    Case("cl-list-different", req("/public", "POST", (("Content-Length", "5, 6"),)), 400),
    Case(
        "cl-two-same",
        req("/public", "POST", (("Content-Length", "5"), ("Content-Length", "5")), b"hello"),
        200,
        400,
    ),
    Case("cl-good-control", req("/public", "POST", (("Content-Length", "5"),), b"hello"), 200),
    Case("cl-leading-zero", req("/public", "POST", (("Content-Length", "05"),), b"hello"), 200),
    Case("cl-huge", req("/public", "POST", (("Content-Length", "9" * 25),), b"hello"), 400),
    Case("cl-space-inside", req("/public", "POST", (("Content-Length", "5 5"),), b"hello"), 400),
    Case("cl-empty", req("/public", "POST", (("Content-Length", ""),), b"hello"), 400),
]

# Item 5: transfer codings (RFC 9112 §6.1, §6.3, §7): 501 for a coding not implemented, 400
# when chunked is not final or applied twice. Traefik (Go) answers 501 to anything but a lone
# `chunked`; meshproxy follows the RFC's 400 where chunked is not final.
ITEM5 = [
    Case("xchunked", te("xchunked"), 501),
    Case("gzip-chunked", te("gzip, chunked"), 501),
    Case("identity", te("identity"), 501),
    Case("chunked-gzip", te("chunked, gzip"), 501, 400),
    Case("chunked-chunked", te("chunked, chunked"), 501, 400),
    Case(
        "two-te-fields",
        te("chunked", b"5\r\nhello\r\n0\r\n\r\n", ("Transfer-Encoding", "gzip")),
        501,
        400,
    ),
    Case("te-empty", te(""), 501, 400),
    Case("te-xchunked-and-cl", te("xchunked", b"hello", ("Content-Length", "5")), 501, 400),
    Case("te-trailing-comma", te("chunked,"), 501, 400),
    Case("te-leading-comma", te(", chunked"), 501, 200, None),
    Case("te-tab-before-value", te("\tchunked"), 200),
    Case("te-quoted", te('"chunked"'), 501),
    Case("te-uppercase", te("CHUNKED"), 200),
    Case(
        "te-and-cl",
        te("chunked", b"5\r\nhello\r\n0\r\n\r\n", ("Content-Length", "3")),
        200,
        400,
    ),
    Case(
        "te-in-http10",
        req(
            "/public",
            "POST",
            (("Transfer-Encoding", "chunked"),),
            b"5\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.0",
        ),
        200,
        400,
    ),
]

# Item 8: dot-segments and encoded characters before routing (RFC 3986 §5.2.4, §6.2.2;
# Traefik >= 3.3.6 `sanitizePath`). Traefik 3.7 forwards encoded `/`, `\` and NUL as they came.
ITEM8 = [
    Case("dotdot", req("/api/../admin/secret"), 403),
    Case("dotdot-encoded", req("/api/%2e%2e/admin/secret"), 403),
    Case("dotdot-encoded-upper", req("/api/%2E%2E/admin/secret"), 403),
    Case("dotdot-encoded-mixed", req("/api/%2e%2E/admin/secret"), 403),
    Case("dotdot-half-encoded", req("/api/.%2e/admin/secret"), 403),
    Case("dot", req("/api/./admin"), 200),
    Case("double-slash", req("//admin/secret"), 403),
    Case("dotdot-above-root", req("/../../admin/secret"), 403),
    Case("dotdot-at-end", req("/api/.."), 200),
    Case("admin-then-back", req("/admin/../api/x"), 200),
    Case("encoded-unreserved", req("/%61dmin/secret"), 403),
    Case("absolute-form-dotdot", req("http://a.test/api/../admin/secret"), 403),
    Case("dotdot-with-query", req("/api/../admin/secret?x=1"), 403),
    Case("dotdot-encoded-slash", req("/api/..%2fadmin/secret"), 200),
    Case("dotdot-encoded-slash-upper", req("/api/..%2Fadmin/secret"), 200),
    Case("all-encoded", req("/api/%2e%2e%2fadmin/secret"), 200),
    Case("encoded-backslash", req("/api/..%5cadmin/secret"), 200),
    Case("raw-backslash", req("/api/..\\admin/secret"), 200),
    Case("encoded-nul", req("/api/%00/../admin"), 200),
    Case("encoded-nul-kept", req("/public/a%00b"), 200),
    Case("encoded-percent", req("/public/a%25b"), 200),
    Case("encoded-question-mark", req("/public/a%3Fb?c=d"), 200),
    Case("semicolon", req("/api/..;/admin"), 200),
    Case("admin-control", req("/admin/secret"), 403),
    Case("api-control", req("/api/x"), 200),
]

# Item 9: stripPrefix and friends on encoded paths: match on the decoded path, cut the raw path
# by the encoded length, keep the rest as received, X-Forwarded-Prefix (Traefik stripprefix).
ITEM9 = [
    Case("space-prefix", req("/foo%20bar/baz"), 200),
    Case("space-prefix-only", req("/foo%20bar"), 200),
    Case("space-prefix-encoded-rest", req("/foo%20bar/a%20b"), 200),
    Case("space-prefix-encoded-slash-rest", req("/foo%20bar/a%2Fb"), 200),
    Case("space-prefix-no-boundary", req("/foo%20barbaz"), 200),
    Case("space-prefix-tilde", req("/foo%20bar/%7euser"), 200),
    Case("raw-space-target", req("/foo bar/baz"), 400),
    Case("strip-api-encoded-rest", req("/api/a%20b/c"), 200),
    Case("strip-api-encoded-prefix", req("/%61pi/x"), 200),
    Case("strip-regex-encoded", req("/rx/abc/a%20b"), 200),
    Case("replace-regex-encoded", req("/repl/a%20b"), 200),
    Case("add-prefix-encoded", req("/add/a%20b"), 200),
    Case("replace-path-encoded", req("/rp/a%20b"), 200),
]

# Item 10: a fragment in the request target (RFC 9112 §3.2; CVE-2023-47106). Traefik refuses
# `#` in the path only; meshproxy refuses it anywhere in the target (the grammar has none).
ITEM10 = [
    Case("fragment-dotdot", req("/public#/../admin"), 400),
    Case("fragment-simple", req("/public#frag"), 400),
    Case("fragment-empty", req("/public#"), 400),
    Case("fragment-root", req("/#"), 400),
    Case("fragment-absolute-form", req("http://a.test/public#x"), 400),
    Case("fragment-after-query", req("/public?q=1#frag"), 200, 400),
    Case("fragment-in-query-value", req("/public?q=a#b&c=d"), 200, 400),
    Case("fragment-encoded", req("/public%23frag"), 200),
    Case("fragment-encoded-in-query", req("/public?q=%23"), 200),
]

# Item 11: Host must be `uri-host [":" port]` (RFC 9112 §3.2, RFC 3986 §3.2.2; RFC 9110 §4.2.4
# for userinfo). Traefik (Go) only refuses bytes outside the field-value grammar.
ITEM11 = [
    Case("userinfo", req(host="internal.test@public.test"), 400),
    Case("space", req(host="a b.test"), 400),
    Case("slash", req(host="a.test/evil"), 400),
    Case("non-ascii", req(host="\xff.test"), 400),
    Case("missing", req(host=None), 400),
    Case("two-hosts", req(headers=(("Host", "b.test"),)), 400),
    Case("bad-port", req(host="a.test:abc"), 200, 400),
    Case("ipv6-unclosed", req(host="[::1"), 200, 400),
    Case("ipv6-unbracketed", req(host="::1"), 200, 400),
    Case("absolute-form-userinfo", req("http://user@b.test/public", host="b.test"), 200, 400),
    Case("port-too-big", req(host="a.test:99999"), 200),
    Case("empty-port", req(host="a.test:"), 200),
    Case("empty", req(host=""), 200),
    Case("ipv6", req(host="[::1]"), 200),
    Case("ipv6-port", req(host="[::1]:8080"), 200),
    Case("trailing-dot", req(host="a.test."), 200),
    Case("underscore", req(host="a_b.test"), 200),
    Case("ipv4", req(host="192.0.2.1"), 200),
    Case("absolute-form-vs-host", req("http://b.test/public", host="a.test"), 200),
    Case("absolute-form-https", req("https://b.test/public", host="b.test"), 200),
    Case("absolute-form-no-host-field", req("http://b.test/public", host=None), 400),
]

# Item 12: head size limits. Traefik allows 1 MiB (Go's DefaultMaxHeaderBytes); meshproxy is
# deliberately stricter (60 KiB of head, 16 KiB of target, as the issue asks): 414 / 431,
# nothing forwarded, whatever the segmentation.
BIG_HEADER = "v" * 70_000


def _split(data: bytes, size: int) -> tuple[bytes, ...]:
    return tuple(data[i : i + size] for i in range(0, len(data), size))


ITEM12 = [
    Case("target-100k", req("/public/" + "a" * 100_000), 200, 414),
    Case("target-20k", req("/public/" + "a" * 20_000), 200, 414),
    Case("target-8k-control", req("/public/" + "a" * 8_000), 200),
    Case("header-70k", req(headers=(("X-Big", BIG_HEADER),)), 200, 431),
    Case("header-70k-4k-segments", _split(req(headers=(("X-Big", BIG_HEADER),)), 4096), 200, 431),
    Case(
        "header-70k-first-byte-apart",
        (b"G", req(headers=(("X-Big", BIG_HEADER),))[1:]),
        200,
        431,
    ),
    Case(
        "header-70k-many-fields",
        req(headers=tuple((f"X-F{i}", "v" * 90) for i in range(700))),
        200,
        431,
    ),
    Case("header-30k-control", req(headers=(("X-Big", "v" * 30_000),)), 200),
    Case("header-over-1mib", req(headers=(("X-Big", "v" * 1_100_000),)), 431),
]

# Neighbours of items 4, 5 and 13: the head's own syntax (RFC 9112 §2.2, §3, §5), where a
# proxy and a backend that parse differently are the request-smuggling setup.
HEAD_SYNTAX = [
    Case("space-before-colon", req(headers=(("Transfer-Encoding ", "chunked"),)), 400),
    Case("obs-fold", req(headers=(("X-A", "1\r\n 2"),)), 200, 400),
    Case("nul-in-value", req(headers=(("X-A", "a\x00b"),)), 400),
    Case("cr-in-value", req(headers=(("X-A", "a\rb"),)), 400),
    Case("space-in-name", req(headers=(("X A", "1"),)), 400),
    Case("empty-name", req(headers=(("", "x"),)), 400),
    Case(
        "whitespace-line-after-request-line",
        b"GET /public HTTP/1.1\r\n X: 1\r\nHost: a.test\r\n\r\n",
        400,
    ),
    Case("bare-lf-head", b"GET /public HTTP/1.1\nHost: a.test\n\n", 200, 400),
    Case("two-spaces-in-request-line", b"GET  /public HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
    Case("tab-in-request-line", b"GET\t/public HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
    Case("method-lowercase", req(method="get"), 200, 400),
    Case("method-extension", req(method="FOOBAR"), 200, 400),
    Case("method-bad-char", req(method="GE(T"), 400),
    Case("asterisk-form-options", req("*", "OPTIONS"), 200),
    Case("asterisk-form-get", req("*", "GET"), 404, 400),
    Case("authority-form-connect", req("a.test:443", "CONNECT", host="a.test:443"), 501),
    Case("absolute-form-ftp", req("ftp://a.test/public"), 200, 400),
    Case("target-no-slash", req("public"), 400),
]

# Item 12, configured: the same `entryPoints.web.http.maxHeaderBytes` for both. Strict pair:
# 8 KiB of head and every `encodedCharacters.allowEncoded*` false (Traefik >= 3.6 refuses those
# encoded characters in the path with 400); raised pair: Traefik's default 1 MiB, explicitly.
STRICT_FLAGS = (
    "--entryPoints.web.http.maxHeaderBytes=8192",
    *(
        f"--entryPoints.web.http.encodedCharacters.{option}=false"
        for option in (
            "allowEncodedSlash",
            "allowEncodedBackslash",
            "allowEncodedNullCharacter",
            "allowEncodedSemicolon",
            "allowEncodedPercent",
            "allowEncodedQuestionMark",
            "allowEncodedHash",
        )
    ),
)
RAISED_FLAGS = ("--entryPoints.web.http.maxHeaderBytes=1048576",)
STRICT = [
    Case("strict-head-7k", req(headers=(("X-Big", "v" * 7_000),)), 200),
    Case("strict-head-20k", req(headers=(("X-Big", "v" * 20_000),)), 431),
    Case("strict-head-12k-go-slack", req(headers=(("X-Big", "v" * 12_100),)), 200, 431),
    Case("strict-target-20k", req("/public/" + "a" * 20_000), 431, 414),
    Case("strict-encoded-slash", req("/public/a%2Fb"), 400),
    Case("strict-encoded-slash-lower", req("/public/a%2fb"), 400),
    Case("strict-encoded-backslash", req("/public/a%5Cb"), 400),
    Case("strict-encoded-nul", req("/public/a%00b"), 400),
    Case("strict-encoded-semicolon", req("/public/a%3Bb"), 400),
    Case("strict-encoded-percent", req("/public/a%25b"), 400),
    Case("strict-encoded-question-mark", req("/public/a%3Fb"), 400),
    Case("strict-encoded-hash", req("/public/a%23b"), 400),
    Case("strict-encoded-slash-in-query", req("/public?a=%2F"), 200),
    Case("strict-encoded-space", req("/public/a%20b"), 200),
]
RAISED = [
    Case("raised-head-70k", req(headers=(("X-Big", BIG_HEADER),)), 200),
    Case(
        "raised-head-70k-4k-segments",
        _split(req(headers=(("X-Big", BIG_HEADER),)), 4096),
        200,
    ),
    Case("raised-head-over-1mib", req(headers=(("X-Big", "v" * 1_100_000),)), 431),
    Case("raised-target-20k", req("/public/" + "a" * 20_000), 200, 414),
]

# Item 13: the request line's version (RFC 9110 §6.2, §15.6.6; RFC 9112 §2.3, §3).
ITEM13 = [
    Case("http-2.0", req(version="HTTP/2.0"), 505),
    Case("http-3.0", req(version="HTTP/3.0"), 505),
    Case("http-0.9", req(version="HTTP/0.9"), 505),
    Case("http-1.2", req(version="HTTP/1.2"), 200),
    Case("http-1.0", req(version="HTTP/1.0"), 200),
    Case("http-1.10", req(version="HTTP/1.10"), 400),
    Case("http-lowercase", req(version="http/1.1"), 400),
    Case("http-no-minor", req(version="HTTP/1"), 400),
    Case("http-leading-zero", req(version="HTTP/01.1"), 400),
    Case("version-missing", b"GET /public\r\nHost: a.test\r\n\r\n", 400),
]

# Item 14: X-Forwarded-Port from Host, else 80 (443 for TLS); the client's X-Forwarded-* and
# X-Real-Ip are not trusted (Traefik forwardedHeaders.insecure=false).
ITEM14 = [
    Case("host-no-port", req(host="a.test"), 200),
    Case("host-port", req(host="a.test:8080"), 200),
    Case("host-port-80", req(host="a.test:80"), 200),
    Case("ipv6-port", req(host="[::1]:9000"), 200),
    Case("client-xfport-ignored", req(headers=(("X-Forwarded-Port", "1234"),)), 200),
    Case("client-xff-replaced", req(headers=(("X-Forwarded-For", "198.51.100.7"),)), 200),
    Case(
        "client-xfhost-proto-replaced",
        req(headers=(("X-Forwarded-Host", "evil.test"), ("X-Forwarded-Proto", "https"))),
        200,
    ),
    Case("client-x-real-ip-replaced", req(headers=(("X-Real-Ip", "198.51.100.7"),)), 200),
]

# The middlewares meshproxy supports (docs/middlewares.md), as Traefik's docs describe them.
MIDDLEWARE_HEADERS = (*COMPARED_HEADERS, "x-custom", "x-drop")
MIDDLEWARES = [
    Case("stripprefix-query", req("/api/x?a=1&b=%20"), 200),
    Case("stripprefix-exact", req("/api"), 200),
    Case("stripprefix-regex", req("/rx/abc/def"), 200),
    Case("stripprefix-regex-no-match", req("/rx/ABC/def"), 200),
    Case("addprefix", req("/add/x?q=1"), 200),
    Case("replacepath", req("/rp/x?q=1"), 200),
    Case("replacepathregex", req("/repl/x/y?q=1"), 200),
    Case("replacepathregex-no-match", req("/repl"), 200),
    Case(
        "headers-request",
        req("/hdr/x", headers=(("X-Drop", "client"), ("X-Custom", "client"))),
        200,
        headers=MIDDLEWARE_HEADERS,
    ),
    Case(
        "chain", req("/chain/x", headers=(("X-Drop", "client"),)), 200, headers=MIDDLEWARE_HEADERS
    ),
    Case(
        "buffering-chunked",
        req("/buf/x", "POST", (("Transfer-Encoding", "chunked"),), b"5\r\nhello\r\n0\r\n\r\n"),
        200,
        headers=(*COMPARED_HEADERS, "content-length", "transfer-encoding"),
    ),
    Case(
        "buffering-small",
        req("/buf/x", "POST", (("Content-Length", "5"),), b"hello"),
        200,
        headers=(*COMPARED_HEADERS, "content-length", "transfer-encoding"),
    ),
    Case("buffering-too-large", req("/buf/x", "POST", (("Content-Length", "20"),), b"x" * 20), 413),
    Case(
        "buffering-too-large-chunked",
        req(
            "/buf/x",
            "POST",
            (("Transfer-Encoding", "chunked"),),
            b"14\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n",
        ),
        413,
    ),
    Case("ipallowlist-allowed", req("/allowed/x"), 200),
    Case("ipallowlist-denied", req("/admin/x"), 403),
    # From an untrusted client Traefik replaces X-Forwarded-For before any middleware runs, so
    # ipStrategy.depth sees only the client's own address: all refused.
    Case(
        "ipallowlist-depth-untrusted",
        req("/xff/x", headers=(("X-Forwarded-For", "192.0.2.7"),)),
        403,
    ),
    Case("ipallowlist-depth-no-xff", req("/xff/x"), 403),
]

# With the client trusted (entryPoints.web.forwardedHeaders.trustedIPs), its X-Forwarded-*
# are kept, X-Forwarded-For is appended to, and ipStrategy.depth reads it.
TRUSTED_FLAGS = ("--entryPoints.web.forwardedHeaders.trustedIPs=127.0.0.1/32",)
TRUSTED = [
    Case("depth-allowed", req("/xff/x", headers=(("X-Forwarded-For", "192.0.2.7"),)), 200),
    Case(
        "depth-rightmost-refused",
        req("/xff/x", headers=(("X-Forwarded-For", "192.0.2.7, 198.51.100.1"),)),
        403,
    ),
    Case(
        "depth-second",
        req("/xff/x", headers=(("X-Forwarded-For", "198.51.100.1, 192.0.2.7"),)),
        200,
    ),
    Case("depth-no-xff", req("/xff/x"), 403),
    Case("xff-appended", req(headers=(("X-Forwarded-For", "198.51.100.7"),)), 200),
    Case(
        "xf-host-proto-port-kept",
        req(
            headers=(
                ("X-Forwarded-Host", "outer.test"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Port", "8443"),
            )
        ),
        200,
    ),
    Case("x-real-ip-kept", req(headers=(("X-Real-Ip", "198.51.100.7"),)), 200),
    Case("host-port-trusted", req(host="a.test:8080"), 200),
]


@pytest.mark.parametrize("case", params(_closing(ITEM4 + FRAMING)))
def test_malformed_body_framing(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 4 and Content-Length neighbours: RFC 9112 §7.1 (chunked grammar), §6.3
    (Content-Length must be one valid number; RFC 9110 §8.6). A malformed body gets 400 before
    any response has started; a well-formed one is forwarded as Traefik forwards it."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(_closing(ITEM5)))
def test_transfer_codings(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 5: RFC 9112 §6.1 (501 for an unimplemented coding), §6.3 (400 when chunked
    is not final; TE with CL may be refused; TE in HTTP/1.0 is faulty framing), §7 (chunked at
    most once). Nothing is forwarded for a refused coding."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(ITEM8))
def test_dot_segments_before_routing(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 8: RFC 3986 §5.2.4 (remove_dot_segments) and §6.2.2 (decode unreserved
    %XX) before routing, as Traefik's `sanitizePath` (default true): /api/../admin reaches the
    ipAllowList of /admin (403), never the backend through /api."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(ITEM9))
def test_path_middlewares_on_encoded_paths(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 9: Traefik's stripPrefix/stripPrefixRegex/replacePathRegex/addPrefix match
    the decoded path and forward the rest still encoded (stripprefix.go: the prefix is cut from
    the raw path by its encoded length), with X-Forwarded-Prefix / X-Replaced-Path."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(ITEM10))
def test_fragment_in_target(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 10: RFC 9112 §3.2 (the request-target has no fragment), CVE-2023-47106:
    400 and nothing forwarded; an encoded %23 is data, not a fragment."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(ITEM11))
def test_host_validation(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 11: RFC 9112 §3.2 (exactly one valid Host, else 400; absolute-form's
    authority replaces Host, §3.2.2), RFC 3986 §3.2.2-3.2.3 (uri-host, port = *DIGIT)."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(ITEM12))
def test_head_size_limits(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 12: RFC 9110 §15.5.15 (414 for a target too long), RFC 6585 §5 (431 for
    header fields too large), enforced on the whole head however it is segmented; Traefik's
    limit is Go's 1 MiB, meshproxy's the issue's safe default (docs/traefik-differences.md)."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(HEAD_SYNTAX))
def test_head_syntax(main_pair: Differential, case: Case) -> None:
    """RFC 9112 §5.1 (no whitespace between field name and colon: 400), §5.2 (obs-fold: 400 or
    replace), RFC 9110 §5.5 (no NUL/CR/LF in a field value), §5.1 (field names are tokens),
    RFC 9112 §2.2 (whitespace before the first field line), §3 (single SP in the request line,
    method token, the four target forms and where each is allowed)."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(STRICT))
def test_configured_strict_entrypoint(strict_pair: Differential, case: Case) -> None:
    """Issue 9 items 8 and 12 with the entrypoint options set alike on both: Traefik's
    `http.maxHeaderBytes` (431, RFC 6585 §5) and `http.encodedCharacters.allowEncoded*=false`
    (400 for %2F, %5C, %00, %3B, %25, %3F, %23 in the path; the query is not checked)."""
    check(strict_pair, case)


@pytest.mark.parametrize("case", params(RAISED))
def test_configured_raised_head_limit(raised_pair: Differential, case: Case) -> None:
    """Issue 9 item 12: `http.maxHeaderBytes` raises meshproxy's head limit to Traefik's 1 MiB
    when set; the request target keeps its own limit (414, RFC 9110 §15.5.15)."""
    check(raised_pair, case)


@pytest.mark.parametrize("case", params(ITEM13))
def test_request_line_version(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 13: RFC 9110 §6.2 (a higher minor version is served as the highest we
    support) and §15.6.6 (505 for another major version); RFC 9112 §2.3 (HTTP-version grammar:
    one digit each, case-sensitive "HTTP"), §3 (the version is required)."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(ITEM14))
def test_forwarded_headers(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 14: Traefik's forwarded headers: X-Forwarded-Port is Host's port, else 80
    (443 with TLS); X-Forwarded-For/Host/Proto/Port and X-Real-Ip from an untrusted client are
    replaced (Traefik forwardedheaders, `insecure: false`)."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(MIDDLEWARES))
def test_middlewares(main_pair: Differential, case: Case) -> None:
    """Traefik's documented middlewares that meshproxy supports (docs/middlewares.md):
    stripPrefix/stripPrefixRegex (X-Forwarded-Prefix), addPrefix, replacePath/replacePathRegex
    (X-Replaced-Path), headers (customRequestHeaders, empty value removes), ipAllowList with
    ipStrategy.depth (the depth-th address from the right of X-Forwarded-For)."""
    check(main_pair, case)


@pytest.mark.parametrize("case", params(TRUSTED))
def test_trusted_forwarded_headers(trusted_pair: Differential, case: Case) -> None:
    """Traefik's forwardedHeaders.trustedIPs: from a trusted client X-Forwarded-Host/Proto/
    Port/X-Real-Ip are kept, the client address is appended to X-Forwarded-For, and ipAllowList's
    ipStrategy.depth picks the depth-th address from the right (Traefik ipAllowList docs)."""
    check(trusted_pair, case)


def test_headers_middleware_response_fields(main_pair: Differential) -> None:
    """Traefik's headers middleware on the response: customResponseHeaders, frameDeny
    (X-Frame-Options: DENY), contentTypeNosniff (X-Content-Type-Options: nosniff)."""
    cmp = main_pair.compare(req("/hdr/x"))
    cmp.assert_same(MIDDLEWARE_HEADERS)
    for name in ("X-Resp", "X-Frame-Options", "X-Content-Type-Options"):
        assert cmp.traefik.response.header(name) is not None, name
        assert cmp.meshproxy.response.header(name) == cmp.traefik.response.header(name), name


# Item 15: 1xx interim responses from the backend (RFC 9110 §15.2: a proxy forwards them).
INTERIM = [("early-hints", "103"), ("two-early-hints", "103,103"), ("processing", "102")]


@pytest.mark.parametrize(("name", "interim"), INTERIM, ids=[n for n, _ in INTERIM])
def test_interim_responses(main_pair: Differential, name: str, interim: str) -> None:
    """Issue 9 item 15: RFC 9110 §15.2 (a proxy forwards 1xx responses other than 101 outside
    an upgrade), RFC 8297 (103 Early Hints). The backend sends `interim` before its 200."""
    cmp = main_pair.compare(req(headers=((INTERIM_HEADER, interim),)))
    assert cmp.traefik.status == 200
    cmp.assert_same()
    assert cmp.meshproxy.response.interim == cmp.traefik.response.interim, (
        f"interim: traefik={cmp.traefik.response.interim} "
        f"meshproxy={cmp.meshproxy.response.interim}"
    )


# Item 16: Expect: 100-continue (RFC 9110 §10.1.1). Client: head, then the body only after a
# 100 (`body_after_continue`). `status` is the backend's answer (via X-Differential-Status).
EXPECT = [
    # name, the backend's status (Traefik relays it)
    ("backend-refuses", 401),
    ("backend-too-large", 413),
    ("backend-accepts", 200),
]


def _expect_head(status: int, version: str = "HTTP/1.1", expect: str = "100-continue") -> bytes:
    return req(
        "/public",
        "POST",
        (("Expect", expect), ("Content-Length", "5"), (STATUS_HEADER, str(status))),
        version=version,
    )


@pytest.mark.parametrize(("name", "status"), EXPECT, ids=[n for n, _ in EXPECT])
def test_expect_continue(main_pair: Differential, name: str, status: int) -> None:
    """Issue 9 item 16: RFC 9110 §10.1.1: a proxy forwards `Expect: 100-continue`, the
    backend's 100 or final status reaches the client, and a refused upload is refused before
    the client sends it (the client here sends its body only after a 100). How many 100s
    arrive is not compared: Go's server sends its own when the handler reads the body, and
    relays the backend's too when it comes first (so Traefik sends one or two, by timing);
    a client must take any number of 1xx (RFC 9110 §15.2)."""
    cmp = main_pair.compare(_expect_head(status), body_after_continue=b"hello")
    assert cmp.traefik.status == status
    cmp.assert_same((*COMPARED_HEADERS, "expect", "content-length"))
    distinct = (
        sorted(set(cmp.meshproxy.response.interim)),
        sorted(set(cmp.traefik.response.interim)),
    )
    assert distinct[0] == distinct[1], (
        f"interim: traefik={cmp.traefik.response.interim} "
        f"meshproxy={cmp.meshproxy.response.interim}"
    )
    t_body = cmp.traefik.request.body if cmp.traefik.request else None
    m_body = cmp.meshproxy.request.body if cmp.meshproxy.request else None
    assert m_body == t_body


def test_expect_continue_backend_silent(main_pair: Differential) -> None:
    """Issue 9 item 16: a backend that ignores `Expect: 100-continue` (sends no 100, waits for
    the body): RFC 9110 §10.1.1 lets a client (here the proxy's upstream side) send the body
    after waiting; Traefik's transport does so after its ExpectContinueTimeout (1 s) and the
    client gets a 100 then the backend's 200. meshproxy must not deadlock either: the client
    gets a 100 from it within the configured delay, the body reaches the backend."""
    head = req(
        "/public",
        "POST",
        (("Expect", "100-continue"), ("Content-Length", "5"), (NO_CONTINUE_HEADER, "1")),
    )
    cmp = main_pair.compare(head, body_after_continue=b"hello")
    assert cmp.traefik.status == 200
    cmp.assert_same((*COMPARED_HEADERS, "expect", "content-length"))
    assert cmp.meshproxy.response.interim == cmp.traefik.response.interim == [100]
    assert cmp.meshproxy.request is not None and cmp.meshproxy.request.body == b"hello"


EXPECT_ODD = [
    Case("expect-unknown", _expect_head(200, expect="something-else") + b"hello", 417),
    Case("expect-http10", _expect_head(200, version="HTTP/1.0") + b"hello", 200),
    Case(
        "expect-no-body",
        req("/public", headers=(("Expect", "100-continue"),)),
        200,
    ),
]


@pytest.mark.parametrize("case", params(EXPECT_ODD))
def test_expect_variants(main_pair: Differential, case: Case) -> None:
    """RFC 9110 §10.1.1: an unknown expectation may be answered 417; a 100-continue
    expectation in an HTTP/1.0 request is ignored; one on a request without body is harmless."""
    check(main_pair, case)


# ---------------------------------------------------------------- the rule language

RULE_CASES = [
    # id, raw request, Traefik's status
    Case("host", req("/", host="rules.test"), 200),
    Case("host-case", req("/", host="RULES.Test"), 200),
    Case("host-with-port", req("/", host="rules.test:8080"), 200),
    Case("host-trailing-dot", req("/", host="rules.test."), 200),
    Case("longer-rule-wins", req("/v2/x", host="rules.test"), 200),
    Case("header", req("/", host="rules.test", headers=(("X-Env", "canary"),)), 200),
    Case("header-other-value", req("/", host="rules.test", headers=(("X-Env", "prod"),)), 200),
    Case("query", req("/?debug=1", host="rules.test"), 200),
    Case("query-other", req("/?debug=2", host="rules.test"), 200),
    Case("method", req("/", "POST", (("Content-Length", "0"),), host="rules.test"), 200),
    Case("not-method", req("/v2/x", "DELETE", host="rules.test"), 200),
    Case("path-regexp", req("/items/42", host="rules.test"), 200),
    Case("path-regexp-no", req("/items/4x", host="rules.test"), 200),
    Case("host-regexp", req("/", host="abc.wild.test"), 200),
    Case("host-regexp-no", req("/", host="a1.wild.test"), 404),
    Case("priority-explicit", req("/x", host="prio.test"), 200),
    Case("or-a", req("/a", host="or.test"), 200),
    Case("or-c", req("/c", host="or.test"), 404),
    Case("no-router", req("/", host="none.test"), 404),
]


@pytest.mark.parametrize("case", params(RULE_CASES))
def test_rules(rules_pair: Differential, case: Case) -> None:
    """Traefik v3's rule language (routing/routers docs): Host (case-insensitive, port
    ignored), HostRegexp/PathRegexp (Go regexp), PathPrefix, Header, Query, Method, `!`, `||`,
    and priority (default the rule's length, longest first; explicit priority wins); the
    router that won is told by its X-Router request header. 404 when nothing matches."""
    check(rules_pair, replace(case, headers=(*COMPARED_HEADERS, "x-router")))


# Every field the backend receives, not only the ones a proxy sets (RFC 9110 §7.6.1: hop-by-hop
# fields and those named by Connection are removed; end-to-end ones are forwarded as received).
HOP_BY_HOP_REQUEST = req(
    headers=(
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "s"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-T"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Upgrade", "foo"),
        ("User-Agent", "ua/1"),
        ("Accept", "*/*"),
        ("Accept-Encoding", "br"),
        ("Via", "1.1 other"),
        ("Forwarded", "for=192.0.2.1"),
        ("Cookie", "a=b"),
        ("Cookie", "c=d"),
    )
)
FIELD_CASES = [
    Case("fields-plain", req(), 200),
    Case("fields-hop-by-hop", HOP_BY_HOP_REQUEST, 200),
    Case("fields-te-only", req(headers=(("TE", "trailers"),)), 200),
    Case("fields-head", req(method="HEAD"), 200),
    Case("fields-post-no-body", req(method="POST"), 200),
    Case("fields-post-cl0", req(method="POST", headers=(("Content-Length", "0"),)), 200),
    Case("fields-get-with-body", req(headers=(("Content-Length", "5"),), body=b"hello"), 200),
]


def _fields(outcome_request: Any, client_sent_accept_encoding: bool) -> list[tuple[str, str]]:
    """The fields the backend got, names lowered, sorted; without the harness's tag, and
    without the `Accept-Encoding: gzip` that Go's transport adds on its own when the client
    sent none (docs/traefik-differences.md, outside the compared projection)."""
    fields = [
        (n.lower(), v) for n, v in outcome_request.headers if n.lower() != "x-differential-tag"
    ]
    if not client_sent_accept_encoding:
        fields = [(n, v) for n, v in fields if (n, v) != ("accept-encoding", "gzip")]
    return sorted(fields)


@pytest.mark.parametrize("case", params(FIELD_CASES))
def test_every_forwarded_field(main_pair: Differential, case: Case) -> None:
    """RFC 9110 §7.6.1 (Connection and the fields it names, Keep-Alive, TE, Trailer,
    Proxy-Connection, Upgrade are hop-by-hop), §7.6.3 (Via is the proxy's choice), §8.6
    (Content-Length): the backend receives the same field lines through meshproxy as through
    Traefik, names compared case-insensitively, order ignored."""
    cmp = check(main_pair, case)
    assert cmp.traefik.request is not None and cmp.meshproxy.request is not None
    sent_ae = b"accept-encoding:" in case.raw.lower() if isinstance(case.raw, bytes) else True
    assert _fields(cmp.meshproxy.request, sent_ae) == _fields(cmp.traefik.request, sent_ae)


RESPONSE_FIELD_CASES = [Case("response-fields", req(), 200)]


@pytest.mark.parametrize("case", params(RESPONSE_FIELD_CASES))
def test_response_fields(main_pair: Differential, case: Case) -> None:
    """RFC 9110 §6.6.1: a recipient with a clock that forwards a response without Date MUST
    add one (Traefik does, Go's server); otherwise the backend's fields reach the client as
    they are. Field names compared, case-insensitively (values: Date is the time)."""
    cmp = check(main_pair, case)
    names = [sorted(n.lower() for n, _ in o.response.headers) for o in (cmp.traefik, cmp.meshproxy)]
    assert names[1] == names[0]


# Persistence (RFC 9112 §9.3, §9.6): the proxy closes after its answer when the client asked.
CLOSING = [
    Case("connection-close", req(headers=(("Connection", "close"),)), 200),
    Case("http10-default-close", req(version="HTTP/1.0"), 200),
    Case("connection-close-mixed-case", req(headers=(("Connection", "Close"),)), 200),
    Case("connection-close-in-list", req(headers=(("Connection", "x-a, close"),)), 200),
]


@pytest.mark.parametrize("case", params(CLOSING))
def test_connection_close(main_pair: Differential, case: Case) -> None:
    """RFC 9112 §9.6: a server that receives `Connection: close` closes after its response;
    §9.3: an HTTP/1.0 request without keep-alive is not persistent. Both proxies answer, then
    close (awaited as a condition, up to the answer timeout)."""
    cmp = check(main_pair, case, await_close=True)
    assert cmp.traefik.response.closed, "Traefik kept the connection open"
    assert cmp.meshproxy.response.closed, "meshproxy kept the connection open"


# Item 6: a backend that never answers (it holds the request until the proxy hangs up).
SLOW = [
    Case("hold-get", req("/slow/x", headers=((HOLD_HEADER, "1"),)), 504),
    Case(
        "hold-post",
        req("/slow/x", "POST", (("Content-Length", "5"), (HOLD_HEADER, "1")), b"hello"),
        504,
    ),
]


@pytest.mark.parametrize("case", params(SLOW))
def test_backend_never_answers(main_pair: Differential, case: Case) -> None:
    """Issue 9 item 6: Traefik's serversTransport forwardingTimeouts.responseHeaderTimeout
    (here 1 s): a backend that has the request but sends no response head gets the client a
    504 Gateway Timeout (RFC 9110 §15.6.5) once it elapses, not a hang. The client waits up to
    10 s, so a proxy that ignores the timeout fails without relying on timing luck."""
    cmp = check(main_pair, case)
    assert cmp.meshproxy.reached_backend and cmp.traefik.reached_backend


# Item 7: a config file rewritten in place passes through an empty file.
def reload_config(backend_url: str) -> dict[str, Any]:
    """One catch-all router; the test rewrites the files of this pair (not shared)."""
    return {
        "http": {
            "routers": {"all": _router("PathPrefix(`/`)")},
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend_url}]}}},
        }
    }


def test_config_file_emptied_in_place(differential: DifferentialFactory) -> None:
    """Issue 9 item 7: an empty file is not a configuration (meshproxy keeps the last good one
    and warns); an intentionally empty configuration is `{}` (both then drop every router).
    Traefik 3.7 applies the empty file as an empty configuration (every router gone, 404): a
    deliberate difference (docs/traefik-differences.md). Every change is waited for as a
    condition (Traefik's API and answers, meshproxy's log and answers), never a fixed delay."""
    pair = differential("http-reload", reload_config)
    traefik, meshproxy = pair.traefik, pair.meshproxy
    assert traefik is not None and meshproxy is not None
    restored = yaml.safe_dump(pair.config)

    def status(side: str) -> int | None:
        return raw_request(pair.port(side), [req("/x")]).status

    pair.compare(req("/x")).assert_same()

    # An editor truncates the file, then writes it: we stop at the truncation.
    generation = meshproxy.generation()
    traefik.write_in_place("")
    meshproxy.write_in_place("")
    wait_until(lambda: "all" not in (traefik.api_routers() or {"all"}), "Traefik applies it")
    wait_until(lambda: status("traefik") == 404, "Traefik answering 404")
    wait_until(lambda: "keeping the last good configuration" in meshproxy.log_text(), "warning")
    assert status("meshproxy") == 200, "meshproxy applied an empty file"
    assert meshproxy.generation() == generation, "meshproxy applied an empty file"

    traefik.write_in_place(restored)
    meshproxy.write_in_place(restored)
    wait_until(lambda: status("traefik") == 200, "Traefik restored")

    # An intentionally empty configuration: both drop every router; meshproxy warns that
    # every router is gone (issue 9 item 7), which Traefik does not.
    warnings = meshproxy.log_text().count("WARNING")
    traefik.write_in_place("{}\n")
    meshproxy.write_in_place("{}\n")
    wait_until(lambda: status("traefik") == 404, "Traefik applies {}")
    wait_until(lambda: status("meshproxy") == 404, "meshproxy applies {}")
    assert meshproxy.generation() > generation
    wait_until(lambda: meshproxy.log_text().count("WARNING") > warnings, "a warning for {}")


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    """Poll `condition` every 20 ms until truthy; AssertionError naming `what` after
    `timeout` seconds (a condition wait, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.02)
