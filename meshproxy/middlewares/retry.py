"""retry: try the request again, on the next server, when it failed before reaching a backend.

As Traefik: `attempts` is the total number of tries; a try is retried only when no request byte
reached the backend (connection refused, dial timeout), the chain behind the middleware is run
again (so the load balancer picks the next server), and retries wait `initialInterval` with
Traefik's exponential backoff. Every retry counts in `traefik_service_retries_total`.

Beyond Traefik's classic retry (as in its v3.7 `status` option): responses whose code is in
`status` are retried for idempotent methods, with the request body kept for replay up to
`maxRequestBodyBytes`; the discarded response never reaches the client. And a retry budget
(`budget`, a meshproxy extension) caps retries at a share of the traffic, so that retries can
never multiply an outage.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from time import monotonic
from typing import Any

from meshproxy.config.dynamic import Retry, RetryBudget
from meshproxy.http.errors import ClientGone, UpstreamConnectError
from meshproxy.http.exchange import Exchange
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
DEFAULT_REPLAY_LIMIT = 2 * 1024 * 1024

# Set by a worker process of a node (meshproxy.node.worker): (instance key, window) -> the
# budget's counts in the memory the node's workers share (meshproxy.node.shared_windows), or
# None when there is no room; so a budget holds for the node, not once per worker.
SHARED_STATE: list[Callable[[str, float], Any]] = []


class Backoff:
    """cenkalti/backoff's exponential backoff with Traefik's multiplier, ±50% jitter."""

    def __init__(self, initial: float, attempts: int) -> None:
        self.interval = initial
        self.multiplier = 2 ** (1 / (attempts - 1)) if attempts > 1 else 2.0

    def next(self) -> float:
        if self.interval <= 0:
            return 0.0
        interval = self.interval
        self.interval = min(interval * self.multiplier, 60.0)
        return interval * (0.5 + random.random())


class RetryBudgetState:
    """Requests and retries over a rolling window of 10 slots."""

    def __init__(self, ratio: float, min_per_second: int, window: float) -> None:
        self.ratio = ratio
        self.floor = min_per_second * window
        self.width = window / 10
        self.epochs = [-1] * 10
        self.requests = [0] * 10
        self.retries = [0] * 10

    def _slot(self, now: float) -> int:
        epoch = int(now / self.width)
        slot = epoch % 10
        if self.epochs[slot] != epoch:
            self.epochs[slot] = epoch
            self.requests[slot] = 0
            self.retries[slot] = 0
        return slot

    def _totals(self, now: float) -> tuple[int, int]:
        epoch = int(now / self.width)
        live = [i for i in range(10) if 0 <= epoch - self.epochs[i] < 10]
        return sum(self.requests[i] for i in live), sum(self.retries[i] for i in live)

    def record_request(self, now: float) -> None:
        self.requests[self._slot(now)] += 1

    def allows_retry(self, now: float) -> bool:
        requests, retries = self._totals(now)
        return retries < max(self.floor, self.ratio * requests)

    def record_retry(self, now: float) -> None:
        self.retries[self._slot(now)] += 1


class NodeRetryBudget(RetryBudgetState):
    """The same budget counted over every worker of a node: each worker counts in its own
    row of shared memory (`cell`: a meshproxy.node.shared_windows.BudgetCell) and a retry is
    allowed against the rows' sum. Used only with `--workers N`; one process keeps
    RetryBudgetState's lists."""

    def __init__(self, ratio: float, min_per_second: int, window: float, cell: Any) -> None:
        super().__init__(ratio, min_per_second, window)
        self.cell = cell

    def _totals(self, now: float) -> tuple[int, int]:
        requests, retries = self.cell.totals(now)
        return int(requests), int(retries)

    def record_request(self, now: float) -> None:
        self.cell.record(now, False)

    def record_retry(self, now: float) -> None:
        self.cell.record(now, True)

    def retire(self) -> None:
        """A reload dropped this instance: its node entry is freed now (as
        NodeBreakerState.retire), so the definition, if it comes back, counts afresh."""
        self.cell.release()


def _budget_state(key: str, ratio: float, min_per_second: int, window: float) -> RetryBudgetState:
    """The node's budget in a worker of a node (when there is room), else this process's."""
    cell = SHARED_STATE[0](key, window) if SHARED_STATE else None
    if cell is None:
        return RetryBudgetState(ratio, min_per_second, window)
    return NodeRetryBudget(ratio, min_per_second, window, cell)


def parse_status_ranges(values: list[str]) -> list[tuple[int, int]]:
    ranges = []
    for index, value in enumerate(values):
        low, sep, high = value.strip().partition("-")
        try:
            start = int(low)
            end = int(high) if sep else start
        except ValueError:
            raise MiddlewareConfigError(
                f"status[{index}]", f"{value!r} is not a status code or a range like 500-599"
            ) from None
        if not 100 <= start <= end <= 599:
            raise MiddlewareConfigError(f"status[{index}]", f"{value!r} is not within 100-599")
        ranges.append((start, end))
    return ranges


def _budget(options: RetryBudget | None, ctx: BuildContext) -> RetryBudgetState | None:
    if options is None:
        return None
    ratio = 0.2 if options.ratio is None else options.ratio
    if not 0 <= ratio <= 1:
        raise MiddlewareConfigError("budget.ratio", "must be within 0..1")
    floor = 10 if options.min_retries_per_second is None else options.min_retries_per_second
    if floor < 0:
        raise MiddlewareConfigError("budget.minRetriesPerSecond", "must not be negative")
    window = 10.0 if not options.window else float(options.window)
    if window <= 0:
        raise MiddlewareConfigError("budget.window", "must be > 0")
    key = f"{ctx.router}\0{ctx.name}\0{ctx.fingerprint.hex()}"
    return ctx.keep(lambda: _budget_state(key, ratio, floor, window))


class RetryPolicy:
    """The options of one retry instance, compiled."""

    __slots__ = (
        "attempts",
        "budget",
        "initial",
        "metrics",
        "next_handler",
        "on_network",
        "replay_limit",
        "router",
        "status_methods",
        "statuses",
        "timeout",
    )

    def __init__(self, options: Retry, next_handler: Handler, ctx: BuildContext) -> None:
        attempts = options.attempts
        if attempts is None or attempts <= 0:
            raise MiddlewareConfigError("attempts", "must be > 0")
        self.attempts = attempts
        self.initial = float(options.initial_interval or 0)
        if self.initial < 0:
            raise MiddlewareConfigError("initialInterval", "must not be negative")
        self.timeout = float(options.timeout or 0)
        self.statuses = parse_status_ranges(options.status or [])
        self.on_network = not options.disable_retry_on_network_error
        if not self.on_network and not self.statuses:
            raise MiddlewareConfigError(
                "disableRetryOnNetworkError", "with no `status` there would be nothing to retry"
            )
        limit = options.max_request_body_bytes
        self.replay_limit = DEFAULT_REPLAY_LIMIT if limit is None else limit
        self.status_methods = None if options.retry_non_idempotent_method else IDEMPOTENT
        self.budget = _budget(options.budget, ctx)
        self.metrics = ctx.metrics
        self.router = ctx.router
        self.next_handler = next_handler

    def serve(self, ex: Exchange, finish: Finish) -> None:
        tries = _Tries(self, ex, finish)
        if self.budget is not None:
            self.budget.record_request(tries.first)
        methods = self.status_methods
        if self.statuses and (methods is None or ex.request.method in methods):
            if ex.has_body:
                ex.keep_body_for_replay(self.replay_limit)
            ex.swallow = tries.retry_status
        self.next_handler(ex, tries.try_done)


class _Tries:
    """One request's tries. Holds no reference cycle: `ex.swallow` (the only way back to this
    object from the exchange) is reset before `finish`, so it is freed without the GC."""

    __slots__ = (
        "backoff",
        "checkpoint",
        "dropped_for_retry",
        "ex",
        "finish",
        "first",
        "hooks",
        "outer",
        "policy",
        "tries",
    )

    def __init__(self, policy: RetryPolicy, ex: Exchange, finish: Finish) -> None:
        self.policy = policy
        self.ex = ex
        self.finish = finish
        # the clock is read only when a timeout or a budget needs it
        self.first = monotonic() if policy.timeout or policy.budget is not None else 0.0
        self.tries = 1
        self.backoff: Backoff | None = None
        # Inner middlewares edit the request (paths, headers): each try starts from here.
        self.checkpoint = ex.request.checkpoint()
        self.hooks = list(ex.response_hooks) if ex.response_hooks else None
        self.outer = ex.swallow  # a middleware in front may drop responses too (buffering)
        self.dropped_for_retry = False

    def may_try_again(self) -> bool:
        policy = self.policy
        now = monotonic()
        if self.tries >= policy.attempts or (policy.timeout and now - self.first >= policy.timeout):
            return False
        return policy.budget is None or policy.budget.allows_retry(now)

    def retry_status(self, status: int, content_length: int | None) -> bool:
        outer = self.outer
        if outer is not None and outer(status, content_length):
            return True
        self.dropped_for_retry = (
            any(low <= status <= high for low, high in self.policy.statuses)
            and self.may_try_again()
            and self.ex.rewind_body()
        )
        return self.dropped_for_retry

    def try_done(self, ex: Exchange, exc: BaseException | None) -> None:
        if ex.client_gone:
            self.end(exc or ClientGone())
            return
        again = self.dropped_for_retry or (
            self.policy.on_network
            and isinstance(exc, UpstreamConnectError)
            and not ex.response_started
            and ex.body_untouched
            and self.may_try_again()
        )
        if not again:
            self.end(exc)
            return
        policy = self.policy
        self.tries += 1
        self.dropped_for_retry = False
        if policy.budget is not None:
            policy.budget.record_retry(monotonic())
        policy.metrics.add_retry(ex.service or policy.router)
        ex.retries += 1
        ex.swallowed_status = 0
        ex.request.restore(self.checkpoint)
        ex.response_hooks = list(self.hooks) if self.hooks else None
        if self.backoff is None:
            self.backoff = Backoff(policy.initial, policy.attempts)
        delay = self.backoff.next()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.try_again)
        else:
            self.try_again()

    def try_again(self) -> None:
        if self.ex.client_gone:
            self.end(ClientGone())
            return
        self.policy.next_handler(self.ex, self.try_done)

    def end(self, exc: BaseException | None) -> None:
        ex = self.ex
        ex.swallow = self.outer
        self.finish(ex, exc)


def build_retry(options: Retry, next_handler: Handler, ctx: BuildContext) -> Handler:
    policy = RetryPolicy(options, next_handler, ctx)
    if policy.attempts == 1:
        return next_handler  # one try is no retry at all
    return policy.serve
