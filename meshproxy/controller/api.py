"""The controller API (:9000), Traefik Mesh's paths:

/api/configuration/current   the dynamic configuration (ETag, 304 on If-None-Match)
/api/topology/current        the topology, with the errors of each object
/api/status/readiness        500 until the first cluster sync, then 200 `true`
/api/status/nodes            the mesh proxies: [{Name, IP, Ready}]
"""

from __future__ import annotations

import json

from aiohttp import web

from meshproxy.controller.app import Controller

JSON = "application/json"


def make_app(controller: Controller) -> web.Application:
    async def configuration(request: web.Request) -> web.Response:
        etag = controller.etag
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
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
