"""The controller API (:9000), Traefik Mesh's paths:

/api/configuration/current   the dynamic configuration (ETag, 304 on If-None-Match)
/api/topology/current        the topology, with the errors of each object
/api/status/readiness        500 until the first cluster sync, then 200 `true`
/api/status/nodes            the mesh proxies: [{Name, IP, Ready}]
"""

from __future__ import annotations

import json
import re

from aiohttp import web

from meshproxy.controller.app import Controller

JSON = "application/json"

# One entity-tag of an If-None-Match list (RFC 9110 §8.8.3): an optional weak prefix `W/`
# and a quoted opaque string (no DQUOTE inside).
_ENTITY_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


def none_match(header_values: list[str], etag: str) -> bool:
    """True when an `If-None-Match` condition is false for `etag`, i.e. the answer is 304.

    RFC 9110 §13.1.2: the field is `*` or a list of entity-tags; `*` matches any current
    representation, and a list matches when one member matches by the *weak* comparison
    (§8.8.3.2: the opaque strings are equal, whatever `W/` prefixes either side has).
    Several header lines are one list (RFC 9110 §5.3). A member that does not parse is
    ignored (the condition is then evaluated on the members that do).
    """
    opaque = etag[2:] if etag.startswith("W/") else etag
    for value in header_values:
        if value.strip() == "*":
            return True
        position = 0
        text = value.strip()
        while position < len(text):
            match = _ENTITY_TAG.match(text, position)
            if match is None:
                # skip one malformed member up to the next comma
                comma = text.find(",", position)
                if comma < 0:
                    break
                position = comma + 1
                continue
            if match.group(2) == opaque:
                return True
            position = match.end()
    return False


def make_app(controller: Controller) -> web.Application:
    async def configuration(request: web.Request) -> web.Response:
        etag = controller.etag
        if none_match(request.headers.getall("If-None-Match", []), etag):
            # RFC 9110 §13.1.2: 304 for GET and HEAD, 412 for any other method (the API,
            # like Traefik Mesh's, answers every method with the configuration)
            status = 304 if request.method in ("GET", "HEAD") else 412
            return web.Response(status=status, headers={"ETag": etag})
        return web.Response(body=controller.config_bytes, content_type=JSON, headers={"ETag": etag})

    async def topology(request: web.Request) -> web.Response:
        return web.Response(body=controller.topology_bytes, content_type=JSON)

    async def readiness(request: web.Request) -> web.Response:
        if not controller.synced.is_set():
            return web.Response(status=500, text="not synced yet")
        return web.Response(text="true", content_type=JSON)

    async def nodes(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(controller.nodes()), content_type=JSON)

    app = web.Application()
    for path, handler in (
        ("/api/configuration/current", configuration),
        ("/api/topology/current", topology),
        ("/api/status/readiness", readiness),
        ("/api/status/nodes", nodes),
    ):
        app.router.add_route("*", path, handler)  # Traefik Mesh accepts any method
    return app


async def start_api(controller: Controller, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(controller), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or None, port).start()
    return runner
