"""The controller against malformed cluster objects (issue 9, item 20) and the conditional
request contract of its configuration endpoint (issue 9, item 19).

Item 20: one HTTPRouteGroup written in the SMI specs v1alpha3 list form used to raise in the
topology builder and freeze the whole controller. Every object is now confined to itself: its
shape is checked, its problem is recorded on it (`objectErrors`) and logged, and every other
object is still served.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.controller.api import none_match, start_api
from meshproxy.controller.app import Controller
from meshproxy.controller.config_builder import build_config
from meshproxy.controller.objects import ClusterState
from meshproxy.controller.ports import PortTable
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.topology import build_topology
from tests.helpers import free_port, request, wait_for

NS = "ns"


def svc(name: str, port: int = 80) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "clusterIP": "10.0.0.1",
            "ports": [{"name": "p", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def pod(name: str, ip: str, account: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"serviceAccountName": account, "containers": [{"ports": [{"containerPort": 80}]}]},
        "status": {"podIP": ip},
    }


def endpoints(name: str, *pods: str) -> dict[str, Any]:
    refs = [{"ip": "x", "targetRef": {"kind": "Pod", "name": p, "namespace": NS}} for p in pods]
    return {
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": NS},
        "subsets": [{"addresses": refs}],
    }


def route_group(name: str, headers: Any, **match: Any) -> dict[str, Any]:
    return {
        "apiVersion": "specs.smi-spec.io/v1alpha3",
        "kind": "HTTPRouteGroup",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"matches": [{"name": "authorized", "headers": headers, **match}]},
    }


def traffic_target(name: str, group: str, destination: str = "api-sa") -> dict[str, Any]:
    return {
        "apiVersion": "access.smi-spec.io/v1alpha2",
        "kind": "TrafficTarget",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": destination, "namespace": NS},
            "sources": [{"kind": "ServiceAccount", "name": "client-sa", "namespace": NS}],
            "rules": [{"kind": "HTTPRouteGroup", "name": group, "matches": ["authorized"]}],
        },
    }


def base() -> list[dict[str, Any]]:
    """A healthy mesh: service `api` (pod api-1, SA api-sa), a client pod, service `other`."""
    return [
        svc("api"),
        endpoints("api", "api-1"),
        pod("api-1", "10.1.0.1", "api-sa"),
        pod("client", "10.1.0.9", "client-sa"),
        svc("other"),
        endpoints("other", "api-1"),
    ]


def build(objects: list[dict[str, Any]], acl: bool = False) -> tuple[Any, dict[str, Any]]:
    state = ClusterState()
    for obj in objects:
        state.put(obj)
    settings = ControllerSettings(acl=acl)
    topology = build_topology(state, settings)
    tables = {
        "tcp": PortTable(settings.min_tcp_port, settings.max_tcp_port),
        "udp": PortTable(settings.min_udp_port, settings.max_udp_port),
    }
    return topology, build_config(topology, settings, tables)


# ---------------------------------------------------------------- item 20: the reported case


def test_route_group_headers_as_a_list_of_maps_is_the_same_as_a_map():
    """SMI specs v1alpha3 writes `headers: [{Authorized: "t|True"}]` (Traefik Mesh's
    integration tests use it); Traefik Mesh's Go type is a map. Both give the same
    `HeadersRegexp` matcher (reference/traefik-mesh.md §2.4: each header -> HeadersRegexp)."""
    configs = []
    for headers in ([{"Authorized": "t|True"}], {"Authorized": "t|True"}):
        objects = [*base(), route_group("rg", headers), traffic_target("tt", "rg")]
        topology, config = build(objects, acl=True)
        assert topology.object_errors == {}
        configs.append(config)
    assert configs[0] == configs[1]
    router = configs[0]["http"]["routers"]["ns-api-tt-80-traffic-target-direct"]
    assert "HeadersRegexp(`Authorized`, `t|True`)" in router["rule"]


def test_a_header_name_repeated_in_the_list_form_keeps_both_regexps():
    """In the list form a name may appear twice; both conditions are ANDed, none is lost."""
    headers = [{"X-A": "one"}, {"X-A": "two"}]
    _, config = build([*base(), route_group("rg", headers), traffic_target("tt", "rg")], acl=True)
    rule = config["http"]["routers"]["ns-api-tt-80-traffic-target-direct"]["rule"]
    assert "HeadersRegexp(`X-A`, `one`)" in rule and "HeadersRegexp(`X-A`, `two`)" in rule


# ---------------------------------------------------------------- item 20: the whole kind

# (what is wrong, the objects to add, the object that must carry the error, text in it)
MALFORMED = [
    ("headers a string", [route_group("rg", "Authorized")], "HTTPRouteGroup rg@ns", "headers"),
    ("headers item a string", [route_group("rg", ["x"])], "HTTPRouteGroup rg@ns", "headers[0]"),
    ("headers item empty", [route_group("rg", [{}])], "HTTPRouteGroup rg@ns", "headers[0]"),
    (
        "header value a map",
        [route_group("rg", [{"A": {"b": 1}}])],
        "HTTPRouteGroup rg@ns",
        "headers[0].A",
    ),
    (
        "backtick injection in a regexp",
        [route_group("rg", {"A": "x`) || Host(`evil"})],
        "HTTPRouteGroup rg@ns",
        "backtick",
    ),
    ("header name not a token", [route_group("rg", {"A B": "x"})], "HTTPRouteGroup rg@ns", "token"),
    ("invalid regexp", [route_group("rg", {"A": "(("})], "HTTPRouteGroup rg@ns", "regular"),
    (
        "methods a string",
        [route_group("rg", {}, methods="GET")],
        "HTTPRouteGroup rg@ns",
        "methods",
    ),
    (
        "matches a map",
        [{**route_group("rg", {}), "spec": {"matches": {"a": 1}}}],
        "HTTPRouteGroup rg@ns",
        "spec.matches",
    ),
    (
        "service ports a map",
        [{**svc("bad"), "spec": {"ports": {"port": 80}}}],
        "Service bad@ns",
        "spec.ports",
    ),
    (
        "service port missing",
        [{**svc("bad"), "spec": {"ports": [{"name": "x"}]}}],
        "Service bad@ns",
        "spec.ports[0].port",
    ),
    (
        "service port out of range",
        [{**svc("bad"), "spec": {"ports": [{"port": 70000}]}}],
        "Service bad@ns",
        "out of range",
    ),
    ("service spec a list", [{**svc("bad"), "spec": [1]}], "Service bad@ns", "spec"),
    (
        "annotations a list",
        [{**svc("bad"), "metadata": {"name": "bad", "namespace": NS, "annotations": ["x"]}}],
        "Service bad@ns",
        "annotations",
    ),
    (
        "pod containers a map",
        [{**pod("p", "10.1.0.3", "x"), "spec": {"containers": {"a": 1}}}],
        "Pod p@ns",
        "containers",
    ),
    (
        "pod containerPort missing",
        [{**pod("p", "10.1.0.3", "x"), "spec": {"containers": [{"ports": [{"name": "h"}]}]}}],
        "Pod p@ns",
        "containerPort",
    ),
    (
        "endpoints subsets a string",
        [svc("bad"), {**endpoints("bad"), "subsets": "x"}],
        "Endpoints bad@ns",
        "subsets",
    ),
    (
        "traffic target sources a map",
        [{**traffic_target("tt", "rg"), "spec": {"sources": {"a": 1}}}],
        "TrafficTarget tt@ns",
        "spec.sources",
    ),
    (
        "traffic target destination a string",
        [{**traffic_target("tt", "rg"), "spec": {"destination": "api-sa"}}],
        "TrafficTarget tt@ns",
        "spec.destination",
    ),
    (
        "traffic target rule a string",
        [{**traffic_target("tt", "rg"), "spec": {"rules": ["HTTPRouteGroup"]}}],
        "TrafficTarget tt@ns",
        "spec.rules[0]",
    ),
    (
        "traffic split backends a map",
        [
            {
                "kind": "TrafficSplit",
                "metadata": {"name": "ts", "namespace": NS},
                "spec": {"service": "api", "backends": {"service": "other"}},
            }
        ],
        "TrafficSplit ts@ns",
        "spec.backends",
    ),
    (
        "traffic split weight not a number",
        [
            {
                "kind": "TrafficSplit",
                "metadata": {"name": "ts", "namespace": NS},
                "spec": {"service": "api", "backends": [{"service": "other", "weight": "half"}]},
            }
        ],
        "TrafficSplit ts@ns",
        "weight",
    ),
    (
        "tcp route port a word",
        [
            {
                "kind": "TCPRoute",
                "metadata": {"name": "tr", "namespace": NS},
                "spec": {"matches": {"ports": ["high"]}},
            }
        ],
        "TCPRoute tr@ns",
        "ports[0]",
    ),
]


@pytest.mark.parametrize("acl", [False, True], ids=["default", "acl"])
@pytest.mark.parametrize(
    ("objects", "culprit", "text"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_a_malformed_object_is_recorded_on_itself_and_everything_else_is_served(
    objects, culprit, text, acl
):
    """Per-object isolation (the controller's promise; reference/traefik-mesh.md §2.1: Traefik
    Mesh records builder errors per object): the bad object's error is in `objectErrors`
    under its own name, and the healthy services keep their routers."""
    topology, config = build([*base(), *copy.deepcopy(objects)], acl=acl)
    errors = topology.to_json()["objectErrors"]
    if culprit.startswith("TrafficTarget") and not acl:
        assert errors == {}  # TrafficTargets are read in ACL mode only (as Traefik Mesh)
    else:
        assert culprit in errors, errors
        assert any(text in message for message in errors[culprit]), errors[culprit]
    routers = config["http"]["routers"]
    assert "ns-api-80" in routers and "ns-other-80" in routers
    if not acl:
        assert routers["ns-api-80"]["service"] == "ns-api-80"


def test_a_traffic_target_with_an_invalid_route_group_is_not_applied():
    """Fail closed, as Traefik Mesh's `evaluateTrafficTarget` (an error building a target's
    specs skips the target): the sources are refused by the block-all router (403) instead of
    being allowed on every path because the path/header restriction was lost."""
    objects = [*base(), route_group("rg", "not-a-map"), traffic_target("tt", "rg")]
    topology, config = build(objects, acl=True)
    routers = config["http"]["routers"]
    assert not any("traffic-target" in name for name in routers)
    assert routers["ns-api-80"]["middlewares"] == ["block-all-middleware"]
    assert "is invalid" in topology.object_errors["TrafficTarget tt@ns"][0]


def test_a_traffic_split_with_an_invalid_match_is_not_applied():
    """A split whose HTTPRouteGroup match is invalid would otherwise split *all* the root
    service's traffic; it is recorded and not applied, the service keeps its own router."""
    ts = {
        "kind": "TrafficSplit",
        "metadata": {"name": "ts", "namespace": NS},
        "spec": {
            "service": "api",
            "matches": [{"kind": "HTTPRouteGroup", "name": "rg"}],
            "backends": [{"service": "other", "weight": 1}],
        },
    }
    topology, config = build([*base(), route_group("rg", 5), ts])
    assert not any("traffic-split" in name for name in config["http"]["routers"])
    assert any("not applied" in e for e in topology.traffic_splits["ts@ns"].errors)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
_FIELDS = [
    ("Service", ["spec"], ["spec", "ports"], ["spec", "ports", 0], ["spec", "ports", 0, "port"]),
    ("Pod", ["spec"], ["spec", "containers"], ["status"], ["status", "podIP"]),
    ("HTTPRouteGroup", ["spec", "matches"], ["spec", "matches", 0, "headers"]),
    ("TrafficTarget", ["spec", "sources"], ["spec", "rules"], ["spec", "destination"]),
    ("TrafficSplit", ["spec", "backends"], ["spec", "matches"], ["spec", "service"]),
]


def _replace(obj: dict[str, Any], path: list[Any], value: Any) -> None:
    node: Any = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    which=st.integers(0, len(_FIELDS) - 1),
    field_index=st.integers(0, 3),
    value=_JSON,
    acl=st.booleans(),
)
def test_any_value_in_any_field_never_stops_the_build(which, field_index, value, acl):
    """Property (arbitrary JSON in any field of any kind, bounded to 300 examples): building
    never raises, and the healthy service `other` is always configured."""
    objects = [
        *base(),
        route_group("rg", {"A": "x"}),
        traffic_target("tt", "rg"),
        {
            "kind": "TrafficSplit",
            "metadata": {"name": "ts", "namespace": NS},
            "spec": {
                "service": "api",
                "matches": [{"kind": "HTTPRouteGroup", "name": "rg"}],
                "backends": [{"service": "api", "weight": 1}],
            },
        },
    ]
    kind, *paths = _FIELDS[which]
    path = paths[field_index % len(paths)]
    target = next(o for o in objects if o["kind"] == kind)
    try:
        _replace(target, path, value)
    except (KeyError, IndexError, TypeError):
        _replace(target, path[:1], value)
    _, config = build(objects, acl=acl)
    assert "ns-other-80" in config["http"]["routers"]


def test_a_controller_process_with_bad_manifests_is_ready_and_logs_each_problem(tmp_path):
    """The issue's scenario through a real `meshproxy controller --manifests` process:
    readiness becomes 200 (not "not synced yet" for good), the healthy service is served,
    `/api/topology/current` carries each object's error, and each is logged once."""
    manifests = tmp_path / "m"
    manifests.mkdir()
    docs = [
        *base(),
        route_group("rg", [{"Authorized": "t|True"}]),
        traffic_target("tt", "rg"),
        route_group("broken", [["not", "a", "map"]]),
        {**svc("bad"), "spec": {"ports": "eighty"}},
    ]
    (manifests / "mesh.yaml").write_text(yaml.safe_dump_all(docs))
    (manifests / "junk.yaml").write_text("- just\n- a list\n")
    port = free_port()
    log_path = tmp_path / "controller.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshproxy",
                "controller",
                f"--manifests={manifests}",
                "--apiHost=127.0.0.1",
                f"--apiPort={port}",
                "--acl",
                "--logLevel=INFO",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base_url = f"http://127.0.0.1:{port}/api"

            def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    with urllib.request.urlopen(f"{base_url}/status/readiness", timeout=2) as r:
                        return r.status == 200
                except OSError:
                    return False

            asyncio.run(wait_for(ready, 20, "controller readiness"))
            with urllib.request.urlopen(f"{base_url}/configuration/current") as r:
                routers = json.loads(r.read())["http"]["routers"]
            assert (
                "HeadersRegexp(`Authorized`, `t|True`)"
                in (routers["ns-api-tt-80-traffic-target-direct"]["rule"])
            )
            assert "ns-other-80" in routers
            with urllib.request.urlopen(f"{base_url}/topology/current") as r:
                object_errors = json.loads(r.read())["objectErrors"]
            assert "headers[0]" in object_errors["HTTPRouteGroup broken@ns"][0]
            assert "spec.ports" in object_errors["Service bad@ns"][0]
        finally:
            proc.terminate()
            proc.wait(10)
    text = log_path.read_text()
    assert text.count("HTTPRouteGroup broken@ns: spec.matches[0].headers[0]") == 1
    assert "junk.yaml: document 0 is not a Kubernetes object" in text
    assert "Traceback" not in text


# ---------------------------------------------------------------- item 19: If-None-Match


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["*"], True),  # RFC 9110 §13.1.2: "*" matches any current representation
        ([" * "], True),
        (['"abc"'], True),
        (['W/"abc"'], True),  # weak comparison: W/ ignored (§8.8.3.2)
        (['"x", "abc"'], True),  # a list: any member
        (['W/"x", W/"abc"'], True),
        (['"x"', '"abc"'], True),  # several field lines are one list (RFC 9110 §5.3)
        (['"x",,  "abc" '], True),  # empty list elements are allowed (RFC 9110 §5.6.1)
        (['junk, "abc"'], True),  # a malformed member does not hide the others
        (['"abcd"'], False),
        (['"ab"'], False),  # no substring match
        (["abc"], False),  # unquoted: not an entity-tag
        (['"x", "y"'], False),
        ([""], False),
        ([], False),
    ],
)
def test_if_none_match_evaluation(values, expected):
    """RFC 9110 §13.1.2 and §8.8.3.2, evaluated against the current ETag `"abc"`."""
    assert none_match(values, '"abc"') is expected


async def test_configuration_endpoint_answers_304_to_star_and_weak_lists():
    """Over a real socket: `If-None-Match: *`, a weak tag and a list containing the current
    tag get 304 with the ETag and no body (GET and HEAD), 412 for other methods (RFC 9110
    §13.1.2); a list without it gets 200 and the configuration."""
    controller = Controller(ControllerSettings())
    port = free_port()
    runner = await start_api(controller, "127.0.0.1", port)
    try:
        etag = controller.etag
        path = "/api/configuration/current"
        for value in ("*", f"W/{etag}", f'"nope", W/{etag}', f'W/"nope",{etag}'):
            response = await request(port, target=path, headers={"If-None-Match": value})
            assert response.status == 304, value
            assert response.headers["etag"] == etag and response.body == b""
        two_lines = [("If-None-Match", '"nope"'), ("If-None-Match", etag)]
        assert (await request(port, target=path, headers=two_lines)).status == 304
        response = await request(port, target=path, headers={"If-None-Match": '"nope", W/"x"'})
        assert response.status == 200 and response.body == controller.config_bytes
        head = await request(port, "HEAD", path, headers={"If-None-Match": "*"})
        assert head.status == 304
        # §13.1.2: a method other than GET/HEAD whose condition is false gets 412
        post = await request(port, "POST", path, headers={"If-None-Match": f"W/{etag}"})
        assert post.status == 412
        post = await request(port, "POST", path, headers={"If-None-Match": '"other"'})
        assert post.status == 200
    finally:
        await runner.cleanup()
