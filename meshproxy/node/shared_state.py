"""State the workers of a node share: token buckets of rateLimit middlewares, and (after
them, meshproxy.node.shared_windows) the rolling windows and states of circuitBreaker
middlewares and retry budgets.

A rate limit of R requests/s must hold for the node, not for each of N workers (N x R). The
buckets live in one shared mapping without a path (state_fd: a memfd the workers inherit)
that every worker maps: SLOTS fixed slots of 32 bytes (key hash u64, tokens f64, stamp f64,
unused), a bucket at `hash(middleware instance, source) % SLOTS`. Each update is a read-modify-write
under an exclusive `flock` of the file (two system calls, about 1-2 us, paid by rate-limited
requests only), so the node's count is exact. Each process locks through its own open file
description of the memfd (`own_description`: reopened through /proc/self/fd): flock(2) locks
belong to an open file description, and an inherited descriptor is the supervisor's one
description shared by every worker, on which one worker's LOCK_EX never excludes another's.
Stamps are CLOCK_MONOTONIC, which every
process of the host reads alike. A slot holding another key is taken over with a full bucket
(what a new source gets), the same as the single-process limiter forgetting its least
recent source: with 65,536 slots, collisions need many thousands of active sources.
Written by hand: no library offers a cross-process token bucket; multiprocessing's locks
need a fork, and workers are exec'ed.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
from typing import Any

from meshproxy.node import shared_windows

SLOTS = 65536
_SLOT = struct.Struct("<Qdd8x")
BUCKETS_BYTES = SLOTS * _SLOT.size
# The breakers' and budgets' region follows the buckets; it is sparse (memfd pages are
# allocated when first written), so its size is address space, not memory.
STATE_BYTES = BUCKETS_BYTES + shared_windows.REGION_BYTES


def own_description(fd: int) -> int:
    """A new open file description of the file `fd` refers to, for this process's flock(2).

    Locks taken with flock belong to the open file description, and every worker inherited
    the same one from the supervisor: LOCK_EX through it in one worker does not exclude
    another worker (it only converts the lock they share). Opening /proc/self/fd/N again
    makes a description of this process's own. Where /proc is missing, a dup() (the locks
    then exclude nothing between processes: the counts become approximate, as without
    locks). Raises nothing."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


def state_fd() -> int:
    """A new, zeroed, inheritable state file for one node, as a descriptor with no name.

    memfd_create(2) (Linux): anonymous memory with no path, so a supervisor killed with
    SIGKILL leaves nothing behind (a named file in /dev/shm would stay, 2 MiB of a pod's
    64 MiB tmpfs per crash). Elsewhere: a file made in /dev/shm (or the temp dir) and unlinked
    at once. The workers inherit the descriptor (pass_fds); the memory is freed when the last
    process holding it exits. Raises OSError when neither can be made."""
    size = STATE_BYTES
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("meshproxy-node", 0)  # no MFD_CLOEXEC: workers inherit it
    else:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, name = tempfile.mkstemp(prefix="meshproxy-node-", dir=shm)
        os.unlink(name)
    try:
        os.ftruncate(fd, size)
        os.set_inheritable(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


class SharedBuckets:
    """One worker's mapping of the node's bucket file (`fd`: inherited from the supervisor;
    it is left open, this object locks and maps through its own description of the file)."""

    def __init__(self, fd: int) -> None:
        self.fd = own_description(fd)
        self.map = mmap.mmap(self.fd, BUCKETS_BYTES)

    def limiter(self, key: str, rate: float, burst: int) -> SharedLimiter:
        return SharedLimiter(self, key.encode(), rate, burst)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class NodeState:
    """Everything one worker shares with the node: the token buckets, and the breakers' and
    retry budgets' windows (meshproxy.node.shared_windows) written in row `row` (the
    worker's index: a restarted worker takes its predecessor's row over)."""

    def __init__(self, fd: int, row: int) -> None:
        self.buckets = SharedBuckets(fd)
        size = os.fstat(self.buckets.fd).st_size
        self.windows: shared_windows.NodeWindows | None = None
        if size >= STATE_BYTES:
            self.windows = shared_windows.NodeWindows(
                self.buckets.fd, BUCKETS_BYTES, shared_windows.REGION_BYTES, row
            )

    def limiter(self, key: str, rate: float, burst: int) -> SharedLimiter:
        return self.buckets.limiter(key, rate, burst)

    def budget(self, key: str, window: float) -> Any:
        """A retry budget's node-wide counts, or None (per-worker counts then)."""
        return None if self.windows is None else self.windows.budget(key, window)

    def breaker(self, key: str, boundaries: list[int], latencies: bool, horizon: float) -> Any:
        """A circuit breaker's node-wide windows and state, or None (per-worker then)."""
        if self.windows is None:
            return None
        return self.windows.breaker(key, boundaries, latencies, horizon)

    def close(self) -> None:
        if self.windows is not None:
            self.windows.close()
        self.buckets.close()


class SharedLimiter:
    """The RateLimiterState interface (middlewares/rate_limit.py) over the shared buckets."""

    __slots__ = ("burst", "fd", "key", "map", "rate")

    def __init__(self, buckets: SharedBuckets, key: bytes, rate: float, burst: int) -> None:
        self.map = buckets.map
        self.fd = buckets.fd
        self.key = key
        self.rate = rate
        self.burst = float(burst)

    def _slot(self, source: str) -> tuple[int, int]:
        digest = hashlib.blake2b(self.key + b"\0" + source.encode(), digest_size=8).digest()
        hashed = int.from_bytes(digest, "little") or 1  # 0 marks an empty slot
        return hashed, (hashed % SLOTS) * _SLOT.size

    def reserve(self, source: str, now: float) -> float:
        """Take a token; how long the request must wait for it (0: go now)."""
        hashed, offset = self._slot(source)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            key, tokens, stamp = _SLOT.unpack_from(self.map, offset)
            if key != hashed:
                tokens, stamp = self.burst, now
            elif now > stamp:
                tokens = min(self.burst, tokens + (now - stamp) * self.rate)
                stamp = now
            tokens -= 1.0
            _SLOT.pack_into(self.map, offset, hashed, tokens, stamp)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def tokens(self, source: str, now: float) -> float:
        """The tokens `source` has at `now` for the node, changing nothing (explain)."""
        hashed, offset = self._slot(source)
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            key, tokens, stamp = _SLOT.unpack_from(self.map, offset)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        if key != hashed:
            return self.burst
        return min(self.burst, tokens + max(0.0, now - stamp) * self.rate)

    def cancel(self, source: str) -> None:
        """Give back the token of a reservation that was refused."""
        hashed, offset = self._slot(source)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            key, tokens, stamp = _SLOT.unpack_from(self.map, offset)
            if key == hashed:
                _SLOT.pack_into(self.map, offset, hashed, tokens + 1.0, stamp)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
