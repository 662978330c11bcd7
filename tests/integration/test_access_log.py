"""Access logs (issue 14, point 3): Traefik's formats and field names, filters, header modes,
the "why" code per exchange in the line and in `meshproxy_exchange_failures_total`, and a log
that cannot be written (Traefik's doc: observability/access-logs; our docs/observability.md).

Real proxy processes, real backends on 127.0.0.1; the lines are read from the file the proxy
writes (waiting for them, never sleeping)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import catch_all, lb, refused_url, request, router, wait_for


@pytest.fixture
def proxy_factory(proxy_factory: Any) -> Any:
    """One process (`--workers=1`): the admin API reads the state of the process that serves
    the traffic (in-flight counts, token buckets, the balancer's rotation, RequestCount).
    With N workers the supervisor answers the admin API (docs/observability.md)."""

    async def make(dynamic: Any = None, **kwargs: Any) -> Any:
        kwargs["extra_flags"] = ["--workers=1", *kwargs.get("extra_flags", [])]
        return await proxy_factory(dynamic, **kwargs)

    return make


CLF = re.compile(
    r'^(?P<host>\S+) - (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) '
    r'(?P<proto>[^"]+)" (?P<status>\d+) (?P<size>\d+) "(?P<referer>[^"]*)" "(?P<ua>[^"]*)" '
    r'(?P<count>\d+) "(?P<router>[^"]*)" "(?P<url>[^"]*)" (?P<ms>\d+)ms(?: why=(?P<why>\w+))?$'
)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _wait_lines(path: Path, count: int) -> list[str]:
    await wait_for(lambda: len(_lines(path)) >= count, 10, f"{count} access log lines")
    return _lines(path)


def _failures(metrics: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in metrics.splitlines():
        match = re.match(
            r'meshproxy_exchange_failures_total\{entrypoint="(\w+)",service="([^"]*)",'
            r'why="(\w+)"\} (\S+)',
            line,
        )
        if match:
            out[(match.group(2), match.group(3))] = float(match.group(4))
    return out


async def test_common_format_and_why_codes(
    proxy_factory: Any, backends: Any, tmp_path: Path
) -> None:
    """Traefik's `common` line (CLF, request count, router, service URL, duration) for a proxied
    request, and the why code appended to the lines the proxy failed or refused itself: no
    router (404 no_route), a refused connection (502 upstream_connect_failure), a rate limit
    (429 rate_limited), an ipAllowList (403 denied). The same codes label
    meshproxy_exchange_failures_total."""
    backend = await backends("b1")
    log_path = tmp_path / "logs" / "access.log"
    dynamic = {
        "http": {
            "routers": {
                "ok": router("Path(`/ok`)", "good"),
                "down": router("Path(`/down`)", "refused"),
                "limited": router("Path(`/limited`)", "good", middlewares=["rl"]),
                "denied": router("Path(`/denied`)", "good", middlewares=["deny"]),
            },
            "services": {"good": lb(backend.url), "refused": lb(refused_url())},
            "middlewares": {
                "rl": {"rateLimit": {"average": 1, "period": "1m", "burst": 1}},
                "deny": {"ipAllowList": {"sourceRange": ["192.0.2.0/24"]}},
            },
        }
    }
    proxy = await proxy_factory(
        dynamic, extra_flags=["--accesslog", f"--accesslog.filePath={log_path}"]
    )
    assert (await request(proxy.port, target="/ok?x=1")).status == 200
    assert (await request(proxy.port, target="/nothing")).status == 404
    assert (await request(proxy.port, target="/down")).status == 502
    assert (await request(proxy.port, target="/limited")).status == 200
    assert (await request(proxy.port, target="/limited")).status == 429
    assert (await request(proxy.port, target="/denied")).status == 403
    lines = await _wait_lines(log_path, 6)
    parsed = [CLF.match(line) for line in lines]
    assert all(parsed), lines
    by_path = {m["path"]: m for m in parsed if m}
    ok = by_path["/ok?x=1"]
    assert ok["method"] == "GET" and ok["proto"] == "HTTP/1.1" and ok["status"] == "200"
    assert ok["host"] == "127.0.0.1" and ok["router"] == "ok@file"
    assert ok["url"] == backend.url and ok["why"] is None
    assert int(ok["size"]) > 0
    # headers are dropped by default, as in Traefik: referer and user agent are "-"
    assert ok["referer"] == "-" and ok["ua"] == "-"
    assert [m["count"] for m in parsed if m] == ["1", "2", "3", "4", "5", "6"]
    assert by_path["/nothing"]["why"] == "no_route" and by_path["/nothing"]["router"] == "-"
    assert by_path["/down"]["why"] == "upstream_connect_failure"
    limited = [m for m in parsed if m and m["path"] == "/limited"]
    assert [m["why"] for m in limited] == [None, "rate_limited"]
    assert by_path["/denied"]["why"] == "denied" and by_path["/denied"]["status"] == "403"
    failures = _failures(proxy.metrics())
    assert failures[("", "no_route")] == 1
    assert failures[("refused@file", "upstream_connect_failure")] == 1
    assert failures[("", "rate_limited")] == 1
    assert failures[("", "denied")] == 1


async def test_json_format_fields_and_header_modes(
    proxy_factory: Any, backends: Any, tmp_path: Path
) -> None:
    """The `json` format: Traefik's field names and types (Duration in ns, StartUTC in
    RFC 3339, entryPointName...), `fields.names.X=drop`, and header modes: `keep`
    (request_<Canonical-Name>), `redact` ("REDACTED") and the default drop."""
    backend = await backends("b1")
    log_path = tmp_path / "access.json"
    proxy = await proxy_factory(
        catch_all(backend.url),
        extra_flags=[
            "--accesslog.format=json",
            f"--accesslog.filePath={log_path}",
            "--accesslog.fields.names.ClientPort=drop",
            "--accesslog.fields.headers.names.User-Agent=keep",
            "--accesslog.fields.headers.names.Authorization=redact",
            "--accesslog.fields.headers.names.Content-Type=keep",
        ],
    )
    response = await request(
        proxy.port,
        target="/p?q=1",
        headers={"User-Agent": "probe/1", "Authorization": "Bearer s3cret", "X-Other": "o"},
    )
    assert response.status == 200
    (line,) = await _wait_lines(log_path, 1)
    entry = json.loads(line)
    assert entry["RequestMethod"] == "GET" and entry["RequestPath"] == "/p?q=1"
    assert entry["DownstreamStatus"] == 200 and entry["OriginStatus"] == 200
    assert entry["DownstreamContentSize"] == len(response.body)
    assert entry["RouterName"] == "r@file" and entry["ServiceName"] == "s@file"
    assert entry["entryPointName"] == "web" and entry["RequestHost"] == "example.test"
    assert isinstance(entry["Duration"], int) and entry["Duration"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", entry["StartUTC"])
    assert "ClientPort" not in entry and entry["ClientHost"] == "127.0.0.1"
    assert entry["request_User-Agent"] == "probe/1"
    assert entry["request_Authorization"] == "REDACTED"
    assert "request_X-Other" not in entry
    assert entry["downstream_Content-Type"].startswith("text/plain")
    assert "meshproxy_why" not in entry
    assert list(entry) == sorted(entry)  # Go's encoder writes a map's keys sorted


async def test_filters_status_codes_and_min_duration(
    proxy_factory: Any, backends: Any, tmp_path: Path
) -> None:
    """`filters.statusCodes` keeps the lines whose status is in a listed code or range; a
    line any filter keeps is written, others are not (Traefik's keepAccessLog). RequestCount
    still counts the filtered-out requests."""
    backend = await backends("b1")
    log_path = tmp_path / "filtered.log"
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {"r": router("Path(`/ok`)", "s")},
                "services": {"s": lb(backend.url)},
            }
        },
        extra_flags=[
            f"--accesslog.filePath={log_path}",
            "--accesslog.filters.statusCodes=400-499",
            "--accesslog.filters.minDuration=1h",
        ],
    )
    for target in ("/ok", "/missing", "/ok", "/missing2"):
        await request(proxy.port, target=target)
    lines = await _wait_lines(log_path, 2)
    # the two 200s were flushed before or with the second 404: nothing but 404s was written
    matches = [CLF.match(line) for line in lines]
    assert [(m["path"], m["count"]) for m in matches if m] == [
        ("/missing", "2"),
        ("/missing2", "4"),
    ]


async def test_why_codes_of_upstream_failures(
    proxy_factory: Any, scripted: Any, tmp_path: Path
) -> None:
    """The why codes decided past the middlewares, each on its JSON line (`meshproxy_why`)
    and in meshproxy_exchange_failures_total: a backend that closes without answering (502
    upstream_reset), one that answers too late for responseHeaderTimeout (504 timeout), a
    service whose only server failed its health check (503 no_healthy_server), a circuit
    breaker tripped by 500s (503 breaker_open: Traefik's answer while open), and a client
    that leaves before the answer (499 client_gone)."""
    resetting, holding, failing = await scripted("r"), await scripted("h"), await scripted("f")
    resetting.mode, holding.mode, failing.mode = "reset", "hold", "status:500"
    log_path = tmp_path / "why.json"
    dynamic = {
        "http": {
            "routers": {
                "reset": router("Path(`/reset`)", "resetting"),
                "slow": router("Path(`/slow`)", "slow"),
                "gone": router("Path(`/gone`)", "holding"),
                "down": router("Path(`/down`)", "checked"),
                "cb": router("Path(`/cb`)", "failing", middlewares=["cb"]),
            },
            "services": {
                "resetting": lb(resetting.url),
                "slow": lb(holding.url, serversTransport="quick"),
                "holding": lb(holding.url),
                "checked": lb(refused_url(), healthCheck={"path": "/h", "interval": "100ms"}),
                "failing": lb(failing.url),
            },
            "serversTransports": {
                "quick": {"forwardingTimeouts": {"responseHeaderTimeout": "200ms"}}
            },
            "middlewares": {
                "cb": {
                    "circuitBreaker": {
                        "expression": "ResponseCodeRatio(500, 600, 0, 600) > 0.5",
                        "checkPeriod": "10ms",
                        "fallbackDuration": "10s",
                    }
                }
            },
        }
    }
    proxy = await proxy_factory(
        dynamic, extra_flags=["--accesslog.format=json", f"--accesslog.filePath={log_path}"]
    )
    assert (await request(proxy.port, target="/reset")).status == 502
    assert (await request(proxy.port, target="/slow")).status == 504

    async def refused_for_health() -> bool:
        return (await request(proxy.port, target="/down")).status == 503

    await wait_for(refused_for_health, 10, "the health-checked service answering 503")

    async def breaker_open() -> bool:
        return (await request(proxy.port, target="/cb")).status == 503

    await wait_for(breaker_open, 10, "the breaker to trip")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /gone HTTP/1.1\r\nHost: example.test\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: holding.holding >= 1, 10, "the request held by the backend")
    writer.close()  # the client leaves before any answer

    def why_lines() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for line in _lines(log_path):
            entry = json.loads(line)
            out.setdefault(entry["RequestPath"], set()).add(entry.get("meshproxy_why", ""))
        return out

    await wait_for(lambda: "/gone" in why_lines(), 10, "the client_gone line")
    holding.release()
    codes = why_lines()
    assert codes["/reset"] == {"upstream_reset"}
    assert codes["/slow"] == {"timeout"}
    assert "no_healthy_server" in codes["/down"]
    assert "breaker_open" in codes["/cb"]
    assert codes["/gone"] == {"client_gone"}
    failures = _failures(proxy.metrics())
    for key in (
        ("resetting@file", "upstream_reset"),
        ("slow@file", "timeout"),
        ("checked@file", "no_healthy_server"),
        ("", "breaker_open"),
        ("holding@file", "client_gone"),
    ):
        assert failures.get(key, 0) >= 1, (key, failures)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_unwritable_log_keeps_traffic_going(
    proxy_factory: Any, backends: Any, tmp_path: Path
) -> None:
    """Bad input: a log file that cannot be written (/dev/full: every write fails with
    ENOSPC, as on a full disk). Traffic is served as usual, each lost line is counted in
    meshproxy_accesslog_write_errors_total, and the error is logged once a minute at most
    (one line for 20 failed requests)."""
    backend = await backends("b1")
    proxy = await proxy_factory(
        catch_all(backend.url), extra_flags=["--accesslog.filePath=/dev/full"]
    )
    for _ in range(20):
        assert (await request(proxy.port, target="/x")).status == 200

    def lost() -> float:
        match = re.search(r"^meshproxy_accesslog_write_errors_total (\S+)$", proxy.metrics(), re.M)
        return float(match.group(1)) if match else 0.0

    await wait_for(lambda: lost() >= 20, 10, "20 lost lines counted")
    log_text = proxy.log_path.read_text()
    assert log_text.count("cannot write the access log") == 1
    assert "No space left on device" in log_text


async def test_permission_denied_then_counted(
    proxy_factory: Any, backends: Any, tmp_path: Path
) -> None:
    """Bad input: a directory the proxy may not write into (permission denied): requests are
    answered, lines are counted as lost. (Skipped as root, who may write anywhere.)"""
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    backend = await backends("b1")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    proxy = await proxy_factory(
        catch_all(backend.url), extra_flags=[f"--accesslog.filePath={locked / 'a.log'}"]
    )
    for _ in range(3):
        assert (await request(proxy.port, target="/x")).status == 200
    await wait_for(
        lambda: "meshproxy_accesslog_write_errors_total 3.0" in proxy.metrics(), 10, "3 lost"
    )
    assert "Permission denied" in proxy.log_path.read_text()
