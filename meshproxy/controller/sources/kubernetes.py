"""Cluster state from the Kubernetes API: list, then watch from the list's resourceVersion; a
watch that ends (the resync period) or fails with `410 Gone` leads to a fresh list. Nothing is
served from a partial view: the first configuration is built once every kind has been listed,
and an API server that cannot be reached changes nothing until it is back."""

from __future__ import annotations

import asyncio
import logging

from meshproxy.controller.app import Controller
from meshproxy.controller.cluster_effects import ClusterEffects
from meshproxy.controller.kube import Kube, KubeError, make_api_client
from meshproxy.controller.objects import ClusterState, meta
from meshproxy.controller.settings import ControllerSettings

log = logging.getLogger("meshproxy.controller")

BASE_KINDS = ["Service", "Endpoints", "Pod", "TrafficSplit", "HTTPRouteGroup", "TCPRoute"]
OPTIONAL = {"TrafficSplit", "HTTPRouteGroup", "TCPRoute", "TrafficTarget"}  # SMI CRDs
WATCH_SECONDS = 300


class KubernetesSource:
    def __init__(
        self, settings: ControllerSettings, controller: Controller, kube: Kube | None = None
    ) -> None:
        self.settings = settings
        self.controller = controller
        self.kube = kube
        self.kinds = BASE_KINDS + (["TrafficTarget"] if settings.acl else [])
        self.state = ClusterState()
        self.versions: dict[str, str] = {}
        self.effects: ClusterEffects | None = None

    async def run(self) -> None:
        if self.kube is None:
            self.kube = Kube(await make_api_client(self.settings))
        self.effects = ClusterEffects(self.kube, self.settings)
        await self.effects.load_port_tables(self.controller.tables)
        await self.initial_sync()
        self.controller.set_state(self.state)
        await self.effects.sync(self.controller)
        self.controller.on_rebuild = self.effects.schedule_sync
        await asyncio.gather(*(self.follow(kind) for kind in self.kinds))

    async def initial_sync(self) -> None:
        delay = 0.5
        pending = list(self.kinds)
        while pending:
            for kind in list(pending):
                if await self.relist(kind):
                    pending.remove(kind)
            if pending:
                log.warning("waiting for the API server to list %s", ", ".join(pending))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def relist(self, kind: str) -> bool:
        assert self.kube is not None
        try:
            items, version = await self.kube.list(kind)
        except KubeError as exc:
            if exc.status == 404 and kind in OPTIONAL:
                log.warning("%s is not served (SMI CRD missing?): treated as empty", kind)
                self.state.replace_kind(kind, [])
                self.versions[kind] = ""
                return True
            log.warning("listing %s failed: %s", kind, exc)
            return False
        except OSError as exc:
            log.warning("listing %s failed: %s", kind, exc)
            return False
        self.state.replace_kind(kind, items)
        self.versions[kind] = version
        return True

    async def follow(self, kind: str) -> None:
        """Watch one kind forever: a watch that simply ends is resumed from the last version
        seen; `410 Gone` (history compacted) or the periodic resync lists again."""
        assert self.kube is not None
        loop = asyncio.get_running_loop()
        listed_at = loop.time()
        delay = 0.5
        while True:
            relist = loop.time() - listed_at >= self.settings.resync_seconds
            version = self.versions.get(kind, "")
            if not relist and (version or kind not in OPTIONAL):
                timeout = max(1, int(min(self.settings.resync_seconds, WATCH_SECONDS)))
                try:
                    async for event_type, obj in self.kube.watch(kind, version, timeout):
                        self.apply_event(kind, event_type, obj)
                        delay = 0.5
                    continue  # ended by the server: resume from the last version
                except KubeError as exc:
                    if exc.status == 410:
                        log.info("watch of %s expired (410 Gone): listing again", kind)
                        relist = True
                    else:
                        log.warning("watch of %s failed: %s", kind, exc)
                except (TimeoutError, OSError) as exc:
                    log.warning("watch of %s failed: %s", kind, exc)
                if not relist:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            elif not relist:
                await asyncio.sleep(self.settings.resync_seconds)  # CRD absent: look again later
            if await self.relist(kind):
                listed_at = loop.time()
                self.controller.state_changed()
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def apply_event(self, kind: str, event_type: str, obj: dict) -> None:
        version = meta(obj).get("resourceVersion")
        if version:
            self.versions[kind] = version
        if event_type == "BOOKMARK":
            return
        obj.setdefault("kind", kind)
        if event_type in ("ADDED", "MODIFIED"):
            self.state.put(obj)
        elif event_type == "DELETED":
            self.state.remove(obj)
        else:
            return
        self.controller.state_changed()
