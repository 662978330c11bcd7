"""The rule language, differentially: the same routers through real Traefik 3.7 and meshproxy.

Two things are compared (issue 9, item 17):

- acceptance: every rule of `RULES` is loaded by both as a router, under `ruleSyntax: v3`,
  `ruleSyntax: v2`, the static `core.defaultRuleSyntax=v3`, and with nothing set; each router's
  status (enabled / disabled) in `/api/rawdata` must agree. With nothing set Traefik reads v3
  and meshproxy detects Traefik Mesh's v2 rules: the rules on which they then differ are exactly
  `DETECTED_V2` (the deliberate divergence docs/rules.md lists), and the test fails if that set
  changes.
- routing: for each scenario of `SCENARIOS`, routers (each tagging what it forwards with an
  `X-Router` request header) and raw requests; the router that wins each request (or the status
  when none does) must agree.

The reference is Traefik's behaviour as observed here (docs: routing/rules-and-priority.md;
sources: pkg/muxer/http/matcher.go, pkg/rules/parser.go, Go's regexp/syntax). The whole module
is skipped when the traefik binary is not installed (tests/differential/conftest.py).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.differential.harness import Differential

Dynamic = dict[str, Any]

# Rules fed to both proxies. Each is one router; the ones Traefik rejects are the point.
RULES: list[str] = [
    # arity: v3 takes one value per Host/Method/ClientIP/Path..., v2 several
    "Host(`a.test`, `b.test`)",
    "Method(`GET`, `POST`)",
    "ClientIP(`127.0.0.1`, `::1`)",
    "Path(`/a`, `/b`)",
    "PathPrefix(`/a`, `/b`)",
    "Query(`a`, `b`, `c`)",
    "Query(`a=1`, `b=2`)",
    "Query(`k`, `v`)",
    "Query(`k=v`)",
    "Query(`k`)",
    "Header(`X-A`)",
    "Header(`X-A`, `1`, `2`)",
    "Header(`X-A`, `1`)",
    "HeaderRegexp(`X-A`, `^1`)",
    "QueryRegexp(`k`, `^v`)",
    "QueryRegexp(`k`)",
    "HostRegexp(`a`, `b`)",
    # v2-only and v3-only matchers
    "HostHeader(`a.test`)",
    "Headers(`X-A`, `1`)",
    "HeadersRegexp(`X-A`, `.+`)",
    "PathRegexp(`^/x`)",
    # gorilla/mux templates: v2 syntax; in v3 a plain regexp (Go reads `{` literally)
    "HostRegexp(`{sub:[a-z]+}.example.com`)",
    "HostRegexp(`{sub}.example.com`)",
    "PathRegexp(`/{id:[0-9]+}`)",
    "PathPrefix(`/{path:app}`)",
    "Path(`/{id}`)",
    "Host(`{sub:[a-z]+}.example.com`)",
    # Go (RE2) regexp syntax: what Go accepts and refuses, unlike Python's re
    "PathRegexp(`\\Z`)",
    "PathRegexp(`\\z`)",
    "PathRegexp(`\\A/`)",
    "PathRegexp(`(?=a)`)",
    "PathRegexp(`(?!a)`)",
    "PathRegexp(`(?<=a)b`)",
    "PathRegexp(`(a)\\1`)",
    "PathRegexp(`(?P<x>a)`)",
    "PathRegexp(`(?<x>a)`)",
    "PathRegexp(`a{1000}`)",
    "PathRegexp(`a{1001}`)",
    "PathRegexp(`(a{1000}){1000}`)",
    "PathRegexp(`[[:alpha:]]`)",
    "PathRegexp(`[[:nope:]]`)",
    "PathRegexp(`\\pL`)",
    "PathRegexp(`\\p{Greek}`)",
    "PathRegexp(`\\p{Nope}`)",
    "PathRegexp(`\\Q.*\\E`)",
    "PathRegexp(`a++`)",
    "PathRegexp(`a**`)",
    "PathRegexp(`(?>a)`)",
    "PathRegexp(`\\C`)",
    "PathRegexp(`\\G`)",
    "PathRegexp(`\\x{41}`)",
    "PathRegexp(`\\u0041`)",
    "PathRegexp(`\\0`)",
    "PathRegexp(`\\8`)",
    "PathRegexp(`(?U)a+`)",
    "PathRegexp(`(?#comment)`)",
    "PathRegexp(`(?i)/A`)",
    "PathRegexp(`(?x) a`)",
    "PathRegexp(`x{2,1}`)",
    "PathRegexp(`[z-a]`)",
    "PathRegexp(`(`)",
    "PathRegexp(`)`)",
    "PathRegexp(`*`)",
    "PathRegexp(`[a-\\d]`)",
    "HostRegexp(`\\Z`)",
    "HeaderRegexp(`X-A`, `(?=x)`)",
    "QueryRegexp(`k`, `\\1`)",
    # values each matcher validates
    "Host(`ex\u00e4mple.test`)",
    "HostRegexp(`\u00e4`)",
    "Host(`*`)",
    "Host(`*.example.com`)",
    "Host(`a.*.example.com`)",
    "Host(`a.test:8080`)",
    "Path(`a`)",
    "PathPrefix(`a`)",
    "Path(`/ok`)",
    "ClientIP(`10.0.0.0/8`)",
    "ClientIP(`10.0.0.1/33`)",
    "ClientIP(`::1/128`)",
    "ClientIP(`not-an-ip`)",
    "ClientIP(` 10.0.0.1`)",
    "Method(`get`)",
    "Method(`G E T`)",
    # grammar: names, quotes, operators, empty values
    "pathprefix(`/`)",
    "PATHPREFIX(`/`)",
    "Pathprefix(`/`)",
    "pathPrefix(`/`)",
    'Host("a.test")',
    'Host("a\\x2etest")',
    'Host("a\\qtest")',
    "Host('a.test')",
    "Host(a.test)",
    "Host(``)",
    "Host()",
    "Host(`a`) && ",
    "Host(`a`) & Path(`/`)",
    "Host(`a`) and Path(`/`)",
    "!Host(`a`)",
    "!!Host(`a`)",
    "!(Host(`a`) || Path(`/x`))",
    "((Host(`a`)))",
    "(Host(`a`)",
    "Host(`a`) || Path(`/x`) && Method(`GET`)",
    "Host(`a`) == Host(`b`)",
    "Host(`a`)\n&& Path(`/x`)",
    "Host(`a`) // comment",
    "Host(`a`) /* c */ && Path(`/x`)",
    "Host(`a`)(`b`)",
    # Go's scanner: newlines end an operand (automatic semicolon), comments, trailing commas,
    # illegal characters, string escapes
    "Host(`a`,)",
    "Host(\n`a`,\n)",
    "Host(\n`a`\n)",
    "Host(`a`)\n",
    "\nHost(`a`)",
    "Host(`a`) &&\nPath(`/x`)",
    "Host(`a`) /* x\n */ && Path(`/x`)",
    "Host(`a`) /* x",
    "Host(`a`)/*\n*/",
    "Host\n(`a`)",
    "(\nHost(`a`)\n)",
    "(\nHost(`a`))",
    "Host(`a`)\r&& Path(`/x`)",
    "Host(`a`)\f",
    "Host(`a`)\u00a0",
    "Host(`a\x00`)",
    "Host(,)",
    "Host(`a`) && !",
    "Host(`a`) ||| Path(`/`)",
    "Host(`a`) & & Path(`/`)",
    "Host(`a`);",
    'Host("\\101")',
    'Host("\\xff")',
    'Host("a\\u00e9")',
    'Host("\\\'")',
    'Host("\\400")',
    'Host("\\ud800")',
    "ClientIP(`10.0.0.1 `)",
    "ClientIP(`010.0.0.1`)",
    "ClientIP(`::ffff:10.0.0.1`)",
    "ClientIP(`fe80::1%eth0`)",
    "Method(`\u00e9`)",
    "Header(`X A`, `b`)",
    "Host(` `)",
    "Host(`a`)[0]",
    "1",
    "Host",
    "",
]

# Rules whose router status differs when nothing sets the syntax: Traefik reads them as v3 and
# disables them; meshproxy recognises Traefik Mesh's v2 forms and serves them (docs/rules.md,
# "Syntax detection"). Every other rule must agree in that mode too.
DETECTED_V2: set[str] = {
    "Host(`a.test`, `b.test`)",
    "Method(`GET`, `POST`)",
    "ClientIP(`127.0.0.1`, `::1`)",
    "Path(`/a`, `/b`)",
    "PathPrefix(`/a`, `/b`)",
    "HostRegexp(`a`, `b`)",
    "HostHeader(`a.test`)",
    "Headers(`X-A`, `1`)",
    "HeadersRegexp(`X-A`, `.+`)",
}


def _api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def router_states(pair: Differential) -> tuple[dict[str, str], dict[str, str]]:
    """Each router's (short name) status, as Traefik and as meshproxy report it."""
    assert pair.traefik is not None and pair.meshproxy is not None
    traefik = _api(f"http://127.0.0.1:{pair.traefik.api_port}/api/rawdata")["routers"]
    mesh = pair.meshproxy.proxy.rawdata()["routers"]

    def short(section: dict[str, Any]) -> dict[str, str]:
        return {name.split("@")[0]: entry["status"] for name, entry in section.items()}

    return short(traefik), short(mesh)


def acceptance_config(syntax: str | None) -> Callable[[str], Dynamic]:
    def make(backend_url: str) -> Dynamic:
        routers: dict[str, Any] = {}
        for index, rule in enumerate(RULES):
            routers[f"rule{index}"] = {"rule": rule, "service": "s", "entryPoints": ["web"]}
            if syntax is not None:
                routers[f"rule{index}"]["ruleSyntax"] = syntax
        return {
            "http": {
                "routers": routers,
                "services": {"s": {"loadBalancer": {"servers": [{"url": backend_url}]}}},
            }
        }

    return make


def disagreements(pair: Differential) -> dict[str, tuple[str, str]]:
    traefik, mesh = router_states(pair)
    out = {}
    for index, rule in enumerate(RULES):
        name = f"rule{index}"
        t, m = traefik.get(name, "missing"), mesh.get(name, "missing")
        if t != m:
            out[rule] = (t, m)
    return out


@pytest.mark.parametrize(
    ("mode", "syntax", "flags"),
    [
        ("router-v3", "v3", ()),
        ("router-v2", "v2", ()),
        ("default-v3", None, ("--core.defaultRuleSyntax=v3",)),
        ("default-v2", None, ("--core.defaultRuleSyntax=v2",)),
        ("router-v3-over-default-v2", "v3", ("--core.defaultRuleSyntax=v2",)),
    ],
)
def test_rule_acceptance_matches_traefik(differential, mode, syntax, flags):
    """Traefik 3.7 disables a router whose rule its parser for that syntax rejects (v3: one
    value per matcher, Go regexp syntax, v3-only matchers; v2: the v2 matchers): meshproxy
    enables and disables exactly the same routers, whether the syntax comes from the router's
    `ruleSyntax` or the static `core.defaultRuleSyntax` (the router's wins)."""
    pair = differential(f"rules-accept-{mode}", acceptance_config(syntax), flags)
    assert disagreements(pair) == {}


def test_unset_syntax_differs_only_on_detected_traefik_mesh_v2_rules(differential):
    """With neither `ruleSyntax` nor `core.defaultRuleSyntax`, Traefik 3.7 reads every rule as
    v3. meshproxy reads a rule as v2 only when it has a v2-only form (several values, a v2-only
    matcher): those routers are served by meshproxy and disabled by Traefik, and no other
    router differs (the deliberate divergence of docs/rules.md)."""
    pair = differential("rules-accept-unset", acceptance_config(None))
    diff = disagreements(pair)
    assert diff == {rule: ("disabled", "enabled") for rule in DETECTED_V2}


# ---------------------------------------------------------------------- routing


def request(
    target: str = "/",
    host: str | None = "example.test",
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A raw HTTP/1.1 request; `host=None` sends no Host field."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1")


# name -> (routers: {router: rule or (rule, extra router options)}, requests, static flags)
Routers = dict[str, Any]
SCENARIOS: dict[str, tuple[Routers, list[bytes], tuple[str, ...]]] = {
    # Host: case-insensitive, port stripped, trailing dot tolerated on either side, one-label
    # wildcard (v3.7), absolute-form target wins over the Host field; HostRegexp sees the
    # lower-cased, port-stripped host and is unanchored.
    "host": (
        {
            "exact": "Host(`example.com`)",
            "upper": "Host(`UPPER.test`)",
            "dotted": "Host(`dotted.test.`)",
            "wild": "Host(`*.wild.test`)",
            "re-api": "HostRegexp(`^api\\.`)",
            "re-upper": "HostRegexp(`^UP\\.re\\.test$`)",
            "re-nl": "HostRegexp(`^nl\\.test$`)",
            "re-unanchored": "HostRegexp(`mid`)",
            "v2tpl": ("HostRegexp(`{sub:[a-z]+}.tpl.test`)", {"ruleSyntax": "v2"}),
            "v2upper": ("HostRegexp(`{sub:[A-Z]+}.v2up.test`)", {"ruleSyntax": "v2"}),
            "v2host": ("Host(`{sub:[a-z]+}.h2.test`)", {"ruleSyntax": "v2"}),
            "v2path": ("PathPrefix(`/{v:v[0-9]+}/tpl`)", {"ruleSyntax": "v2"}),
            "v2wild": ("Host(`*.w2.test`)", {"ruleSyntax": "v2"}),
            "v3tpl": "HostRegexp(`^{sub:[a-z]+}\\.v3tpl\\.test$`)",
            "v6": "Host(`::1`)",
        },
        [
            request(host="example.com"),
            request(host="EXAMPLE.COM"),
            request(host="example.com."),
            request(host="example.com:8080"),
            request(host="upper.test"),
            request(host="dotted.test"),
            request(host="dotted.test."),
            request(host="a.wild.test"),
            request(host="a.b.wild.test"),
            request(host="wild.test"),
            request(host="api.example.org"),
            request(host="API.example.org:81"),
            request(host="UP.re.test"),
            request(host="up.re.test"),
            request(host="nl.test"),
            request(host="amidb.test"),
            request(host="x.tpl.test"),
            request(host="X.TPL.test"),
            request(host="x.v3tpl.test"),
            request(host="abc.v2up.test"),
            request(host="ABC.v2up.test"),
            request(host="abc.h2.test"),
            request(host="{sub:[a-z]+}.h2.test"),
            request(host="a.w2.test"),
            request("/v2/tpl/x"),
            request("/vx/tpl"),
            request(host="[::1]:80"),
            request(host="[::1]"),
            request("http://example.com/", host="other.test"),
            request(host=None),
        ],
        (),
    ),
    # Path is exact, PathPrefix a plain string prefix, PathRegexp unanchored Go regexp on the
    # routing path (reserved %XX stay encoded, others are decoded; v3.4.1+).
    "path": (
        {
            "p-exact": "Path(`/exact`)",
            "p-prefix": "PathPrefix(`/products`)",
            "p-slash": "PathPrefix(`/dir/`)",
            "p-space": "Path(`/foo bar`)",
            "p-ab": "Path(`/a/b`)",
            "re-ver": "PathRegexp(`^/v[0-9]+/`)",
            "re-json": "PathRegexp(`\\.json$`)",
            "re-mid": "PathRegexp(`mid`)",
            "re-case": "PathRegexp(`(?i)^/CaSe`)",
            "re-class": "PathRegexp(`^/cls/[[:digit:]]+$`)",
            "re-x": "PathRegexp(`^/hex\\x{41}$`)",
            "re-quote": "PathRegexp(`^/q\\Q.*\\E$`)",
        },
        [
            request("/exact"),
            request("/exact/"),
            request("/EXACT"),
            request("/exact?x=1"),
            request("/products"),
            request("/products-for-sale"),
            request("/dir"),
            request("/dir/x"),
            request("/foo%20bar"),
            request("/a%2Fb"),
            request("/a/b"),
            request("/v2/x"),
            request("/x/v2/"),
            request("/file.json"),
            request("/file.json%0A"),
            request("/file.jsonx"),
            request("/amidz"),
            request("/case"),
            request("/cls/123"),
            request("/cls/12a"),
            request("/hexA"),
            request("/q.*"),
            request("/qxx"),
            request("/nothing"),
        ],
        (),
    ),
    # Header names canonical (case-insensitive), values exact; Query keys case-sensitive, any
    # value of a repeated key, one-argument form = empty value; Method upper-cased from the rule
    # and compared exactly; ClientIP on the TCP peer only.
    "request": (
        {
            "hdr": "Header(`x-env`, `prod`)",
            "hdr-re": "HeaderRegexp(`User-Agent`, `^curl/`)",
            "q-flag": "Query(`mobile`)",
            "q-kv": "Query(`k`, `v`)",
            "q-re": "QueryRegexp(`id`, `^[0-9]+$`)",
            "m-post": "Method(`post`) && PathPrefix(`/m`)",
            "ip4": "ClientIP(`127.0.0.0/8`) && PathPrefix(`/ip4`)",
            "ip6": "ClientIP(`::1`) && PathPrefix(`/ip6`)",
            "ip-xff": "ClientIP(`10.9.9.9`) && PathPrefix(`/xff`)",
            "neg": "!Method(`GET`) && PathPrefix(`/neg`)",
        },
        [
            request(headers=(("X-ENV", "prod"),)),
            request(headers=(("x-env", "Prod"),)),
            request(headers=(("X-Env", "dev"), ("X-Env", "prod"))),
            request(headers=(("User-Agent", "curl/8.0"),)),
            request(headers=(("User-Agent", "Mozilla curl/8.0"),)),
            request("/?mobile"),
            request("/?mobile="),
            request("/?mobile=true"),
            request("/?Mobile"),
            request("/?k=x&k=v"),
            request("/?k=v%20"),
            request("/?k=%76"),
            request("/?id=42"),
            request("/?id=4a"),
            request("/?id=a&id=7"),
            request("/m", method="POST"),
            request("/m", method="GET"),
            request("/ip4"),
            request("/ip6"),
            request("/xff", headers=(("X-Forwarded-For", "10.9.9.9"),)),
            request("/neg", method="GET"),
            request("/neg", method="DELETE"),
        ],
        (),
    ),
    # How the request is read before matching: query decoding as Go's url.ParseQuery (`+`,
    # %XX in keys and values, a pair with `;` or a bad escape skipped), a header's values not
    # split at commas, the path cleaned (`..`, `//`) before routing. (A lower-case request
    # method is not here: meshproxy's HTTP parser answers 400 where Go's answers 404.)
    "details": (
        {
            "q-space": "Query(`k`, `a b`)",
            "q-key": "Query(`key`, `1`) && PathPrefix(`/qk`)",
            "q-semi": "Query(`s`, `1`) && PathPrefix(`/qs`)",
            "q-bad": "Query(`g`, `1`) && PathPrefix(`/qb`)",
            "h-comma": "Header(`X-List`, `b`)",
            "m-lower": "Method(`get`) && PathPrefix(`/ml`)",
            "clean": "Path(`/clean/x`)",
        },
        [
            request("/?k=a+b"),
            request("/?k=a%20b"),
            request("/qk?%6Bey=1"),
            request("/qs?s=1;t=2"),
            request("/qs?t=2;s=1&s=1"),
            request("/qb?g=1&h=%zz"),
            request("/qb?g=%zz&g=1"),
            request(headers=(("X-List", "a, b"),)),
            request(headers=(("X-List", "a"), ("X-List", "b"))),
            request("/ml", method="GET"),
            request("/clean/../clean/x"),
            request("//clean/x"),
            request("/clean/./x"),
        ],
        (),
    ),
    # Default priority = rule length in bytes (so the longer, more specific rule wins), explicit
    # priority overrides it, negative priorities are allowed, `&&` binds tighter than `||`.
    "priority": (
        {
            "short": "PathPrefix(`/p`)",  # priority 16
            "long": "PathPrefix(`/p/other`)",  # 23
            "explicit": ("PathPrefix(`/p/o`)", {"priority": 20}),
            "negative": ("PathPrefix(`/neg`)", {"priority": -5}),
            "prec": "Host(`a.test`) || Host(`b.test`) && PathPrefix(`/prec`)",
            "utf8": "Path(`/\u00e9\u00e9`) || Path(`/ascii-of-the-same-length`)",
            "plain": ("PathPrefix(`/`) && !PathPrefix(`/neg`)", {"priority": 1}),
        },
        [
            request("/p"),
            request("/p/other/y"),
            request("/p/oz"),
            request("/neg"),
            request("/prec", host="b.test"),
            request("/other", host="b.test"),
            request("/other", host="a.test"),
            request("/%C3%A9%C3%A9"),
            request("/ascii-of-the-same-length"),
        ],
        (),
    ),
}


# Routers that Traefik never picks for any request of their scenario (and why).
NEVER_WIN: dict[str, set[str]] = {
    # the host is lower-cased before matching, so an upper-case pattern cannot match; `{`
    # is a literal brace in a v3 regexp; a v2 Host takes no template (literal text, and `{`
    # cannot be in a request's host), nor a wildcard (v3.7 added those to v3 only)
    "host": {"re-upper", "v3tpl", "v2host", "v2wild"},
    # requests come from 127.0.0.1, and X-Forwarded-For never counts for ClientIP
    "request": {"ip6", "ip-xff"},
}


def routing_config(routers: Routers) -> Callable[[str], Dynamic]:
    def make(backend_url: str) -> Dynamic:
        http: Dynamic = {"routers": {}, "middlewares": {}, "services": {}}
        http["services"]["s"] = {"loadBalancer": {"servers": [{"url": backend_url}]}}
        for name, spec in routers.items():
            rule, extra = spec if isinstance(spec, tuple) else (spec, {})
            http["middlewares"][f"tag-{name}"] = {
                "headers": {"customRequestHeaders": {"X-Router": name}}
            }
            http["routers"][name] = {
                "rule": rule,
                "service": "s",
                "entryPoints": ["web"],
                "middlewares": [f"tag-{name}"],
                **extra,
            }
        return {"http": http}

    return make


def winner(outcome: Any) -> str:
    """The router that served a request (its X-Router tag), else the status the client got."""
    if outcome.request is not None:
        return outcome.request.header("x-router") or "untagged"
    return f"status {outcome.status_text()}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_same_router_wins_as_in_traefik(differential, scenario):
    """For each request of the scenario, the router Traefik 3.7 picks (matcher semantics of
    pkg/muxer/http/matcher.go, priority = rule length, first match of the sorted routes)
    is the one meshproxy picks, and a request no router matches gets the same status (404).
    Every router of the scenario must be enabled by both."""
    routers, requests, flags = SCENARIOS[scenario]
    pair = differential(f"rules-route-{scenario}", routing_config(routers), flags)
    traefik_states, mesh_states = router_states(pair)
    for name in routers:
        assert (traefik_states.get(name), mesh_states.get(name)) == ("enabled", "enabled"), name
    diverging, traefik_winners = [], set()
    for raw in requests:
        comparison = pair.compare(raw)
        t, m = winner(comparison.traefik), winner(comparison.meshproxy)
        traefik_winners.add(t)
        if t != m:
            diverging.append(f"{raw.split(b'Connection')[0]!r}: traefik={t} meshproxy={m}")
    assert diverging == []
    # the requests exercise the routers: all but the ones meant never to match win somewhere
    assert set(routers) - traefik_winners == NEVER_WIN.get(scenario, set())
