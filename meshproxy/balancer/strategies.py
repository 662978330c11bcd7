"""How a loadBalancer picks a server: smooth weighted round robin, power of two choices on
in-flight requests (Traefik v3's `strategy: p2c`), and peak-EWMA P2C (Linkerd's balancer).

Every strategy picks an *index* into the service's server list among the servers that are up
(`set_up`), honours weights, and returns -1 when no server is up. The per-server numbers the
load-aware strategies read (in-flight requests, the latency estimate) live in `ServerState`,
one object per (service, server URL) that a reload hands on to the next balancer while the
server stays configured: in-flight requests started before a reload end on the same counter,
so a reload neither forgets a loaded server (traefik/traefik#13913: Traefik's p2c starts every
counter at zero after a reload and sends a third of the traffic back to the busy server) nor
leaves a counter that never comes down.

Strategies and their `strategy:` names:

- `wrr` (and unset: the default, as in Traefik): nginx's smooth weighted round robin
  (balancer.wrr). Deterministic, and exactly proportional to the weights.
- `p2c`: Traefik v3.4's power of two random choices: two distinct up servers drawn at random,
  the one with fewer in-flight requests wins, the first drawn on a tie. Traefik ignores
  weights here; we draw the two candidates in proportion to their weights and compare
  in-flight requests per unit of weight, which is Traefik's behaviour whenever the weights are
  equal (the only case Traefik Mesh produces).
- `ewma` (meshproxy extension): peak-EWMA P2C as Linkerd's proxy (Finagle's "PeakEwma"):
  the cost of a server is its latency estimate times (in-flight + 1); the estimate jumps to any
  slower sample at once (peak) and decays toward faster ones with time constant `decay`
  (10 s), and decays toward zero while the server gets no traffic, so a server that was slow
  is tried again after a while. A server never observed starts at `DEFAULT_RTT` (30 ms, as
  Linkerd). Weights are read as capacities: candidates are drawn in proportion to them and
  the cost is divided by them, so under load equal servers get traffic in proportion to
  their weights (an idle service's requests go to the cheapest of the two drawn).
  Per-server latency must be measured per server: the circuit breaker's
  `LatencyAtQuantileMS` windows are per middleware (the whole service), so they cannot tell a
  slow pod from a fast one and are not used here.

Clocks are seconds on `time.perf_counter`'s scale; tests pass their own `now`.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Sequence
from time import perf_counter

from meshproxy.balancer.wrr import SmoothWeightedRoundRobin

DEFAULT_RTT = 0.030  # seconds: the estimate of a server never observed (Linkerd's default)
DEFAULT_DECAY = 10.0  # seconds: the EWMA time constant (Linkerd's default)

_exp = math.exp

STRATEGIES = ("wrr", "p2c", "ewma")


class ServerState:
    """What outlives one balancer about one server of one service: in-flight requests, the
    peak-EWMA latency estimate, and the passive outlier detector's counters (balancer.outlier).

    `healthy` is the active health check's verdict (True when there is no check), `ejected`
    the outlier detector's; the server takes traffic when healthy and not ejected."""

    __slots__ = (
        "consecutive_failures",
        "ejected",
        "ejected_until",
        "ejections",
        "failure_times",
        "healthy",
        "in_flight",
        "last_ejection",
        "rtt",
        "stamp",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.in_flight = 0
        self.rtt = DEFAULT_RTT  # seconds, as of `stamp`
        self.stamp = -1.0  # perf_counter time of the last sample; < 0: never observed
        self.healthy = True
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0  # ejections in a row: the back-off grows with them
        self.last_ejection = 0.0
        self.consecutive_failures = 0
        self.failure_times: list[float] = []  # passiveHealthCheck: failures in its window

    @property
    def available(self) -> bool:
        return self.healthy and not self.ejected

    def observe(self, seconds: float, now: float, decay: float = DEFAULT_DECAY) -> None:
        """Fold one response time into the peak-EWMA estimate (Finagle/Linkerd PeakEwma): a
        slower sample replaces the estimate at once; a faster one moves it by a weight that
        grows with the time since the last sample."""
        if self.stamp < 0.0 or seconds > self.rtt:
            self.rtt = seconds
        else:
            weight = math.exp(-max(now - self.stamp, 0.0) / decay)
            self.rtt = self.rtt * weight + seconds * (1.0 - weight)
        self.stamp = now

    def estimate(self, now: float, decay: float = DEFAULT_DECAY) -> float:
        """The latency estimate at `now`: decayed toward zero since the last sample, so a
        server shunned for being slow is tried again after a few `decay` periods."""
        if self.stamp < 0.0:
            return self.rtt
        return self.rtt * math.exp(-max(now - self.stamp, 0.0) / decay)


class Strategy(ABC):
    """The common part: the servers, their weights, which are up. Subclasses pick."""

    name = ""

    def __init__(self, states: Sequence[ServerState], weights: Sequence[int]) -> None:
        self.states = list(states)
        self.weights = [max(int(w), 0) for w in weights]
        self._up: list[int] = []  # indexes of servers that are up and have weight
        self._cumulative: list[int] = []  # running sum of the up servers' weights
        self._total = 0
        self._equal = True  # all up servers have the same weight: uniform draws
        self.refresh()

    def refresh(self) -> None:
        """Recompute the up list from the states (after a health or ejection change)."""
        self._up = [i for i, s in enumerate(self.states) if s.available and self.weights[i] > 0]
        total = 0
        cumulative = []
        for i in self._up:
            total += self.weights[i]
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total
        self._equal = len({self.weights[i] for i in self._up}) <= 1

    def any_up(self) -> bool:
        return bool(self._up)

    @abstractmethod
    def pick(self) -> int:
        """The index of the server for the next request (among those up)."""

    def adopt(self, previous: Strategy) -> None:  # noqa: B027 (a default that keeps nothing)
        """Take over what the previous balancer of the same service knew (the rotation);
        only the round robin has something to take over."""


class RoundRobin(Strategy):
    """Smooth weighted round robin (nginx): Traefik's `wrr`."""

    name = "wrr"

    def __init__(self, states: Sequence[ServerState], weights: Sequence[int]) -> None:
        self._wrr: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin(
            [(i, w) for i, w in enumerate(weights)]
        )
        super().__init__(states, weights)

    def refresh(self) -> None:
        super().refresh()
        for i, state in enumerate(self.states):
            if self.weights[i] > 0:
                self._wrr.set_up(i, state.available)

    def pick(self) -> int:
        index = self._wrr.pick()
        return -1 if index is None else index

    def adopt(self, previous: Strategy) -> None:
        if isinstance(previous, RoundRobin) and previous.weights == self.weights:
            self._wrr.adopt_position(previous._wrr)
            self.refresh()  # the up/down marks are the states', not the old balancer's


class PowerOfTwo(Strategy):
    """Traefik's `p2c`: the less loaded (in-flight per weight) of two random up servers."""

    name = "p2c"

    def __init__(
        self,
        states: Sequence[ServerState],
        weights: Sequence[int],
        rng: random.Random | None = None,
    ) -> None:
        self.rng = rng or random.Random()
        super().__init__(states, weights)

    def _two(self) -> tuple[int, int]:
        """Two distinct up servers, each drawn in proportion to its weight (the second among
        the rest). Call only with at least two up servers."""
        up = self._up
        rand = self.rng.random
        if self._equal:
            n = len(up)
            a = int(rand() * n)
            b = int(rand() * (n - 1))
            if b >= a:
                b += 1
            return up[a], up[b]
        cumulative = self._cumulative
        a = bisect_right(cumulative, rand() * self._total)
        # The second draw skips the first's span of the cumulative weights.
        weight_a = self.weights[up[a]]
        start_a = cumulative[a] - weight_a
        r = rand() * (self._total - weight_a)
        if r >= start_a:
            r += weight_a
        b = bisect_right(cumulative, r)
        if b == a:  # floating point at a span's edge
            b = (a + 1) % len(up)
        return up[a], up[b]

    def pick(self) -> int:
        up = self._up
        n = len(up)
        if n < 2:
            return up[0] if n else -1
        states = self.states
        if self._equal:  # the common case, inlined: one call less per request
            rand = self.rng.random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1
            a = up[i]
            b = up[j]
            # b wins only when strictly less loaded, as Traefik keeps the first on a tie
            return b if states[b].in_flight < states[a].in_flight else a
        a, b = self._two()
        weights = self.weights
        if states[b].in_flight * weights[a] < states[a].in_flight * weights[b]:
            return b
        return a


class PeakEWMA(PowerOfTwo):
    """Linkerd's balancer: P2C on latency estimate x (in-flight + 1), per unit of weight."""

    name = "ewma"

    def __init__(
        self,
        states: Sequence[ServerState],
        weights: Sequence[int],
        rng: random.Random | None = None,
        decay: float = DEFAULT_DECAY,
        clock: object = perf_counter,
    ) -> None:
        self.decay = decay
        self.clock = clock
        super().__init__(states, weights, rng)

    def cost(self, index: int, now: float) -> float:
        """Latency estimate at `now` x (in-flight + 1) / weight."""
        state = self.states[index]
        return state.estimate(now, self.decay) * (state.in_flight + 1) / self.weights[index]

    def pick(self) -> int:
        up = self._up
        if len(up) < 2:
            return up[0] if up else -1
        a, b = self._two()
        now: float = self.clock()  # type: ignore[operator]
        # cost(), inlined: this runs for every request
        sa = self.states[a]
        sb = self.states[b]
        inverse = -1.0 / self.decay
        cost_a = sa.rtt * (sa.in_flight + 1)
        if sa.stamp >= 0.0:
            cost_a *= _exp((now - sa.stamp) * inverse)
        cost_b = sb.rtt * (sb.in_flight + 1)
        if sb.stamp >= 0.0:
            cost_b *= _exp((now - sb.stamp) * inverse)
        if self._equal:
            return b if cost_b < cost_a else a
        weights = self.weights
        return b if cost_b * weights[a] < cost_a * weights[b] else a


def make_strategy(
    name: str | None,
    states: Sequence[ServerState],
    weights: Sequence[int],
    rng: random.Random | None = None,
) -> Strategy:
    """The strategy named in the config (None or "" is `wrr`, as Traefik). Raises ValueError
    for a name we do not know, listing the ones we do."""
    key = (name or "wrr").lower()
    if key == "wrr":
        return RoundRobin(states, weights)
    if key == "p2c":
        return PowerOfTwo(states, weights, rng)
    if key == "ewma":
        return PeakEWMA(states, weights, rng)
    raise ValueError(
        f"load-balancer strategy {name!r} is not supported (supported: {', '.join(STRATEGIES)})"
    )
