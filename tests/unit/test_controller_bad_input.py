"""Bad cluster input: the object concerned is skipped with its error in the topology, and
everything else is still served."""

from __future__ import annotations

from typing import Any

from meshproxy.controller.config_builder import build_config
from meshproxy.controller.objects import ClusterState
from meshproxy.controller.ports import PortTable, load_tables, save_tables
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.topology import build_topology


def svc(name: str, port: int = 80, protocol: str = "TCP", **annotations: str) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
        "spec": {
            "clusterIP": "10.0.0.1",
            "ports": [{"name": "p", "port": port, "targetPort": port, "protocol": protocol}],
        },
    }


def pod(name: str, ip: str, account: str = "default") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"serviceAccountName": account},
        "status": {"podIP": ip},
    }


def endpoints(name: str, *pods: str) -> dict[str, Any]:
    refs = [{"ip": "x", "targetRef": {"kind": "Pod", "name": p, "namespace": "ns"}} for p in pods]
    return {
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": "ns"},
        "subsets": [{"addresses": refs}],
    }


def split(name: str, root: str, *backends: str) -> dict[str, Any]:
    return {
        "kind": "TrafficSplit",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"service": root, "backends": [{"service": b, "weight": 1} for b in backends]},
    }


def build(objects: list[dict[str, Any]], settings: ControllerSettings | None = None, tables=None):
    state = ClusterState()
    for obj in objects:
        state.put(obj)
    settings = settings or ControllerSettings()
    topology = build_topology(state, settings)
    tables = tables or {
        "tcp": PortTable(settings.min_tcp_port, settings.max_tcp_port),
        "udp": PortTable(settings.min_udp_port, settings.max_udp_port),
    }
    return topology, build_config(topology, settings, tables), tables


def test_invalid_annotations_skip_only_that_service():
    topology, config, _ = build(
        [
            svc("good"),
            svc("bad-type", **{"mesh.traefik.io/traffic-type": "quic"}),
            svc("bad-retry", **{"mesh.traefik.io/retry-attempts": "many"}),
            svc("bad-breaker", **{"maesh.containo.us/circuit-breaker-expression": "Nope() > 1"}),
            svc(
                "bad-rate",
                **{
                    "mesh.traefik.io/ratelimit-average": "0",
                    "mesh.traefik.io/ratelimit-burst": "5",
                },
            ),
        ]
    )
    assert set(config["http"]["routers"]) == {"readiness", "ns-good-80"}
    errors = {k: v.errors for k, v in topology.services.items()}
    assert "traffic-type 'quic'" in errors["bad-type@ns"][0]
    assert "retry-attempts 'many' is not an integer" in errors["bad-retry@ns"][0]
    assert "unknown function 'Nope'" in errors["bad-breaker@ns"][0]
    assert "must be > 0" in errors["bad-rate@ns"][0]
    assert errors["good@ns"] == []


def test_annotation_middlewares_come_in_a_stable_order_with_old_prefix_accepted():
    _, config, _ = build(
        [
            svc(
                "api",
                **{
                    "mesh.traefik.io/retry-attempts": "3",
                    "maesh.containo.us/ratelimit-average": "10",
                    "mesh.traefik.io/ratelimit-burst": "20",
                    "mesh.traefik.io/circuit-breaker-expression": "NetworkErrorRatio() > 0.5",
                },
            )
        ]
    )
    assert config["http"]["routers"]["ns-api-80"]["middlewares"] == [
        "ns-api-circuit-breaker",
        "ns-api-rate-limit",
        "ns-api-retry",
    ]
    assert config["http"]["middlewares"]["ns-api-rate-limit"] == {
        "rateLimit": {"average": 10, "burst": 20}
    }


def test_dangling_split_references_and_cycles_are_recorded_and_skipped():
    topology, config, _ = build(
        [
            svc("a"),
            svc("b"),
            svc("c"),
            split("missing-root", "ghost", "a"),
            split("to-ghost", "a", "b", "ghost"),
            split("loop-1", "b", "c"),
            split("loop-2", "c", "b"),
        ]
    )
    assert any("root service ghost@ns does not exist" in e for e in topology.errors)
    to_ghost = topology.traffic_splits["to-ghost@ns"]
    assert to_ghost.backends == [(1, "b@ns")]
    assert "ghost@ns does not exist" in to_ghost.errors[0]
    looping = [s for s in topology.traffic_splits.values() if any("cycle" in e for e in s.errors)]
    assert looping, "a cycle between splits must be reported"
    assert "ns-a-to-ghost-80-traffic-split-direct" in config["http"]["routers"]


def test_exhausted_tcp_ports_skip_the_port_with_an_error():
    settings = ControllerSettings(limit_tcp_port=1)
    topology, config, _ = build(
        [
            svc("one", **{"mesh.traefik.io/traffic-type": "tcp"}),
            svc("two", **{"mesh.traefik.io/traffic-type": "tcp"}),
        ],
        settings,
    )
    assert list(config["tcp"]["routers"]) == ["ns-one-80"]
    assert "no free port" in topology.services["two@ns"].errors[0]


def test_tcp_ports_stay_stable_across_controller_restarts(tmp_path):
    state_file = str(tmp_path / "ports.json")
    tcp = lambda *names: [svc(n, **{"mesh.traefik.io/traffic-type": "tcp"}) for n in names]  # noqa: E731
    _, first, tables = build(tcp("b", "c"))
    assert first["tcp"]["routers"]["ns-c-80"]["entryPoints"] == ["tcp-10001"]
    save_tables(state_file, tables)
    saved = load_tables(state_file)
    restored = {
        "tcp": PortTable(10000, 10024, saved["tcp"]),
        "udp": PortTable(15000, 15024, saved["udp"]),
    }
    # after a restart, with a new service sorting first, existing ports do not move
    _, second, _ = build(tcp("a", "b", "c"), tables=restored)
    assert second["tcp"]["routers"]["ns-c-80"]["entryPoints"] == ["tcp-10001"]
    assert second["tcp"]["routers"]["ns-a-80"]["entryPoints"] == ["tcp-10002"]


def test_acl_tcp_traffic_targets_enforce_their_sources():
    settings = ControllerSettings(acl=True)
    target = {
        "kind": "TrafficTarget",
        "metadata": {"name": "db-clients", "namespace": "ns"},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "db"},
            "sources": [{"kind": "ServiceAccount", "name": "app", "namespace": "ns"}],
            "rules": [{"kind": "TCPRoute", "name": "db-route"}],
        },
    }
    route = {"kind": "TCPRoute", "metadata": {"name": "db-route", "namespace": "ns"}, "spec": {}}
    _, config, _ = build(
        [
            svc("db", 5432, **{"mesh.traefik.io/traffic-type": "tcp"}),
            pod("db-0", "10.0.1.1", "db"),
            pod("app-0", "10.0.2.1", "app"),
            endpoints("db", "db-0"),
            target,
            route,
        ],
        settings,
    )
    router = config["tcp"]["routers"]["ns-db-db-clients-5432-traffic-target"]
    [allow] = router["middlewares"]
    assert config["tcp"]["middlewares"][allow] == {"ipAllowList": {"sourceRange": ["10.0.2.1"]}}


def test_destination_port_picks_the_entrypoint_of_that_port():
    settings = ControllerSettings(acl=True)
    two_ports = svc("web")
    two_ports["spec"]["ports"] = [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "admin", "port": 81, "targetPort": 9090, "protocol": "TCP"},
    ]
    target = {
        "kind": "TrafficTarget",
        "metadata": {"name": "ops", "namespace": "ns"},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "web", "port": 9090},
            "sources": [{"kind": "ServiceAccount", "name": "ops", "namespace": "ns"}],
        },
    }
    _, config, _ = build(
        [two_ports, pod("web-0", "10.0.1.1", "web"), endpoints("web", "web-0"), target],
        settings,
    )
    router = config["http"]["routers"]["ns-web-ops-81-traffic-target-direct"]
    assert router["entryPoints"] == ["http-5001"]  # Traefik Mesh would say http-5000


def test_watch_and_ignore_namespaces_and_traefik_mesh_ignore_rules():
    settings = ControllerSettings(ignore_namespaces=["ns"])
    _, config, _ = build([svc("a")], settings)
    assert set(config["http"]["routers"]) == {"readiness"}
    external = svc("ext")
    external["spec"]["type"] = "ExternalName"
    labelled = svc("jaeger")
    labelled["metadata"]["labels"] = {"app": "jaeger"}
    _, config, _ = build([external, labelled, svc("kept")])
    assert set(config["http"]["routers"]) == {"readiness", "ns-kept-80"}
