"""circuitBreaker: stop sending traffic to a failing service for a while, as Traefik (oxy) does.

standby   every response is recorded in rolling windows; at most once per `checkPeriod` the
          expression is evaluated, and when it holds the breaker trips;
tripped   for `fallbackDuration` every request is answered `responseCode` without reaching
          what is behind the breaker;
recovering for `recoveryDuration` a linearly growing share of requests is let through (the
          rest get the fallback); if the expression holds again it trips again, else standby.

Only what is after the breaker in the chain is observed. The windows: counts over 10 x 1 s,
latencies over 6 x 10 s (as oxy), kept as counts per rounded millisecond value so memory stays
bounded whatever the traffic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from time import monotonic
from typing import Any

from meshproxy.config.dynamic import CircuitBreaker
from meshproxy.http.errors import ProxyError
from meshproxy.http.exchange import Exchange
from meshproxy.http.status import reason_phrase
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError
from meshproxy.middlewares.breaker_expression import (
    ExpressionError,
    Predicate,
    code_boundaries,
    parse_expression,
)

STANDBY, TRIPPED, RECOVERING = "standby", "tripped", "recovering"
# The states by the number meshproxy.node.shared_windows keeps them as.
_STATE_NAMES = (STANDBY, TRIPPED, RECOVERING)

# Set by a worker process of a node (meshproxy.node.worker): (instance key, the expression's
# ResponseCodeRatio boundaries, latencies kept?, seconds an idle instance keeps its place) ->
# the breaker's windows and state in the memory the node's workers share
# (meshproxy.node.shared_windows), or None when there is no room; so a breaker sees the
# node's traffic and every worker opens and closes it together.
SHARED_STATE: list[Callable[[str, list[int], bool, float], Any]] = []


def _round_ms(value: int) -> int:
    """Two significant digits from 100 ms up: bounded distinct keys, ~1% error, like HDR."""
    scale = 10 ** (len(str(value)) - 2)
    return value // scale * scale


class RollingWindows:
    """Response codes over the last `slots` x `width` seconds, latencies over 6 x 10 s."""

    def __init__(self, slots: int = 10, width: float = 1.0, latencies: bool = True) -> None:
        self.keep_latencies = latencies  # only when the expression asks for them
        self.slots = slots
        self.width = width
        self.codes: list[dict[int, int]] = [{} for _ in range(slots)]
        self.code_epochs = [-1] * slots
        self.latencies: list[dict[int, int]] = [{} for _ in range(6)]
        self.latency_epochs = [-1] * 6

    def record(self, status: int, seconds: float, now: float) -> None:
        epoch = int(now / self.width)
        slot = epoch % self.slots
        if self.code_epochs[slot] != epoch:
            self.code_epochs[slot] = epoch
            self.codes[slot] = {}
        codes = self.codes[slot]
        codes[status] = codes.get(status, 0) + 1
        if not self.keep_latencies:
            return
        epoch = int(now * 0.1)
        slot = epoch % 6
        if self.latency_epochs[slot] != epoch:
            self.latency_epochs[slot] = epoch
            self.latencies[slot] = {}
        latencies = self.latencies[slot]
        ms = int(seconds * 1000.0)
        if ms >= 100:
            ms = _round_ms(ms)
        latencies[ms] = latencies.get(ms, 0) + 1

    def reset(self) -> None:
        self.code_epochs = [-1] * self.slots
        self.latency_epochs = [-1] * 6

    def view(self, now: float) -> WindowView:
        epoch = int(now / self.width)
        codes: Counter[int] = Counter()
        for slot, counts in enumerate(self.codes):
            if 0 <= epoch - self.code_epochs[slot] < self.slots:
                codes.update(counts)
        epoch = int(now / 10.0)
        latencies: Counter[int] = Counter()
        for slot, counts in enumerate(self.latencies):
            if 0 <= epoch - self.latency_epochs[slot] < 6:
                latencies.update(counts)
        return WindowView(codes, latencies)


class WindowView:
    """The metric functions of the expression language, over one moment's windows."""

    def __init__(self, codes: Counter[int], latencies: Counter[int]) -> None:
        self.codes = codes
        self.latencies = latencies
        self.total = sum(codes.values())

    def network_error_ratio(self) -> float:
        if not self.total:
            return 0.0
        return (self.codes[502] + self.codes[504]) / self.total

    def response_code_ratio(self, start: int, end: int, div_start: int, div_end: int) -> float:
        dividend = sum(n for code, n in self.codes.items() if start <= code < end)
        divisor = sum(n for code, n in self.codes.items() if div_start <= code < div_end)
        return dividend / divisor if divisor else 0.0

    def latency_at_quantile_ms(self, quantile: float) -> float:
        count = sum(self.latencies.values())
        if not count:
            return 0.0
        rank = quantile / 100.0 * count
        seen = 0
        for value in sorted(self.latencies):
            seen += self.latencies[value]
            if seen >= rank:
                return float(value)
        return float(max(self.latencies))

    def request_count(self) -> int:
        return self.total


class BreakerState:
    """One breaker instance's state machine (kept across reloads while unchanged)."""

    def __init__(
        self,
        condition: Predicate,
        check_period: float,
        fallback: float,
        recovery: float,
        latencies: bool = True,
    ) -> None:
        self.condition = condition
        self.check_period = check_period
        self.fallback = fallback
        self.recovery = recovery
        self.state = STANDBY
        self.windows = RollingWindows(latencies=latencies)
        self.last_check = 0.0
        self.until = 0.0  # end of the tripped or recovering phase
        self.allowed = 0
        self.denied = 0

    def admit(self, now: float | None = None) -> bool:
        if self.state == STANDBY:
            return True
        if now is None:
            now = monotonic()
        if self.state == TRIPPED:
            if now < self.until:
                return False
            self.state = RECOVERING
            self.until = now + self.recovery
            self.allowed = self.denied = 0
        if self.state == RECOVERING:
            if now >= self.until:
                self.state = STANDBY
                return True
            return self._ramp(now)
        return True

    def _ramp(self, now: float) -> bool:
        """Recovering: let through a share of requests growing linearly over the phase."""
        elapsed = self.recovery - (self.until - now)
        target = 0.5 * elapsed / self.recovery if self.recovery > 0 else 1.0
        seen = self.allowed + self.denied
        if seen and self.allowed / seen >= target:
            self.denied += 1
            return False
        self.allowed += 1
        return True

    def observe(self, status: int, seconds: float, now: float) -> None:
        self.windows.record(status, seconds, now)
        if now - self.last_check < self.check_period or self.state == TRIPPED:
            return
        self.last_check = now
        if self.condition(self.windows.view(now)):
            self.trip(now)

    def trip(self, now: float) -> None:
        self.state = TRIPPED
        self.until = now + self.fallback
        self.windows.reset()


class NodeBreakerState(BreakerState):
    """The same breaker for every worker of a node: the windows are the sum of the workers'
    rows in shared memory and the state (standby, tripped until, recovering until) is one
    for the node (`cell`: a meshproxy.node.shared_windows.BreakerCell), so a breaker tripped
    by responses one worker saw answers the fallback in every worker, and they recover and
    close together. `state` and `until` mirror the node's as of this worker's last request.
    Used only with `--workers N`; one process keeps BreakerState."""

    def __init__(
        self,
        condition: Predicate,
        check_period: float,
        fallback: float,
        recovery: float,
        latencies: bool,
        cell: Any,
    ) -> None:
        super().__init__(condition, check_period, fallback, recovery, latencies)
        self.cell = cell
        self.phase_end = 0.0  # the recovering phase `allowed` and `denied` count in

    def admit(self, now: float | None = None) -> bool:
        if now is None:
            now = monotonic()
        shared, until = self.cell.phase(now, self.recovery)
        self.state = _STATE_NAMES[int(shared)]
        self.until = float(until)
        if self.state == STANDBY:
            return True
        if self.state == TRIPPED:
            return False
        if self.until != self.phase_end:  # a new recovering phase: this worker's ramp anew
            self.phase_end = self.until
            self.allowed = self.denied = 0
        return self._ramp(now)

    def observe(self, status: int, seconds: float, now: float) -> None:
        cell = self.cell
        if cell.record(status, seconds, now, self.check_period):  # the node's check is due
            codes, latencies = cell.view(now)
            if self.condition(WindowView(codes, latencies)):
                self.trip(now)

    def trip(self, now: float) -> None:
        self.cell.trip(now, self.fallback)
        self.state = TRIPPED
        self.until = now + self.fallback

    def retire(self) -> None:
        """A reload dropped this instance (BuildContext.keep did not keep it): its node
        entry is freed now, so a definition reverted to later starts fresh, as one process's
        new BreakerState does, and the slot serves another breaker at once."""
        self.cell.release()


def _breaker_state(
    key: str,
    condition: Predicate,
    check_period: float,
    fallback: float,
    recovery: float,
    latencies: bool,
    boundaries: list[int],
) -> BreakerState:
    """The node's breaker in a worker of a node (when there is room), else this process's.
    A node breaker gives its place in shared memory back when a reload drops it (retire);
    one no worker uses any more (its workers gone) keeps it 10 minutes past its phases."""
    horizon = 600.0 + fallback + recovery
    cell = SHARED_STATE[0](key, boundaries, latencies, horizon) if SHARED_STATE else None
    if cell is None:
        return BreakerState(condition, check_period, fallback, recovery, latencies)
    return NodeBreakerState(condition, check_period, fallback, recovery, latencies, cell)


def build_circuit_breaker(
    options: CircuitBreaker, next_handler: Handler, ctx: BuildContext
) -> Handler:
    if not options.expression:
        raise MiddlewareConfigError("expression", "an expression is required")
    try:
        condition = parse_expression(options.expression)
    except ExpressionError as exc:
        raise MiddlewareConfigError("expression", str(exc)) from None
    check_period = _duration(options.check_period, 0.1, "checkPeriod")
    fallback = _duration(options.fallback_duration, 10.0, "fallbackDuration")
    recovery = _duration(options.recovery_duration, 10.0, "recoveryDuration")
    status = options.response_code or 503
    if not 100 <= status <= 599 or reason_phrase(status) == b"Unknown":
        raise MiddlewareConfigError("responseCode", f"unknown status code {status}")
    body = reason_phrase(status)
    latencies = "LatencyAtQuantileMS" in options.expression
    key = f"{ctx.router}\0{ctx.name}\0{ctx.fingerprint.hex()}"
    boundaries = code_boundaries(options.expression)
    breaker = ctx.keep(
        lambda: _breaker_state(
            key, condition, check_period, fallback, recovery, latencies, boundaries
        )
    )
    if isinstance(breaker, NodeBreakerState):
        return _NodeBreakerHandler(breaker, next_handler, status, body, latencies).serve

    def circuit_breaker(ex: Exchange, finish: Finish) -> None:
        if breaker.state != STANDBY and not breaker.admit():
            ex.why = "breaker_open"
            ex.respond(status, body)
            finish(ex, None)
            return
        started = monotonic() if latencies else 0.0
        next_handler(ex, _Observation(breaker, started, finish).done)

    return circuit_breaker


class _NodeBreakerHandler:
    """The handler of a node breaker: asks the node's state on every request (one process's
    handler reads its own `state` attribute, which a node breaker only mirrors)."""

    __slots__ = ("body", "breaker", "latencies", "next_handler", "status")

    def __init__(
        self,
        breaker: NodeBreakerState,
        next_handler: Handler,
        status: int,
        body: bytes,
        latencies: bool,
    ) -> None:
        self.breaker = breaker
        self.next_handler = next_handler
        self.status = status
        self.body = body
        self.latencies = latencies

    def serve(self, ex: Exchange, finish: Finish) -> None:
        breaker = self.breaker
        if not breaker.admit():
            ex.why = "breaker_open"
            ex.respond(self.status, self.body)
            finish(ex, None)
            return
        started = monotonic() if self.latencies else 0.0
        self.next_handler(ex, _Observation(breaker, started, finish).done)


class _Observation:
    """Feeds one request's outcome to the breaker. An object rather than a closure: compiled
    by mypyc, a closure and its environment form a reference cycle per request."""

    __slots__ = ("breaker", "finish", "started")

    def __init__(self, breaker: BreakerState, started: float, finish: Finish) -> None:
        self.breaker = breaker
        self.started = started
        self.finish = finish

    def done(self, ex: Exchange, exc: BaseException | None) -> None:
        now = monotonic()
        if exc is None:
            self.breaker.observe(ex.status or 500, now - self.started, now)
        elif isinstance(exc, ProxyError) and exc.status != 499:
            self.breaker.observe(exc.status, now - self.started, now)  # a client that left
        self.finish(ex, exc)


def _duration(value: float | None, default: float, path: str) -> float:
    if value is None:
        return default
    if value < 0:
        raise MiddlewareConfigError(path, "must not be negative")
    return float(value) or default
