"""Property tests of the rule language: arbitrary rule text never crashes the parser with
anything but RuleError, never hangs, and well-formed rules mean what Traefik says they mean.

Traefik's reference: routing/rules-and-priority.md (operators, precedence, default priority),
pkg/rules/parser.go (go/parser.ParseExpr), Go's regexp/syntax (RE2, linear-time matching).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshproxy.rules.http import compile_http_rule, default_priority
from meshproxy.rules.parser import RuleError
from meshproxy.rules.regex import GoRegexpError, compile_go_regexp
from meshproxy.rules.tcp import compile_tcp_rule

# ------------------------------------------------------------------ request views


@dataclass
class View:
    """What a compiled HTTP matcher reads of a request (meshproxy.rules.http docstring)."""

    method: str = "GET"
    host: str = "example.test"
    path: str = "/"
    client_ip: str = "127.0.0.1"
    headers: dict[str, list[str]] = field(default_factory=dict)
    query: dict[str, list[str]] = field(default_factory=dict)

    def header_values(self, name: str) -> list[str]:
        return self.headers.get(name, [])

    def query_values(self, key: str) -> list[str] | None:
        return self.query.get(key)


@dataclass
class Conn:
    """What a compiled TCP matcher reads of a connection."""

    sni: str = ""
    client_ip: str = "127.0.0.1"
    alpn: list[str] = field(default_factory=list)


WORDS = ["", "a", "x-env", "prod", "api", "v1", "mobile", "é", "\udcff", "\n", "GET", "%2F"]
word = st.one_of(st.sampled_from(WORDS), st.text(max_size=12))
hosts = st.one_of(
    st.sampled_from(["example.test", "a.example.test", "", "[::1]", "API.test", "a.test."]),
    st.text(max_size=30),
)
paths = st.one_of(
    st.builds(lambda parts: "/" + "/".join(parts), st.lists(word, max_size=5)),
    st.text(max_size=40),
)
ips = st.one_of(
    st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "::ffff:10.0.0.1", "", "garbage"]),
    st.ip_addresses().map(str),
)
views = st.builds(
    View,
    method=st.sampled_from(["GET", "POST", "get", "DELETE", ""]),
    host=hosts,
    path=paths,
    client_ip=ips,
    headers=st.dictionaries(word.map(str.lower), st.lists(word, max_size=3), max_size=3),
    query=st.dictionaries(word, st.lists(word, max_size=3), max_size=3),
)
conns = st.builds(Conn, sni=hosts, client_ip=ips, alpn=st.lists(word, max_size=3))

# ------------------------------------------------------------------ arbitrary rule text

TOKENS = [
    "Host", "HostRegexp", "Path", "PathPrefix", "PathRegexp", "Method", "Header",
    "HeaderRegexp", "Query", "QueryRegexp", "ClientIP", "HostHeader", "Headers",
    "HeadersRegexp", "HostSNI", "HostSNIRegexp", "ALPN", "host", "PATH", "Nope",
    "(", ")", ",", "&&", "||", "!", "&", "|", " ", "\n", "\t", "\r", "/*", "*/", "//",
    "`", '"', "'", "\\", "`a.test`", "`/x`", "`*`", "`*.a.test`", "`GET`", "`10.0.0.0/8`",
    "`::1`", "`(a+)+$`", "`{id:[0-9]+}`", "`/{path:app}`", "`k=v`", "`\\Z`", "`(?=a)`",
    '"\\x41"', '"\\u00e9"', '"\\101"', '"\\q"', "``", "`\x00`", "\x00", "\u00a0", "1",
]  # fmt: skip
rule_text = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
    st.text(max_size=200),
)


@given(rule_text, st.sampled_from([None, "v2", "v3", "v9"]), views)
def test_arbitrary_rule_text_compiles_or_raises_rule_error(text, syntax, view):
    """Any text is either a rule (whose matcher answers a bool for any request) or a
    RuleError naming its column; no other exception, whatever the syntax setting."""
    try:
        rule = compile_http_rule(text, syntax)
    except RuleError as exc:
        assert 0 <= exc.pos <= len(text)
        return
    assert isinstance(rule.matcher(view), bool)
    if rule.hosts is not None and view.host in rule.hosts and rule.within_hosts is not None:
        assert isinstance(rule.within_hosts(view), bool)
    assert default_priority(text) == len(text.encode("utf-8", "surrogatepass"))


@given(rule_text, st.sampled_from([None, "v2", "v3"]), conns)
def test_arbitrary_tcp_rule_text_compiles_or_raises_rule_error(text, syntax, conn):
    """The same for TCP rules (HostSNI, HostSNIRegexp, ClientIP, ALPN)."""
    try:
        rule = compile_tcp_rule(text, syntax)
    except RuleError:
        return
    assert isinstance(rule.matcher(conn), bool)


@settings(max_examples=max(10, settings().max_examples // 10))  # each example is a big rule
@given(st.integers(1, 2000), st.sampled_from(["&&", "||"]), st.sampled_from(["(", "!"]))
def test_long_and_deep_rules_are_bounded(terms, operator, opener):
    """A chain of thousands of terms compiles (a balanced tree: no recursion limit), and
    nesting beyond the parser's bound is a RuleError, not a RecursionError."""
    chain = f" {operator} ".join(["PathPrefix(`/a`)"] * terms)
    rule = compile_http_rule(chain, "v3")
    assert rule.matcher(View(path="/a/b"))
    nested = opener * terms + "Path(`/a`)" + (")" * terms if opener == "(" else "")
    try:
        compile_http_rule(nested, "v3")
    except RuleError as exc:
        assert "nested deeper" in str(exc)


# ------------------------------------------------------------------ semantics of valid rules

atoms = st.sampled_from(
    [
        ("Host(`example.test`)", lambda v: v.host.rstrip(".") == "example.test"),
        ("Host(`*.test`)", lambda v: v.host.rstrip(".").count(".") == 1),
        ("PathPrefix(`/a`)", lambda v: v.path.startswith("/a")),
        ("Path(`/`)", lambda v: v.path == "/"),
        ("Method(`get`)", lambda v: v.method == "GET"),
        ("Header(`X-Env`, `prod`)", lambda v: "prod" in v.headers.get("x-env", [])),
        ("Query(`mobile`)", lambda v: "" in (v.query.get("mobile") or [])),
        ("ClientIP(`127.0.0.0/8`)", lambda v: v.client_ip.startswith("127.")),
        ("PathRegexp(`^/v[0-9]`)", lambda v: v.path[:2] == "/v" and v.path[2:3].isdigit()),
    ]
)


def _combine(children):
    def node(draw_kind):
        kind, left, right = draw_kind
        ltext, lfn = left
        rtext, rfn = right
        if kind == "and":
            return f"({ltext}) && ({rtext})", lambda v: lfn(v) and rfn(v)
        if kind == "or":
            return f"({ltext}) || ({rtext})", lambda v: lfn(v) or rfn(v)
        return f"!({ltext})", lambda v: not lfn(v)

    return st.tuples(st.sampled_from(["and", "or", "not"]), children, children).map(node)


expressions = st.recursive(atoms, _combine, max_leaves=8)
semantic_views = st.builds(
    View,
    method=st.sampled_from(["GET", "POST", "get"]),
    host=st.sampled_from(["example.test", "example.test.", "other.test"]),
    path=st.sampled_from(["/", "/a", "/a/b", "/v1/x", "/b", "/vx"]),
    client_ip=st.sampled_from(["127.0.0.1", "10.0.0.1"]),
    headers=st.sampled_from([{}, {"x-env": ["prod"]}, {"x-env": ["dev", "prod"]}]),
    query=st.sampled_from([{}, {"mobile": [""]}, {"mobile": ["1"]}]),
)


@given(expressions, semantic_views)
def test_operators_mean_what_traefik_says(expression, view):
    """`&&`, `||`, `!` and parentheses combine matchers as boolean logic (Traefik docs,
    "Rules": operators and parenthesis); each matcher keeps its meaning inside any tree."""
    text, meaning = expression
    assert compile_http_rule(text, "v3").matcher(view) == meaning(view)


@given(atoms, atoms, atoms, semantic_views)
def test_and_binds_tighter_than_or(a, b, c, view):
    """Go precedence: `A || B && C` is `A || (B && C)`, and `A && B || C` is `(A && B) || C`."""
    (at, af), (bt, bf), (ct, cf) = a, b, c
    assert compile_http_rule(f"{at} || {bt} && {ct}", "v3").matcher(view) == (
        af(view) or (bf(view) and cf(view))
    )
    assert compile_http_rule(f"{at} && {bt} || {ct}", "v3").matcher(view) == (
        (af(view) and bf(view)) or cf(view)
    )


# ------------------------------------------------------------------ regular expressions

REGEX_TOKENS = [
    "a", "b", ".", "*", "+", "?", "{2}", "{1,3}", "{1001}", "(", ")", "(?:", "(?i)", "(?P<n>",
    "(?<n>", "(?=", "[", "]", "[^", "-", "^", "$", "|", "\\", "\\d", "\\w", "\\s", "\\b",
    "\\pL", "\\p{Greek}", "\\x{41}", "\\Q", "\\E", "\\z", "\\Z", "\\C", "\\1", "[[:alpha:]]",
    "é", "\x00", "\n", "{", "}", ",",
]  # fmt: skip
patterns = st.one_of(
    st.lists(st.sampled_from(REGEX_TOKENS), max_size=30).map("".join),
    st.text(max_size=60),
)


@given(patterns, st.text(max_size=2000))
def test_arbitrary_patterns_compile_or_raise_go_regexp_error(pattern, value):
    """Any pattern is either a Go regexp (answering a bool for any value, surrogates
    included) or a GoRegexpError; nothing else escapes."""
    try:
        search = compile_go_regexp(pattern)
    except GoRegexpError:
        return
    assert isinstance(search(value), bool)


@given(
    st.sampled_from(["a", "[a-z]", "\\w", "[^!]", "(a|aa)", "(a|a?)"]),
    st.sampled_from(["+", "*", "{1,10}"]),
    st.sampled_from(["+", "*", "{2,}"]),
    st.integers(1_000, 200_000),
)
def test_catastrophic_backtracking_patterns_run_in_linear_time(atom, inner, outer, length):
    """ReDoS: nested quantifiers (`(a+)+$`, `(\\w*)*$`, `((a|aa)+)+$` ...) against a long
    almost-matching value. Python's backtracking `re` takes exponential time on these; Go's
    RE2, and meshproxy's (the same engine), is linear: 200 kB of input in well under a second."""
    pattern = f"^({atom}{inner}){outer}$"
    try:
        search = compile_go_regexp(pattern)
    except GoRegexpError:
        assume(False)
        return
    value = "a" * length + "!"
    started = time.perf_counter()
    assert search(value) is False
    assert time.perf_counter() - started < 1.0
