"""`GET /api/explain` and `meshproxy explain` (issue 14, point 5): which router takes a request
and why each router tried before it did not (the first failing matcher of its rule), the
middleware chain with what each would do now, the service and the server the balancer would
pick, without consuming a pick; malformed queries are 400 with what is wrong. Checked against
what real traffic then does through the same proxy."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.helpers import free_port, lb, refused_url, request, router


@pytest.fixture
def proxy_factory(proxy_factory: Any) -> Any:
    """One process (`--workers=1`): the admin API reads the state of the process that serves
    the traffic (in-flight counts, token buckets, the balancer's rotation, RequestCount).
    With N workers the supervisor answers the admin API (docs/observability.md)."""

    async def make(dynamic: Any = None, **kwargs: Any) -> Any:
        kwargs["extra_flags"] = ["--workers=1", *kwargs.get("extra_flags", [])]
        return await proxy_factory(dynamic, **kwargs)

    return make


def _explain(admin: int, **params: Any) -> tuple[int, dict[str, Any]]:
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, values in params.items()
            for v in (values if isinstance(values, list) else [values])
        ]
    )
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{admin}/api/explain?{query}", timeout=5
        ) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _aexplain(admin: int, **params: Any) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(_explain, admin, **params)


def _config(a: str, b: str) -> dict[str, Any]:
    return {
        "http": {
            "routers": {
                "api": router(
                    "Host(`shop.test`) && PathPrefix(`/api`) && Method(`POST`)",
                    "pair",
                    priority=300,
                ),
                "admin": router(
                    "Host(`shop.test`) && Header(`X-Admin`, `yes`)",
                    "pair",
                    priority=200,
                    middlewares=["office"],
                ),
                "web": router("Host(`shop.test`)", "pair", priority=100, middlewares=["rl"]),
                "broken": router("Path(`/b`)", "missing"),
            },
            "services": {"pair": lb(a, b), "dead": lb(refused_url())},
            "middlewares": {
                "rl": {"rateLimit": {"average": 1, "period": "1m", "burst": 2}},
                "office": {"ipAllowList": {"sourceRange": ["10.0.0.0/8"]}},
            },
        }
    }


async def test_router_reasons_chain_and_next_server(proxy_factory: Any, backends: Any) -> None:
    """A GET to shop.test/api: `api` (priority 300) is skipped for its Method matcher,
    `admin` (200) for its Header matcher, `web` takes it. Its rateLimit shows the tokens left
    for the source (2, then 1 after a real request: explain itself takes none), and the
    balancer's next server is the one real traffic then reaches (wrr: explain consumed no
    pick, so asking twice names the same server)."""
    a, b = await backends("a"), await backends("b")
    proxy = await proxy_factory(_config(a.url, b.url))
    admin = proxy.admin_port
    status, answer = await _aexplain(admin, method="GET", host="shop.test", path="/api/x")
    assert status == 200, answer
    assert answer["router"] == "web@file"
    skipped = {s["router"]: s["reason"] for s in answer["skipped"]}
    assert list(skipped) == ["api@file", "admin@file"]
    assert skipped["api@file"].startswith("Method(`POST`) does not match")
    assert "GET" in skipped["api@file"]
    assert skipped["admin@file"].startswith("Header(`X-Admin`, `yes`) does not match")
    (limit,) = answer["middlewares"]
    assert limit["type"] == "rateLimit" and limit["tokensLeft"] == 2.0
    first_pick = answer["service"]["server"]
    _, again = await _aexplain(admin, method="GET", host="shop.test", path="/api/x")
    assert again["service"]["server"] == first_pick  # no pick consumed
    response = await request(proxy.port, target="/api/x", host="shop.test")
    assert response.status == 200
    reached = a if a.requests else b
    assert reached.url == first_pick
    _, after = await _aexplain(admin, method="GET", host="shop.test", path="/api/x")
    assert after["middlewares"][0]["tokensLeft"] == pytest.approx(1.0, abs=0.01)
    assert after["service"]["server"] != first_pick  # the rotation moved for real traffic
    assert any(
        d["router"] == "broken@file" and any("missing" in e for e in d["errors"])
        for d in after["disabled"]
    )


async def test_denied_source_and_no_route(proxy_factory: Any, backends: Any) -> None:
    """The `admin` router's ipAllowList: 10.1.2.3 is allowed, 192.0.2.1 would be answered 403
    (why: denied), as a request with that header really is. No router for another host: the
    outcome is a 404 (no_route)."""
    a, b = await backends("a"), await backends("b")
    proxy = await proxy_factory(_config(a.url, b.url))
    admin = proxy.admin_port
    _, allowed = await _aexplain(
        admin, host="shop.test", path="/", headers="X-Admin: yes", source="10.1.2.3"
    )
    assert allowed["router"] == "admin@file"
    assert allowed["middlewares"][0]["now"] == "allow 10.1.2.3"
    _, denied = await _aexplain(
        admin, host="shop.test", path="/", headers="X-Admin: yes", source="192.0.2.1"
    )
    assert denied["middlewares"][0]["refuses"] is True
    assert "deny 192.0.2.1" in denied["outcome"] and "why: denied" in denied["outcome"]
    real = await request(proxy.port, target="/", host="shop.test", headers={"X-Admin": "yes"})
    assert real.status == 403  # the client is 127.0.0.1: outside 10.0.0.0/8 too
    _, nothing = await _aexplain(admin, host="other.test", path="/")
    assert nothing["router"] is None and nothing["outcome"].startswith("404")
    assert [s["router"] for s in nothing["skipped"]] == ["api@file", "admin@file", "web@file"]
    assert all("host is other.test" in s["reason"] for s in nothing["skipped"])


@pytest.mark.parametrize(
    ("params", "complaint"),
    [
        ({"method": "GE T"}, "method="),
        ({"path": "no-slash"}, "path="),
        ({"headers": "no colon here"}, "headers="),
        ({"source": "not-an-ip"}, "source="),
        ({"entrypoint": "nope"}, "entrypoint="),
        ({"bogus": "1"}, "unknown parameter"),
        ({"sni": "a.test", "path": "/"}, "not both"),
        ({"tls": "maybe"}, "tls="),
        # a value a real request could not carry (RFC 9110 §5.5, RFC 9112 §5: refused, 400)
        ({"headers": "X-A:\r\nY: 1"}, "headers="),
        ({"headers": "X-A: a\x00b"}, "headers="),
        # Go's httpguts.ValidHostHeader, applied by Traefik before routing: 400
        ({"host": "a\x00b"}, "host="),
        ({"host": "a b"}, "host="),
        ({"path": "/a\tb"}, "path="),
    ],
)
async def test_malformed_queries_are_400(
    proxy_factory: Any, backends: Any, params: dict[str, str], complaint: str
) -> None:
    """Bad input (issue 14): a malformed explain query is 400 with `error` saying what is
    wrong, naming the parameter at fault first (not another one's prefix). A header value
    with CR, LF or NUL, or a Host with a byte Traefik refuses, is malformed: a real request
    with them is refused with 400, so explaining it as if routed would be false."""
    a = await backends("a")
    proxy = await proxy_factory(_config(a.url, a.url))
    status, answer = await _aexplain(proxy.admin_port, **params)
    assert status == 400 and complaint in answer["error"], answer
    if complaint.endswith("="):
        assert answer["error"].startswith(complaint), answer


async def test_tcp_explain(proxy_factory: Any, backends: Any) -> None:
    """TCP: `sni=` is checked against the TLS TCP routers by priority; the first failing
    matcher (HostSNI, ALPN) is named, the matching router's servers listed."""
    a = await backends("a")
    address = f"127.0.0.1:{a.port}"
    proxy = await proxy_factory(
        {
            "tcp": {
                "routers": {
                    "db": {
                        "rule": "HostSNI(`db.test`) && ALPN(`postgresql`)",
                        "service": "tcp",
                        "entryPoints": ["web"],
                        "priority": 100,
                        "tls": {"passthrough": True},
                    },
                    "other": {
                        "rule": "HostSNI(`db.test`)",
                        "service": "tcp",
                        "entryPoints": ["web"],
                        "priority": 10,
                        "tls": {"passthrough": True},
                    },
                },
                "services": {"tcp": {"loadBalancer": {"servers": [{"address": address}]}}},
            }
        }
    )
    status, answer = await _aexplain(proxy.admin_port, sni="db.test", alpn="h2")
    assert status == 200, answer
    assert answer["router"] == "other@file"
    (skipped,) = answer["skipped"]
    assert skipped["router"] == "db@file"
    assert skipped["reason"].startswith("ALPN(`postgresql`) does not match")
    assert answer["service"]["servers"] == [address]


async def test_cli_prints_a_tree(proxy_factory: Any, backends: Any) -> None:
    """`meshproxy explain` calls the admin API and prints the tree; a refused query exits 2
    with the proxy's message, an unreachable admin exits 1."""
    a, b = await backends("a"), await backends("b")
    proxy = await proxy_factory(_config(a.url, b.url))
    base = f"http://127.0.0.1:{proxy.admin_port}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshproxy", "explain", "--admin", base, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    done = await asyncio.to_thread(run, "--host", "shop.test", "--path", "/api/x")
    assert done.returncode == 0, done.stderr
    assert "├─ skipped api@file (priority 300)" in done.stdout
    assert "Method(`POST`) does not match" in done.stdout
    assert "├─ router web@file" in done.stdout and "next pick: http://127.0.0.1" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("=> proxied to http://127.0.0.1")
    refused = await asyncio.to_thread(run, "--source", "nope")
    assert refused.returncode == 2 and "source=" in refused.stderr
    base = f"http://127.0.0.1:{free_port()}"
    unreachable = await asyncio.to_thread(run, "--path", "/")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


async def test_weighted_service_next_child_and_server(proxy_factory: Any, backends: Any) -> None:
    """A weighted service (Traefik's smooth weighted round robin over child services):
    explain names the child the rotation picks next and that child's next server, computed
    on copies (asking twice gives the same answer), and the real request then reaches it."""
    a, b = await backends("a"), await backends("b")
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {"r": router("PathPrefix(`/`)", "split")},
                "services": {
                    "split": {
                        "weighted": {
                            "services": [{"name": "one", "weight": 1}, {"name": "two", "weight": 3}]
                        }
                    },
                    "one": lb(a.url),
                    "two": lb(b.url),
                },
            }
        }
    )
    _, first = await _aexplain(proxy.admin_port, path="/")
    _, second = await _aexplain(proxy.admin_port, path="/")
    assert first["service"]["type"] == "weighted"
    assert first["service"]["next"]["name"] == second["service"]["next"]["name"]
    server = first["service"]["server"]
    assert server in (a.url, b.url) and server == second["service"]["server"]
    assert first["outcome"] == f"proxied to {server}"
    assert (await request(proxy.port, target="/")).status == 200
    reached = a if a.requests else b
    assert reached.url == server
