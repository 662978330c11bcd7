"""File provider: a dynamic config file (or a directory of them), re-read when it changes.

Changes are found by polling the file's stat every 200 ms: dependable on every filesystem
(including Kubernetes ConfigMap symlink swaps, where inotify watches go stale), and cheap.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import yaml

from meshproxy.runtime.manager import ConfigManager

log = logging.getLogger("meshproxy.providers.file")

POLL_SECONDS = 0.2
_SUFFIXES = (".yaml", ".yml", ".json")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES and p.is_file())
    return [path]


def _fingerprint(path: Path) -> tuple[tuple[str, int, int, int], ...] | None:
    try:
        out = []
        for file in _files(path):
            st = file.stat()
            out.append((str(file), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)
    except OSError:
        return None


def read_config_bytes(path: Path) -> bytes:
    """The file's bytes, or for a directory one merged document (as YAML)."""
    files = _files(path)
    if path.is_file() or len(files) == 1:
        return files[0].read_bytes()
    merged: dict[str, dict[str, dict[str, object]]] = {}
    for file in files:
        data = yaml.safe_load(file.read_bytes()) or {}
        for section, kinds in (data or {}).items():
            for kind, objects in (kinds or {}).items():
                target = merged.setdefault(section, {}).setdefault(kind, {})
                for name, obj in (objects or {}).items():
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


class FileProvider:
    def __init__(self, path: str, manager: ConfigManager, watch: bool = True) -> None:
        self.path = Path(path)
        self.manager = manager
        self.watch = watch

    def load_once(self) -> bool:
        try:
            data = read_config_bytes(self.path)
        except (OSError, yaml.YAMLError) as exc:
            log.error("cannot read %s: %s; keeping the last good configuration", self.path, exc)
            self.manager.last_error = f"file {self.path}: {exc}"
            return False
        return self.manager.apply_bytes(data, f"file {os.fspath(self.path)}")

    async def run(self) -> None:
        seen = _fingerprint(self.path)
        self.load_once()
        while self.watch:
            await asyncio.sleep(POLL_SECONDS)
            current = _fingerprint(self.path)
            if current != seen and current is not None:
                seen = current
                self.load_once()
