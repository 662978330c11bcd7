"""Dynamic and static configuration decoding: Traefik's key rules, durations, located errors."""

from __future__ import annotations

import pytest

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin
from meshproxy.config.decode import ConfigDecodeError
from meshproxy.config.durations import format_duration, parse_duration
from meshproxy.config.dynamic import decode_dynamic
from meshproxy.config.static import build_static, parse_address
from tests.helpers import FIXTURES


@pytest.mark.parametrize(("text", "seconds"), [("100ms", 0.1), ("1m30s", 90), (5, 5), ("2", 2)])
def test_durations_accept_go_strings_and_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_durations_render_like_go():
    assert format_duration(60) == "1m0s" and format_duration(0.1) == "100ms"


def test_keys_match_case_insensitively_and_scalars_convert():
    config = decode_dynamic(
        '{"HTTP": {"Services": {"s": {"loadbalancer": {"passHostHeader": "false", '
        '"servers": [{"URL": "http://a", "weight": "2"}]}}}}}'
    )
    lb = config.http.services["s"].load_balancer
    assert lb.pass_host_header is False and lb.servers[0].weight == 2


def test_every_decode_error_is_reported_with_its_json_path():
    with pytest.raises(ConfigDecodeError) as info:
        decode_dynamic(
            "http:\n  routers:\n    r: {rule: 5, sevice: s}\n"
            "  services:\n    s: {loadBalancer: {servers: [{url: 'http://a', weight: x}]}}\n"
        )
    paths = [e.path for e in info.value.errors]
    assert "http.routers.r.sevice" in paths
    assert "http.services.s.loadBalancer.servers[0].weight" in paths


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*-config.json")))
def test_traefik_mesh_fixtures_decode(fixture):
    config = decode_dynamic((FIXTURES / fixture).read_bytes())
    assert "readiness" in config.http.routers


def test_static_flags_and_addresses():
    static, warnings = build_static(
        None, ["--entryPoints.udp-15000.address=:15000/udp", "--ping", "--providers.docker=true"]
    )
    assert parse_address(static.entry_points["udp-15000"].address).protocol == "udp"
    assert static.ping is not None
    assert any("providers.docker: not implemented" in w for w in warnings)
    with pytest.raises(ConfigDecodeError, match="unknown: unknown option"):
        build_static(None, ["--unknown.thing=1"])  # as Traefik: a key it does not know
    with pytest.raises(ConfigDecodeError):
        build_static(None, ["--entryPoints.web.address=nonsense"])


def test_smooth_weighted_round_robin_interleaves():
    balancer = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
    assert "".join(balancer.pick() for _ in range(7)) == "aabacaa"
    balancer.set_up("a", False)
    assert {balancer.pick() for _ in range(4)} == {"b", "c"}
