"""Middlewares on real traffic: a proxy process, real backends that fail on command."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from tests.helpers import FIXTURES, free_port, lb, refused_url, request, router, wait_for

ACL_FIXTURE = "acl-enabled-http-traffic-split-http-route-group-config.json"


def routed(
    servers: list[str], middlewares: dict[str, Any], chain: list[str], **lb_options: Any
) -> dict[str, Any]:
    """Every request on `web` through `chain` to a load balancer over `servers`."""
    return {
        "http": {
            "routers": {"r": router("PathPrefix(`/`)", "s", middlewares=chain)},
            "middlewares": middlewares,
            "services": {"s": lb(*servers, **lb_options)},
        }
    }


def retries_total(proxy: Any) -> float:
    match = re.search(r'traefik_service_retries_total\{service="s@file"\} (\S+)', proxy.metrics())
    return float(match.group(1)) if match else 0.0


# ---------------------------------------------------------------- retry


async def test_retry_moves_to_the_next_server_when_the_connection_is_refused(
    scripted, proxy_factory
):
    good = await scripted("good")
    proxy = await proxy_factory(
        routed([refused_url(), good.url], {"retry": {"retry": {"attempts": 2}}}, ["retry"])
    )
    statuses = [(await request(proxy.port)).status for _ in range(6)]
    assert statuses == [200] * 6
    assert len(good.requests) == 6
    # Round robin over two servers, two picks per request: each one meets the dead server
    # first, until five refused connections in a row eject it (passive outlier detection,
    # on by default: docs/load-balancing.md); the sixth request goes straight to `good`.
    assert retries_total(proxy) == 5
    # Nothing reached the dead server, so even a POST and its body can go to the next one.
    response = await request(proxy.port, method="POST", body=b"order #1")
    assert response.status == 200 and good.requests[-1]["body"] == b"order #1"


async def test_without_retry_a_refused_connection_is_a_502(scripted, proxy_factory):
    good = await scripted("good")
    proxy = await proxy_factory(routed([refused_url(), good.url], {}, []))
    statuses = sorted([(await request(proxy.port)).status for _ in range(4)])
    assert statuses == [200, 200, 502, 502]


async def test_retry_does_not_resend_a_request_that_reached_the_backend(scripted, proxy_factory):
    flaky = await scripted("flaky")
    flaky.mode = "reset"
    proxy = await proxy_factory(
        routed([flaky.url], {"retry": {"retry": {"attempts": 3}}}, ["retry"])
    )
    response = await request(proxy.port, method="POST", body=b"pay once")
    assert response.status == 502
    assert len(flaky.requests) == 1
    assert retries_total(proxy) == 0


async def test_retry_on_status_replays_idempotent_requests_with_their_body(scripted, proxy_factory):
    first, second = await scripted("first"), await scripted("second")
    first.mode = "status:503"
    retry = {"retry": {"attempts": 3, "status": ["500-599"]}}
    proxy = await proxy_factory(routed([first.url, second.url], {"retry": retry}, ["retry"]))
    response = await request(proxy.port, method="PUT", body=b"x" * 5000)
    assert response.status == 200 and response.body == b"second"
    assert [r["body"] for r in first.requests + second.requests] == [b"x" * 5000] * 2
    # A POST is not idempotent: its 503 is final.
    response = await request(proxy.port, method="POST", body=b"once")
    assert response.status == 503 and response.body == b"failure 503"
    assert len(first.requests) == 2


async def test_retry_on_status_gives_the_last_answer_when_attempts_run_out(scripted, proxy_factory):
    broken = await scripted("broken")
    broken.mode = "status:500"
    retry = {"retry": {"attempts": 3, "status": ["500"]}}
    proxy = await proxy_factory(routed([broken.url], {"retry": retry}, ["retry"]))
    response = await request(proxy.port)
    assert response.status == 500 and response.body == b"failure 500"
    assert len(broken.requests) == 3
    assert retries_total(proxy) == 2


async def test_retry_budget_stops_retries_from_multiplying_an_outage(scripted, proxy_factory):
    broken = await scripted("broken")
    broken.mode = "status:503"
    retry = {
        "retry": {
            "attempts": 5,
            "status": ["503"],
            "budget": {"ratio": 0.5, "minRetriesPerSecond": 0, "window": "60s"},
        }
    }
    proxy = await proxy_factory(routed([broken.url], {"retry": retry}, ["retry"]))
    for _ in range(10):
        assert (await request(proxy.port)).status == 503
    # 10 requests may add at most 5 retries, instead of 40 without a budget.
    assert len(broken.requests) == 15
    assert retries_total(proxy) == 5


# ---------------------------------------------------------------- rateLimit


async def test_rate_limit_answers_429_with_retry_after_once_the_burst_is_spent(
    backends, proxy_factory
):
    backend = await backends()
    limit = {"rateLimit": {"average": 1, "period": "1m", "burst": 2}}
    proxy = await proxy_factory(routed([backend.url], {"limit": limit}, ["limit"]))
    first, second, third = [await request(proxy.port) for _ in range(3)]
    assert (first.status, second.status, third.status) == (200, 200, 429)
    assert third.body == b"Too Many Requests"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert third.headers["x-retry-in"].endswith("s")
    assert len(backend.requests) == 2


async def test_rate_limit_keeps_one_bucket_per_source(backends, proxy_factory):
    backend = await backends()
    limit = {
        "rateLimit": {
            "average": 1,
            "period": "1m",
            "burst": 1,
            "sourceCriterion": {"requestHeaderName": "X-Tenant"},
        }
    }
    proxy = await proxy_factory(routed([backend.url], {"limit": limit}, ["limit"]))

    async def status(tenant: str) -> int:
        return (await request(proxy.port, headers={"X-Tenant": tenant})).status

    assert [await status("a"), await status("a"), await status("b"), await status("b")] == [
        200,
        429,
        200,
        429,
    ]


async def test_rate_limit_buckets_survive_a_reload_unless_the_limit_changes(
    backends, proxy_factory
):
    backend = await backends()
    limit = {"rateLimit": {"average": 1, "period": "1m", "burst": 1}}
    config = routed([backend.url], {"limit": limit}, ["limit"])
    proxy = await proxy_factory(config)
    assert (await request(proxy.port)).status == 200
    assert (await request(proxy.port)).status == 429

    config["http"]["routers"]["other"] = router("Path(`/other`)", "s")  # unrelated change
    generation = proxy.generation()
    proxy.write(config)
    await wait_for(lambda: proxy.generation() > generation, 5, "reload")
    assert (await request(proxy.port)).status == 429  # the spent bucket was kept

    config["http"]["middlewares"]["limit"]["rateLimit"]["burst"] = 2
    generation = proxy.generation()
    proxy.write(config)
    await wait_for(lambda: proxy.generation() > generation, 5, "reload")
    assert (await request(proxy.port)).status == 200  # a new definition starts afresh


# ---------------------------------------------------------------- circuitBreaker


async def test_circuit_breaker_trips_on_errors_and_recovers(scripted, proxy_factory):
    backend = await scripted("svc")
    backend.mode = "status:500"
    breaker = {
        "circuitBreaker": {
            "expression": "ResponseCodeRatio(500, 600, 0, 600) > 0.5",
            "checkPeriod": "10ms",
            "fallbackDuration": "300ms",
            "recoveryDuration": "200ms",
        }
    }
    proxy = await proxy_factory(routed([backend.url], {"cb": breaker}, ["cb"]))

    async def tripped() -> bool:
        response = await request(proxy.port)
        return response.status == 503 and response.body == b"Service Unavailable"

    await wait_for(tripped, 10, "the breaker to trip")
    seen = len(backend.requests)
    for _ in range(5):  # while tripped, nothing reaches the backend
        assert (await request(proxy.port)).status == 503
    assert len(backend.requests) == seen

    backend.mode = "ok"

    async def recovered() -> bool:
        statuses = [(await request(proxy.port)).status for _ in range(5)]
        return statuses == [200] * 5

    await wait_for(recovered, 10, "the breaker to close again")
    assert len(backend.requests) > seen


async def test_circuit_breaker_trips_on_network_errors_with_a_custom_code(proxy_factory):
    breaker = {
        "circuitBreaker": {
            "expression": "NetworkErrorRatio() > 0.30",
            "checkPeriod": "1ms",
            "fallbackDuration": "1m",
            "responseCode": 429,
        }
    }
    proxy = await proxy_factory(routed([refused_url()], {"cb": breaker}, ["cb"]))

    async def tripped() -> bool:
        return (await request(proxy.port)).status == 429

    assert (await request(proxy.port)).status == 502
    await wait_for(tripped, 10, "the breaker to trip")


# ---------------------------------------------------------------- the everyday ones


async def test_headers_middleware_sets_and_deletes_request_and_response_headers(
    backends, proxy_factory
):
    backend = await backends()
    headers = {
        "headers": {
            "customRequestHeaders": {"X-Team": "payments", "X-Debug": ""},
            "customResponseHeaders": {"X-Served-By": "mesh", "Content-Type": ""},
            "frameDeny": True,
        }
    }
    proxy = await proxy_factory(routed([backend.url], {"h": headers}, ["h"]))
    response = await request(proxy.port, headers={"X-Debug": "1"})
    sent = dict(backend.requests[0]["headers"])
    assert sent["x-team"] == "payments" and "x-debug" not in sent
    assert response.headers["x-served-by"] == "mesh"
    assert response.headers["x-frame-options"] == "DENY"
    assert "content-type" not in response.headers


async def test_path_middlewares_rewrite_the_forwarded_path(backends, proxy_factory):
    backend = await backends()
    config = {
        "http": {
            "routers": {
                "strip": router("PathPrefix(`/api`)", "s", middlewares=["strip"]),
                "regex": router("PathPrefix(`/v1`)", "s", middlewares=["strip-version"]),
                "add": router("PathPrefix(`/add`)", "s", middlewares=["add"]),
                "replace": router("PathPrefix(`/old`)", "s", middlewares=["replace"]),
                "rx": router("PathPrefix(`/users`)", "s", middlewares=["rx"]),
            },
            "middlewares": {
                "strip": {"stripPrefix": {"prefixes": ["/nope", "/api"]}},
                "strip-version": {"stripPrefixRegex": {"regex": ["/v[0-9]+"]}},
                "add": {"addPrefix": {"prefix": "/base"}},
                "replace": {"replacePath": {"path": "/new"}},
                "rx": {"replacePathRegex": {"regex": "^/users/(\\w+)", "replacement": "/u/$1"}},
            },
            "services": {"s": lb(backend.url)},
        }
    }
    proxy = await proxy_factory(config)
    for target in ("/api/items?page=2", "/v12/x", "/add/y", "/old/z?q=1", "/users/ann/photos"):
        assert (await request(proxy.port, target=target)).status == 200
    seen = [(r["url"], dict(r["headers"])) for r in backend.requests]
    assert seen[0][0] == "/items?page=2" and seen[0][1]["x-forwarded-prefix"] == "/api"
    assert seen[1][0] == "/x" and seen[1][1]["x-forwarded-prefix"] == "/v12"
    assert seen[2][0] == "/base/add/y"
    assert seen[3][0] == "/new?q=1" and seen[3][1]["x-replaced-path"] == "/old/z"
    assert seen[4][0] == "/u/ann/photos" and seen[4][1]["x-replaced-path"] == "/users/ann/photos"


async def test_middlewares_run_in_the_order_the_router_lists_them(backends, proxy_factory):
    backend = await backends()
    middlewares = {
        "add": {"addPrefix": {"prefix": "/x"}},
        "strip": {"stripPrefix": {"prefixes": ["/x"]}},
        "outer": {"chain": {"middlewares": ["strip", "add"]}},
    }
    config = routed([backend.url], middlewares, ["add", "strip"])
    config["http"]["routers"]["chained"] = router("PathPrefix(`/c`)", "s", middlewares=["outer"])
    proxy = await proxy_factory(config)
    await request(proxy.port, target="/a")  # add then strip: back to /a
    await request(proxy.port, target="/c/b")  # strip (no match) then add
    assert [r["url"] for r in backend.requests] == ["/a", "/x/c/b"]


async def test_in_flight_req_refuses_requests_beyond_the_amount(scripted, proxy_factory):
    backend = await scripted("slow")
    backend.mode = "hold"
    limit = {"inFlightReq": {"amount": 1}}
    proxy = await proxy_factory(routed([backend.url], {"limit": limit}, ["limit"]))
    first = asyncio.ensure_future(request(proxy.port))
    await wait_for(lambda: backend.holding == 1, 10, "the first request to be held")
    assert (await request(proxy.port)).status == 429
    backend.release()
    assert (await first).status == 200
    assert (await request(proxy.port)).status == 200  # the slot was given back


async def test_buffering_refuses_large_bodies_and_sends_a_content_length(scripted, proxy_factory):
    backend = await scripted("b")
    buffering = {"buffering": {"maxRequestBodyBytes": 100}}
    proxy = await proxy_factory(routed([backend.url], {"buf": buffering}, ["buf"]))
    too_big = await request(proxy.port, method="POST", body=b"x" * 101)
    assert too_big.status == 413
    chunked = await request(
        proxy.port,
        method="POST",
        headers={"Transfer-Encoding": "chunked"},
        body=b"y" * 60,
    )
    assert chunked.status == 200
    [seen] = backend.requests
    headers = dict(seen["headers"])
    assert headers["content-length"] == "60" and "transfer-encoding" not in headers
    assert seen["body"] == b"y" * 60


# ---------------------------------------------------------------- bad input


async def test_invalid_middlewares_disable_only_their_routers_with_the_json_path(
    backends, proxy_factory
):
    backend = await backends()
    bad = {
        "no-attempts": {"retry": {"attempts": 0}},
        "no-average": {"rateLimit": {"average": 0}},
        "neg-burst": {"rateLimit": {"average": 5, "burst": -1}},
        "bad-cidr": {"ipAllowList": {"sourceRange": ["10.0.0.0/33"]}},
        "bad-fn": {"circuitBreaker": {"expression": "NetworkErrorRate() > 0.5"}},
        "bad-float": {"circuitBreaker": {"expression": "NetworkErrorRatio() > 1"}},
    }
    routers = {name: router(f"Path(`/{name}`)", "s", middlewares=[name]) for name in bad}
    routers["fine"] = router("Path(`/fine`)", "s")
    config = {"http": {"routers": routers, "middlewares": bad, "services": {"s": lb(backend.url)}}}
    proxy = await proxy_factory(config)
    assert (await request(proxy.port, target="/fine")).status == 200
    for name in bad:
        assert (await request(proxy.port, target=f"/{name}")).status == 404
    raw = proxy.rawdata()["middlewares"]
    errors = {name: " ".join(raw[f"{name}@file"]["error"]) for name in bad}
    assert "retry.attempts: must be > 0" in errors["no-attempts"]
    assert "rateLimit.average" in errors["no-average"]
    assert "rateLimit.burst: must be > 0" in errors["neg-burst"]
    assert "ipAllowList.sourceRange[0]" in errors["bad-cidr"]
    assert "unknown function 'NetworkErrorRate'" in errors["bad-fn"]
    assert "column 1" in errors["bad-fn"]
    assert "float literal" in errors["bad-float"] and "column 23" in errors["bad-float"]


# ---------------------------------------------------------------- access control


async def test_acl_fixture_lets_the_allowed_source_through_and_blocks_the_rest(
    backends, proxy_factory, tmp_path
):
    """Traefik Mesh's ACL fixture, with its pod addresses pointed at a real backend. The
    allowed pod (10.10.1.1) is seen through the X-Forwarded-For its own proxy adds, which this
    entrypoint trusts from loopback as a mesh proxy would from its peers."""
    backend = await backends("svc-b-pod")
    fixture = json.loads((FIXTURES / ACL_FIXTURE).read_text())
    for name in ("my-ns-svc-b-tt-8080-traffic-target", "my-ns-svc-c-tt-8080-traffic-target"):
        fixture["http"]["services"][name]["loadBalancer"]["servers"] = [{"url": backend.url}]
    config = tmp_path / "acl.json"
    config.write_text(json.dumps(fixture))
    mesh_port = free_port()
    proxy = await proxy_factory(
        None,
        entrypoints={"web": f"127.0.0.1:{free_port()}", "http-10000": f"127.0.0.1:{mesh_port}"},
        provider="none",
        extra_flags=[
            f"--providers.file.filename={config}",
            "--entryPoints.http-10000.forwardedHeaders.trustedIPs=127.0.0.1/32",
        ],
    )
    await wait_for(lambda: proxy.generation() >= 1)
    host = "svc-b.my-ns.traefik.mesh"

    async def status(xff: str | None) -> int:
        headers = {"X-Forwarded-For": xff} if xff else {}
        return (await request(mesh_port, host=host, headers=headers)).status

    assert await status("10.10.1.1") == 200
    assert await status("10.99.9.9") == 403  # a pod the TrafficTarget does not name
    assert await status(None) == 403  # loopback itself is not an allowed source
    assert len(backend.requests) == 1


async def test_ip_allow_list_matches_ipv6_sources_and_answers_the_reject_status(
    backends, proxy_factory
):
    backend = await backends()
    port = free_port()
    config = {
        "http": {
            "routers": {
                "open": router("Path(`/open`)", "s", middlewares=["loopback"]),
                "closed": router("Path(`/closed`)", "s", middlewares=["ula-only"]),
            },
            "middlewares": {
                "loopback": {"ipAllowList": {"sourceRange": ["10.0.0.0/8", "::1/128"]}},
                "ula-only": {"ipAllowList": {"sourceRange": ["fd00::/8"], "rejectStatusCode": 404}},
            },
            "services": {"s": lb(backend.url)},
        }
    }
    proxy = await proxy_factory(config, entrypoints={"web": f"[::1]:{port}"})
    assert (await request(proxy.port, target="/open", address="::1")).status == 200
    closed = await request(proxy.port, target="/closed", address="::1")
    assert (closed.status, closed.body) == (404, b"Not Found")
