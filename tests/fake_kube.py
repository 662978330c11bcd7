"""A local Kubernetes API endpoint that speaks the real list and watch wire format: lists with a
resourceVersion, `?watch=true` streams of JSON lines from a given resourceVersion, `410 Gone`
(as an ERROR event) for a version older than the compacted history, and the writes the
controller makes (create, merge-patch, delete). Not a cluster: no defaulting, no admission."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

from aiohttp import web

Collection = tuple[str, str]  # (api prefix, plural), e.g. ("/api/v1", "services")

KIND_COLLECTIONS: dict[str, Collection] = {
    "Service": ("/api/v1", "services"),
    "Endpoints": ("/api/v1", "endpoints"),
    "Pod": ("/api/v1", "pods"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "TrafficTarget": ("/apis/access.smi-spec.io/v1alpha2", "traffictargets"),
    "HTTPRouteGroup": ("/apis/specs.smi-spec.io/v1alpha3", "httproutegroups"),
    "TCPRoute": ("/apis/specs.smi-spec.io/v1alpha3", "tcproutes"),
    "TrafficSplit": ("/apis/split.smi-spec.io/v1alpha3", "trafficsplits"),
}


class FakeKubeAPI:
    def __init__(self) -> None:
        self.version = 100
        self.compacted = 0
        self.store: dict[Collection, dict[tuple[str, str], dict[str, Any]]] = {
            c: {} for c in KIND_COLLECTIONS.values()
        }
        self.events: list[tuple[int, Collection, str, dict[str, Any]]] = []
        self.changed = asyncio.Condition()
        self.watches = 0
        self.gone_sent = 0
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.closing = False

    # -- test controls ------------------------------------------------------------------

    def put(self, obj: dict[str, Any]) -> None:
        collection = KIND_COLLECTIONS[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        ident = (meta.get("namespace", "default"), meta["name"])
        kind = "MODIFIED" if ident in self.store[collection] else "ADDED"
        self._record(collection, kind, obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        collection = KIND_COLLECTIONS[kind]
        obj = self.store[collection].get((namespace, name))
        if obj is not None:
            self._record(collection, "DELETED", obj)

    def compact(self) -> None:
        """Forget history: every watch from an older resourceVersion gets 410 Gone."""
        self.compacted = self.version
        self.events.clear()

    def objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        items = self.store[KIND_COLLECTIONS[kind]]
        return [o for (ns, _), o in sorted(items.items()) if namespace in (None, ns)]

    def _record(self, collection: Collection, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta["resourceVersion"] = str(self.version)
        ident = (meta["namespace"], meta["name"])
        if kind == "DELETED":
            self.store[collection].pop(ident, None)
        else:
            self.store[collection][ident] = obj
        self.events.append((self.version, collection, kind, obj))
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # -- server -------------------------------------------------------------------------

    async def start(self) -> FakeKubeAPI:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.closing = True
        await self._notify()  # open watches end now instead of at their timeout
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _route(self, path: str) -> tuple[Collection, str | None, str | None] | None:
        for collection in KIND_COLLECTIONS.values():
            prefix, plural = collection
            if not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :].split("/")
            if rest == [plural]:
                return collection, None, None
            if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] == plural:
                return collection, rest[1], rest[3] if len(rest) > 3 else None
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        if route is None:
            return _status(404, "NotFound", f"the server could not find {request.path}")
        collection, namespace, name = route
        items = self.store[collection]
        if request.method == "GET" and name is None:
            if request.query.get("watch") in ("true", "1"):
                return await self.watch(request, collection)
            selector = _selector(request.query.get("labelSelector", ""))
            listed = [
                o
                for (ns, _), o in sorted(items.items())
                if namespace in (None, ns) and _matches(o, selector)
            ]
            return web.json_response(
                {
                    "kind": "List",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": listed,
                }
            )
        if request.method == "POST" and name is None:
            obj = await request.json()
            obj.setdefault("metadata", {})["namespace"] = namespace
            if (namespace, obj["metadata"]["name"]) in items:
                return _status(409, "AlreadyExists", "already exists")
            self._record(collection, "ADDED", obj)
            return web.json_response(obj, status=201)
        current = items.get((namespace or "default", name or ""))
        if current is None:
            return _status(404, "NotFound", f"{name} not found")
        if request.method == "GET":
            return web.json_response(current)
        if request.method == "PATCH":
            merged = _merge(copy.deepcopy(current), await request.json())
            self._record(collection, "MODIFIED", merged)
            return web.json_response(merged)
        if request.method == "DELETE":
            self._record(collection, "DELETED", current)
            return web.json_response({"kind": "Status", "status": "Success"})
        return _status(405, "MethodNotAllowed", request.method)

    async def watch(self, request: web.Request, collection: Collection) -> web.StreamResponse:
        self.watches += 1
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds", "30"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since < self.compacted:
            self.gone_sent += 1
            gone = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": f"too old resource version: {since} ({self.compacted})",
                "reason": "Expired",
                "code": 410,
            }
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return response
        deadline = asyncio.get_running_loop().time() + timeout
        sent = since
        while True:
            for version, coll, kind, obj in list(self.events):
                if coll == collection and version > sent:
                    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    sent = version
            if since < self.compacted or self.closing:
                break  # history was compacted under this watch: end it, the client re-lists
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except TimeoutError:
                    break
        return response


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "status": "Failure", "reason": reason, "message": message}
    return web.json_response({**body, "code": code}, status=code)


def _selector(text: str) -> dict[str, str]:
    pairs = [part.split("=", 1) for part in text.split(",") if "=" in part]
    return {k.strip(): v.strip() for k, v in pairs}


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _merge(target: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target
