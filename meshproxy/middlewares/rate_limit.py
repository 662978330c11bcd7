"""rateLimit: a token bucket per source, as Traefik's (golang.org/x/time/rate semantics).

`average` tokens per `period` flow into a bucket of `burst` tokens. A request takes a token;
when the bucket is short, a request that would wait at most `maxDelay` is held that long, a
longer wait is answered 429 with Retry-After. Differences from Traefik, on purpose:
- `average` must be > 0 (Traefik reads 0 as "no limit"; a limiter that never limits is more
  likely a typo than a wish) and an explicit `burst` must be > 0.
- A bucket is forgotten once it would be full again (burst / rate after its last use), which is
  exact: a new bucket starts full. At most 65,536 sources are tracked; the least recently
  seen one is forgotten first.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable
from time import monotonic
from typing import Any

from meshproxy.config.durations import format_duration
from meshproxy.config.dynamic import RateLimit
from meshproxy.http.errors import ClientGone
from meshproxy.http.exchange import Exchange
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError
from meshproxy.middlewares.source import source_key_getter

MAX_SOURCES = 65536
TOO_MANY = b"Too Many Requests"

# Set by a worker process of a node (meshproxy.node.worker): makes the state of a rateLimit
# instance, (instance key, rate, burst) -> an object with reserve/cancel, in the buckets the
# node's workers share (meshproxy.node.shared_state), so the limit holds for the node.
SHARED_STATE: list[Callable[[str, float, int], Any]] = []


class TokenBucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiterState:
    """The buckets of one rateLimit instance (kept across reloads while unchanged)."""

    def __init__(self, rate: float, burst: int, max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.next_expiry = 0.0

    def reserve(self, source: str, now: float) -> float:
        """Take a token; returns how long the request must wait for it (0: go now)."""
        if now >= self.next_expiry:
            self.next_expiry = now + 0.5  # sweeping twice a second is plenty
            self._expire(now)
        buckets = self.buckets
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
            bucket = buckets[source] = TokenBucket(float(self.burst), now)
        else:
            buckets.move_to_end(source)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        bucket.tokens -= 1.0
        if bucket.tokens >= 0:
            return 0.0
        return -bucket.tokens / self.rate

    def tokens(self, source: str, now: float) -> float:
        """The tokens `source` has at `now`, changing nothing (the admin API's explain)."""
        bucket = self.buckets.get(source)
        if bucket is None:
            return float(self.burst)
        return min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)

    def cancel(self, source: str) -> None:
        """Give back the token of a reservation that was refused."""
        bucket = self.buckets.get(source)
        if bucket is not None:
            bucket.tokens += 1.0

    def _expire(self, now: float) -> None:
        buckets = self.buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            # full again (so equal to a new bucket) once the missing tokens have flowed in
            if (now - oldest.stamp) * self.rate < self.burst - oldest.tokens:
                return
            buckets.popitem(last=False)


def max_delay(rate: float) -> float:
    """How long Traefik holds a request rather than refusing it."""
    if rate >= 1:
        return 1.0 / (2 * int(rate))
    return 0.5


def build_rate_limit(options: RateLimit, next_handler: Handler, ctx: BuildContext) -> Handler:
    if options.average is None or options.average <= 0:
        raise MiddlewareConfigError("average", "must be a positive number of requests")
    if options.burst is not None and options.burst <= 0:
        raise MiddlewareConfigError("burst", "must be > 0")
    period = 1.0 if options.period is None or options.period == 0 else float(options.period)
    if period < 0:
        raise MiddlewareConfigError("period", "must be > 0")
    rate = options.average / period
    burst = options.burst or 1
    source_of = source_key_getter(options.source_criterion, "sourceCriterion")
    by_peer = options.source_criterion is None  # the common case: no getter call
    key = f"{ctx.router}\0{ctx.name}\0{ctx.fingerprint.hex()}"
    state: Any = ctx.keep(
        lambda: SHARED_STATE[0](key, rate, burst) if SHARED_STATE else RateLimiterState(rate, burst)
    )
    hold_limit = max_delay(rate)

    def go_on(ex: Exchange, finish: Finish) -> None:
        if ex.client_gone:
            finish(ex, ClientGone())
            return
        next_handler(ex, finish)

    def rate_limit(ex: Exchange, finish: Finish) -> None:
        source = ex.request.client_ip if by_peer else source_of(ex.request)
        delay = state.reserve(source, monotonic())
        if delay == 0.0:
            next_handler(ex, finish)
        elif delay <= hold_limit:
            asyncio.get_running_loop().call_later(delay, go_on, ex, finish)
        else:
            state.cancel(source)
            ex.why = "rate_limited"
            ex.respond(
                429,
                TOO_MANY,
                [
                    (b"retry-after", str(math.ceil(delay)).encode()),
                    (b"x-retry-in", format_duration(delay).encode()),
                ],
            )
            finish(ex, None)

    return rate_limit
