"""Node-wide circuit breakers and retry budgets (issue 15 point 2, meshproxy.node.shared_windows):
two mappings of one node memfd in this process act as two workers (rows 0 and 1), exactly as
two worker processes map the descriptor they inherited. Times are passed explicitly."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.middlewares.breaker_expression import code_boundaries, parse_expression
from meshproxy.middlewares.circuit_breaker import (
    RECOVERING,
    STANDBY,
    TRIPPED,
    BreakerState,
    NodeBreakerState,
    RollingWindows,
    WindowView,
    _round_ms,
)
from meshproxy.middlewares.retry import NodeRetryBudget, RetryBudgetState
from meshproxy.node import shared_windows
from meshproxy.node.shared_state import NodeState, state_fd

KEY = "router\0breaker\0" + "ab" * 8


@pytest.fixture
def node() -> Iterator[tuple[NodeState, NodeState]]:
    fd = state_fd()
    first, second = NodeState(fd, 0), NodeState(fd, 1)
    yield first, second
    first.close()
    second.close()
    os.close(fd)


def _breaker(node: NodeState, expression: str, **kw: float) -> NodeBreakerState:
    latencies = "LatencyAtQuantileMS" in expression
    cell = node.breaker(KEY, code_boundaries(expression), latencies, 600.0)
    assert cell is not None
    return NodeBreakerState(
        parse_expression(expression),
        kw.get("check", 0.1),
        kw.get("fallback", 10.0),
        kw.get("recovery", 10.0),
        latencies,
        cell,
    )


def test_each_worker_locks_through_its_own_description(node):
    """flock(2): locks belong to an open file description; the workers' inherited
    descriptor is one description, so each worker must reopen the file for LOCK_EX to
    exclude the others (it did not: the rate limiter's buckets were updated unlocked)."""
    first, second = node
    fcntl.flock(first.buckets.fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(second.buckets.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        fcntl.flock(first.buckets.fd, fcntl.LOCK_UN)


def test_a_breaker_trips_on_the_nodes_traffic_and_every_worker_follows(node):
    """Traefik's circuitBreaker (oxy cbreaker): the expression over the last 10 s of
    responses, checked every checkPeriod; tripped for fallbackDuration, recovering for
    recoveryDuration, then standby. With two workers each seeing half of the failures,
    neither alone reaches NetworkErrorRatio() > 0.5, the node does, and the other worker
    answers the fallback too, recovers and closes at the same moments."""
    a = _breaker(node[0], "NetworkErrorRatio() > 0.5", check=0.0, fallback=5.0, recovery=4.0)
    b = _breaker(node[1], "NetworkErrorRatio() > 0.5", check=0.0, fallback=5.0, recovery=4.0)
    now = time.monotonic()
    for _ in range(10):  # b sees the successes, a the failures
        b.observe(200, 0.001, now)
    for index in range(9):
        a.observe(502, 0.001, now)
        assert a.state == STANDBY, index  # 9/19 < 0.5: not yet
    a.observe(502, 0.001, now)
    a.observe(502, 0.001, now)  # 11/21 > 0.5: trips
    assert a.state == TRIPPED
    # b saw only 200s, yet answers the fallback: the node's breaker is open.
    assert b.admit(now + 0.1) is False and b.state == TRIPPED
    assert a.admit(now + 4.9) is False
    # After fallbackDuration both recover: the first request is let through, and the ramp
    # lets at most half through by the phase's end.
    assert b.admit(now + 5.0) is True and b.state == RECOVERING
    assert a.admit(now + 5.0) is True and a.state == RECOVERING
    assert a.until == b.until == pytest.approx(now + 9.0)
    let_through = sum(a.admit(now + 5.0 + i * 0.03) for i in range(100))
    assert 10 <= let_through <= 60, let_through
    # After recoveryDuration both close.
    assert a.admit(now + 9.0) is True and a.state == STANDBY
    assert b.admit(now + 9.0) is True and b.state == STANDBY


def test_the_windows_start_over_after_a_trip_for_every_worker(node):
    """oxy resets its metrics when the breaker trips: the failures that tripped it do not
    trip it again when it closes. b's rows, written before the trip, are stale too."""
    a = _breaker(node[0], "ResponseCodeRatio(500, 600, 0, 600) > 0.5", check=0.0, fallback=1.0)
    b = _breaker(node[1], "ResponseCodeRatio(500, 600, 0, 600) > 0.5", check=0.0, fallback=1.0)
    now = time.monotonic()
    a.observe(200, 0.001, now)
    b.observe(503, 0.001, now)
    b.observe(503, 0.001, now)  # 2/3 > 0.5: trips
    assert b.state == TRIPPED
    codes, _ = a.cell.view(now)
    assert sum(codes.values()) == 0  # the responses before the trip are gone for the node
    for breaker in (a, b):
        assert breaker.admit(now + 1.0) is True and breaker.state == RECOVERING
    # A success after the trip: 0 of 1 failed, no new trip from the old failures.
    a.observe(200, 0.001, now + 1.1)
    assert a.admit(now + 1.2) in (True, False) and a.state == RECOVERING
    assert sum(a.cell.view(now + 1.2)[0].values()) == 1


def test_a_breaker_checks_once_per_check_period_for_the_node(node):
    """checkPeriod: the expression is evaluated at most once per period; with workers, once
    per period for the node (not once per worker)."""
    a = _breaker(node[0], "RequestThreshold() > 1000", check=1.0)
    b = _breaker(node[1], "RequestThreshold() > 1000", check=1.0)
    now = time.monotonic()
    assert a.cell.check_due(now, 1.0) is True
    assert b.cell.check_due(now + 0.5, 1.0) is False
    assert a.cell.check_due(now + 0.9, 1.0) is False
    assert b.cell.check_due(now + 1.0, 1.0) is True


@settings(max_examples=60, deadline=None)
@given(
    responses=st.lists(
        st.tuples(
            st.sampled_from([200, 201, 302, 404, 429, 500, 502, 503, 504, 599]),
            st.integers(0, 2_000_000),
            st.integers(0, 25),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_node_windows_answer_every_metric_as_one_process(responses):
    """The node's windows, split over two workers' rows and kept per code class and latency
    bucket, answer NetworkErrorRatio, every ResponseCodeRatio of the expression,
    LatencyAtQuantileMS and RequestThreshold as one process's RollingWindows seeing all
    the responses (oxy's metrics over 10 x 1 s and 6 x 10 s)."""
    expression = (
        "NetworkErrorRatio() > 0.5 || ResponseCodeRatio(500, 600, 0, 600) > 0.5 || "
        "ResponseCodeRatio(400, 500, 200, 300) > 2.0 || LatencyAtQuantileMS(50.0) > 100"
    )
    fd = state_fd()
    first, second = NodeState(fd, 0), NodeState(fd, 1)
    try:
        cells = [n.breaker(KEY, code_boundaries(expression), True, 600.0) for n in (first, second)]
        alone = RollingWindows()
        start = float(int(time.monotonic()))
        # Responses are recorded as they end: in time order, on either worker.
        for status, micros, offset, which in sorted(responses, key=lambda r: r[2]):
            now = start + offset * 0.5
            cells[which].record(status, micros / 1e6, now)
            alone.record(status, micros / 1e6, now)
        end = start + 13.0
        shared = WindowView(*cells[0].view(end))
        single = alone.view(end)
        assert shared.request_count() == single.request_count()
        assert shared.network_error_ratio() == single.network_error_ratio()
        for args in ((500, 600, 0, 600), (400, 500, 200, 300)):
            assert shared.response_code_ratio(*args) == single.response_code_ratio(*args)
        for quantile in (50.0, 90.0, 99.0):
            assert shared.latency_at_quantile_ms(quantile) == min(
                single.latency_at_quantile_ms(quantile), 990_000.0
            )
    finally:
        first.close()
        second.close()
        os.close(fd)


@given(st.integers(0, 10**7))
def test_latency_buckets_round_as_one_process(ms):
    """The shared histogram keeps what RollingWindows keeps: milliseconds below 100, two
    significant digits above (oxy's HDR histogram precision), up to 990,000 ms."""
    value = shared_windows.LATENCY_VALUES[shared_windows.latency_bucket(ms)]
    expected = ms if ms < 100 else _round_ms(ms)
    assert value == min(expected, 990_000)


def test_a_retry_budget_holds_for_the_node(node):
    """The retry budget (Linkerd's: ratio x requests over the window, at least
    minRetriesPerSecond x window): two workers together get the floor once, not twice."""
    window = 10.0
    budgets = [NodeRetryBudget(0.0, 3, window, n.budget(KEY, window)) for n in node]
    now = time.monotonic()
    allowed = 0
    for index in range(200):
        budget = budgets[index % 2]
        budget.record_request(now)
        if budget.allows_retry(now):
            budget.record_retry(now)
            allowed += 1
    assert allowed == 3 * window
    # Per-worker budgets (RetryBudgetState each) would have allowed twice the floor.
    alone = [RetryBudgetState(0.0, 3, window) for _ in range(2)]
    per_worker = 0
    for index in range(200):
        budget = alone[index % 2]
        budget.record_request(now)
        if budget.allows_retry(now):
            budget.record_retry(now)
            per_worker += 1
    assert per_worker == 2 * 3 * window
    # The ratio counts the node's requests: 20% of 400 requests across both rows.
    ratio = [NodeRetryBudget(0.2, 0, window, n.budget(KEY + "r", window)) for n in node]
    for index in range(400):
        ratio[index % 2].record_request(now)
    assert ratio[0]._totals(now) == ratio[1]._totals(now) == (400, 0)
    made = 0
    while ratio[made % 2].allows_retry(now) and made < 1000:
        ratio[made % 2].record_retry(now)
        made += 1
    assert made == 80
    # The window rolls for the node: 10 slots later the counts are gone.
    assert ratio[1]._totals(now + window + 1.0) == (0, 0)


def test_an_idle_instance_is_taken_over_and_its_owner_claims_anew(node):
    """A table slot unused for its horizon can be given to another instance (old
    definitions after reloads must not fill the table); the old owner, back, finds its key
    gone and claims a place again, with empty counts."""
    first, second = node
    now = time.monotonic()
    old = first.windows.budget("old", 10.0)
    old.record(now, False)
    offset = old.offset
    # Same table slot, horizon passed: a key hashing to the same place takes it over.
    newcomer = second.windows.claim(
        shared_windows.BUDGET_TABLE,
        shared_windows.BUDGET_STRIDE,
        shared_windows.BUDGETS,
        old.key + shared_windows.BUDGETS,  # same start slot, another key
        now + old.horizon + 1.0,
        60.0,
    )
    assert newcomer is not None and newcomer[0] == offset
    requests, _ = old.totals(now + old.horizon + 2.0)
    assert old.offset != offset and requests == 0


def test_a_released_breaker_starts_fresh_when_its_definition_comes_back(node):
    """One process (BuildContext.keep) and Traefik (middlewares rebuilt on every change)
    keep a breaker's state only while its definition is unchanged: A tripped, reload to B,
    reload back to A -> A is closed with empty windows. Both workers apply the reloads and
    release A; the second release is a no-op, and even a worker one generation behind that
    records into A after the first release writes nothing a fresh claim would see."""
    expression = "ResponseCodeRatio(500, 600, 0, 600) > 0.5"
    a = _breaker(node[0], expression, check=0.0, fallback=15.0)
    b = _breaker(node[1], expression, check=0.0, fallback=15.0)
    now = time.monotonic()
    for _ in range(3):
        a.observe(500, 0.001, now)
    assert a.state == TRIPPED and b.admit(now + 0.1) is False
    offset = a.cell.offset
    a.retire()  # worker 0 applies the reload to B first
    # Worker 1, one generation behind, still serves A: it is detached, not tripped, and
    # what it records goes nowhere.
    assert b.admit(now + 0.2) is True
    for _ in range(5):
        b.observe(500, 0.001, now + 0.2)
    b.retire()  # then applies it too: a no-op
    header = shared_windows._HEADER.unpack_from(node[0].windows.map, offset)
    assert header[0] == 0  # the slot is free
    # Back to A (the same key) in both workers: closed, with empty windows.
    a2 = _breaker(node[0], expression, check=0.0, fallback=15.0)
    b2 = _breaker(node[1], expression, check=0.0, fallback=15.0)
    assert a2.cell.offset == b2.cell.offset
    assert a2.admit(now + 0.3) is True and b2.admit(now + 0.3) is True
    assert a2.state == b2.state == STANDBY
    assert sum(a2.cell.view(now + 0.3)[0].values()) == 0
    # The stale instances' releases, repeated, do not touch the new entry.
    a.retire()
    b.cell.released = False
    b.cell.release()
    b2.observe(200, 0.001, now + 0.4)
    assert sum(a2.cell.view(now + 0.4)[0].values()) == 1
    # And A works node-wide again: failures seen by one worker open it for both.
    for _ in range(3):
        a2.observe(500, 0.001, now + 0.5)
    assert a2.state == TRIPPED and b2.admit(now + 0.6) is False


def test_a_released_slot_serves_another_key_and_the_old_instance_stays_out(node):
    """Released entries give their slot back at once (not after the 10 minute horizon), so
    config churn cannot fill the table: another key claims the slot, and the released
    instance (its epoch gone) neither reads nor writes it, even past REFRESH."""
    first, second = node
    now = time.monotonic()
    old = first.windows.budget("old", 10.0)
    assert old is not None
    other_worker = second.windows.budget("old", 10.0)
    assert other_worker is not None and other_worker.offset == old.offset
    old.record(now, False)
    offset = old.offset
    old.release()
    other_worker.release()  # every worker applies the reload: the second is a no-op
    # A key hashing to the same start slot takes it now, horizon or not.
    newcomer = second.windows.claim(
        shared_windows.BUDGET_TABLE,
        shared_windows.BUDGET_STRIDE,
        shared_windows.BUDGETS,
        old.key + shared_windows.BUDGETS,
        now + 1.0,
        60.0,
    )
    assert newcomer is not None and newcomer[0] == offset
    later = now + shared_windows.REFRESH + 1.0
    old.record(later, True)  # an exchange of the dropped snapshot ending late
    assert old.totals(later) == (0, 0) and old.offset == offset
    header = shared_windows._HEADER.unpack_from(first.windows.map, offset)
    assert header[0] == old.key + shared_windows.BUDGETS  # not claimed back
    fresh = first.windows.budget("old", 10.0)
    assert fresh is not None and fresh.offset != offset
    assert fresh.totals(later) == (0, 0)


def test_reloads_release_what_they_drop_so_config_churn_fits_the_table(node, monkeypatch):
    """F5: 300 routers sharing one circuitBreaker whose definition changes twice: 900
    instances over time, never more than 300 in use. Through the reload path itself
    (BuildContext.keep, then RuntimeState.retain_middlewares), each replaced instance frees
    its slot before its successor claims one: all stay node-wide in the 512-slot table, and
    routers removed by a reload give theirs back too."""
    from meshproxy.config.dynamic import CircuitBreaker
    from meshproxy.middlewares import circuit_breaker
    from meshproxy.middlewares.base import BuildContext, MiddlewareState
    from meshproxy.runtime.state import RuntimeState

    monkeypatch.setattr(circuit_breaker, "SHARED_STATE", [node[0].breaker])
    runtime = RuntimeState()

    def reload(routers: int, fallback: float) -> MiddlewareState:
        options = CircuitBreaker(
            expression="ResponseCodeRatio(500, 600, 0, 600) > 0.5", fallback_duration=fallback
        )
        current = MiddlewareState()
        for router in range(routers):
            ctx = BuildContext(
                router=f"r{router}@file",
                name="cb@file",
                metrics=None,
                fingerprint=b"circuitBreaker%f" % fallback,
                previous=runtime.middlewares,
                current=current,
            )
            circuit_breaker.build_circuit_breaker(options, _unreached, ctx)
        runtime.retain_middlewares(current)
        return current

    def used() -> int:
        m = node[0].windows.map
        return sum(
            shared_windows._KEY_GEN.unpack_from(m, slot * shared_windows.BREAKER_STRIDE)[0] != 0
            for slot in range(shared_windows.BREAKERS)
        )

    try:
        for fallback in (3.0, 4.0, 5.0, 3.0):
            state = reload(300, fallback)
            kinds = {type(obj) for _, obj in state.objects.values()}
            assert kinds == {NodeBreakerState}, fallback
            assert used() == 300
        reload(100, 3.0)  # 200 routers removed
        assert used() == 100
    finally:
        runtime.retain_middlewares(MiddlewareState())
    assert used() == 0


def _unreached(ex, finish):  # the handler behind the breaker; no request is sent here
    raise AssertionError("not called")


def test_a_single_process_keeps_its_own_state():
    """Without workers (no SHARED_STATE), a breaker and a budget are the in-process
    objects, as before."""
    from meshproxy.middlewares import circuit_breaker, retry

    assert circuit_breaker.SHARED_STATE == [] and retry.SHARED_STATE == []
    state = circuit_breaker._breaker_state(
        KEY, parse_expression("NetworkErrorRatio() > 0.5"), 0.1, 10.0, 10.0, False, []
    )
    assert type(state) is BreakerState
    assert type(retry._budget_state(KEY, 0.2, 10, 10.0)) is RetryBudgetState
