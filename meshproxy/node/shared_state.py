"""State the workers of a node share: token buckets of rateLimit middlewares.

A rate limit of R requests/s must hold for the node, not for each of N workers (N x R). The
buckets live in one shared mapping without a path (state_fd: a memfd the workers inherit)
that every worker maps: SLOTS fixed slots of 32 bytes (key hash u64, tokens f64, stamp f64,
unused), a bucket at `hash(middleware instance, source) % SLOTS`. Each update is a read-modify-write
under an exclusive `flock` of the file (two system calls, about 1-2 us, paid by rate-limited
requests only), so the node's count is exact. Stamps are CLOCK_MONOTONIC, which every
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

SLOTS = 65536
_SLOT = struct.Struct("<Qdd8x")


def state_fd() -> int:
    """A new, zeroed, inheritable state file for one node, as a descriptor with no name.

    memfd_create(2) (Linux): anonymous memory with no path, so a supervisor killed with
    SIGKILL leaves nothing behind (a named file in /dev/shm would stay, 2 MiB of a pod's
    64 MiB tmpfs per crash). Elsewhere: a file made in /dev/shm (or the temp dir) and unlinked
    at once. The workers inherit the descriptor (pass_fds); the memory is freed when the last
    process holding it exits. Raises OSError when neither can be made."""
    size = SLOTS * _SLOT.size
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
    """One worker's mapping of the node's bucket file (`fd`: inherited from the supervisor)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map = mmap.mmap(self.fd, SLOTS * _SLOT.size)

    def limiter(self, key: str, rate: float, burst: int) -> SharedLimiter:
        return SharedLimiter(self, key.encode(), rate, burst)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


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
