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
from time import monotonic

from meshproxy.config.dynamic import Retry, RetryBudget
from meshproxy.http.errors import ClientGone, UpstreamConnectError
from meshproxy.http.exchange import Exchange
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
DEFAULT_REPLAY_LIMIT = 2 * 1024 * 1024


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
    return ctx.keep(lambda: RetryBudgetState(ratio, floor, window))


def build_retry(options: Retry, next_handler: Handler, ctx: BuildContext) -> Handler:
    attempts = options.attempts
    if attempts is None or attempts <= 0:
        raise MiddlewareConfigError("attempts", "must be > 0")
    initial = float(options.initial_interval or 0)
    if initial < 0:
        raise MiddlewareConfigError("initialInterval", "must not be negative")
    timeout = float(options.timeout or 0)
    statuses = parse_status_ranges(options.status or [])
    on_network = not options.disable_retry_on_network_error
    if not on_network and not statuses:
        raise MiddlewareConfigError(
            "disableRetryOnNetworkError", "with no `status` there would be nothing to retry"
        )
    replay_limit = options.max_request_body_bytes
    if replay_limit is None:
        replay_limit = DEFAULT_REPLAY_LIMIT
    status_methods = None if options.retry_non_idempotent_method else IDEMPOTENT
    budget = _budget(options.budget, ctx)
    metrics = ctx.metrics
    if attempts == 1:
        return next_handler  # one try is no retry at all

    def retry(ex: Exchange, finish: Finish) -> None:
        first = monotonic()
        if budget is not None:
            budget.record_request(first)
        original = ex.request.copy()  # inner middlewares edit the request; each try starts anew
        hooks = list(ex.response_hooks) if ex.response_hooks else None
        backoff = Backoff(initial, attempts)
        tries = 1

        def may_try_again() -> bool:
            now = monotonic()
            if tries >= attempts or (timeout and now - first >= timeout):
                return False
            return budget is None or budget.allows_retry(now)

        outer = ex.swallow  # a middleware in front may drop responses too (buffering)

        dropped_for_retry = False

        def retry_status(status: int, content_length: int | None) -> bool:
            nonlocal dropped_for_retry
            if outer is not None and outer(status, content_length):
                return True
            dropped_for_retry = (
                any(low <= status <= high for low, high in statuses)
                and may_try_again()
                and ex.rewind_body()
            )
            return dropped_for_retry

        retry_on_status = bool(statuses) and (
            status_methods is None or ex.request.method in status_methods
        )
        if retry_on_status:
            if ex.has_body:
                ex.keep_body_for_replay(replay_limit)
            ex.swallow = retry_status

        def try_done(ex: Exchange, exc: BaseException | None) -> None:
            nonlocal tries, dropped_for_retry
            if ex.client_gone:
                ex.swallow = outer
                finish(ex, exc or ClientGone())
                return
            again = dropped_for_retry or (
                on_network
                and isinstance(exc, UpstreamConnectError)
                and not ex.response_started
                and ex.body_untouched
                and may_try_again()
            )
            if not again:
                ex.swallow = outer
                finish(ex, exc)
                return
            tries += 1
            dropped_for_retry = False
            if budget is not None:
                budget.record_retry(monotonic())
            metrics.add_retry(ex.service or ctx.router)
            ex.swallowed_status = 0
            ex.request = original.copy()
            ex.response_hooks = list(hooks) if hooks else None
            delay = backoff.next()
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, start_try)
            else:
                start_try()

        def start_try() -> None:
            if ex.client_gone:
                ex.swallow = outer
                finish(ex, ClientGone())
                return
            next_handler(ex, try_done)

        start_try()

    return retry
