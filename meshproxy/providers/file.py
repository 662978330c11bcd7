"""File provider: a dynamic config file (or a directory of them), re-read when it changes.

Changes are found by polling the file's stat every 200 ms: dependable on every filesystem
(including Kubernetes ConfigMap symlink swaps, where inotify watches go stale), and cheap.

A file being rewritten in place passes through states that are not configurations: empty
right after `open(..., "w")` truncates it, then a prefix of the new text. So a change is only
taken once it is *whole and stable*:

- the read is consistent: the file's stat (mtime, size, inode) is the same before and after
  reading it;
- the content is stable: two consecutive polls (200 ms apart) saw the same stat and the same
  content hash (a debounce: an editor or `kubectl cp` that is still writing moves one of them);
- an empty file (or one with only whitespace or comments, i.e. no YAML document) is never a
  configuration; an intentionally empty configuration is written `{}`;
- a prefix that does not parse (truncated JSON, an unterminated YAML scalar...) is rejected
  with the file's path, and the last good configuration keeps serving.

- on Linux, a file that a writer has modified and not closed yet is still being written
  (inotify `IN_MODIFY` without `IN_CLOSE_WRITE`), however long the writer pauses: a prefix cut
  at a YAML line boundary is a valid, smaller document that no content check can tell from a
  finished file, so this is what keeps it out. A writer silent for `WRITER_GRACE` seconds
  without closing is taken as done (it may hold the file open for good). Without inotify
  (other systems, no watch left, `MESHPROXY_FILE_WATCH=poll`) the stat debounce above is all;
  replacing the file atomically (write a temporary file, rename it over, as Kubernetes and
  most tools do) never exposes a prefix in any case.

A configuration that would remove every router is applied (it may be meant) with a warning.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import logging
import os
import struct
import sys
import time
from pathlib import Path

import yaml

from meshproxy.config.decode import ConfigDecodeError, ConfigError, load_text
from meshproxy.runtime.manager import ConfigManager

log = logging.getLogger("meshproxy.providers.file")

POLL_SECONDS = 0.2
WRITER_GRACE = 10.0  # seconds without a write after which an unclosed file counts as written
_SUFFIXES = (".yaml", ".yml", ".json")

Fingerprint = tuple[tuple[str, int, int, int], ...]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES and p.is_file())
    return [path]


def _fingerprint(path: Path) -> Fingerprint:
    """(file, mtime ns, size, inode) of every file read; raises OSError."""
    out = []
    for file in _files(path):
        st = file.stat()
        out.append((str(file), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def read_stable(path: Path) -> tuple[Fingerprint, dict[Path, bytes]] | None:
    """Every file's bytes with the fingerprint they were read at, or None when a file changed
    while it was being read (the caller tries again at the next poll). Raises OSError."""
    before = _fingerprint(path)
    contents = {Path(name): Path(name).read_bytes() for name, *_ in before}
    if _fingerprint(path) != before:
        return None
    return before, contents


def _digest(contents: dict[Path, bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name, data in sorted(contents.items()):
        h.update(str(name).encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.digest()


def merge_documents(contents: dict[Path, bytes]) -> bytes:
    """One file's bytes as they are; several files (a directory) merged into one document.
    Raises ConfigDecodeError naming the file that does not parse."""
    if len(contents) == 1:
        return next(iter(contents.values()))
    merged: dict[str, dict[str, dict[str, object]]] = {}
    for file, data in sorted(contents.items()):
        try:
            loaded = load_text(data) or {}
        except ConfigDecodeError as exc:
            raise ConfigDecodeError(
                [ConfigError(f"{file}: {e.path}", e.message) for e in exc.errors]
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigDecodeError([ConfigError(f"{file}: $", "expected an object")])
        for section, kinds in loaded.items():
            if not isinstance(kinds, dict):
                raise ConfigDecodeError([ConfigError(f"{file}: {section}", "expected an object")])
            for kind, objects in kinds.items():
                if not isinstance(objects, dict):
                    where = f"{file}: {section}.{kind}"
                    raise ConfigDecodeError([ConfigError(where, "expected an object")])
                target = merged.setdefault(section, {}).setdefault(kind, {})
                for name, obj in objects.items():
                    if name in target:
                        log.error(
                            "%s: %s.%s.%s is defined in several files; keeping the first",
                            file,
                            section,
                            kind,
                            name,
                        )
                        continue
                    target[name] = obj
    return yaml.safe_dump(merged).encode()


def _blank(data: bytes) -> bool:
    """No document at all: empty, whitespace, or only comments / `---` (what a file cut right
    after its header comment looks like). A text that does not parse is not blank: it is
    rejected later with its error."""
    if not data.strip():
        return True
    try:
        return load_text(data) is None
    except ConfigDecodeError:
        return False


_IN_MODIFY, _IN_CLOSE_WRITE, _IN_Q_OVERFLOW = 0x2, 0x8, 0x4000
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class WriterWatch:
    """Which files of some directories a writer has modified and not closed yet (Linux
    inotify, through libc; no dependency). `create` returns None where it is unavailable."""

    def __init__(self, fd: int, directories: dict[int, Path]) -> None:
        self.fd = fd
        self.directories = directories  # watch descriptor -> directory
        self.open_writes: dict[Path, float] = {}  # file -> monotonic time of its last write

    @classmethod
    def create(cls, directories: list[Path]) -> WriterWatch | None:
        if not sys.platform.startswith("linux") or os.environ.get("MESHPROXY_FILE_WATCH") == "poll":
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        watched: dict[int, Path] = {}
        for directory in directories:
            wd = libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MODIFY | _IN_CLOSE_WRITE)
            if wd < 0:  # no watch left (fs.inotify.max_user_watches), or no such directory
                os.close(fd)
                return None
            watched[wd] = directory
        return cls(fd, watched)

    def busy(self, files: list[Path]) -> list[Path]:
        """The files among `files` still open for writing after a write (read events first)."""
        self._drain()
        now = time.monotonic()
        for file, last in list(self.open_writes.items()):
            if now - last > WRITER_GRACE:
                del self.open_writes[file]
        return [f for f in files if f in self.open_writes]

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    self.open_writes.clear()  # lost track: fall back to the debounce alone
                    continue
                directory = self.directories.get(wd)
                if directory is None:
                    continue
                file = directory / os.fsdecode(raw.rstrip(b"\0"))
                if mask & _IN_CLOSE_WRITE:
                    self.open_writes.pop(file, None)
                elif mask & _IN_MODIFY:
                    self.open_writes[file] = time.monotonic()

    def close(self) -> None:
        os.close(self.fd)


def _router_count(manager: ConfigManager) -> int:
    snapshot = manager.snapshot
    return len(snapshot.routers) + len(snapshot.tcp_routers) + len(snapshot.udp_routers)


class FileProvider:
    """Applies the file (or directory) at start, then each whole and stable change of it.

    `poll_seconds` is the stat period; a change is applied after it has been seen unchanged on
    two consecutive polls, so at most about two periods after the writer finished.
    """

    def __init__(
        self,
        path: str,
        manager: ConfigManager,
        watch: bool = True,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.manager = manager
        self.watch = watch
        self.poll_seconds = poll_seconds
        self._handled: Fingerprint | None = None  # the stat last applied or refused
        self._handled_digest: bytes | None = None
        self._candidate: tuple[Fingerprint, bytes] | None = None  # seen once, not yet stable
        self._unreadable: str | None = None  # the last read error logged (logged once)
        self._writers: WriterWatch | None = None
        self._waiting_for: tuple[Fingerprint, bytes] | None = None  # logged once per state

    def load_once(self) -> bool:
        """Read now and apply (start-up, and `watch: false`); False when nothing was applied."""
        try:
            result = read_stable(self.path)
        except OSError as exc:
            self._cannot_read(exc)
            return False
        if result is None:
            return False
        fingerprint, contents = result
        self._handled, self._handled_digest = fingerprint, _digest(contents)
        return self.handle(contents)

    def poll(self) -> bool:
        """One poll step; True when a configuration was applied."""
        try:
            fingerprint = _fingerprint(self.path)
            if fingerprint == self._handled:
                self._candidate = None
                return False
            result = read_stable(self.path)
        except OSError as exc:
            self._cannot_read(exc)
            return False
        self._unreadable = None
        if result is None:  # written while we read: not stable
            self._candidate = None
            return False
        fingerprint, contents = result
        digest = _digest(contents)
        if self._candidate != (fingerprint, digest):
            self._candidate = (fingerprint, digest)  # wait one more poll for stability
            return False
        if self._writers is not None:
            busy = self._writers.busy([Path(name) for name, *_ in fingerprint])
            if busy:  # stable for now, but its writer has not closed it: more may come
                if self._waiting_for != self._candidate:
                    self._waiting_for = self._candidate
                    log.info(
                        "%s is being written (open for writing); waiting until it is closed",
                        ", ".join(str(f) for f in busy),
                    )
                return False
        self._candidate = None
        self._handled = fingerprint
        if digest == self._handled_digest:
            return False  # touched, or rewritten with the same bytes
        self._handled_digest = digest
        return self.handle(contents)

    def handle(self, contents: dict[Path, bytes]) -> bool:
        """Apply whole, stable contents; False (last good kept) when they are not a config."""
        source = f"file {os.fspath(self.path)}"
        empty = [file for file, data in contents.items() if _blank(data)]
        if empty or not contents:
            what = ", ".join(str(f) for f in empty) or f"{self.path} (no .yaml/.yml/.json file)"
            message = (
                f"{what}: empty (no document, only whitespace or comments), not a "
                "configuration (write {} for an empty one); keeping the last good configuration"
            )
            log.warning("%s", message)
            self.manager.last_error = f"{source}: {message}"
            return False
        try:
            data = merge_documents(contents)
        except ConfigDecodeError as exc:
            self.manager.reject(source, exc)
            return False
        before = _router_count(self.manager)
        applied = self.manager.apply_bytes(data, source)
        if applied and before and not _router_count(self.manager):
            log.warning(
                "%s: the new configuration has no router: every one of the %d routers "
                "was removed (every request now gets 404)",
                source,
                before,
            )
        return applied

    def _cannot_read(self, exc: OSError) -> None:
        message = f"cannot read {self.path}: {exc}; keeping the last good configuration"
        if message != self._unreadable:
            log.error("%s", message)
            self._unreadable = message
        self.manager.last_error = f"file {self.path}: {exc}"
        self._candidate = None

    async def run(self) -> None:
        if self.watch:
            directory = self.path if self.path.is_dir() else self.path.parent
            self._writers = WriterWatch.create([directory])
        self.load_once()
        try:
            while self.watch:
                await asyncio.sleep(self.poll_seconds)
                self.poll()
        finally:
            if self._writers is not None:
                self._writers.close()
                self._writers = None
