"""Graceful shutdown and a DaemonSet-style restart (issue 15 point 3, Traefik's
entryPoints.X.transport.lifeCycle: requestAcceptGraceTimeout, graceTimeOut; docs/workers.md)."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request

from tests.helpers import ProxyProcess, catch_all, request, wait_for
from tests.integration.test_workers import Load, workers


def ping_status(admin_port: int) -> int:
    """The status of the admin /ping; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ping", timeout=2):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


LIFE_CYCLE = [
    "--entryPoints.web.transport.lifeCycle.requestAcceptGraceTimeout=1s",
    "--entryPoints.web.transport.lifeCycle.graceTimeOut=10s",
]


async def test_rollout_under_load_fails_no_request(backends, proxy_factory, tmp_path):
    """Issue 15 point 3: a new proxy starts on the same ports (SO_REUSEPORT), then the old
    one gets SIGTERM, while a bounded client loop (keep-alive and new-connection requests)
    runs: /ping of the old one goes 503 first (Traefik's ping.terminatingStatusCode), it
    keeps accepting for requestAcceptGraceTimeout, ends keep-alive connections at a request
    boundary (Connection: close, RFC 9112 §9.6), finishes what is in flight: zero failures."""
    a = await backends("a")
    old = await proxy_factory(catch_all(a.url), extra_flags=["--workers=2", *LIFE_CYCLE])
    await wait_for(lambda: [w["generation"] for w in workers(old)] == [1, 1], 15, "old ready")
    load = Load(old.port, keep_alive=2, fresh=2, limit=20000, seconds=90)
    running = asyncio.create_task(load.run())
    await wait_for(lambda: load.done >= 200, 20, "load under way")
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new = ProxyProcess(
        new_dir,
        catch_all(a.url),
        entrypoints=dict(old.entrypoints),
        extra_flags=["--workers=2", *LIFE_CYCLE],
    )
    try:
        await new.start()
        await wait_for(lambda: [w["generation"] for w in workers(new)] == [1, 1], 15, "new ready")
        assert old.process is not None
        old.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        await wait_for(lambda: ping_status(old.admin_port) == 503, 5, "old readiness false")
        before = load.done
        await wait_for(lambda: old.process.poll() is not None, 20, "old proxy exited")
        assert time.monotonic() - started >= 0.9  # it accepted for requestAcceptGraceTimeout
        assert old.process.returncode == 0
        await wait_for(lambda: load.done >= before + 500, 30, "the new proxy serves")
        load.stop()
        await running
        print(f"rollout: {load.done} requests, {load.retried} resent on a new connection")
        assert load.failures == [], load.failures[:5]
        assert load.done >= 700
    finally:
        load.stop()
        new.stop()


async def test_readiness_goes_false_first_and_a_second_sigterm_ends_at_once(
    scripted, proxy_factory
):
    """Issue 15 point 3 and bad input: on SIGTERM /ping answers 503 while an in-flight
    request is held (graceTimeOut 30 s); a second SIGTERM during the grace period ends the
    process at once."""
    backend = await scripted()
    proxy = await proxy_factory(
        catch_all(backend.url),
        extra_flags=[
            "--workers=2",
            "--entryPoints.web.transport.lifeCycle.graceTimeOut=30s",
        ],
    )
    await wait_for(lambda: [w["generation"] for w in workers(proxy)] == [1, 1], 15, "ready")
    backend.mode = "hold"
    held = asyncio.create_task(request(proxy.port, host="app.test", timeout=40))
    await wait_for(lambda: backend.holding == 1, 10, "a request in flight")
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    await wait_for(lambda: ping_status(proxy.admin_port) == 503, 5, "readiness false")
    assert proxy.process.poll() is None  # the held request keeps it in its grace period
    proxy.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    await wait_for(lambda: proxy.process.poll() is not None, 10, "exit on the second SIGTERM")
    assert time.monotonic() - started < 5
    backend.release()
    held.cancel()
