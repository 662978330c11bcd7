"""Parser for Traefik's rule language.

Traefik parses rules with Go's expression parser: `&&` binds tighter than `||`, `!` negates,
parentheses group, and arguments are Go string literals (backticks, or double quotes with
escapes). Hand-written here because it is tiny and must report the column of the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshproxy.rules.ast import And, Call, Node, Not, Or

# Deepest nesting of parentheses and `!` accepted. Go's parser allows far more (100,000), but
# Python's recursion limit would not; real rules use a handful of levels.
MAX_NESTING = 100


class RuleError(ValueError):
    """An invalid rule; the message names the problem and its column."""

    def __init__(self, rule: str, pos: int, message: str) -> None:
        self.rule = rule
        self.pos = pos
        super().__init__(f"{message} at column {pos + 1} in rule {rule!r}")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ident, string, lparen, rparen, comma, and, or, not, newline, end
    text: str
    pos: int


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Go's single-character escapes in interpreted ("...") strings; `\'` is a rune-only escape.
_GO_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "\\": "\\",
    '"': '"',
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}
_HEX = frozenset("0123456789abcdefABCDEF")
# Kinds after which Go's scanner turns a newline into a semicolon (The Go Programming
# Language Specification, "Semicolons"): an expression cannot continue on the next line there.
_ENDS_OPERAND = frozenset(("ident", "string", "rparen"))


def _tokenize(rule: str) -> list[_Token]:
    """Split a rule into tokens the way Go's scanner (go/scanner) does for an expression.

    Whitespace is space, tab, CR and LF only (anything else, NUL included, is an illegal
    character, even inside a string); `//` and `/* */` comments are skipped; a newline (or a
    comment spanning one) right after an identifier, a string or `)` becomes a `newline`
    token, which the parser accepts only at the very end (Go's automatic semicolon).
    """
    tokens: list[_Token] = []
    i, n = 0, len(rule)
    nul = rule.find("\x00")
    if nul >= 0:
        raise RuleError(rule, nul, "illegal character NUL")

    def newline_here(pos: int) -> None:
        if tokens and tokens[-1].kind in _ENDS_OPERAND:
            tokens.append(_Token("newline", "\n", pos))

    while i < n:
        ch = rule[i]
        if ch in " \t\r":
            i += 1
        elif ch == "\n":
            newline_here(i)
            i += 1
        elif rule.startswith("//", i):
            end = rule.find("\n", i)
            newline_here(i)
            i = n if end < 0 else end + 1
        elif rule.startswith("/*", i):
            end = rule.find("*/", i + 2)
            if end < 0:
                raise RuleError(rule, i, "comment not terminated")
            if "\n" in rule[i:end]:
                newline_here(i)
            i = end + 2
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
            # Go discards carriage returns inside raw string literals.
            tokens.append(_Token("string", rule[i + 1 : end].replace("\r", ""), i))
            i = end + 1
        elif ch == '"':
            text, end = _read_quoted(rule, i)
            tokens.append(_Token("string", text, i))
            i = end
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
    """A Go interpreted string literal starting at `start` (the quote): its value and the
    index after the closing quote. Escapes as in the Go spec ("Rune literals"): single
    characters, `\\ooo` octal (3 digits, at most 255), `\\xhh`, `\\uhhhh`, `\\Uhhhhhhhh` (a valid
    code point). A byte escape above 0x7f stands for that byte (kept as the same code point,
    which the matchers reject or never match, as Traefik does)."""
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
            if nxt and nxt in "xuU01234567":
                octal = nxt not in ("x", "u", "U")
                width = 3 if octal else {"x": 2, "u": 4, "U": 8}[nxt]
                first = i + 1 if octal else i + 2
                digits = rule[first : first + width]
                allowed = "01234567" if octal else _HEX
                if len(digits) != width or any(d not in allowed for d in digits):
                    raise RuleError(rule, i, "invalid escape in string")
                value = int(digits, 8 if octal else 16)
                if (octal and value > 255) or value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                    raise RuleError(rule, i, "escape is invalid Unicode code point")
                if value == 0:
                    raise RuleError(rule, i, "illegal character NUL")
                out.append(chr(value))
                i = first + width
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
        self.depth = 0  # open parentheses and negations around the current position

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
        if self.peek().kind == "newline":  # Go's parser accepts one final semicolon
            self.index += 1
        token = self.peek()
        if token.kind == "newline":
            raise RuleError(self.rule, token.pos, "unexpected newline")
        if token.kind != "end":
            raise RuleError(self.rule, token.pos, f"unexpected {token.text!r}")
        return node

    def parse_or(self) -> Node:
        terms = [self.parse_and()]
        while self.peek().kind == "or":
            self.index += 1
            terms.append(self.parse_and())
        return _balanced(Or, terms)

    def parse_and(self) -> Node:
        terms = [self.parse_unary()]
        while self.peek().kind == "and":
            self.index += 1
            terms.append(self.parse_unary())
        return _balanced(And, terms)

    def parse_unary(self) -> Node:
        token = self.peek()
        if token.kind in ("not", "lparen"):
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise RuleError(
                    self.rule, token.pos, f"rule nested deeper than {MAX_NESTING} levels"
                )
            self.index += 1
            if token.kind == "not":
                node: Node = Not(self.parse_unary())
            else:
                node = self.parse_or()
                self.take("rparen", "')'")
            self.depth -= 1
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
                if self.peek().kind == "newline":
                    raise RuleError(
                        self.rule, self.peek().pos, "missing ',' before newline in argument list"
                    )
                if self.peek().kind == "comma":
                    self.index += 1
                    if self.peek().kind == "rparen":  # Go allows a trailing comma
                        break
                    continue
                break
        self.take("rparen", f"')' to close {canon}(")
        if not args:
            raise RuleError(self.rule, name_token.pos, f"{canon} needs at least one argument")
        return Call(canon, tuple(args), name_token.pos)


def _balanced(kind: type[And] | type[Or], terms: list[Node]) -> Node:
    """`a op b op c ...` as a balanced tree, operands kept in order: `&&` and `||` are
    associative, and a chain of thousands of terms stays a few levels deep, so compiling and
    walking it never approaches Python's recursion limit."""
    if len(terms) == 1:
        return terms[0]
    middle = len(terms) // 2
    return kind(_balanced(kind, terms[:middle]), _balanced(kind, terms[middle:]))


def parse_rule(rule: str, known: dict[str, str]) -> Node:
    """Parse `rule` into an AST; `known` maps lower-case matcher names to canonical ones."""
    return _Parser(rule, known).parse()
