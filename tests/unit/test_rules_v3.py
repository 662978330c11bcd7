"""Rule syntax v3 is strict (issue 9, item 17), Go's regexp and scanner semantics, and the
detection of Traefik Mesh's v2 rules when nothing sets the syntax.

The expected answers are Traefik 3.7's (checked against the real binary: the same rules are in
tests/differential/test_rules_vs_traefik.py, which compares them live).
"""

from __future__ import annotations

import json
import time

import pytest

from meshproxy.rules.http import compile_http_rule, detect_syntax, resolve_syntax
from meshproxy.rules.parser import RuleError, parse_rule
from meshproxy.rules.regex import HAVE_RE2, compile_go_regexp
from meshproxy.rules.tcp import compile_tcp_rule
from tests.helpers import FIXTURES
from tests.unit.test_rules import Req

needs_re2 = pytest.mark.skipif(not HAVE_RE2, reason="google-re2 (a dependency) is not installed")


def rejected(rule: str, syntax: str | None = "v3", default: str | None = None) -> str:
    with pytest.raises(RuleError) as info:
        compile_http_rule(rule, syntax, default)
    return str(info.value)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("Host(`a.test`, `b.test`)", "Host takes 1 argument(s) in rule syntax v3, got 2"),
        ("Method(`GET`, `POST`)", "Method takes 1 argument(s) in rule syntax v3, got 2"),
        ("ClientIP(`10.0.0.1`, `::1`)", "ClientIP takes 1 argument(s)"),
        ("Query(`a`, `b`, `c`)", "Query takes 1 or 2 argument(s) in rule syntax v3, got 3"),
        ("Path(`/a`, `/b`)", "Path takes 1 argument(s)"),
        ("PathPrefix(`/a`, `/b`)", "PathPrefix takes 1 argument(s)"),
        ("HostRegexp(`a`, `b`)", "HostRegexp takes 1 argument(s)"),
        ("HostHeader(`a.test`)", "HostHeader does not exist in rule syntax v3"),
        ("Headers(`X`, `1`)", "Headers does not exist in rule syntax v3"),
        ("HeadersRegexp(`X`, `.+`)", "HeadersRegexp does not exist in rule syntax v3"),
    ],
)
def test_v3_rejects_the_v2_forms(rule, message):
    """Traefik v3 (`ruleSyntax: v3`, or the default) refuses multi-value Host, Method,
    ClientIP, Path, PathPrefix, HostRegexp, a third Query value, and the v2-only matchers
    ("unexpected number of parameters", "unsupported function")."""
    assert message in rejected(rule, "v3")
    # the static default applies when the router says nothing
    assert message in rejected(rule, None, "v3")


def test_syntax_precedence_router_then_static_default_then_detection():
    """Traefik reads the router's `ruleSyntax`, else `core.defaultRuleSyntax`; any value but
    `v2` selects the v3 parser. Unset everywhere, meshproxy detects (docs/rules.md)."""
    assert resolve_syntax("v2", "v3") == "v2"
    assert resolve_syntax("v3", "v2") == "v3"
    assert resolve_syntax(None, "v2") == "v2"
    assert resolve_syntax("v4", None) == "v3"
    assert resolve_syntax("", "v3") == "v3"
    assert resolve_syntax(None, None) is None
    assert compile_http_rule("Host(`a`, `b`)", "v2", "v3").syntax == "v2"
    assert "got 2" in rejected("Host(`a`, `b`)", "v3", "v2")
    assert "got 2" in rejected("Host(`a`, `b`)", "nonsense")


def test_v3_regexp_matchers_read_mux_templates_as_plain_regexps():
    """Under v3, `{name:re}` is not a template: Go's regexp reads `{` literally when it does not
    start a repeat count, so `PathRegexp(`/{id:[0-9]+}`)` matches the text `/{id:42}` only, and
    the template forms of Path/PathPrefix are literal strings."""
    rule = compile_http_rule("PathRegexp(`/{id:[0-9]+}`)", "v3")
    assert rule.matcher(Req(path="/{id:42}"))
    assert not rule.matcher(Req(path="/42"))
    prefix = compile_http_rule("PathPrefix(`/{path:app}`)", "v3")
    assert prefix.matcher(Req(path="/{path:app}/x"))
    assert not prefix.matcher(Req(path="/app"))
    host = compile_http_rule("HostRegexp(`^{sub:[a-z]+}\\.example\\.com$`)", "v3")
    assert not host.matcher(Req(host="api.example.com"))


@needs_re2
def test_host_regexp_sees_the_lower_cased_host_and_is_unanchored():
    """Traefik v3 matches HostRegexp against the lower-cased, port-stripped host (the request
    view gives it so), unanchored, with the pattern as written: an upper-case pattern never
    matches (Traefik docs, "HostRegexp"; pkg/muxer/http/matcher.go)."""
    assert compile_http_rule("HostRegexp(`api`)", "v3").matcher(Req(host="my-api.test"))
    assert not compile_http_rule("HostRegexp(`^API\\.test$`)", "v3").matcher(Req(host="api.test"))
    assert compile_http_rule("HostRegexp(`(?i)^API\\.test$`)", "v3").matcher(Req(host="api.test"))


@needs_re2
@pytest.mark.parametrize(
    "pattern",
    [r"\Z", r"(?=a)", r"(?!a)", r"(?<=a)b", r"(a)\1", r"a++", r"a**", r"(?>a)", r"\C", r"\G",
     r"\u0041", r"(?#c)", r"a{1001}", r"(a{1000}){1000}", r"x{2,1}", r"[a-\d]", r"\8", "(", ")"],
)  # fmt: skip
def test_patterns_go_rejects_are_rejected(pattern):
    """Go's regexp/syntax refuses these (lookarounds, back-references, possessive and atomic
    forms, `\\Z`, `\\C`, `\\G`, `\\u`, comments, repeat counts over 1000), although Python's
    `re` accepts most of them: the router is disabled with "invalid regular expression"."""
    assert "invalid regular expression" in rejected(f"PathRegexp(`{pattern}`)")


@needs_re2
@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        (r"\.json$", "/a.json\n", False),  # Go's `$` is end of text; Python's also before \n
        (r"\.json\z", "/a.json", True),
        (r"^/hex\x{41}$", "/hexA", True),
        (r"^/[[:digit:]]+$", "/123", True),
        (r"^/[[:digit:]]+$", "/12a", False),
        (r"^/\pL+$", "/\u00e9t\u00e9", True),
        (r"^/q\Q.*\E$", "/q.*", True),
        (r"^/q\Q.*\E$", "/qxx", False),
        (r"(?U)^/a+", "/aaa", True),
        (r"(?P<x>a)(?<y>b)", "/ab", True),
        (r"\bword\b", "/a word/", True),
        (r"^/\d+$", "/\u0663", False),  # \d is ASCII in Go, Unicode digits in Python
        (r"^/\w+$", "/\u00e9", False),  # so is \w
        ("(?i)^/stra\u00dfe$", "/STRASSE", False),  # simple case folding only
    ],
)
def test_go_regexp_semantics_not_pythons(pattern, value, expected):
    """Patterns Python's `re` reads differently from Go's RE2 match as in Go."""
    assert bool(compile_go_regexp(pattern)(value)) is expected


@needs_re2
def test_a_pathological_regexp_matches_in_linear_time():
    """ReDoS: `(a+)+$` against 'aaa…b' takes exponential time in a backtracking engine (Python's
    `re` needs ~1 s for 22 characters); RE2, like Go, is linear in the input, so a 1 MB path
    is answered in milliseconds and cannot hold the event loop."""
    rule = compile_http_rule("PathRegexp(`^/(a+)+$`)", "v3")
    path = "/" + "a" * 1_000_000 + "b"
    started = time.perf_counter()
    assert not rule.matcher(Req(path=path))
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("rule", "ok"),
    [
        ("Host(`a`,)", True),  # trailing comma
        ("Host(\n`a`,\n)", True),
        ("Host(\n`a`\n)", False),  # missing ',' before newline
        ("Host(`a`)\n", True),  # one final automatic semicolon is fine
        ("Host(`a`) &&\nPath(`/x`)", True),
        ("Host(`a`)\n&& Path(`/x`)", False),  # newline after `)` ends the expression
        ("Host\n(`a`)", False),
        ("Host(`a`) // comment", True),
        ("Host(`a`) /* c */ && Path(`/x`)", True),
        ("Host(`a`) /* c\n */ && Path(`/x`)", False),  # a comment spanning a newline is one
        ("Host(`a`) /* c", False),
        ("Host(`a`)\f", False),  # only space, tab, CR and LF are whitespace
        ("Host(`a\x00`)", False),  # NUL is illegal anywhere, strings included
        ('Host("\\101")', True),  # octal escape
        ('Host("\\400")', False),  # octal above 255
        ('Host("\\\'")', False),  # \' is a rune-literal escape only
        ('Host("\\ud800")', False),  # surrogate code point
        ("Host(,)", False),
        ("Host(`a`);", False),
    ],
)
def test_rule_text_is_scanned_as_go_scans_it(rule, ok):
    """Traefik parses rules with go/parser.ParseExpr: Go's whitespace, comments, automatic
    semicolons, trailing commas in calls and string escapes decide what is valid."""
    if ok:
        compile_http_rule(rule, "v3")
    else:
        rejected(rule)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10.0.0.0/8", True),
        ("::ffff:10.0.0.1", True),
        ("::1/128", True),
        (" 10.0.0.1", False),
        ("10.0.0.1 ", False),
        ("010.0.0.1", False),
        ("fe80::1%eth0", False),
        ("10.0.0.1/33", False),
    ],
)
def test_client_ip_values_parse_as_go_parses_them(value, ok):
    """ClientIP takes what Go's net.ParseIP / net.ParseCIDR take: no spaces, no IPv6 zone,
    no leading zeros (Traefik: "invalid CIDR address")."""
    rule = f"ClientIP(`{value}`)"
    if ok:
        compile_http_rule(rule, "v3")
    else:
        assert "is not an IP or CIDR" in rejected(rule)


def test_v2_query_values_pair_up_as_gorilla_mux_queries():
    """Traefik v2 splits each Query value at '=' and passes the list to mux's Queries(k, v...):
    an odd count is an error, an empty value only needs the key."""
    rejected("Query(`k`)", "v2")
    rejected("Query(`a`, `b`, `c`)", "v2")
    rule = compile_http_rule("Query(`a=1`, `b=`)", "v2")
    assert rule.matcher(Req(query={"a": ["1"], "b": ["anything"]}))
    assert not rule.matcher(Req(query={"a": ["1"]}))


def test_tcp_rules_follow_the_same_syntax_choice():
    """TCP routers read `ruleSyntax` and `core.defaultRuleSyntax` the same way: several
    HostSNI values are v2 only."""
    compile_tcp_rule("HostSNI(`*`) || ClientIP(`10.0.0.1`, `10.0.0.2`)", "v2")
    compile_tcp_rule("ClientIP(`10.0.0.1`, `10.0.0.2`)", None)  # detected v2
    with pytest.raises(RuleError):
        compile_tcp_rule("ClientIP(`10.0.0.1`, `10.0.0.2`)", None, "v3")


def test_traefik_mesh_rules_are_detected_as_v2_when_nothing_sets_the_syntax():
    """Traefik Mesh serves v2 rules without `ruleSyntax` (`PathPrefix(`/{path:app}`)`,
    `HeadersRegexp`): every router rule of its fixtures compiles, a template is a template,
    and a rule with no v2 form stays v3."""
    rules = []
    for path in sorted(FIXTURES.glob("*-config.json")):
        config = json.loads(path.read_text())
        rules += [r["rule"] for r in config.get("http", {}).get("routers", {}).values()]
    assert rules
    for rule in rules:
        compile_http_rule(rule)
    template = compile_http_rule("PathPrefix(`/{path:app}`)")
    assert template.syntax == "v2" and template.matcher(Req(path="/app/x"))
    assert detect_syntax(parse_rule("Host(`a`) || Host(`b`)", _known())) == "v3"
    assert detect_syntax(parse_rule("Query(`k=v`)", _known())) == "v3"  # as Traefik v3 reads it


def _known() -> dict[str, str]:
    from meshproxy.rules.http import KNOWN_HTTP

    return KNOWN_HTTP


def test_v2_host_values_are_literal_and_v3_has_the_wildcards():
    """Traefik's v2 Host compares literal values (templates belong to HostRegexp; wildcards
    came with v3.7, for v3 only): checked against Traefik 3.7 in the differential test."""
    assert not compile_http_rule("Host(`{sub:[a-z]+}.a.test`)", "v2").matcher(Req(host="x.a.test"))
    assert not compile_http_rule("Host(`*.a.test`)", "v2").matcher(Req(host="x.a.test"))
    assert compile_http_rule("Host(`*.a.test`)", "v3").matcher(Req(host="x.a.test"))
    assert compile_http_rule("HostRegexp(`{sub:[a-z]+}.a.test`)", "v2").matcher(
        Req(host="x.a.test")
    )


def test_the_go_regexp_engine_is_installed():
    """Rule regexps are Go's only with RE2 (`google-re2`, a dependency in pyproject.toml):
    without it meshproxy falls back to Python's `re` (docs/rules.md), which this test makes
    loud rather than letting the regexp tests above be skipped."""
    assert HAVE_RE2, "pip install google-re2: rule regexps need the RE2 engine"
