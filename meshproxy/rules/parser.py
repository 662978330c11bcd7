"""Parser for Traefik's rule language.

Traefik parses rules with Go's expression parser: `&&` binds tighter than `||`, `!` negates,
parentheses group, and arguments are Go string literals (backticks, or double quotes with
escapes). Hand-written here because it is tiny and must report the column of the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshproxy.rules.ast import And, Call, Node, Not, Or


class RuleError(ValueError):
    """An invalid rule; the message names the problem and its column."""

    def __init__(self, rule: str, pos: int, message: str) -> None:
        self.rule = rule
        self.pos = pos
        super().__init__(f"{message} at column {pos + 1} in rule {rule!r}")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ident, string, lparen, rparen, comma, and, or, not, end
    text: str
    pos: int


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GO_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}


def _tokenize(rule: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(rule)
    while i < n:
        ch = rule[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "(":
            tokens.append(_Token("lparen", ch, i))
            i += 1
        elif ch == ")":
            tokens.append(_Token("rparen", ch, i))
            i += 1
        elif ch == ",":
            tokens.append(_Token("comma", ch, i))
            i += 1
        elif rule.startswith("&&", i):
            tokens.append(_Token("and", "&&", i))
            i += 2
        elif rule.startswith("||", i):
            tokens.append(_Token("or", "||", i))
            i += 2
        elif ch == "!":
            tokens.append(_Token("not", ch, i))
            i += 1
        elif ch == "`":
            end = rule.find("`", i + 1)
            if end < 0:
                raise RuleError(rule, i, "unterminated backtick string")
            tokens.append(_Token("string", rule[i + 1 : end], i))
            i = end + 1
        elif ch == '"':
            text, i = _read_quoted(rule, i)
            tokens.append(_Token("string", text, i))
        elif ch == "'":
            raise RuleError(rule, i, 'single quotes do not delimit strings; use backticks or "')
        else:
            match = _IDENT.match(rule, i)
            if match is None:
                raise RuleError(rule, i, f"unexpected character {ch!r}")
            tokens.append(_Token("ident", match.group(), i))
            i = match.end()
    tokens.append(_Token("end", "", n))
    return tokens


def _read_quoted(rule: str, start: int) -> tuple[str, int]:
    out: list[str] = []
    i = start + 1
    while i < len(rule):
        ch = rule[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\n":
            break
        if ch == "\\":
            nxt = rule[i + 1 : i + 2]
            if nxt in _GO_ESCAPES:
                out.append(_GO_ESCAPES[nxt])
                i += 2
                continue
            if nxt in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[nxt]
                digits = rule[i + 2 : i + 2 + width]
                try:
                    out.append(chr(int(digits, 16)))
                except ValueError:
                    raise RuleError(rule, i, "invalid escape in string") from None
                i += 2 + width
                continue
            raise RuleError(rule, i, "invalid escape in string")
        out.append(ch)
        i += 1
    raise RuleError(rule, start, "unterminated string")


def canonical_name(name: str, known: dict[str, str]) -> str | None:
    """Traefik accepts `PathPrefix`, `pathprefix`, `PATHPREFIX` and `Pathprefix` only."""
    canon = known.get(name.lower())
    if canon is None:
        return None
    lower = canon.lower()
    if name in (canon, lower, canon.upper(), lower.capitalize()):
        return canon
    return None


class _Parser:
    def __init__(self, rule: str, known: dict[str, str]) -> None:
        self.rule = rule
        self.known = known
        self.tokens = _tokenize(rule)
        self.index = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self, kind: str, what: str) -> _Token:
        token = self.peek()
        if token.kind != kind:
            found = "end of rule" if token.kind == "end" else repr(token.text)
            raise RuleError(self.rule, token.pos, f"expected {what}, found {found}")
        self.index += 1
        return token

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise RuleError(self.rule, 0, "empty rule")
        node = self.parse_or()
        token = self.peek()
        if token.kind != "end":
            raise RuleError(self.rule, token.pos, f"unexpected {token.text!r}")
        return node

    def parse_or(self) -> Node:
        node = self.parse_and()
        while self.peek().kind == "or":
            self.index += 1
            node = Or(node, self.parse_and())
        return node

    def parse_and(self) -> Node:
        node = self.parse_unary()
        while self.peek().kind == "and":
            self.index += 1
            node = And(node, self.parse_unary())
        return node

    def parse_unary(self) -> Node:
        token = self.peek()
        if token.kind == "not":
            self.index += 1
            return Not(self.parse_unary())
        if token.kind == "lparen":
            self.index += 1
            node = self.parse_or()
            self.take("rparen", "')'")
            return node
        return self.parse_call()

    def parse_call(self) -> Node:
        name_token = self.take("ident", "a matcher such as Host(`example.com`)")
        canon = canonical_name(name_token.text, self.known)
        if canon is None:
            raise RuleError(self.rule, name_token.pos, f"unknown matcher {name_token.text!r}")
        self.take("lparen", f"'(' after {name_token.text}")
        args: list[str] = []
        if self.peek().kind != "rparen":
            while True:
                token = self.peek()
                if token.kind != "string":
                    found = "end of rule" if token.kind == "end" else repr(token.text)
                    raise RuleError(
                        self.rule,
                        token.pos,
                        f"expected a quoted argument to {canon}, found {found}",
                    )
                self.index += 1
                if token.text == "":
                    raise RuleError(self.rule, token.pos, f"empty argument to {canon}")
                args.append(token.text)
                if self.peek().kind == "comma":
                    self.index += 1
                    continue
                break
        self.take("rparen", f"')' to close {canon}(")
        if not args:
            raise RuleError(self.rule, name_token.pos, f"{canon} needs at least one argument")
        return Call(canon, tuple(args), name_token.pos)


def parse_rule(rule: str, known: dict[str, str]) -> Node:
    """Parse `rule` into an AST; `known` maps lower-case matcher names to canonical ones."""
    return _Parser(rule, known).parse()
