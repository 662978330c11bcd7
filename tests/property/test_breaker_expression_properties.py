"""Property tests of the circuit breaker's expression language (Traefik's circuitBreaker
middleware, oxy's cbreaker predicates): arbitrary text is either an expression or an
ExpressionError, and a valid expression evaluates to the boolean its structure says."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from meshproxy.middlewares.breaker_expression import (
    MAX_NESTING,
    ExpressionError,
    parse_expression,
)


@dataclass
class Metrics:
    """Fixed metric values (meshproxy.middlewares.breaker_expression.BreakerMetrics)."""

    ner: float = 0.0
    rcr: float = 0.0
    latency: float = 0.0
    requests: int = 0

    def network_error_ratio(self) -> float:
        return self.ner

    def response_code_ratio(self, start: int, end: int, div_start: int, div_end: int) -> float:
        return self.rcr

    def latency_at_quantile_ms(self, quantile: float) -> float:
        return self.latency

    def request_count(self) -> int:
        return self.requests


ratios = st.floats(0.0, 1.0)
metrics = st.builds(
    Metrics,
    ner=ratios,
    rcr=ratios,
    latency=st.floats(0.0, 10_000.0),
    requests=st.integers(0, 10_000),
)

TOKENS = [
    "NetworkErrorRatio()", "ResponseCodeRatio(500, 600, 0, 600)", "LatencyAtQuantileMS(50.0)",
    "RequestThreshold()", "NetworkErrorRatio", "Nope()", "(", ")", ",", "&&", "||", "!", ">",
    ">=", "<", "<=", "==", "!=", "=", "0.5", "5", "50.0", ".5", "5.", "-1", "1e3", " ", "\t",
    "\n", "\u00a0", "\u0663", "9" * 5000,
]  # fmt: skip
texts = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=30).map("".join),
    st.text(max_size=200),
)


@given(texts, metrics)
def test_arbitrary_text_parses_or_raises_expression_error(text, values):
    """Any text is a predicate answering a bool, or an ExpressionError with a 1-based column
    inside the text (or just past it); nothing else escapes (no RecursionError, no bare
    ValueError from an over-long number)."""
    try:
        predicate = parse_expression(text)
    except ExpressionError as exc:
        assert 1 <= exc.column <= len(text) + 1
        return
    assert isinstance(predicate(values), bool)


COMPARISONS = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
comparisons = st.one_of(
    st.tuples(
        st.sampled_from(["NetworkErrorRatio()", "ResponseCodeRatio(500, 600, 0, 600)"]),
        st.sampled_from(sorted(COMPARISONS)),
        st.sampled_from(["0.0", "0.25", "0.5", "1.0"]),
    ),
    st.tuples(
        st.sampled_from(["LatencyAtQuantileMS(50.0)", "RequestThreshold()"]),
        st.sampled_from(sorted(COMPARISONS)),
        st.sampled_from(["0", "10", "100", "5000"]),
    ),
).map(
    lambda t: (
        f"{t[0]} {t[1]} {t[2]}",
        lambda m, f=t[0], op=COMPARISONS[t[1]], c=float(t[2]): op(_call(m, f), c),
    )
)


def _call(m: Metrics, function: str) -> float:
    return {
        "NetworkErrorRatio()": m.ner,
        "ResponseCodeRatio(500, 600, 0, 600)": m.rcr,
        "LatencyAtQuantileMS(50.0)": m.latency,
        "RequestThreshold()": float(m.requests),
    }[function]


def _combine(children):
    def node(t):
        kind, (lt, lf), (rt, rf) = t
        if kind == "&&":
            return f"({lt}) && ({rt})", lambda m: lf(m) and rf(m)
        return f"({lt}) || ({rt})", lambda m: lf(m) or rf(m)

    return st.tuples(st.sampled_from(["&&", "||"]), children, children).map(node)


@given(st.recursive(comparisons, _combine, max_leaves=10), metrics)
def test_valid_expressions_evaluate_as_their_structure_says(expression, values):
    """Comparisons of the four metric functions with constants, combined with `&&`, `||`
    and parentheses, evaluate as boolean logic over the metrics (Traefik docs,
    circuitBreaker "expression")."""
    text, meaning = expression
    assert parse_expression(text)(values) == meaning(values)


@given(st.integers(1, 500))
def test_nesting_is_bounded(depth):
    """Parentheses up to MAX_NESTING parse; deeper ones are an ExpressionError, never a
    RecursionError."""
    text = "(" * depth + "NetworkErrorRatio() > 0.5" + ")" * depth
    if depth <= MAX_NESTING:
        assert parse_expression(text)(Metrics(ner=0.6))
    else:
        try:
            parse_expression(text)
        except ExpressionError as exc:
            assert "nested deeper" in str(exc)
        else:
            raise AssertionError("nesting beyond the bound was accepted")
