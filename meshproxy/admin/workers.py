"""The admin API's view of worker processes (`--workers=N`, meshproxy.node).

With workers, the supervisor answers the admin entrypoint but serves no traffic: the live
state (per-server in-flight counts and latency estimates, token buckets, breakers, the
balancer's rotation) is in the workers. The supervisor asks each of them over the control
channel (meshproxy.node.channel frames `{"t": "admin", "id": n}` with a JSON body; the worker
answers a frame of the same kind and id), waits at most `ASK_TIMEOUT` and merges:

- `servers`: per service, each worker's balancer.health.describe_service; merged per server:
  in-flight and health-check probes summed, up only if up in every worker that answered
  (each worker runs its own health checks and outlier detection; /metrics'
  traefik_service_server_up follows the same rule, meshproxy.node.metrics), the latency
  estimate the largest. The supervisor runs no health check: /api/rawdata and the
  Traefik API paths show the workers' merged view.
- `explain`: the first worker's explain answer: the rateLimit tokens left are the node's
  (the workers share the buckets, meshproxy.node.shared_state); a breaker's state is the
  node's as that worker last read it (on its last request through the breaker,
  meshproxy.node.shared_windows); the balancer's rotation is that worker's.

A worker that does not answer in time is left out of that answer; one that raised while
answering (meshproxy.node.worker logs the traceback and keeps serving) too, and when every
worker that answered raised, ask_workers raises WorkerRequestFailed (the admin API: 500).
Without workers (one process) nothing is asked: the admin API reads its own process.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from meshproxy.balancer.health import describe_service
from meshproxy.node.channel import encode

ASK_TIMEOUT = 2.0  # seconds


def supervisor_of(daemon: Any) -> Any:
    """The daemon's Supervisor when this process runs workers, else None."""
    return getattr(daemon, "node", None) if daemon is not None else None


async def ask_workers(daemon: Any, what: str, query: Any = None) -> list[Any] | None:
    """Each answering worker's JSON answer to `what`; None without workers."""
    supervisor = supervisor_of(daemon)
    if supervisor is None:
        return None
    loop = asyncio.get_running_loop()
    body = json.dumps({"what": what, "query": query}).encode()
    waits: list[asyncio.Future[bytes]] = []
    for slot in supervisor.slots:
        if slot.writer is None or slot.writer.is_closing():
            continue
        ident = next(supervisor._ids)
        waiter: asyncio.Future[bytes] = loop.create_future()
        slot.waiting[ident] = waiter
        slot.writer.write(encode({"t": "admin", "id": ident}, body))
        waits.append(waiter)
    if not waits:
        return []
    done, pending = await asyncio.wait(waits, timeout=ASK_TIMEOUT)
    for waiter in pending:
        waiter.cancel()
    # in the order the workers were asked (slot order), not the order they answered
    answers = []
    failed: BaseException | None = None
    for waiter in waits:
        if waiter not in done:
            continue
        error = waiter.exception()
        if error is not None:
            failed = failed or error
        elif waiter.result():
            answers.append(json.loads(waiter.result()))
    if failed is not None and not answers:  # every worker that answered raised: a bug, 500
        raise failed
    return answers


def answer(daemon: Any, body: bytes) -> bytes:
    """A worker's answer to one admin question (runs in the worker)."""
    request = json.loads(body)
    what = request.get("what")
    snapshot = daemon.manager.snapshot
    if what == "servers":
        out = {
            name: describe_service(service) for name, service in snapshot.service_objects.items()
        }
        return json.dumps(out).encode()
    if what == "explain":
        from multidict import MultiDict

        from meshproxy.admin.explain import Explainer, ExplainError
        from meshproxy.admin.traefik_api import AdminContext

        ctx = AdminContext(daemon.manager, daemon.static, 0.0, state=daemon.state)
        query: MultiDict[str] = MultiDict(request.get("query") or [])
        try:
            return json.dumps(Explainer(ctx).explain(query)).encode()
        except ExplainError as exc:
            return json.dumps({"error": str(exc)}).encode()
    return json.dumps({"error": f"unknown question {what!r}"}).encode()


def merge_servers(answers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per service, the workers' describe_service views merged (see the module docstring)."""
    merged: dict[str, dict[str, Any]] = {}
    for worker in answers:
        for service, described in worker.items():
            into = merged.setdefault(service, {"servers": {}})
            if "meshproxyServers" not in described and described.get("meshproxyWhy"):
                # a weighted/mirroring parent that is down (no servers of its own)
                into.setdefault("parentWhy", described["meshproxyWhy"])
            for server in described.get("meshproxyServers", []):
                url = server["url"]
                seen = into["servers"].get(url)
                if seen is None:
                    into["servers"][url] = dict(server)
                    continue
                seen["inFlight"] += server.get("inFlight", 0)
                seen["up"] = seen["up"] and server.get("up", False)
                seen["healthy"] = seen.get("healthy", True) and server.get("healthy", True)
                latencies = [
                    v
                    for v in (seen.get("latencyEstimateMs"), server.get("latencyEstimateMs"))
                    if v is not None
                ]
                seen["latencyEstimateMs"] = max(latencies) if latencies else None
                check = server.get("healthCheck")
                if check is not None and seen.get("healthCheck") is not None:
                    # the node's probes: each worker probes (the supervisor does not)
                    seen["healthCheck"] = {
                        "probes": seen["healthCheck"]["probes"] + check["probes"],
                        "lastError": seen["healthCheck"]["lastError"] or check["lastError"],
                    }
                if server.get("why") and not seen.get("why"):
                    seen["why"] = server["why"]
    out = {}
    for service, data in merged.items():
        servers = list(data["servers"].values())
        view: dict[str, Any] = {
            "serverStatus": {s["url"]: "UP" if s["up"] else "DOWN" for s in servers},
            "meshproxyServers": servers,
        }
        if servers and not any(s["up"] for s in servers):
            view["meshproxyWhy"] = (
                "no server available: every server is down (see meshproxyServers)"
            )
        elif not servers and data.get("parentWhy"):
            view["meshproxyWhy"] = data["parentWhy"]
        out[service] = view
    return out
