"""Cluster state from a directory of manifests (YAML, several documents per file, `kind: List`
accepted): for local meshes and tests. The directory is re-read when a file changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from meshproxy.controller.objects import ClusterState, Object

log = logging.getLogger("meshproxy.controller")

POLL_SECONDS = 0.5


def _files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
    )


def load_manifests(directory: Path) -> tuple[ClusterState, list[str]]:
    """Every object of a kind the controller reads; unreadable files are reported, skipped."""
    state = ClusterState()
    errors: list[str] = []
    for path in _files(directory):
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        for index, document in enumerate(documents):
            if document is None:
                continue
            if not isinstance(document, dict):
                errors.append(f"{path}: document {index} is not a Kubernetes object")
                continue
            items = document.get("items") if document.get("kind") == "List" else [document]
            if not isinstance(items, list):
                errors.append(f"{path}: document {index}: a List's items must be a list")
                continue
            for item in items:
                if (
                    not isinstance(item, dict)
                    or not isinstance(item.get("kind"), str)
                    or not isinstance(item.get("metadata"), dict)
                ):
                    errors.append(f"{path}: document {index} is not a Kubernetes object")
                    continue
                state.put(item)
    return state, errors


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in _files(directory):
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(out)


class ManifestSource:
    """Loads the directory, then reloads it whenever a file is added, removed or changed."""

    def __init__(self, directory: str, on_state: Callable[[ClusterState, list[str]], None]) -> None:
        self.directory = Path(directory)
        self.on_state = on_state

    def load(self) -> None:
        state, errors = load_manifests(self.directory)
        for error in errors:
            log.error("%s", error)
        self.on_state(state, errors)

    async def run(self) -> None:
        seen = _fingerprint(self.directory)
        self.load()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            current = _fingerprint(self.directory)
            if current != seen:
                seen = current
                self.load()


__all__ = ["ManifestSource", "Object", "load_manifests"]
