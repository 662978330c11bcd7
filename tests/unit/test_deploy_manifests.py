"""deploy/daemonset.yaml and the Dockerfile: parse, refer to each other consistently, and carry
arguments that `meshproxy proxy` / `meshproxy controller` accept."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from meshproxy.config.static import build_static
from meshproxy.controller.flags import parse_controller_flags

REPO = Path(__file__).resolve().parents[2]
DOCS = list(yaml.safe_load_all((REPO / "deploy" / "daemonset.yaml").read_text()))


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in DOCS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container(workload: dict) -> dict:
    [only] = workload["spec"]["template"]["spec"]["containers"]
    return only


def flag(args: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_every_namespaced_object_lives_in_the_mesh_namespace():
    namespace = one("Namespace")["metadata"]["name"]
    for doc in DOCS:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


def test_service_accounts_roles_and_selectors_refer_to_existing_objects():
    controller = one("Deployment", "meshproxy-controller")
    proxy = one("DaemonSet", "meshproxy-proxy")
    accounts = {d["metadata"]["name"] for d in DOCS if d["kind"] == "ServiceAccount"}
    for workload in (controller, proxy):
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] in accounts
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one("ClusterRole")["metadata"]["name"]
    assert (
        binding["subjects"][0]["name"]
        == controller["spec"]["template"]["spec"]["serviceAccountName"]
    )
    service = one("Service", "meshproxy-controller")
    assert (
        service["spec"]["selector"].items()
        <= controller["spec"]["template"]["metadata"]["labels"].items()
    )
    # shadow services select the proxies by component=maesh-mesh
    assert proxy["spec"]["template"]["metadata"]["labels"]["component"] == "maesh-mesh"


def test_controller_args_are_accepted_and_match_its_service():
    namespace = one("Namespace")["metadata"]["name"]
    args = container(one("Deployment", "meshproxy-controller"))["args"]
    assert args[0] == "controller"
    settings, _ = parse_controller_flags(args[1:])
    assert settings.namespace == namespace
    service_port = one("Service", "meshproxy-controller")["spec"]["ports"][0]["port"]
    assert settings.api_port == service_port == 9000


def test_proxy_args_are_accepted_by_meshproxy_proxy_and_match_probes_and_ports():
    namespace = one("Namespace")["metadata"]["name"]
    proxy = container(one("DaemonSet", "meshproxy-proxy"))
    args = proxy["args"]
    assert args[0] == "proxy"
    static, warnings = build_static(None, args[1:])
    assert warnings == []
    assert len([e for e in static.entry_points if e.startswith("http-")]) == 10
    assert len([e for e in static.entry_points if e.startswith("udp-")]) == 25
    endpoint = urlsplit(flag(args, "providers.http.endpoint"))
    assert endpoint.hostname == f"meshproxy-controller.{namespace}.svc.cluster.local"
    assert endpoint.port == 9000 and endpoint.path == "/api/configuration/current"
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert flag(args, "entryPoints.readiness.address") == f":{ports['readiness']}"
    assert flag(args, "entryPoints.liveness.address") == f":{ports['liveness']}"
    assert flag(args, "entryPoints.traefik.address") == f":{ports['api']}"
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "readiness"}
    assert proxy["livenessProbe"]["tcpSocket"]["port"] == "liveness"
    annotations = one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["api"])
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]


def test_dockerfile_runs_as_non_root_with_one_entrypoint_for_both_roles():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "USER 999" in dockerfile
    assert 'ENTRYPOINT ["meshproxy"]' in dockerfile
    image = container(one("DaemonSet"))["image"]
    assert container(one("Deployment"))["image"] == image
