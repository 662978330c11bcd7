"""Rule language: parsing, v2/v3 semantics, errors that point at the problem, priorities."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from meshproxy.rules.http import compile_http_rule, default_priority
from meshproxy.rules.parser import RuleError
from meshproxy.rules.tcp import compile_tcp_rule


@dataclass
class Req:
    host: str = "example.com"
    path: str = "/"
    method: str = "GET"
    client_ip: str = "10.0.0.1"
    headers: dict[str, list[str]] = field(default_factory=dict)
    query: dict[str, list[str]] = field(default_factory=dict)

    def header_values(self, name):
        return self.headers.get(name, ())

    def query_values(self, key):
        return self.query.get(key)


def match(rule: str, **kw) -> bool:
    return compile_http_rule(rule).matcher(Req(**kw))


def test_host_is_case_insensitive_and_supports_one_label_wildcards():
    assert match("Host(`Example.COM`)", host="example.com")
    assert match("Host(`*.example.com`)", host="a.example.com")
    assert not match("Host(`*.example.com`)", host="a.b.example.com")


def test_and_binds_tighter_than_or_and_not_negates():
    rule = "Host(`a`) || Host(`b`) && Path(`/x`)"
    assert match(rule, host="a", path="/y")
    assert not match(rule, host="b", path="/y")
    assert match("!Method(`POST`) && PathPrefix(`/api`)", path="/api/v1")
    assert not match("!Method(`POST`) && PathPrefix(`/api`)", path="/api/v1", method="POST")


def test_v3_matchers_headers_query_regexp_and_client_ip():
    assert match("Header(`X-Env`, `prod`)", headers={"x-env": ["prod"]})
    assert match("HeaderRegexp(`User-Agent`, `^curl/`)", headers={"user-agent": ["curl/8"]})
    assert match("Query(`mobile`)", query={"mobile": [""]})
    assert not match("Query(`mobile`)", query={"mobile": ["true"]})
    assert match("PathRegexp(`^/v[0-9]+/`)", path="/v2/x")
    assert match("ClientIP(`10.0.0.0/8`)")
    assert not match("ClientIP(`192.168.0.0/16`)")
    assert match('Host("example.com")')


def test_traefik_mesh_v2_rules_are_detected_and_use_mux_templates():
    rule = compile_http_rule(
        "(Host(`svc.ns.traefik.mesh`) || Host(`10.0.0.1`)) && (PathPrefix(`/{path:api/x}`) "
        "&& Method(`GET`,`POST`) || HeadersRegexp(`User-Agent`, `Mozilla/.*`))"
    )
    assert rule.syntax == "v2"
    assert rule.hosts == {"svc.ns.traefik.mesh", "10.0.0.1"}
    assert rule.matcher(Req(host="svc.ns.traefik.mesh", path="/api/x/1", method="POST"))
    assert not rule.matcher(Req(host="svc.ns.traefik.mesh", path="/other"))
    assert rule.matcher(Req(host="10.0.0.1", path="/other", headers={"user-agent": ["Mozilla/5"]}))


@pytest.mark.parametrize(
    ("rule", "message", "column"),
    [
        ("Host(example.com)", "unexpected character", 13),
        ("Host(`a`) &&", "expected a matcher", 13),
        ("PathPrefix(`api`)", "must start with '/'", 1),
        ("Nope(`a`)", "unknown matcher 'Nope'", 1),
        ("pAthprefix(`/`)", "unknown matcher", 1),
        ("Host('a')", "single quotes", 6),
        ("Host(`a`", "')' to close Host(", 9),
        ("Header(`x`)", "Header takes 2 argument(s)", 1),
        ("PathRegexp(`(`)", "invalid regular expression", 1),
        ("", "empty rule", 1),
    ],
)
def test_invalid_rules_name_the_problem_and_its_column(rule, message, column):
    with pytest.raises(RuleError) as info:
        compile_http_rule(rule)
    assert message in str(info.value)
    assert f"column {column}" in str(info.value)


def test_default_priority_is_the_rule_length():
    assert default_priority("Host(`example.org`)") == 19


def test_tcp_rules_validate_host_sni():
    assert compile_tcp_rule("HostSNI(`*`)").catch_all
    assert compile_tcp_rule("HostSNI(`db.test`)").needs_sni
    with pytest.raises(RuleError):
        compile_tcp_rule("HostSNI(`bad value!`)")


def test_tcp_sni_matching_as_traefik_3_7():
    """Traefik 3.7 HostSNI (pkg/muxer/tcp): values match `^(\\*\\.)?[[:word:]\\.\\-\\:]+$` (ASCII
    word characters, so an IDN must be given as its A-label); compared case-insensitively
    with a trailing dot stripped; `*.domain` matches one label; `*` matches an empty SNI,
    a host name never does; HostSNIRegexp sees "" when there is no SNI."""
    from meshproxy.tcp.proxy import TCPConnectionView as View

    with pytest.raises(RuleError):
        compile_tcp_rule("HostSNI(`b\u00fccher.test`)")
    exact = compile_tcp_rule("HostSNI(`API.Example.COM.`)").matcher
    assert exact(View("1.2.3.4", "api.example.com")) and not exact(View("1.2.3.4", ""))
    wild = compile_tcp_rule("HostSNI(`*.example.com`)").matcher
    assert wild(View("1.2.3.4", "a.example.com"))
    assert not wild(View("1.2.3.4", "a.b.example.com"))
    assert not wild(View("1.2.3.4", "example.com"))
    assert compile_tcp_rule("HostSNI(`*`)").matcher(View("1.2.3.4", ""))
    assert compile_tcp_rule("HostSNIRegexp(`^$`)").matcher(View("1.2.3.4", ""))
    alpn = compile_tcp_rule("ALPN(`h2`)").matcher
    assert alpn(View("1.2.3.4", "", ["http/1.1", "h2"])) and not alpn(View("1.2.3.4", ""))


@pytest.mark.parametrize(
    ("rule", "inside", "outside"),
    [
        ("Host(`a.test`) && PathPrefix(`/x`)", "/x/1", "/y"),
        ("PathPrefix(`/x`) && Host(`a.test`, `b.test`)", "/x", "/"),
        ("(Host(`a.test`) || Host(`b.test`)) && Method(`GET`) && PathPrefix(`/x`)", "/x", "/y"),
    ],
)
def test_host_indexed_route_checks_only_the_rest_of_its_rule(rule, inside, outside):
    compiled = compile_http_rule(rule)
    assert compiled.within_hosts is not None
    assert compiled.within_hosts(Req(host="a.test", path=inside))
    assert not compiled.within_hosts(Req(host="a.test", path=outside))


def test_host_only_rule_needs_no_test_once_found_by_host_and_host_intersections_stay_exact():
    assert compile_http_rule("Host(`a.test`, `b.test`)").within_hosts is None
    mixed = compile_http_rule("Host(`a.test`, `b.test`) && Host(`b.test`) && Path(`/`)")
    assert mixed.hosts == {"b.test"}
    assert mixed.within_hosts(Req(host="b.test"))
    assert not mixed.within_hosts(Req(host="b.test", path="/x"))
