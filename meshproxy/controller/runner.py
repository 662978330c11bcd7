"""Run the controller: its API, and the source that feeds it cluster state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from meshproxy.controller.api import start_api
from meshproxy.controller.app import Controller
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.sources.manifests import ManifestSource

log = logging.getLogger("meshproxy.controller")


class ControllerStartupError(Exception):
    """The controller cannot start; the message is one line naming the file or address."""


async def start_controller(
    settings: ControllerSettings,
) -> tuple[Controller, list[asyncio.Task[None]], web.AppRunner]:
    """API up first (it serves the default config at once), then the source.

    Raises ControllerStartupError when the manifest directory is missing, the Kubernetes
    credentials cannot be loaded, or the API address cannot be bound: failures that would
    otherwise happen in a background task, unseen, with the API answering "not synced yet".
    """
    kube = None
    if settings.manifests:
        if not Path(settings.manifests).is_dir():
            raise ControllerStartupError(
                f"--manifests {settings.manifests}: not a directory (or not readable)"
            )
    else:
        from meshproxy.controller.kube import Kube, make_api_client

        if settings.kubeconfig and not os.access(settings.kubeconfig, os.R_OK):
            reason = "no such file" if not Path(settings.kubeconfig).exists() else "not readable"
            raise ControllerStartupError(f"--kubeconfig {settings.kubeconfig}: {reason}")
        try:
            kube = Kube(await make_api_client(settings))
        except Exception as exc:  # kubeconfig missing/invalid, not in a cluster...
            where = settings.kubeconfig or "in-cluster credentials"
            raise ControllerStartupError(
                f"cannot load Kubernetes credentials ({where}): {exc}; "
                "give --kubeconfig, --masterURL or --manifests"
            ) from None
    controller = Controller(settings)
    address = f"{settings.api_host or '*'}:{settings.api_port}"
    try:
        runner = await start_api(controller, settings.api_host, settings.api_port)
    except OSError as exc:
        if kube is not None:
            await kube.close()
        raise ControllerStartupError(f"API: cannot listen on {address}: {_reason(exc)}") from None
    loop = asyncio.get_running_loop()
    if settings.manifests:
        source = ManifestSource(settings.manifests, controller.set_state)
        task = loop.create_task(source.run())
    else:
        from meshproxy.controller.sources.kubernetes import KubernetesSource

        task = loop.create_task(KubernetesSource(settings, controller, kube).run())
    task.add_done_callback(_report_end)
    log.info(
        "controller API on %s, cluster state from %s",
        address,
        settings.manifests or "the Kubernetes API",
    )
    return controller, [task], runner


def _report_end(task: asyncio.Task[None]) -> None:
    """A source task must run until cancelled: if it ends with an exception, say so (an
    unobserved task exception is otherwise silent until the process exits)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the cluster source stopped", exc_info=task.exception())


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


def _reason(exc: OSError) -> str:
    """`Address already in use`, not uvloop's long wrapper text around it."""
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)  # resolver errors (socket.gaierror) have negative codes
