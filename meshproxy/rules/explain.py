"""Evaluate a rule with reasons: which matcher made it fail for a given request or connection.

For the admin API's explain (admin/explain.py), off the hot path: the compiled matchers that
route traffic are left alone. Each matcher call of the rule's AST is compiled on its own (with
the syntax the whole rule is read with), so a call means exactly what it means in routing, and
the walk reports the first call that decides the rule is false:

- `A && B`: the first of A, B that fails (B is not looked at when A fails, as in routing);
- `A || B`: both reasons when neither matches;
- `!A`: A itself matched.

A reason names the matcher as written and what the request had instead ("Host(`a.test`) does
not match: the request's host is b.test").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshproxy.rules.ast import And, Call, Node, Not
from meshproxy.rules.http import KNOWN_HTTP, compile_http_rule, detect_syntax, resolve_syntax
from meshproxy.rules.parser import parse_rule
from meshproxy.rules.tcp import KNOWN_TCP, compile_tcp_rule


@dataclass
class RuleVerdict:
    matched: bool
    reason: str  # why it failed ("" when it matched)


def render(call: Call) -> str:
    return f"{call.name}({', '.join(f'`{a}`' for a in call.args)})"


def _what_http(call: Call, request: Any) -> str:
    name = call.name
    if name in ("Host", "HostHeader", "HostRegexp"):
        return f"the request's host is {request.host or '(none)'}"
    if name in ("Path", "PathPrefix", "PathRegexp"):
        return f"the request's path is {request.path}"
    if name == "Method":
        return f"the request's method is {request.method}"
    if name in ("Header", "Headers", "HeaderRegexp", "HeadersRegexp") and call.args:
        values = request.header_values(call.args[0])
        shown = ", ".join(repr(v) for v in values) if values else "absent"
        return f"the request's {call.args[0]} header is {shown}"
    if name in ("Query", "QueryRegexp"):
        return f"the request's query is {request.query or '(empty)'}"
    if name == "ClientIP":
        return f"the client IP is {request.client_ip}"
    return "it is false for this request"


def _what_tcp(call: Call, view: Any) -> str:
    if call.name in ("HostSNI", "HostSNIRegexp"):
        return f"the connection's SNI is {view.sni or '(none)'}"
    if call.name == "ALPN":
        return f"the connection's ALPN protocols are {', '.join(view.alpn) or '(none)'}"
    if call.name == "ClientIP":
        return f"the client IP is {view.client_ip}"
    return "it is false for this connection"


class _Walker:
    def __init__(self, tcp: bool, syntax: str | None) -> None:
        self.tcp = tcp
        self.syntax = syntax

    def call_matches(self, call: Call, subject: Any) -> bool:
        text = render(call)
        if self.tcp:
            return compile_tcp_rule(text, self.syntax).matcher(subject)
        return compile_http_rule(text, self.syntax).matcher(subject)

    def walk(self, node: Node, subject: Any) -> RuleVerdict:
        if isinstance(node, Call):
            if self.call_matches(node, subject):
                return RuleVerdict(True, "")
            what = _what_tcp(node, subject) if self.tcp else _what_http(node, subject)
            return RuleVerdict(False, f"{render(node)} does not match: {what}")
        if isinstance(node, Not):
            inner = self.walk(node.operand, subject)
            if inner.matched:
                return RuleVerdict(False, f"!{self.text(node.operand)} is false: it matched")
            return RuleVerdict(True, "")
        if isinstance(node, And):
            left = self.walk(node.left, subject)
            if not left.matched:
                return left
            return self.walk(node.right, subject)
        left = self.walk(node.left, subject)
        if left.matched:
            return left
        right = self.walk(node.right, subject)
        if right.matched:
            return right
        return RuleVerdict(False, f"{left.reason}; and {right.reason}")

    def text(self, node: Node) -> str:
        if isinstance(node, Call):
            return render(node)
        if isinstance(node, Not):
            return f"!{self.text(node.operand)}"
        op = "&&" if isinstance(node, And) else "||"
        return f"({self.text(node.left)} {op} {self.text(node.right)})"


def explain_http_rule(
    rule: str, request: Any, syntax: str | None = None, default_syntax: str | None = None
) -> RuleVerdict:
    """Whether `rule` matches `request` (an http.request.Request), and the first reason it
    does not. Raises RuleError for a rule that does not parse (such a router is disabled)."""
    node = parse_rule(rule, KNOWN_HTTP)
    chosen = resolve_syntax(syntax, default_syntax) or detect_syntax(node)
    return _Walker(False, chosen).walk(node, request)


def explain_tcp_rule(
    rule: str, view: Any, syntax: str | None = None, default_syntax: str | None = None
) -> RuleVerdict:
    """The same for a TCP rule and a connection view (sni, alpn, client_ip)."""
    node = parse_rule(rule, KNOWN_TCP)
    chosen = resolve_syntax(syntax, default_syntax)
    return _Walker(True, chosen).walk(node, view)
