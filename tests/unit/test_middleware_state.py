"""The clocks and counters behind rateLimit, circuitBreaker and retry, driven with explicit
times (no sleeping)."""

from __future__ import annotations

import pytest

from meshproxy.middlewares.base import MiddlewareConfigError
from meshproxy.middlewares.breaker_expression import ExpressionError, parse_expression
from meshproxy.middlewares.circuit_breaker import (
    RECOVERING,
    STANDBY,
    TRIPPED,
    BreakerState,
    RollingWindows,
)
from meshproxy.middlewares.rate_limit import RateLimiterState, max_delay
from meshproxy.middlewares.retry import Backoff, RetryBudgetState, parse_status_ranges

# ---------------------------------------------------------------- token bucket


def test_token_bucket_spends_the_burst_then_asks_to_wait_one_token_interval():
    bucket = RateLimiterState(rate=10.0, burst=3)
    assert [bucket.reserve("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve("a", 100.0) == pytest.approx(0.1)
    bucket.cancel("a")
    assert bucket.reserve("a", 100.05) == pytest.approx(0.05)  # half a token flowed in


def test_token_bucket_refills_at_the_average_rate_up_to_the_burst():
    bucket = RateLimiterState(rate=2.0, burst=2)
    bucket.reserve("a", 0.0)
    bucket.reserve("a", 0.0)
    assert bucket.reserve("a", 10.0) == 0.0  # ten seconds refill only up to the burst
    assert bucket.reserve("a", 10.0) == 0.0
    assert bucket.reserve("a", 10.0) == pytest.approx(0.5)


def test_idle_buckets_are_forgotten_once_full_and_sources_are_bounded():
    bucket = RateLimiterState(rate=1.0, burst=1, max_sources=3)
    bucket.reserve("a", 0.0)
    bucket.reserve("b", 0.5)
    bucket.reserve("c", 5.0)  # a and b are full again: forgotten
    assert list(bucket.buckets) == ["c"]
    for source in ("d", "e", "f"):
        bucket.reserve(source, 5.0)
    assert len(bucket.buckets) == 3 and "c" not in bucket.buckets


def test_max_delay_follows_traefik():
    assert max_delay(100.0) == pytest.approx(0.005)
    assert max_delay(0.5) == 0.5


# ---------------------------------------------------------------- breaker expressions


class FakeView:
    def __init__(self, network: float = 0.0, codes: float = 0.0, latency: float = 0.0) -> None:
        self.values = (network, codes, latency)
        self.calls: list[tuple[object, ...]] = []

    def network_error_ratio(self) -> float:
        return self.values[0]

    def response_code_ratio(self, a: int, b: int, c: int, d: int) -> float:
        self.calls.append((a, b, c, d))
        return self.values[1]

    def latency_at_quantile_ms(self, q: float) -> float:
        self.calls.append((q,))
        return self.values[2]

    def request_count(self) -> int:
        return 0


def test_breaker_expressions_combine_with_and_or_and_parentheses():
    check = parse_expression(
        "NetworkErrorRatio() > 0.5 || (ResponseCodeRatio(500, 600, 0, 600) >= 0.25 "
        "&& LatencyAtQuantileMS(50.0) > 100)"
    )
    assert check(FakeView(network=0.6))
    assert not check(FakeView(codes=0.3, latency=50))
    view = FakeView(codes=0.3, latency=150)
    assert check(view)
    assert view.calls == [(500, 600, 0, 600), (50.0,)]


@pytest.mark.parametrize(
    ("expression", "column", "message"),
    [
        ("NetworkErrorRate() > 0.5", 1, "unknown function"),
        ("NetworkErrorRatio() > 1", 23, "float literal"),
        ("LatencyAtQuantileMS(50) > 100", 21, "float literal"),
        ("ResponseCodeRatio(500, 600) > 0.5", 27, "takes 4 argument"),
        ("NetworkErrorRatio() 0.5", 21, "expected a comparison"),
        ("NetworkErrorRatio() > 0.5 &&", 29, "expected a metric function"),
        ("NetworkErrorRatio() > 0.5 $", 27, "unexpected character"),
        ("", 1, "empty"),
    ],
)
def test_invalid_breaker_expressions_point_at_the_problem(expression, column, message):
    with pytest.raises(ExpressionError) as caught:
        parse_expression(expression)
    assert caught.value.column == column
    assert message in str(caught.value)


# ---------------------------------------------------------------- breaker state machine


def test_rolling_windows_forget_what_is_older_than_ten_seconds():
    windows = RollingWindows()
    windows.record(502, 0.01, 100.0)
    windows.record(200, 0.01, 105.0)
    assert windows.view(105.5).network_error_ratio() == 0.5
    assert windows.view(111.0).network_error_ratio() == 0.0
    assert windows.view(111.0).total == 1


def test_latency_quantile_over_the_window():
    windows = RollingWindows()
    for ms in range(1, 101):
        windows.record(200, ms / 1000, 50.0)
    assert windows.view(50.0).latency_at_quantile_ms(50.0) == 50
    assert windows.view(50.0).latency_at_quantile_ms(99.0) == 99


def test_breaker_trips_falls_back_then_ramps_up_linearly_and_closes():
    breaker = BreakerState(
        parse_expression("NetworkErrorRatio() > 0.5"),
        check_period=0.1,
        fallback=10.0,
        recovery=10.0,
    )
    breaker.observe(502, 0.01, 1.0)
    assert breaker.state == TRIPPED
    assert not breaker.admit(5.0)  # fallback period
    # Recovering from t=11: the admitted share grows with elapsed time (0.5 * t / recovery).
    admitted = [breaker.admit(11.0 + i * 0.01) for i in range(100)]
    assert breaker.state == RECOVERING
    early = sum(admitted)
    later = sum(breaker.admit(19.0 + i * 0.01) for i in range(100))
    assert 1 <= early < later
    assert breaker.admit(21.5)
    assert breaker.state == STANDBY


def test_breaker_checks_the_condition_at_most_once_per_check_period():
    breaker = BreakerState(
        parse_expression("NetworkErrorRatio() > 0.5"), check_period=1.0, fallback=5, recovery=5
    )
    breaker.observe(200, 0.01, 10.0)  # checked: fine
    breaker.observe(502, 0.01, 10.2)
    breaker.observe(502, 0.01, 10.4)  # not checked yet
    assert breaker.state == STANDBY
    breaker.observe(502, 0.01, 11.1)
    assert breaker.state == TRIPPED


# ---------------------------------------------------------------- retry


def test_backoff_grows_from_the_initial_interval_towards_twice_it():
    backoff = Backoff(0.1, attempts=5)
    intervals = []
    for _ in range(4):
        intervals.append(backoff.interval)
        backoff.next()
    assert intervals[0] == pytest.approx(0.1)
    assert intervals[-1] == pytest.approx(0.1 * 2 ** (3 / 4))
    assert Backoff(0, 3).next() == 0.0


def test_retry_budget_allows_a_ratio_of_the_requests_plus_a_floor():
    budget = RetryBudgetState(ratio=0.2, min_per_second=0, window=10.0)
    for _ in range(10):
        budget.record_request(1.0)
    assert budget.allows_retry(1.0)
    budget.record_retry(1.0)
    budget.record_retry(1.0)
    assert not budget.allows_retry(1.0)
    assert budget.allows_retry(30.0) is False  # nothing seen lately: ratio of 0
    assert RetryBudgetState(0.2, 1, 10.0).allows_retry(0.0)  # the floor: 10 per window


def test_status_ranges_parse_and_reject_nonsense():
    assert parse_status_ranges(["500-599", "429"]) == [(500, 599), (429, 429)]
    with pytest.raises(MiddlewareConfigError, match=r"status\[1\]"):
        parse_status_ranges(["500", "5xx"])
    with pytest.raises(MiddlewareConfigError, match="within 100-599"):
        parse_status_ranges(["600-700"])
