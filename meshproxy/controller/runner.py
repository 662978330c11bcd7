"""Run the controller: its API, and the source that feeds it cluster state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from meshproxy.controller.api import start_api
from meshproxy.controller.app import Controller
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.sources.manifests import ManifestSource

log = logging.getLogger("meshproxy.controller")


async def start_controller(
    settings: ControllerSettings,
) -> tuple[Controller, list[asyncio.Task[None]], web.AppRunner]:
    """API up first (it serves the default config at once), then the source."""
    controller = Controller(settings)
    runner = await start_api(controller, settings.api_host, settings.api_port)
    loop = asyncio.get_running_loop()
    if settings.manifests:
        source = ManifestSource(settings.manifests, controller.set_state)
        task = loop.create_task(source.run())
    else:
        from meshproxy.controller.sources.kubernetes import KubernetesSource

        task = loop.create_task(KubernetesSource(settings, controller).run())
    log.info(
        "controller API on %s:%d, cluster state from %s",
        settings.api_host or "*",
        settings.api_port,
        settings.manifests or "the Kubernetes API",
    )
    return controller, [task], runner


async def run_controller(settings: ControllerSettings) -> None:
    _, tasks, runner = await start_controller(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await runner.cleanup()
