"""The circuit breaker's expression language (oxy's cbreaker predicates).

    NetworkErrorRatio() > 0.30 || ResponseCodeRatio(500, 600, 0, 600) > 0.25
    LatencyAtQuantileMS(50.0) > 100 && NetworkErrorRatio() >= 0.5

Metric functions compared with a constant, combined with `&&` / `||` and parentheses. Parsed
once into a predicate over a `BreakerMetrics`; errors carry the column of the problem. A
hand-written parser: the language is five tokens wide and no library speaks it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class BreakerMetrics(Protocol):
    def network_error_ratio(self) -> float: ...

    def response_code_ratio(self, start: int, end: int, div_start: int, div_end: int) -> float: ...

    def latency_at_quantile_ms(self, quantile: float) -> float: ...

    def request_count(self) -> int: ...


Predicate = Callable[[BreakerMetrics], bool]


class ExpressionError(ValueError):
    def __init__(self, expression: str, column: int, message: str) -> None:
        self.column = column
        pointer = f"{expression}\n{' ' * (column - 1)}^"
        super().__init__(f"{message} (column {column})\n{pointer}")


# ASCII only, as in Go's scanner (oxy parses expressions with go/parser): `\d` and `\s` in
# Python would also take Arabic-Indic digits and Unicode spaces.
_TOKEN = re.compile(
    r"[ \t\r\n]*(?:(?P<num>[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>&&|\|\||>=|<=|==|!=|>|<|\(|\)|,))"
)
# Deepest parenthesis nesting accepted; a deeper one is refused with an ExpressionError rather
# than exhausting Python's recursion limit. Real expressions use two or three levels.
MAX_NESTING = 64
_COMPARE = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class _Token:
    kind: str  # num | ident | op | end
    text: str
    column: int


@dataclass(frozen=True)
class _Function:
    """name -> argument kinds ('int' / 'float'), constant kind, evaluator."""

    args: tuple[str, ...]
    constant: str
    call: Callable[..., float]


_FUNCTIONS = {
    "NetworkErrorRatio": _Function((), "float", lambda m: m.network_error_ratio()),
    "ResponseCodeRatio": _Function(
        ("int", "int", "int", "int"),
        "float",
        lambda m, a, b, c, d: m.response_code_ratio(a, b, c, d),
    ),
    "LatencyAtQuantileMS": _Function(("float",), "int", lambda m, q: m.latency_at_quantile_ms(q)),
    "RequestThreshold": _Function((), "int", lambda m: m.request_count()),
}


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip(" \t\r\n") == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            column = pos + 1 + (len(text[pos:]) - len(text[pos:].lstrip(" \t\r\n")))
            raise ExpressionError(text, column, f"unexpected character {text[column - 1]!r}")
        kind = match.lastgroup or "op"
        value = match.group(kind)
        tokens.append(_Token(kind, value, match.start(kind) + 1))
        pos = match.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def fail(self, token: _Token, message: str) -> ExpressionError:
        return ExpressionError(self.text, token.column, message)

    def expect(self, text: str) -> _Token:
        token = self.take()
        if token.text != text:
            found = token.text or "the end of the expression"
            raise self.fail(token, f"expected {text!r}, found {found!r}")
        return token

    def parse(self) -> Predicate:
        if self.peek().kind == "end":
            raise self.fail(self.peek(), "the expression is empty")
        predicate = self.parse_or()
        token = self.peek()
        if token.kind != "end":
            raise self.fail(token, f"unexpected {token.text!r}")
        return predicate

    def parse_or(self) -> Predicate:
        terms = [self.parse_and()]
        while self.peek().text == "||":
            self.take()
            terms.append(self.parse_and())
        if len(terms) == 1:
            return terms[0]
        return lambda m: any(term(m) for term in terms)

    def parse_and(self) -> Predicate:
        terms = [self.parse_atom()]
        while self.peek().text == "&&":
            self.take()
            terms.append(self.parse_atom())
        if len(terms) == 1:
            return terms[0]
        return lambda m: all(term(m) for term in terms)

    def parse_atom(self) -> Predicate:
        token = self.peek()
        if token.text == "(":
            self.take()
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.fail(token, f"parentheses nested deeper than {MAX_NESTING} levels")
            inner = self.parse_or()
            self.expect(")")
            self.depth -= 1
            return inner
        return self.parse_comparison()

    def parse_comparison(self) -> Predicate:
        name = self.take()
        if name.kind != "ident":
            raise self.fail(name, f"expected a metric function, found {name.text or 'the end'!r}")
        function = _FUNCTIONS.get(name.text)
        if function is None:
            known = ", ".join(f"{n}()" for n in _FUNCTIONS)
            raise self.fail(name, f"unknown function {name.text!r} (known: {known})")
        self.expect("(")
        args: list[float] = []
        while self.peek().text != ")":
            if args:
                self.expect(",")
            args.append(
                self.number(function.args[len(args)] if len(args) < len(function.args) else "int")
            )
        closing = self.expect(")")
        if len(args) != len(function.args):
            raise self.fail(
                closing,
                f"{name.text}() takes {len(function.args)} argument(s), got {len(args)}",
            )
        comparator = self.take()
        compare = _COMPARE.get(comparator.text)
        if compare is None:
            raise self.fail(
                comparator, f"expected a comparison (>, >=, <, <=, ==, !=) after {name.text}()"
            )
        constant = self.number(function.constant)
        call = function.call
        bound = tuple(args)
        return lambda m: compare(call(m, *bound), constant)

    def number(self, kind: str) -> float:
        token = self.take()
        if token.kind != "num":
            raise self.fail(token, f"expected a number, found {token.text or 'the end'!r}")
        is_float = "." in token.text
        if kind == "float" and not is_float:
            raise self.fail(token, f"expected a float literal such as {token.text}.0")
        if kind == "int" and is_float:
            raise self.fail(token, f"expected an integer, found {token.text}")
        try:
            return float(token.text) if is_float else int(token.text)
        except ValueError:  # an integer over 4300 digits (Python's conversion limit)
            raise self.fail(token, f"number too long ({len(token.text)} digits)") from None


def parse_expression(text: str) -> Predicate:
    """Compile a breaker expression; raises ExpressionError pointing at the problem."""
    return _Parser(text).parse()


def code_boundaries(text: str) -> list[int]:
    """The status codes where the ranges of `text`'s ResponseCodeRatio() calls start or end,
    in order of appearance: enough to count responses per class between them and still
    answer every ratio of the expression exactly (meshproxy.node.shared_windows). `text`
    must be a valid expression (parse_expression accepted it)."""
    tokens = _tokenize(text)
    found: list[int] = []
    for index, token in enumerate(tokens):
        if token.kind == "ident" and token.text == "ResponseCodeRatio":
            # ResponseCodeRatio ( a , b , c , d ): the numbers at +2, +4, +6, +8
            found.extend(int(tokens[index + k].text) for k in (2, 4, 6, 8))
    return found
