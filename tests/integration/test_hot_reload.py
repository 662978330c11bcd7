"""Configuration changes apply without dropping requests; bad configs change nothing."""

from __future__ import annotations

import asyncio

import h11

from tests.helpers import lb, read_response, request, router, wait_for


async def test_fifty_reloads_under_load_fail_no_request(backends, proxy_factory):
    a, b = await backends("a"), await backends("b")

    def config(i: int) -> dict:
        servers = [{"url": a.url, "weight": 1 + i % 3}, {"url": b.url, "weight": 1}]
        return {
            "http": {
                "routers": {
                    "main": router("Host(`app.test`)", "s"),
                    f"extra-{i}": router(f"Host(`extra-{i}.test`)", "s"),
                },
                "services": {"s": {"loadBalancer": {"servers": servers}}},
            }
        }

    proxy = await proxy_factory(config(0))
    failures: list[str] = []
    done = asyncio.Event()
    counts = {"requests": 0}

    async def keep_alive_client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        conn = h11.Connection(h11.CLIENT)
        while not done.is_set():
            writer.write(
                conn.send(h11.Request(method="GET", target="/", headers=[("Host", "app.test")]))
            )
            writer.write(conn.send(h11.EndOfMessage()))
            response = await read_response(conn, reader)
            if response.status != 200:
                failures.append(f"keep-alive: {response.status}")
            counts["requests"] += 1
            conn.start_next_cycle()
        writer.close()

    async def new_connection_client() -> None:
        while not done.is_set():
            response = await request(proxy.port, host="app.test")
            if response.status != 200:
                failures.append(f"new connection: {response.status}")
            counts["requests"] += 1

    clients = [
        asyncio.create_task(keep_alive_client()),
        asyncio.create_task(new_connection_client()),
    ]
    start = proxy.generation()
    for i in range(1, 51):
        proxy.write(config(i))
        await wait_for(lambda i=i: proxy.generation() >= start + i, 10, f"reload {i}")
        # a route added by this reload serves at once
        assert (await request(proxy.port, host=f"extra-{i}.test")).status == 200
    done.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert counts["requests"] > 50
    assert f"traefik_config_reloads_total {float(start + 50)}" in proxy.metrics()


async def test_undecodable_config_is_rejected_with_its_path_and_last_good_keeps_serving(
    backends, proxy_factory
):
    backend = await backends()
    good = {
        "http": {
            "routers": {"r": router("Host(`a.test`)", "s")},
            "services": {"s": lb(backend.url)},
        }
    }
    proxy = await proxy_factory(good)
    proxy.write(
        {
            "http": {
                "routers": {"r": router("Host(`a.test`)", "s")},
                "services": {
                    "s": {
                        "loadBalancer": {
                            "servers": [{"url": backend.url, "weight": "x"}],
                            "surprise": 1,
                        }
                    }
                },
            }
        }
    )

    def rejected():
        error = proxy.rawdata()["meshproxy"]["lastConfigError"]
        return error and "http.services.s.loadBalancer.surprise: field not found" in error

    await wait_for(rejected, 10, "config rejected")
    assert (
        "http.services.s.loadBalancer.servers[0].weight"
        in proxy.rawdata()["meshproxy"]["lastConfigError"]
    )
    assert (await request(proxy.port, host="a.test")).status == 200
    proxy.write("http: [this is: not valid")
    await wait_for(
        lambda: "invalid YAML" in (proxy.rawdata()["meshproxy"]["lastConfigError"] or "")
    )
    assert (await request(proxy.port, host="a.test")).status == 200


async def test_broken_object_disables_only_the_routers_that_depend_on_it(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {
                    "ok": router("Host(`ok.test`)", "s"),
                    "bad-rule": router("Host(`x.test`) &&", "s"),
                    "missing-service": router("Host(`m.test`)", "nope"),
                    "two-kinds": router("Host(`t.test`)", "twokinds"),
                    "bad-middleware": router("Host(`w.test`)", "s", middlewares=["badcidr"]),
                },
                "services": {
                    "s": lb(backend.url),
                    "twokinds": {**lb(backend.url), "weighted": {"services": [{"name": "s"}]}},
                },
                "middlewares": {"badcidr": {"ipAllowList": {"sourceRange": ["10.0.0.0/99"]}}},
            }
        }
    )
    raw = proxy.rawdata()
    routers = raw["routers"]
    assert routers["ok@file"]["status"] == "enabled"
    for name, expected in (
        ("bad-rule@file", "invalid rule"),
        ("missing-service@file", "does not exist"),
        ("two-kinds@file", "multi-types service"),
        ("bad-middleware@file", "sourceRange[0]"),
    ):
        assert routers[name]["status"] == "disabled"
        assert expected in " ".join(routers[name]["error"]), routers[name]
    assert raw["services"]["twokinds@file"]["status"] == "disabled"
    assert (await request(proxy.port, host="ok.test")).status == 200
    assert (await request(proxy.port, host="m.test")).status == 404
    log = proxy.log_path.read_text()
    assert "missing-service@file (disabled)" in log


async def test_balancer_position_survives_a_reload_that_does_not_change_it(backends, proxy_factory):
    a, b = await backends("a"), await backends("b")
    services = {"s": {"loadBalancer": {"servers": [{"url": a.url}, {"url": b.url}]}}}
    proxy = await proxy_factory(
        {"http": {"routers": {"r": router("Host(`x.test`)", "s")}, "services": services}}
    )
    order = []
    for i in range(4):
        order.append((await request(proxy.port, host="x.test")).body.split(b"\n")[0])
        generation = proxy.generation()
        proxy.write(
            {
                "http": {
                    "routers": {
                        "r": router("Host(`x.test`)", "s"),
                        f"new{i}": router("Host(`y.test`)", "s"),
                    },
                    "services": services,
                }
            }
        )
        await wait_for(lambda g=generation: proxy.generation() > g)
    assert order == [b"Hostname: a", b"Hostname: b"] * 2
