"""The controller against a local API endpoint speaking the real list/watch wire format (see
tests/fake_kube.py). Not run against a live cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

from meshproxy.controller.app import Controller
from meshproxy.controller.cluster_effects import (
    BLOCK_BEGIN,
    cleanup,
    corefile_block,
    shadow_service,
    write_dns,
)
from meshproxy.controller.kube import Kube, make_api_client
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.sources.kubernetes import KubernetesSource
from tests.fake_kube import FakeKubeAPI
from tests.helpers import wait_for

COREFILE = ".:53 {\n    errors\n    forward . /etc/resolv.conf\n}\n"


def service(name: str, ns: str = "shop", port: int = 80, **annotations: str) -> dict[str, Any]:
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "web", "port": port, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def pod(name: str, ip: str, ns: str = "shop") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app"}]},
        "status": {"podIP": ip},
    }


def endpoints(name: str, pods: list[tuple[str, str]], ns: str = "shop") -> dict[str, Any]:
    addresses = [
        {"ip": ip, "targetRef": {"kind": "Pod", "name": p, "namespace": ns}} for p, ip in pods
    ]
    return {
        "kind": "Endpoints",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns},
        "subsets": [{"addresses": addresses}],
    }


def seed_cluster(api: FakeKubeAPI) -> None:
    api.put(service("cart"))
    api.put(pod("cart-1", "10.1.0.5"))
    api.put(endpoints("cart", [("cart-1", "10.1.0.5")]))
    api.put(
        {
            "kind": "Deployment",
            "apiVersion": "apps/v1",
            "metadata": {
                "name": "coredns",
                "namespace": "kube-system",
                "labels": {"kubernetes.io/name": "CoreDNS"},
            },
            "spec": {"template": {"spec": {"volumes": [{"configMap": {"name": "coredns"}}]}}},
        }
    )
    api.put(
        {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": COREFILE},
        }
    )


def config_of(controller: Controller) -> dict[str, Any]:
    return json.loads(controller.config_bytes)


async def test_controller_follows_the_api_through_watches_410_and_outages(unused_tcp_port):
    api = await FakeKubeAPI().start()
    seed_cluster(api)
    settings = ControllerSettings(
        namespace="mesh", master_url=api.url, resync_seconds=60, api_port=unused_tcp_port
    )
    controller = Controller(settings)
    kube = Kube(await make_api_client(settings))
    source = KubernetesSource(settings, controller, kube)
    task = asyncio.ensure_future(source.run())
    try:
        routers = lambda: config_of(controller)["http"]["routers"]  # noqa: E731
        await wait_for(lambda: "shop-cart-80" in routers(), 10, "the first configuration")
        cart = config_of(controller)["http"]["services"]["shop-cart-80"]["loadBalancer"]
        assert cart["servers"] == [{"url": "http://10.1.0.5:8080"}]

        # side effects: a shadow service on the proxies' HTTP port, and the DNS block
        await wait_for(lambda: api.objects("Service", "mesh"), 10, "the shadow service")
        [shadow] = api.objects("Service", "mesh")
        assert shadow["metadata"]["name"] == "mesh-cart-6d61657368-shop"
        assert shadow["spec"]["ports"][0]["targetPort"] == 5000
        assert shadow["spec"]["selector"] == {"component": "maesh-mesh"}
        corefile = lambda: api.objects("ConfigMap")[0]["data"]["Corefile"]  # noqa: E731
        await wait_for(lambda: BLOCK_BEGIN in corefile(), 10, "the CoreDNS block")
        assert corefile().startswith(COREFILE)

        # a watch event
        api.put(service("orders", port=8081, **{"mesh.traefik.io/retry-attempts": "2"}))
        await wait_for(lambda: "shop-orders-8081" in routers(), 10, "the new service")
        assert routers()["shop-orders-8081"]["middlewares"] == ["shop-orders-retry"]

        # history compacted under the watches: 410 Gone, then a fresh list
        api.compact()
        api.put(service("payments"))
        await wait_for(lambda: "shop-payments-80" in routers(), 10, "a service after 410")
        await wait_for(lambda: api.gone_sent >= 1, 10, "a watch resumed from a compacted version")
        api.put(pod("cart-2", "10.1.0.6"))
        api.put(endpoints("cart", [("cart-1", "10.1.0.5"), ("cart-2", "10.1.0.6")]))
        await wait_for(
            lambda: (
                len(
                    config_of(controller)["http"]["services"]["shop-cart-80"]["loadBalancer"][
                        "servers"
                    ]
                )
                == 2
            ),
            10,
            "events after the re-list",
        )

        # identical state, identical bytes
        before = controller.config_bytes
        controller.rebuild()
        assert controller.config_bytes == before

        # a long name gets a hashed shadow service that fits in 63 characters
        long_name = "a-service-name-that-is-really-quite-long-indeed"
        api.put(service(long_name, ns="inventory-namespace"))
        await wait_for(lambda: len(api.objects("Service", "mesh")) == 4, 10, "4 shadows")
        names = [s["metadata"]["name"] for s in api.objects("Service", "mesh")]
        assert all(len(n) <= 63 for n in names)
        await wait_for(
            lambda: f"{long_name}.inventory-namespace.traefik.mesh" in corefile(), 10, "rewrite"
        )

        # deleting a service removes its shadow
        api.delete("Service", "shop", "orders")
        await wait_for(lambda: len(api.objects("Service", "mesh")) == 3, 10, "shadow deleted")

        # the API server goes away: the last configuration keeps being served
        served = controller.config_bytes
        await api.stop()
        await asyncio.sleep(0.3)
        assert controller.config_bytes == served
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()
        await api.stop()


async def test_cleanup_removes_shadow_services_and_the_dns_block():
    api = await FakeKubeAPI().start()
    try:
        seed_cluster(api)
        api.put(
            {
                "kind": "Service",
                "apiVersion": "v1",
                "metadata": {
                    "name": "mesh-cart-6d61657368-shop",
                    "namespace": "mesh",
                    "labels": {"app": "maesh", "type": "shadow"},
                },
                "spec": {"ports": [{"port": 80, "targetPort": 5000}]},
            }
        )
        configmap = api.objects("ConfigMap")[0]
        configmap["data"]["Corefile"] = (
            COREFILE + BLOCK_BEGIN + "\nx\n#### End Traefik Mesh Block\n"
        )
        api.put(configmap)
        settings = ControllerSettings(namespace="mesh", master_url=api.url)
        assert await cleanup(settings) == 0
        assert api.objects("Service", "mesh") == []
        assert api.objects("ConfigMap")[0]["data"]["Corefile"] == COREFILE
        assert await cleanup(settings) == 0  # idempotent
    finally:
        await api.stop()


async def test_aks_coredns_custom_configmap_gets_the_server_blocks():
    api = await FakeKubeAPI().start()
    try:
        api.put(
            {
                "kind": "Deployment",
                "metadata": {"name": "coredns", "namespace": "kube-system"},
                "spec": {
                    "template": {
                        "spec": {
                            "volumes": [
                                {"configMap": {"name": "coredns"}},
                                {"configMap": {"name": "coredns-custom"}},
                            ]
                        }
                    }
                },
            }
        )
        api.put(
            {
                "kind": "ConfigMap",
                "metadata": {"name": "coredns-custom", "namespace": "kube-system"},
                "data": {"other.server": "keep me"},
            }
        )
        settings = ControllerSettings(namespace="mesh", master_url=api.url)
        kube = Kube(await make_api_client(settings))
        try:
            await write_dns(kube, corefile_block(settings, {}))
            data = api.objects("ConfigMap")[0]["data"]
            assert data["other.server"] == "keep me"
            assert data["traefik.mesh.server"].startswith("traefik.mesh:53 {")
            assert data["maesh.server"].startswith("maesh:53 {")
            annotations = api.objects("Deployment")[0]["spec"]["template"]["metadata"]
            assert "traefik-mesh-hash" in annotations["annotations"]  # CoreDNS restarted
        finally:
            await kube.close()
    finally:
        await api.stop()


def test_shadow_services_can_ask_for_the_proxy_on_the_same_node():
    from meshproxy.controller.ports import PortTable
    from meshproxy.controller.topology import Service, ServicePort

    svc = Service("cart", "shop", {}, {}, [ServicePort("web", "TCP", 80, 8080)], "10.0.0.1")
    tables = {"tcp": PortTable(10000, 10024), "udp": PortTable(15000, 15024)}
    local = shadow_service(svc, ControllerSettings(local_traffic_policy=True), tables)
    assert local["spec"]["internalTrafficPolicy"] == "Local"
    assert "internalTrafficPolicy" not in shadow_service(svc, ControllerSettings(), tables)["spec"]


def test_controller_api_serves_etag_and_304(tmp_path):
    """Through a real `meshproxy controller --manifests` process (see test_local_mesh for
    the whole mesh); here only the HTTP contract of the configuration endpoint."""
    import subprocess
    import sys
    import time

    from tests.helpers import free_port

    manifests = tmp_path / "m"
    manifests.mkdir()
    (manifests / "svc.yaml").write_text(json.dumps(service("cart")))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "controller",
            f"--manifests={manifests}",
            "--apiHost=127.0.0.1",
            f"--apiPort={port}",
        ]
    )
    try:
        url = f"http://127.0.0.1:{port}/api/configuration/current"
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status/readiness") as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with urllib.request.urlopen(url) as response:
            etag = response.headers["ETag"]
            body = response.read()
        assert "shop-cart-80" in json.loads(body)["http"]["routers"]
        request = urllib.request.Request(url, headers={"If-None-Match": etag})
        try:
            urllib.request.urlopen(request)
            raise AssertionError("expected 304")
        except urllib.error.HTTPError as exc:
            assert exc.code == 304
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/topology/current") as r:
            topology = json.loads(r.read())
        assert "cart@shop" in topology["services"]

        # a manifest added to the directory is picked up; proxy pods show in /api/status/nodes
        proxy_pod = pod("proxy-abc", "10.0.9.9", ns="maesh")
        proxy_pod["metadata"]["labels"] = {"app": "maesh", "component": "maesh-mesh"}
        proxy_pod["status"]["containerStatuses"] = [{"ready": True}]
        docs = [service("orders"), proxy_pod]
        (manifests / "more.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
        while True:
            with urllib.request.urlopen(url) as response:
                if "shop-orders-80" in json.loads(response.read())["http"]["routers"]:
                    break
            if time.monotonic() > deadline + 15:
                raise AssertionError("the new manifest was not picked up")
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status/nodes") as r:
            assert json.loads(r.read()) == [{"Name": "proxy-abc", "IP": "10.0.9.9", "Ready": True}]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_indirect_allowlist_cannot_be_spoofed_by_a_client_talking_to_a_proxy(
    backends, proxy_factory, tmp_path
):
    """The controller's ACL config, served by a real proxy: a client that sends the allowed
    pod's address in X-Forwarded-For is refused unless its connection comes from a proxy."""
    from meshproxy.controller.config_builder import BuildOptions, build_config
    from meshproxy.controller.ports import PortTable
    from meshproxy.controller.sources.manifests import load_manifests
    from meshproxy.controller.topology import build_topology
    from tests.helpers import free_port, request

    backend = await backends("svc-b-pod")
    data = Path(__file__).resolve().parents[1] / "data" / "controller"
    state, _ = load_manifests(data / "acl-enabled-http-traffic-split-http-route-group")
    settings = ControllerSettings(acl=True)

    def config_for(proxy_ips: list[str]) -> dict[str, Any]:
        tables = {"tcp": PortTable(10000, 10024), "udp": PortTable(15000, 15024)}
        config = build_config(
            build_topology(state, settings), settings, tables, BuildOptions(proxy_ips=proxy_ips)
        )
        lb = config["http"]["services"]["my-ns-svc-b-tt-8080-traffic-target"]["loadBalancer"]
        lb["servers"] = [{"url": backend.url}]  # the pod's address, made reachable
        return config

    port = free_port()
    proxy = await proxy_factory(
        config_for(["10.42.0.7"]),  # the mesh proxies are elsewhere: we are a plain client
        entrypoints={"web": f"127.0.0.1:{free_port()}", "http-5000": f"127.0.0.1:{port}"},
        extra_flags=["--entryPoints.http-5000.forwardedHeaders.insecure=true"],
    )
    spoofed = {"X-Forwarded-For": "10.10.1.1"}
    host = "svc-b.my-ns.traefik.mesh"
    assert (await request(port, host=host, headers=spoofed)).status == 403
    assert backend.requests == []

    generation = proxy.generation()
    proxy.write(config_for(["127.0.0.1"]))  # now our address is a mesh proxy's
    await wait_for(lambda: proxy.generation() > generation, 10, "reload")
    assert (await request(port, host=host, headers=spoofed)).status == 200


async def test_a_malformed_smi_object_from_the_api_does_not_stop_the_controller(unused_tcp_port):
    """Issue 9 item 20 through the Kubernetes source (list, then watch events): an
    HTTPRouteGroup in the SMI specs v1alpha3 list form is read, a malformed one arriving by a
    watch event is recorded on itself (`objectErrors`), the controller is synced, and a
    service added afterwards is still served (rebuilds go on)."""
    api = await FakeKubeAPI().start()
    seed_cluster(api)

    def group(name: str, headers: Any) -> dict[str, Any]:
        return {
            "kind": "HTTPRouteGroup",
            "apiVersion": "specs.smi-spec.io/v1alpha3",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"matches": [{"name": "m", "headers": headers}]},
        }

    api.put(group("list-form", [{"Authorized": "t|True"}]))
    settings = ControllerSettings(namespace="mesh", master_url=api.url, api_port=unused_tcp_port)
    controller = Controller(settings)
    kube = Kube(await make_api_client(settings))
    task = asyncio.ensure_future(KubernetesSource(settings, controller, kube).run())
    try:
        await wait_for(controller.synced.is_set, 10, "the first sync")
        assert json.loads(controller.topology_bytes)["objectErrors"] == {}
        api.put(group("broken", {"Authorized": ["not", "a", "regexp"]}))

        def recorded() -> list[str]:
            errors = json.loads(controller.topology_bytes)["objectErrors"]
            return errors.get("HTTPRouteGroup broken@shop", [])

        await wait_for(recorded, 10, "the malformed group recorded on itself")
        assert "spec.matches[0].headers.Authorized" in recorded()[0]
        api.put(service("orders", port=8081))
        routers = lambda: config_of(controller)["http"]["routers"]  # noqa: E731
        await wait_for(lambda: "shop-orders-8081" in routers(), 10, "rebuilds go on")
        assert "shop-cart-80" in routers()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()
        await api.stop()
