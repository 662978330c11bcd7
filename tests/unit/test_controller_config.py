"""The controller's config builder against Traefik Mesh's own expected outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshproxy.controller.config_builder import BuildOptions, build_config
from meshproxy.controller.ports import PortTable
from meshproxy.controller.settings import ControllerSettings
from meshproxy.controller.sources.manifests import load_manifests
from meshproxy.controller.topology import build_topology
from tests.helpers import FIXTURES

DATA = Path(__file__).resolve().parent.parent / "data" / "controller"


def fixture_settings(acl: bool) -> ControllerSettings:
    """As Traefik Mesh's provider test: HTTP ports from 10000, TCP from 5000, UDP from 15000."""
    return ControllerSettings(acl=acl, min_http_port=10000, min_tcp_port=5000, min_udp_port=15000)


def build(name: str, acl: bool, options: BuildOptions | None = None) -> dict:
    state, errors = load_manifests(DATA / name)
    assert errors == []
    settings = fixture_settings(acl)
    topology = build_topology(state, settings)
    tables = {
        "tcp": PortTable(settings.min_tcp_port, settings.max_tcp_port),
        "udp": PortTable(settings.min_udp_port, settings.max_udp_port),
    }
    return build_config(topology, settings, tables, options)


def expected(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}-config.json").read_text())


@pytest.mark.parametrize("name", ["annotations-traffic-type", "acl-disabled-http-traffic-split"])
def test_controller_output_equals_traefik_mesh_fixture(name):
    assert build(name, acl=False) == expected(name)


def test_acl_fixture_equals_traefik_mesh_output_in_compatibility_mode():
    name = "acl-enabled-http-traffic-split-http-route-group"
    config = build(name, acl=True, options=BuildOptions(indirect_from_proxies_only=False))
    want = expected(name)
    # The fixture's split allowlist is empty only because its topology file carries no
    # precomputed "incoming" pods (see the fixtures' README); computed from the manifests,
    # the pods allowed on both backends are pod-a's.
    split_allowlist = "my-ns-svc-a-split-whitelist-traffic-split-direct"
    assert want["http"]["middlewares"][split_allowlist] == {"ipWhiteList": {}}
    want["http"]["middlewares"][split_allowlist] = {"ipWhiteList": {"sourceRange": ["10.10.1.1"]}}
    assert config == want


def test_indirect_routers_require_a_mesh_proxy_as_the_peer_by_default():
    name = "acl-enabled-http-traffic-split-http-route-group"
    options = BuildOptions(proxy_ips=["10.42.0.7", "10.42.1.7"])
    config = build(name, acl=True, options=options)
    routers = config["http"]["routers"]
    indirect = routers["my-ns-svc-b-tt-8080-traffic-target-indirect"]
    assert indirect["middlewares"] == [
        "mesh-proxies-only",
        "my-ns-svc-b-tt-whitelist-traffic-target-indirect",
    ]
    assert config["http"]["middlewares"]["mesh-proxies-only"] == {
        "ipWhiteList": {"sourceRange": ["10.42.0.7", "10.42.1.7"]}
    }
