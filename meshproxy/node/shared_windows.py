"""Circuit breakers and retry budgets that hold for the node (issue 15 point 2).

With `--workers N` each worker would otherwise keep its own breaker (it sees 1/N of the
traffic and trips and recovers on its own) and its own retry budget (whose
minRetriesPerSecond the node would then allow N times). Here both live in the node's shared
memory (the memfd of meshproxy.node.shared_state, after the token buckets), so each worker
reads and writes the same counts.

Layout: two tables of instances, breakers and budgets. An instance is a 64-byte header and
MAX_ROWS rows, one per worker (the worker's index). Only its worker writes a row, without a
lock: that is the hot path (a response recorded, a request counted: a few struct reads and
writes in the mapping, no system call). Readers add the rows up: a breaker when it evaluates
its expression (at most once per `checkPeriod` for the whole node), a budget when a retry is
considered. The header (key, generation, breaker state and the end of its phase, last check)
changes only under an exclusive flock(2), and rarely: when an instance is claimed, when a
breaker trips, recovers or closes, once per checkPeriod.

Error against one process seeing all the traffic:
- counts: a reader may miss increments a worker is writing at that instant (a row slot
  written while read), at most one per worker and read;
- retry budgets: a retry's check (enough budget left?) and its count are not one atomic step
  across workers, so N workers deciding in the same instant may each take the last retry:
  at most N-1 retries over the budget per window, as one process already can with
  concurrent status retries (the check is made at the response head, the count at its end);
- breakers: the expression is evaluated on the node's windows once per checkPeriod by
  whichever worker records a response first after it is due; a trip, a move to recovering
  and the close happen under the lock, so every worker answers from the same state at once.
  In recovering, each worker lets through its share of requests by the same linear ramp as
  one process, over its own requests (so the node's share follows the same ramp).

Instances are found by a hash of their identity (router, middleware, definition) with
linear probing over the whole table: a lookup goes on past released slots (their key is 0,
their generation not) and stops at a slot never used (generation 0), so every free slot can
serve and a table with room never refuses an instance (32 probes did, from about 300
instances: linear probing's clusters grow longer than that at that load).

A reload that drops an instance (its definition changed, or its router or middleware is gone:
what one process's BuildContext.keep would not keep) releases its slot at once (`release`):
the header is cleared, so the slot is free for any key and a later lookup of the same key
starts fresh (a definition reverted to comes back closed with empty windows, as in one process
and in Traefik, which rebuilds middlewares on every change). Every worker applies every
generation and releases the same instances: a release acts only on the entry its instance
attached to, named by the slot's `epoch` (bumped by each release and each new claim), so the
later releases are no-ops, and an instance of a worker still one generation behind, finding
its epoch gone, counts nothing and reads standby (detached) instead of writing into what may
already be another instance's slot. A detached instance claims a place again REFRESH seconds
later (a worker that keeps using it: the slot was taken over after `horizon` seconds unused,
or released by a worker that moved on); a released one never does. A slot whose owner has not
used it for `horizon` seconds (its windows are then empty and its breaker closed) can be taken
over as well: an owner gone without releasing (a worker killed in mid-reload). A table with no
free slot, or a worker index over MAX_ROWS, leaves that instance per worker, with a warning.
The region is large in address space (~450 MiB) but sparse: memory is used for the pages
written, about 4-16 KiB per instance and worker.

Written by hand: no library offers lock-free per-process rows in an inherited memfd.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import struct
from collections import Counter
from time import monotonic

log = logging.getLogger("meshproxy.node")

MAX_ROWS = 64  # workers sharing an instance (a worker index above this keeps its own)
PAGE = 4096

STANDBY, TRIPPED, RECOVERING = 0, 1, 2

# key, generation, expires, state, epoch (which claim of the slot: see `release`), rows
# (bitmap of the workers that joined), until (end of the tripped or recovering phase), last
# check; padded to 64 bytes. Key 0: a free slot.
_HEADER = struct.Struct("<QQdII Qdd8x")
HEADER = _HEADER.size
_KEY_GEN = struct.Struct("<QQ")
_KEY_GEN_EPOCH = struct.Struct("<QQ12xI")
# The header fields the hot path reads, in one unpack each: (key, generation, state, epoch,
# last check) when a response is recorded, (key, state, epoch, until) when a request is
# admitted.
_RECORDING = struct.Struct("<QQ8xII8x8xd8x")
_ADMITTING = struct.Struct("<Q16xII8xd16x")
_EPOCHS = 1 << 32
_EXPIRES = struct.Struct("<d")
_EXPIRES_AT = 16
_STAMP = struct.Struct("<qQ")  # a row slot's epoch and the generation it counts for
_U32 = struct.Struct("<I")

# Breakers: response codes over 10 x 1 s, latencies over 6 x 10 s (as oxy and
# middlewares.circuit_breaker.RollingWindows). Codes are counted per class: the intervals
# between the codes the expression's ResponseCodeRatio() calls name (plus 502 and 504 on
# their own for NetworkErrorRatio()), which answers every ratio of that expression exactly.
CODE_SLOTS, CODE_WIDTH = 10, 1.0
LATENCY_SLOTS, LATENCY_WIDTH = 6, 10.0
CLASSES = 48
# Latencies in milliseconds as RollingWindows keeps them: exact below 100 ms, two
# significant digits above, up to 990,000 ms (longer ones count there).
LATENCY_BUCKETS = 100 + 4 * 90
CODE_SLOT = _STAMP.size + 4 * CLASSES
_LATENCIES = struct.Struct(f"<{LATENCY_BUCKETS}I")
LATENCY_SLOT = _STAMP.size + 4 * LATENCY_BUCKETS
BREAKER_ROW = CODE_SLOTS * CODE_SLOT + LATENCY_SLOTS * LATENCY_SLOT
BREAKER_STRIDE = -(-(HEADER + MAX_ROWS * BREAKER_ROW) // PAGE) * PAGE
BREAKERS = 512

# Retry budgets: requests and retries over 10 slots of window/10.
BUDGET_SLOTS = 10
_BUDGET_SLOT = struct.Struct("<qQII")  # epoch, generation, requests, retries
BUDGET_ROW = BUDGET_SLOTS * _BUDGET_SLOT.size
BUDGET_STRIDE = HEADER + MAX_ROWS * BUDGET_ROW
BUDGETS = 1024

BREAKER_TABLE = 0
BUDGET_TABLE = BREAKERS * BREAKER_STRIDE
REGION_BYTES = BUDGET_TABLE + BUDGETS * BUDGET_STRIDE

REFRESH = 10.0  # seconds between an owner's refreshes of its slot's `expires`
_ZERO_CODES = bytes(CODE_SLOT - _STAMP.size)
_ZERO_LATENCIES = bytes(LATENCY_SLOT - _STAMP.size)


def latency_bucket(ms: int) -> int:
    """The bucket of a latency in whole milliseconds (see LATENCY_BUCKETS)."""
    if ms < 100:
        return ms if ms > 0 else 0
    index = 100
    scale = 1
    while ms >= 1000 * scale:
        scale *= 10
        index += 90
    if index >= LATENCY_BUCKETS:
        return LATENCY_BUCKETS - 1
    return index + ms // scale // 10 - 10


def _bucket_values() -> list[int]:
    values = list(range(100))
    scale = 10
    while len(values) < LATENCY_BUCKETS:
        values.extend(lead * scale for lead in range(10, 100))
        scale *= 10
    return values[:LATENCY_BUCKETS]


LATENCY_VALUES = _bucket_values()


def code_classes(boundaries: list[int]) -> tuple[list[int], list[int]] | None:
    """(class of each code 0-599, lowest code of each class) for an expression whose
    ResponseCodeRatio() ranges start or end at `boundaries`; None over CLASSES classes."""
    edges = {100, 600, 502, 503, 504, 505}
    edges.update(min(600, max(100, b)) for b in boundaries)
    starts = sorted(edges)[:-1]  # 600 ends the last class
    if len(starts) > CLASSES:
        return None
    class_of = [0] * 600
    for index, start in enumerate(starts):
        for code in range(start, 600):
            class_of[code] = index
    return class_of, starts


def _hash(key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1  # 0 marks a slot never used


class NodeWindows:
    """One worker's view of the breakers' and budgets' region of the node's memfd.

    `fd`: this process's own description of the file (flock excludes other workers through
    it); `offset`, `size`: where the region is; `row`: the worker's index."""

    def __init__(self, fd: int, offset: int, size: int, row: int) -> None:
        self.fd = fd
        self.row = row
        # mmap offsets must be page aligned: the region starts on a 2 MiB boundary.
        self.map = mmap.mmap(fd, size, offset=offset)
        self.warned = False

    def close(self) -> None:
        self.map.close()

    def lock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _unshared(self, what: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning(
                "worker %d: %s is kept per worker (no room in the node's shared table or "
                "a worker index over %d): it does not see the node's traffic",
                self.row,
                what,
                MAX_ROWS,
            )

    def claim(
        self, table: int, stride: int, count: int, key: int, now: float, horizon: float
    ) -> tuple[int, int] | None:
        """(offset, epoch) of the instance `key` in a table, joined by this worker's row (a
        new one taken when none exists), or None when the table has no slot for it."""
        if self.row >= MAX_ROWS:
            return None
        m = self.map
        start = key % count
        free = -1
        self.lock()
        try:
            for probe in range(count):
                offset = table + (start + probe) % count * stride
                found, gen, expires, state, epoch, rows, until, checked = _HEADER.unpack_from(
                    m, offset
                )
                if gen == 0:  # never used: the key is not further on
                    if free < 0:
                        free = offset
                    break
                if found == key:
                    _HEADER.pack_into(
                        m,
                        offset,
                        key,
                        gen,
                        max(expires, now + horizon),
                        state,
                        epoch,
                        rows | 1 << self.row,
                        until,
                        checked,
                    )
                    return offset, epoch
                if free < 0 and (found == 0 or expires < now):
                    free = offset
            if free < 0:
                return None
            # A new generation: the rows' slots counted for the previous owner are ignored;
            # a new epoch: the previous owner's instances find the slot no longer theirs.
            _, gen, epoch = _KEY_GEN_EPOCH.unpack_from(m, free)
            epoch = (epoch + 1) % _EPOCHS
            _HEADER.pack_into(
                m, free, key, gen + 1, now + horizon, STANDBY, epoch, 1 << self.row, 0, 0
            )
            return free, epoch
        finally:
            self.unlock()

    def release(self, offset: int, key: int, epoch: int) -> bool:
        """Free the slot at `offset` if it still holds the entry (`key`, `epoch`) an instance
        attached to: a new generation and epoch, so its rows' counts and every instance
        attached to it are stale, and key 0, so any key may claim it and a later claim of
        `key` starts closed with empty windows. False (nothing done) when another worker
        released it already, or it was since claimed again."""
        m = self.map
        self.lock()
        try:
            found, gen, _, _, current, _, _, _ = _HEADER.unpack_from(m, offset)
            if found != key or current != epoch:
                return False
            _HEADER.pack_into(m, offset, 0, gen + 1, 0.0, STANDBY, (epoch + 1) % _EPOCHS, 0, 0, 0)
            return True
        finally:
            self.unlock()

    def budget(self, key: str, window: float) -> BudgetCell | None:
        cell = BudgetCell(self, _hash(key), window)
        if cell.offset is None:
            self._unshared(f"retry budget {key.split(chr(0))[1]!r}")
            return None
        return cell

    def breaker(
        self, key: str, boundaries: list[int], latencies: bool, horizon: float
    ) -> BreakerCell | None:
        classes = code_classes(boundaries)
        cell = (
            None if classes is None else BreakerCell(self, _hash(key), classes, latencies, horizon)
        )
        if cell is None or cell.offset is None:
            self._unshared(f"circuit breaker {key.split(chr(0))[1]!r}")
            return None
        return cell


class _Cell:
    """What a node instance's place in a table is: the slot (`offset`) and the `epoch` it
    attached to, kept while the header still says so; detached (counting nothing) when it
    no longer does, until it claims a place again (see the module docstring)."""

    __slots__ = (
        "count",
        "epoch",
        "horizon",
        "key",
        "map",
        "next_refresh",
        "node",
        "offset",
        "released",
        "row",
        "row_bytes",
        "stride",
        "table",
    )

    def __init__(
        self,
        node: NodeWindows,
        key: int,
        horizon: float,
        table: int,
        stride: int,
        count: int,
        row_bytes: int,
    ) -> None:
        self.node = node
        self.map = node.map
        self.key = key
        self.horizon = horizon
        self.table = table
        self.stride = stride
        self.count = count
        self.row_bytes = row_bytes
        self.next_refresh = 0.0
        self.offset: int | None = None
        self.epoch = -1
        self.row = 0
        self.released = False
        self._claim(monotonic())

    def _claim(self, now: float) -> bool:
        """Take or join the instance's entry; False when the table has no slot for it (then
        detached, and tried again after REFRESH, not on every request)."""
        self.next_refresh = now + REFRESH
        found = self.node.claim(self.table, self.stride, self.count, self.key, now, self.horizon)
        if found is None:
            self.epoch = -1
            return False
        self.offset, self.epoch = found
        self.row = self.offset + HEADER + self.node.row * self.row_bytes
        return True

    def _own(self, now: float, key: int, epoch: int) -> bool:
        """Whether the instance holds its entry, the header read saying (`key`, `epoch`):
        its `expires` refreshed every REFRESH seconds; when the entry is another one (released
        by a worker that applied a reload first, or taken over after `horizon` unused), the
        instance is detached and claims a place again once REFRESH has passed, unless it was
        released itself."""
        if key == self.key and epoch == self.epoch:
            if now >= self.next_refresh:
                self.next_refresh = now + REFRESH
                _EXPIRES.pack_into(self.map, (self.offset or 0) + _EXPIRES_AT, now + self.horizon)
            return True
        if self.released or now < self.next_refresh:
            return False
        return self._claim(now)

    def release(self) -> None:
        """The reload dropped this instance: free its entry for the node now (idempotent
        across the workers, see NodeWindows.release); the instance counts nothing after."""
        if self.released:
            return
        self.released = True
        if self.offset is not None and self.epoch >= 0:
            self.node.release(self.offset, self.key, self.epoch)
        self.epoch = -1


class BudgetCell(_Cell):
    """A retry budget's requests and retries for the node (middlewares.retry.NodeRetryBudget)."""

    __slots__ = ("width",)

    def __init__(self, node: NodeWindows, key: int, window: float) -> None:
        self.width = window / BUDGET_SLOTS
        super().__init__(
            node, key, 600.0 + window, BUDGET_TABLE, BUDGET_STRIDE, BUDGETS, BUDGET_ROW
        )

    def _generation(self, now: float) -> int:
        """The entry's generation, or -1 when the instance is detached."""
        key, gen, epoch = _KEY_GEN_EPOCH.unpack_from(self.map, self.offset or 0)
        if key == self.key and epoch == self.epoch and now < self.next_refresh:
            return int(gen)
        if not self._own(now, key, epoch):
            return -1
        return int(_KEY_GEN.unpack_from(self.map, self.offset or 0)[1])

    def record(self, now: float, retry: bool) -> None:
        """Count a request (retry False) or a retry in this worker's row."""
        gen = self._generation(now)
        if gen < 0:
            return
        epoch = int(now / self.width)
        at = self.row + epoch % BUDGET_SLOTS * _BUDGET_SLOT.size
        stamp, slot_gen, requests, retries = _BUDGET_SLOT.unpack_from(self.map, at)
        if stamp != epoch or slot_gen != gen:
            requests = retries = 0
        if retry:
            retries += 1
        else:
            requests += 1
        _BUDGET_SLOT.pack_into(self.map, at, epoch, gen, requests, retries)

    def totals(self, now: float) -> tuple[int, int]:
        """(requests, retries) of the node over the window ending at `now`; (0, 0) while
        detached (the budget's floor applies)."""
        gen = self._generation(now)
        if gen < 0:
            return 0, 0
        offset = self.offset or 0
        rows = _HEADER.unpack_from(self.map, offset)[5]
        epoch = int(now / self.width)
        requests = retries = 0
        unpack = _BUDGET_SLOT.unpack_from
        m = self.map
        for row in range(MAX_ROWS):
            if not rows >> row & 1:
                continue
            at = offset + HEADER + row * BUDGET_ROW
            for slot in range(BUDGET_SLOTS):
                stamp, slot_gen, req, ret = unpack(m, at + slot * _BUDGET_SLOT.size)
                if slot_gen == gen and 0 <= epoch - stamp < BUDGET_SLOTS:
                    requests += req
                    retries += ret
        return requests, retries


class BreakerCell(_Cell):
    """A circuit breaker's windows and state for the node (middlewares.circuit_breaker.
    NodeBreakerState): the state machine's transitions happen here, under the lock. A
    detached instance (see _Cell) admits everything and records nothing."""

    __slots__ = ("class_of", "codes", "latencies", "starts")

    def __init__(
        self,
        node: NodeWindows,
        key: int,
        classes: tuple[list[int], list[int]],
        latencies: bool,
        horizon: float,
    ) -> None:
        self.class_of, self.starts = classes
        self.codes = struct.Struct(f"<{len(self.starts)}I")
        self.latencies = latencies
        super().__init__(node, key, horizon, BREAKER_TABLE, BREAKER_STRIDE, BREAKERS, BREAKER_ROW)

    def header(self, now: float) -> tuple[int, int, float, int, int, int, float, float] | None:
        """The instance's header, or None while it is detached."""
        key, _, epoch = _KEY_GEN_EPOCH.unpack_from(self.map, self.offset or 0)
        if not self._own(now, key, epoch):
            return None
        return _HEADER.unpack_from(self.map, self.offset or 0)

    def phase(self, now: float, recovery: float) -> tuple[int, float]:
        """(state, end of its phase) at `now`, after the transitions time made due: tripped
        past its fallback -> recovering for `recovery`; recovering past it -> standby."""
        key, state, epoch, until = _ADMITTING.unpack_from(self.map, self.offset or 0)
        if key != self.key or epoch != self.epoch or now >= self.next_refresh:
            if not self._own(now, key, epoch):
                return STANDBY, 0.0
            key, state, epoch, until = _ADMITTING.unpack_from(self.map, self.offset or 0)
        if state == STANDBY or now < until:
            return state, until
        node = self.node
        offset = self.offset or 0
        node.lock()
        try:
            key, gen, expires, state, epoch, rows, until, checked = _HEADER.unpack_from(
                self.map, offset
            )
            if key != self.key or epoch != self.epoch:  # released meanwhile
                return STANDBY, 0.0
            if state != STANDBY and now >= until:  # not already moved on by another worker
                if state == TRIPPED:
                    state, until = RECOVERING, now + recovery
                else:
                    state, until = STANDBY, 0.0
                _HEADER.pack_into(
                    self.map, offset, key, gen, expires, state, epoch, rows, until, checked
                )
        finally:
            node.unlock()
        return state, until

    def record(self, status: int, seconds: float, now: float, period: float = -1.0) -> bool:
        """Count one response of this worker: its code class, and its latency if needed.
        With a check `period` (>= 0): whether this worker evaluates the expression now
        (check_due, the header read once for both). Nothing while detached."""
        m = self.map
        key, gen, state, held, checked = _RECORDING.unpack_from(m, self.offset or 0)
        if key != self.key or held != self.epoch or now >= self.next_refresh:
            if not self._own(now, key, held):
                return False
            key, gen, state, held, checked = _RECORDING.unpack_from(m, self.offset or 0)
        epoch = int(now / CODE_WIDTH)
        at = self.row + epoch % CODE_SLOTS * CODE_SLOT
        stamp, slot_gen = _STAMP.unpack_from(m, at)
        if stamp != epoch or slot_gen != gen:
            m[at + _STAMP.size : at + CODE_SLOT] = _ZERO_CODES
            _STAMP.pack_into(m, at, epoch, gen)
        at += _STAMP.size + 4 * self.class_of[status if 0 <= status < 600 else 599]
        _U32.pack_into(m, at, _U32.unpack_from(m, at)[0] + 1)
        if self.latencies:
            self._record_latency(seconds, now, gen)
        if period < 0 or state == TRIPPED or now - checked < period:
            return False
        return self._take_check(now, period)

    def _record_latency(self, seconds: float, now: float, gen: int) -> None:
        m = self.map
        epoch = int(now / LATENCY_WIDTH)
        at = self.row + CODE_SLOTS * CODE_SLOT + epoch % LATENCY_SLOTS * LATENCY_SLOT
        stamp, slot_gen = _STAMP.unpack_from(m, at)
        if stamp != epoch or slot_gen != gen:
            m[at + _STAMP.size : at + LATENCY_SLOT] = _ZERO_LATENCIES
            _STAMP.pack_into(m, at, epoch, gen)
        at += _STAMP.size + 4 * latency_bucket(int(seconds * 1000.0))
        _U32.pack_into(m, at, _U32.unpack_from(m, at)[0] + 1)

    def check_due(self, now: float, period: float) -> bool:
        """Whether this worker evaluates the expression now: at most once per `period` for
        the node, never while tripped. Claims the check (last check = now) when it is."""
        header = self.header(now)
        if header is None or header[3] == TRIPPED or now - header[7] < period:
            return False
        return self._take_check(now, period)

    def _take_check(self, now: float, period: float) -> bool:
        """check_due's decision under the lock, once the unlocked read said it is due."""
        node = self.node
        offset = self.offset or 0
        node.lock()
        try:
            key, gen, expires, state, epoch, rows, until, checked = _HEADER.unpack_from(
                self.map, offset
            )
            if key != self.key or epoch != self.epoch or state == TRIPPED:
                return False
            if now - checked < period:
                return False
            _HEADER.pack_into(self.map, offset, key, gen, expires, state, epoch, rows, until, now)
            return True
        finally:
            node.unlock()

    def trip(self, now: float, fallback: float) -> None:
        """Open the breaker for the node for `fallback` seconds; the windows start over (a
        new generation: every row's slots are stale)."""
        node = self.node
        offset = self.offset or 0
        node.lock()
        try:
            key, gen, expires, state, epoch, rows, _until, _checked = _HEADER.unpack_from(
                self.map, offset
            )
            if key == self.key and epoch == self.epoch and state != TRIPPED:
                expires = max(expires, now + fallback + self.horizon)
                _HEADER.pack_into(
                    self.map,
                    offset,
                    key,
                    gen + 1,
                    expires,
                    TRIPPED,
                    epoch,
                    rows,
                    now + fallback,
                    now,
                )
        finally:
            node.unlock()

    def view(self, now: float) -> tuple[Counter[int], Counter[int]]:
        """The node's (codes, latencies) over the windows ending at `now`: the rows added up.
        Codes are keyed by the lowest code of their class, latencies by their value in ms,
        as RollingWindows.view gives them to WindowView. Empty while detached."""
        m = self.map
        header = self.header(now)
        if header is None:
            return Counter(), Counter()
        gen, rows = header[1], header[5]
        offset = self.offset or 0
        classes = len(self.starts)
        codes = [0] * classes
        latencies = [0] * LATENCY_BUCKETS if self.latencies else []
        code_epoch = int(now / CODE_WIDTH)
        latency_epoch = int(now / LATENCY_WIDTH)
        for row in range(MAX_ROWS):
            if not rows >> row & 1:
                continue
            base = offset + HEADER + row * BREAKER_ROW
            for slot in range(CODE_SLOTS):
                at = base + slot * CODE_SLOT
                stamp, slot_gen = _STAMP.unpack_from(m, at)
                if slot_gen == gen and 0 <= code_epoch - stamp < CODE_SLOTS:
                    for index, count in enumerate(self.codes.unpack_from(m, at + _STAMP.size)):
                        codes[index] += count
            if not self.latencies:
                continue
            base += CODE_SLOTS * CODE_SLOT
            for slot in range(LATENCY_SLOTS):
                at = base + slot * LATENCY_SLOT
                stamp, slot_gen = _STAMP.unpack_from(m, at)
                if slot_gen == gen and 0 <= latency_epoch - stamp < LATENCY_SLOTS:
                    for index, count in enumerate(_LATENCIES.unpack_from(m, at + _STAMP.size)):
                        if count:
                            latencies[index] += count
        code_counts = Counter({self.starts[i]: n for i, n in enumerate(codes) if n})
        latency_counts = Counter({LATENCY_VALUES[i]: n for i, n in enumerate(latencies) if n})
        return code_counts, latency_counts
