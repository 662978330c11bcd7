"""What the controller changes in the cluster, each step idempotent and undone by `cleanup`:

- a shadow Service per meshed Service, in the mesh namespace, selecting the proxy pods and
  mapping each port to the proxy entrypoint serving it (optionally with
  `internalTrafficPolicy: Local`, so a pod reaches the proxy on its own node);
- the CoreDNS block that makes `<svc>.<ns>.traefik.mesh` (and `.maesh`) resolve to the shadow
  Service (or the `coredns-custom` ConfigMap on AKS).

Shadow names follow Traefik Mesh (`<meshNs>-<svc>-6d61657368-<ns>`) so existing DNS rewrites
keep working; a name over Kubernetes' 63 characters is hashed instead, and the DNS block gets
an exact rewrite for it (Traefik Mesh failed to mesh such services and leaked their ports).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any

from meshproxy.controller import annotations as notes
from meshproxy.controller.kube import Kube, KubeError
from meshproxy.controller.objects import labels_of, meta
from meshproxy.controller.ports import PortTable
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.topology import Service, Topology

log = logging.getLogger("meshproxy.controller")

SHADOW_LABELS = {"app": "maesh", "type": "shadow"}
PROXY_SELECTOR = {"component": "maesh-mesh"}
MAX_NAME = 63
BLOCK_BEGIN = "#### Begin Traefik Mesh Block"
BLOCK_END = "#### End Traefik Mesh Block"
CUSTOM_KEYS = ("traefik.mesh.server", "maesh.server")
MERGE = "application/merge-patch+json"


def _same_spec(current: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Only the fields we set are compared (the API server fills in others)."""
    ports = [
        {k: p.get(k) for k in ("name", "port", "protocol", "targetPort")}
        for p in current.get("ports") or []
    ]
    policy = current.get("internalTrafficPolicy", "Cluster")
    return (
        ports == desired["ports"]
        and current.get("selector") == desired["selector"]
        and policy == desired.get("internalTrafficPolicy", policy)
    )


def shadow_name(mesh_namespace: str, name: str, namespace: str) -> str:
    classic = f"{mesh_namespace}-{name}-6d61657368-{namespace}"
    if len(classic) <= MAX_NAME:
        return classic
    digest = hashlib.blake2b(f"{namespace}/{name}".encode(), digest_size=12).hexdigest()
    return f"{mesh_namespace[: MAX_NAME - 36]}-shadow-{digest}"


def mesh_ports(
    service: Service, settings: ControllerSettings, tables: dict[str, PortTable]
) -> list[dict[str, Any]]:
    """The shadow Service's ports: same name/port/protocol, targetPort = the proxy's port."""
    try:
        mode = notes.traffic_type(service.annotations, settings.default_mode)
    except notes.AnnotationError:
        return []
    out = []
    if mode == "http":
        tcp_ports = [p for p in service.ports if p.protocol == "TCP"]
        for index, port in enumerate(tcp_ports):
            if index < settings.limit_http_port:
                out.append((port, settings.min_http_port + index))
    else:
        for port in service.ports:
            number = tables[mode].get(service.namespace, service.name, port.port)
            if number is not None:
                out.append((port, number))
    return [
        {"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": target}
        for p, target in out
    ]


def shadow_service(
    service: Service, settings: ControllerSettings, tables: dict[str, PortTable]
) -> dict[str, Any] | None:
    ports = mesh_ports(service, settings, tables)
    if not ports:
        return None
    spec: dict[str, Any] = {"selector": dict(PROXY_SELECTOR), "ports": ports}
    if settings.local_traffic_policy:
        spec["internalTrafficPolicy"] = "Local"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": shadow_name(settings.namespace, service.name, service.namespace),
            "namespace": settings.namespace,
            "labels": {
                **SHADOW_LABELS,
                "mesh.traefik.io/service-name": service.name,
                "mesh.traefik.io/service-namespace": service.namespace,
            },
        },
        "spec": spec,
    }


def corefile_block(settings: ControllerSettings, hashed: dict[str, str]) -> str:
    """Servers for traefik.mesh and maesh: exact rewrites for hashed shadow names, then the
    regex rewrite of every other name to its shadow Service."""
    mesh_ns, domain = settings.namespace, settings.cluster_domain
    servers = []
    escaped_domain = domain.replace(".", "\\.")
    for zone in ("traefik.mesh", "maesh"):
        escaped_zone = zone.replace(".", "\\.")
        exact = [
            f"    rewrite continue {{\n"
            f"        name exact {name}.{zone} {target}.{mesh_ns}.svc.{domain}\n"
            f"        answer name {target}.{mesh_ns}.svc.{domain} {name}.{zone}\n"
            f"    }}\n"
            for name, target in sorted(hashed.items())
        ]
        servers.append(
            f"{zone}:53 {{\n"
            "    errors\n" + "".join(exact) + "    rewrite continue {\n"
            f"        name regex ([a-zA-Z0-9-_]*)\\.([a-zA-Z0-9-_]*)\\.{escaped_zone} "
            f"{mesh_ns}-{{1}}-6d61657368-{{2}}.{mesh_ns}.svc.{domain}\n"
            f"        answer name {mesh_ns}-([a-zA-Z0-9-_]*)-6d61657368-([a-zA-Z0-9-_]*)"
            f"\\.{mesh_ns}\\.svc\\.{escaped_domain} {{1}}.{{2}}.{zone}\n"
            "    }\n"
            f"    kubernetes {domain} in-addr.arpa ip6.arpa {{\n"
            "        pods insecure\n"
            "        fallthrough in-addr.arpa ip6.arpa\n"
            "    }\n"
            "    forward . /etc/resolv.conf\n"
            "    cache 30\n"
            "    loop\n"
            "    reload\n"
            "    loadbalance\n"
            "}\n"
        )
    return "".join(servers)


def patch_corefile(corefile: str, block: str | None) -> str:
    """Replace (or remove, with None) our marked block; everything else is left as it was."""
    start = corefile.find(BLOCK_BEGIN)
    end = corefile.find(BLOCK_END)
    if start != -1 and end != -1:
        corefile = (
            corefile[:start].rstrip("\n") + "\n" + corefile[end + len(BLOCK_END) :].lstrip("\n")
        )
    corefile = corefile.rstrip("\n") + "\n"
    if block is None:
        return corefile
    return f"{corefile}{BLOCK_BEGIN}\n{block}{BLOCK_END}\n"


class ClusterEffects:
    def __init__(self, kube: Kube, settings: ControllerSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.dns_block: str | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._again = False

    # -- ports survive restarts: rebuilt from the shadow services ---------------------------

    async def load_port_tables(self, tables: dict[str, PortTable]) -> None:
        try:
            shadows = await self.list_shadows()
        except (KubeError, OSError) as exc:
            log.warning("cannot read shadow services to restore TCP/UDP ports: %s", exc)
            return
        for shadow in shadows:
            labels = labels_of(shadow)
            name = labels.get("mesh.traefik.io/service-name")
            namespace = labels.get("mesh.traefik.io/service-namespace")
            if not name or not namespace:
                continue
            for port in (shadow.get("spec") or {}).get("ports") or []:
                target = port.get("targetPort")
                if not isinstance(target, int):
                    continue
                kind = "udp" if port.get("protocol") == "UDP" else "tcp"
                table = tables[kind]
                if table.low <= target <= table.high:
                    table.mappings[PortTable.ident(namespace, name, int(port["port"]))] = target

    async def list_shadows(self) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in SHADOW_LABELS.items())
        items, _ = await self.kube.list("Service", self.settings.namespace, labelSelector=selector)
        return items

    # -- shadow services and DNS, after every rebuild --------------------------------------

    def schedule_sync(self, controller: Any) -> None:
        if self._sync_task is not None and not self._sync_task.done():
            self._again = True
            return
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop(controller))

    async def _sync_loop(self, controller: Any) -> None:
        while True:
            self._again = False
            await self.sync(controller)
            if not self._again:
                return

    async def sync(self, controller: Any) -> None:
        try:
            hashed = await self.sync_shadows(controller.topology, controller.tables)
            await self.sync_dns(hashed)
        except (KubeError, OSError) as exc:
            log.warning("cluster side effects not applied (will retry on next change): %s", exc)

    async def sync_shadows(
        self, topology: Topology, tables: dict[str, PortTable]
    ) -> dict[str, str]:
        desired: dict[str, dict[str, Any]] = {}
        hashed: dict[str, str] = {}
        for service in topology.services.values():
            shadow = shadow_service(service, self.settings, tables)
            if shadow is None:
                continue
            name = meta(shadow)["name"]
            desired[name] = shadow
            if not name.endswith(f"-6d61657368-{service.namespace}"):
                hashed[f"{service.name}.{service.namespace}"] = name
        existing = {meta(s)["name"]: s for s in await self.list_shadows()}
        path = f"/api/v1/namespaces/{self.settings.namespace}/services"
        for name, shadow in sorted(desired.items()):
            current = existing.get(name)
            if current is None:
                await self.kube.request("POST", path, body=shadow)
                log.info("shadow service %s created", name)
                continue
            if not _same_spec(current.get("spec") or {}, shadow["spec"]):
                patch = {"spec": shadow["spec"], "metadata": {"labels": meta(shadow)["labels"]}}
                await self.kube.request("PATCH", f"{path}/{name}", body=patch, content_type=MERGE)
                log.info("shadow service %s updated", name)
        for name in sorted(set(existing) - set(desired)):
            await self.kube.request("DELETE", f"{path}/{name}")
            log.info("shadow service %s deleted", name)
        return hashed

    async def sync_dns(self, hashed: dict[str, str]) -> None:
        block = corefile_block(self.settings, hashed)
        if block == self.dns_block:
            return
        await write_dns(self.kube, block)
        self.dns_block = block


# ---------------------------------------------------------------- DNS


async def find_dns(kube: Kube) -> tuple[dict[str, Any], str] | None:
    """The CoreDNS Deployment of kube-system and the ConfigMap holding its Corefile."""
    deployments, _ = await kube.list("Deployment", "kube-system")
    for deployment in deployments:
        labels = labels_of(deployment)
        if labels.get("kubernetes.io/name") == "CoreDNS" or meta(deployment).get("name") in (
            "coredns",
            "rke2-coredns-rke2-coredns",
        ):
            volumes = ((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get(
                "volumes"
            ) or []
            names = [(v.get("configMap") or {}).get("name") for v in volumes]
            names = [n for n in names if n]
            if "coredns-custom" in names:
                return deployment, "coredns-custom"
            return deployment, str(names[0]) if names else "coredns"
    return None


async def write_dns(kube: Kube, block: str | None) -> None:
    """Install (or, with None, remove) the mesh's DNS servers, then restart CoreDNS."""
    found = await find_dns(kube)
    if found is None:
        raise KubeError(404, "no CoreDNS deployment found in kube-system")
    deployment, configmap = found
    path = f"/api/v1/namespaces/kube-system/configmaps/{configmap}"
    current = await kube.request("GET", path)
    data = dict(current.get("data") or {})
    if configmap == "coredns-custom":
        for key in CUSTOM_KEYS:
            if block is None:
                data.pop(key, None)
            else:
                data[key] = _zone(block, key.removesuffix(".server"))
    else:
        data["Corefile"] = patch_corefile(data.get("Corefile", ""), block)
    if data == (current.get("data") or {}):
        return
    await kube.request("PATCH", path, body={"data": data}, content_type=MERGE)
    restart = {
        "spec": {
            "template": {"metadata": {"annotations": {"traefik-mesh-hash": str(uuid.uuid4())}}}
        }
    }
    await kube.request(
        "PATCH",
        f"/apis/apps/v1/namespaces/kube-system/deployments/{meta(deployment)['name']}",
        body=restart,
        content_type=MERGE,
    )
    log.info("DNS configuration %s in ConfigMap %s", "updated" if block else "removed", configmap)


def _zone(block: str, zone: str) -> str:
    start = block.index(f"{zone}:53 {{")
    depth = 0
    for index in range(start, len(block)):
        if block[index] == "{":
            depth += 1
        elif block[index] == "}":
            depth -= 1
            if depth == 0:
                return block[start : index + 1] + "\n"
    return block[start:]


# ---------------------------------------------------------------- cleanup


async def cleanup(settings: ControllerSettings) -> int:
    """`meshproxy cleanup`: delete the shadow services, take the DNS block out."""
    from meshproxy.controller.kube import make_api_client

    kube = Kube(await make_api_client(settings))
    try:
        effects = ClusterEffects(kube, settings)
        for shadow in await effects.list_shadows():
            name = meta(shadow)["name"]
            await kube.request("DELETE", f"/api/v1/namespaces/{settings.namespace}/services/{name}")
            log.info("shadow service %s deleted", name)
        await write_dns(kube, None)
    except (KubeError, OSError) as exc:
        log.error("cleanup failed: %s", exc)
        return 1
    finally:
        await kube.close()
    return 0
