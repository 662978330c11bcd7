"""Differential: meshproxy's Traefik-shaped admin API and access log against real Traefik 3.7
(issue 14, points 3-4), on the same dynamic config.

"Same keys" is the contract: tools written for Traefik's API (its dashboard, scripts) find
every key they read. For each object Traefik lists (its `@internal` ones included, but
`NOT_INTERNAL_HERE`), meshproxy lists the same name with every key Traefik's has, nested
objects included; meshproxy's extra keys are only the documented ones (`MESHPROXY_EXTRAS`).
The defaults Traefik shows (sticky cookie name and path, health check mode, interval,
timeout, followRedirects) are compared by value. The access log is compared the same
way: the JSON keys of the line for the same request, and the layout of the `common` line."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.differential.harness import (
    MeshproxyProcess,
    RecordingBackend,
    TraefikProcess,
    TraefikUnavailable,
    traefik_binary,
)
from tests.helpers import free_port

MESHPROXY_EXTRAS = {"meshproxyServers", "meshproxyWhy"}
# Traefik's noop@internal is the service of its entrypoint-redirection routers, which
# meshproxy does not generate (admin.traefik_api.internal_objects).
NOT_INTERNAL_HERE = {"noop@internal"}
# Traefik's access log fields meshproxy does not produce (yet): GzipRatio (Traefik's compress
# middleware), origin_* headers (the backend's response fields before middlewares; ours are
# the downstream ones only), TLS fields on plain HTTP (none in either).
LOG_KEYS_NOT_PRODUCED = {"GzipRatio"}


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(backend_url: str) -> dict[str, Any]:
    return {
        "http": {
            "routers": {
                "r1": {
                    "rule": "PathPrefix(`/`)",
                    "service": "s1",
                    "middlewares": ["rl", "strip"],
                    "entryPoints": ["web"],
                },
                "r2": {
                    "rule": "Host(`a.test`)",
                    "priority": 50,
                    "service": "w1",
                    "entryPoints": ["web"],
                    "middlewares": ["allow"],
                },
                "broken": {"rule": "Path(`/b`)", "service": "missing", "entryPoints": ["web"]},
                # Traefik builds (and fills the cookie name of) only services routers use
                "r3": {"rule": "Host(`ws.test`)", "service": "ws", "entryPoints": ["web"]},
                "r4": {"rule": "Host(`st2.test`)", "service": "st2", "entryPoints": ["web"]},
            },
            "services": {
                "s1": {"loadBalancer": {"servers": [{"url": backend_url}]}},
                "w1": {"weighted": {"services": [{"name": "s1", "weight": 1}]}},
                # defaults Traefik fills in and shows: cookie name/path, health check
                # mode/interval/timeout/followRedirects (none written here)
                "st": {
                    "loadBalancer": {
                        "servers": [{"url": backend_url}],
                        "sticky": {"cookie": {}},
                        "healthCheck": {"path": "/health", "interval": "10s"},
                    }
                },
                "st2": {
                    "loadBalancer": {
                        "servers": [{"url": backend_url}],
                        "sticky": {"cookie": {"name": "c", "secure": True}},
                        "healthCheck": {"path": "/health", "followRedirects": False},
                    }
                },
                "ws": {
                    "weighted": {
                        "services": [{"name": "st", "weight": 1}],
                        "sticky": {"cookie": {"httpOnly": True}},
                    }
                },
            },
            "middlewares": {
                "rl": {"rateLimit": {"average": 100, "burst": 50}},
                "strip": {"stripPrefix": {"prefixes": ["/x"]}},
                "allow": {"ipAllowList": {"sourceRange": ["127.0.0.1/32"]}},
            },
        },
        "tcp": {
            "routers": {"t1": {"rule": "HostSNI(`*`)", "service": "ts", "entryPoints": ["tcpep"]}},
            "services": {
                "ts": {"loadBalancer": {"servers": [{"address": backend_url.split("//")[1]}]}}
            },
        },
        "udp": {
            "routers": {"u1": {"service": "us", "entryPoints": ["udpep"]}},
            "services": {"us": {"loadBalancer": {"servers": [{"address": "127.0.0.1:9"}]}}},
        },
    }


def _get(port: int, path: str, method: str = "GET") -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None, dict(response.headers)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = body.decode(errors="replace")
        return exc.code, data, dict(exc.headers)


def _key_differences(theirs: Any, ours: Any, where: str) -> list[str]:
    """Keys Traefik has that meshproxy lacks, and meshproxy's undocumented extras."""
    problems: list[str] = []
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [f"{where}: Traefik has an object, meshproxy {type(ours).__name__}"]
        for key in theirs.keys() - ours.keys():
            problems.append(f"{where}.{key}: missing in meshproxy")
        for key in ours.keys() - theirs.keys() - MESHPROXY_EXTRAS:
            problems.append(f"{where}.{key}: meshproxy only")
        for key in theirs.keys() & ours.keys():
            # serverStatus maps URLs: compare presence, not its keys (different backends)
            if key not in ("serverStatus",):
                problems += _key_differences(theirs[key], ours[key], f"{where}.{key}")
    elif isinstance(theirs, list) and theirs and isinstance(theirs[0], dict):
        if not isinstance(ours, list) or len(ours) != len(theirs):
            return [f"{where}: lists differ in length"]
        for index, (a, b) in enumerate(zip(theirs, ours, strict=True)):
            problems += _key_differences(a, b, f"{where}[{index}]")
    return problems


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    workdir: Path = tmp_path_factory.mktemp("api_vs_traefik")
    backend = RecordingBackend().start()
    dynamic = _config(backend.url)
    logs = {}
    processes = {}
    try:
        for side in ("traefik", "meshproxy"):
            log_path = workdir / f"{side}-access.json"
            logs[side] = log_path
            flags = [
                f"--entryPoints.tcpep.address=127.0.0.1:{free_port()}",
                f"--entryPoints.udpep.address=127.0.0.1:{_free_udp_port()}/udp",
                "--accesslog.format=json",
                f"--accesslog.filePath={log_path}",
                "--accesslog.fields.headers.defaultMode=keep",
                "--accesslog.fields.headers.names.User-Agent=redact",
                "--ping",  # ping@internal, prometheus@internal
                "--metrics.prometheus=true",
            ]
            side_dir = workdir / side
            side_dir.mkdir()
            if side == "traefik":
                processes[side] = TraefikProcess(side_dir, dynamic, flags).start()
            else:
                processes[side] = MeshproxyProcess(
                    side_dir, dynamic, ["--workers=1", *flags]
                ).start()
        yield processes, logs
    finally:
        for process in processes.values():
            process.stop()
        backend.close()


def _api_port(process: Any) -> int:
    return process.api_port if isinstance(process, TraefikProcess) else process.proxy.admin_port


@pytest.mark.parametrize(
    "kind",
    [
        "http/routers",
        "http/services",
        "http/middlewares",
        "tcp/routers",
        "tcp/services",
        "udp/routers",
        "udp/services",
    ],
)
def test_object_lists_have_traefiks_keys(pair: Any, kind: str) -> None:
    """Traefik API `/api/<kind>`: every object of the file provider and every `@internal`
    one of Traefik 3.7's internal provider for the same static config (`--api.insecure
    --ping --metrics.prometheus`: api, dashboard, ping, prometheus routers and services, the
    dashboard's two middlewares; not `NOT_INTERNAL_HERE`), with Traefik's keys (status,
    error, using/usedBy, name, provider, type, serverStatus, the config and the defaults
    Traefik's decoder adds), and the same status for each (a router whose service does not
    exist is disabled in both)."""
    processes, _ = pair
    _, theirs, _ = _get(_api_port(processes["traefik"]), f"/api/{kind}")
    _, ours, _ = _get(_api_port(processes["meshproxy"]), f"/api/{kind}")
    their_objects = {o["name"]: o for o in theirs if o["name"] not in NOT_INTERNAL_HERE}
    our_objects = {o["name"]: o for o in ours}
    assert their_objects, f"Traefik lists no {kind}"
    assert set(their_objects) == set(our_objects)
    problems = []
    for name, theirs_one in their_objects.items():
        ours_one = our_objects[name]
        problems += _key_differences(theirs_one, ours_one, f"{kind}/{name}")
        if theirs_one["status"] != ours_one["status"]:
            problems.append(f"{kind}/{name}: status {theirs_one['status']} != {ours_one['status']}")
        # one object by name: the same as in the list
        status, single, _ = _get(_api_port(processes["meshproxy"]), f"/api/{kind}/{name}")
        assert status == 200 and single == ours_one
    assert not problems, "\n".join(problems)
    for name, theirs_one in their_objects.items():
        if name.endswith("@internal"):  # where they are and what they call: same values
            ours_one = our_objects[name]
            for key in ("entryPoints", "service", "rule", "priority", "middlewares", "usedBy"):
                assert ours_one.get(key) == theirs_one.get(key), (name, key)


def test_defaults_traefik_shows_have_traefiks_values(pair: Any) -> None:
    """Traefik 3.7 shows the defaults it applies (dynamic.ServerHealthCheck.SetDefaults,
    cookie.GetName): a sticky cookie's derived name (`_` + sha1 of the service name) and
    path `/` for loadBalancer and weighted services, a health check's `mode: http`,
    `interval: 30s`, `timeout: 5s`, `followRedirects: true` when not written. meshproxy
    shows the same values (the ones it applies) for the same config."""
    processes, _ = pair
    answers = {}
    for side, process in processes.items():
        _, listed, _ = _get(_api_port(process), "/api/http/services")
        answers[side] = {o["name"]: o for o in listed}
    theirs, ours = answers["traefik"], answers["meshproxy"]
    for name in ("st@file", "st2@file"):
        for key in ("sticky", "healthCheck", "strategy", "passHostHeader"):
            assert ours[name]["loadBalancer"][key] == theirs[name]["loadBalancer"][key], (
                name,
                key,
            )
    assert ours["ws@file"]["weighted"]["sticky"] == theirs["ws@file"]["weighted"]["sticky"]
    # the values are the defaults, not an echo of the config
    assert theirs["st@file"]["loadBalancer"]["healthCheck"]["mode"] == "http"
    assert ours["st@file"]["loadBalancer"]["sticky"]["cookie"]["name"].startswith("_")


def test_overview_entrypoints_version_and_errors(pair: Any) -> None:
    """`/api/overview` (same keys, same counts of routers, services and middlewares, the
    `@internal` ones included but `NOT_INTERNAL_HERE`), `/api/entrypoints/web`,
    `/api/version`, an unknown router (404 with Traefik's message) and a POST (405)."""
    processes, _ = pair
    traefik, mesh = _api_port(processes["traefik"]), _api_port(processes["meshproxy"])
    _, theirs, _ = _get(traefik, "/api/overview")
    _, ours, _ = _get(mesh, "/api/overview")
    assert not _key_differences(theirs, ours, "overview")
    # the @internal objects are counted by both, but NOT_INTERNAL_HERE
    missing = {"routers": 0, "services": len(NOT_INTERNAL_HERE), "middlewares": 0}
    for kind, count in ours["http"].items():
        assert count["total"] == theirs["http"][kind]["total"] - missing[kind], kind
        assert count["errors"] == theirs["http"][kind]["errors"]
        assert count["warnings"] == theirs["http"][kind]["warnings"]
    assert ours["tcp"] == theirs["tcp"] and ours["udp"] == theirs["udp"]
    _, their_ep, _ = _get(traefik, "/api/entrypoints/web")
    _, our_ep, _ = _get(mesh, "/api/entrypoints/web")
    assert not _key_differences(their_ep, our_ep, "entrypoints/web")
    _, their_version, _ = _get(traefik, "/api/version")
    _, our_version, _ = _get(mesh, "/api/version")
    assert set(their_version) == set(our_version)
    status, body, _ = _get(traefik, "/api/http/routers/nope@file")
    assert (status, body) == (404, {"message": "router not found: nope@file"})
    status, body, _ = _get(mesh, "/api/http/routers/nope@file")
    assert (status, body) == (404, {"message": "router not found: nope@file"})
    assert _get(traefik, "/api/overview", "POST")[0] == 405
    assert _get(mesh, "/api/overview", "POST")[0] == 405


def _wait_lines(path: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"no {count} access log lines in {path}")


def test_access_log_json_keys_match_traefik(pair: Any) -> None:
    """Traefik's JSON access log (fields, request_/downstream_ headers with the keep default
    and a redacted User-Agent) for the same proxied request: meshproxy writes every key
    Traefik writes (but `LOG_KEYS_NOT_PRODUCED`), with the same values where they do not
    depend on the process (method, path, status, router, service, entrypoint...)."""
    processes, logs = pair
    entries = {}
    for side, process in processes.items():
        port = process.port
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/x/log?q=1", headers={"User-Agent": "probe/1"}
        )
        with urllib.request.urlopen(req, timeout=5) as response:
            assert response.status == 200
        lines = _wait_lines(logs[side], 1)
        entries[side] = json.loads(next(line for line in reversed(lines) if '"/x/log?q=1"' in line))
    theirs, ours = entries["traefik"], entries["meshproxy"]
    missing = {k for k in theirs if k not in ours and not k.startswith("origin_")}
    assert missing <= LOG_KEYS_NOT_PRODUCED, missing
    for key in (
        "RequestMethod",
        "RequestPath",
        "RequestProtocol",
        "RequestScheme",
        "DownstreamStatus",
        "OriginStatus",
        "RouterName",
        "ServiceName",
        "entryPointName",
        "ClientHost",
        "ClientUsername",
        "RetryAttempts",
        "request_User-Agent",
        "level",
        "msg",
    ):
        assert ours[key] == theirs[key], key
    for key in ("Duration", "OriginDuration", "Overhead", "DownstreamContentSize"):
        assert isinstance(ours[key], int) and isinstance(theirs[key], int)
    assert re.fullmatch(r"\S+Z", ours["StartUTC"]) and re.fullmatch(r"\S+Z", theirs["StartUTC"])


COMMON_LINE = re.compile(
    r'^(\S+) - (\S+) \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] "(\S+) (\S+) (\S+)" '
    r'(\d{3}) (\d+) "([^"]*)" "([^"]*)" (\d+) "([^"]*)" "([^"]*)" (\d+)ms$'
)


def test_common_access_log_line_matches_traefik(tmp_path: Path) -> None:
    """Traefik's `common` format, the same requests through both (a proxied 200 with a
    Referer and a User-Agent, a 404 with no router): the same layout, and the same values
    but the time, the request count (per process) and the duration. Headers are dropped by
    default in both, so Referer and User-Agent print "-". meshproxy's ` why=<code>` suffix
    ends the 404's line only."""
    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    backend = RecordingBackend().start()
    dynamic = {
        "http": {
            "routers": {"r": {"rule": "Path(`/ok`)", "service": "s", "entryPoints": ["web"]}},
            "services": {"s": {"loadBalancer": {"servers": [{"url": backend.url}]}}},
        }
    }
    lines: dict[str, list[str]] = {}
    try:
        for side in ("traefik", "meshproxy"):
            log_path = tmp_path / f"{side}.log"
            flags = ["--accesslog=true", f"--accesslog.filePath={log_path}"]
            side_dir = tmp_path / side
            side_dir.mkdir()
            process: Any = (
                TraefikProcess(side_dir, dynamic, flags)
                if side == "traefik"
                else MeshproxyProcess(side_dir, dynamic, ["--workers=1", *flags])
            )
            process.start()
            try:
                for target in ("/ok?x=1", "/missing"):
                    req = urllib.request.Request(
                        f"http://127.0.0.1:{process.port}{target}",
                        headers={"Referer": "http://r.test/", "User-Agent": "probe/1"},
                    )
                    try:
                        urllib.request.urlopen(req, timeout=5).read()
                    except urllib.error.HTTPError as exc:
                        exc.read()
                found = [
                    line
                    for line in _wait_lines(log_path, 2)
                    if "/ok?x=1" in line or "/missing" in line
                ]
                lines[side] = found[-2:]
            finally:
                process.stop()
    finally:
        backend.close()
    ok_line, missing_line = lines["meshproxy"]
    assert " why=" not in ok_line  # a successful line is exactly Traefik's
    assert missing_line.endswith(" why=no_route")  # meshproxy's suffix, on failures only
    lines["meshproxy"] = [ok_line, missing_line.removesuffix(" why=no_route")]
    for theirs, ours in zip(lines["traefik"], lines["meshproxy"], strict=True):
        their_match, our_match = COMMON_LINE.match(theirs), COMMON_LINE.match(ours)
        assert their_match and our_match, (theirs, ours)
        # the same but 3 (time), 11 (request count), 14 (duration)
        for group in (1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 13):
            assert their_match.group(group) == our_match.group(group), (group, theirs, ours)
