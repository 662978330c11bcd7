"""TCP/UDP ports of the proxies, one per (service, service port): first free in the range, and
stable: a mapping is kept as long as its service port exists, across controller restarts (the
table is rebuilt from the shadow Services, or read from a state file in manifest mode)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class PortsExhausted(Exception):
    pass


class PortTable:
    def __init__(self, low: int, high: int, mappings: dict[str, int] | None = None) -> None:
        self.low = low
        self.high = high
        self.mappings: dict[str, int] = dict(mappings or {})

    @staticmethod
    def ident(namespace: str, name: str, port: int) -> str:
        return f"{namespace}/{name}:{port}"

    def get(self, namespace: str, name: str, port: int) -> int | None:
        return self.mappings.get(self.ident(namespace, name, port))

    def allocate(self, namespace: str, name: str, port: int) -> int:
        ident = self.ident(namespace, name, port)
        if ident in self.mappings:
            return self.mappings[ident]
        used = set(self.mappings.values())
        for candidate in range(self.low, self.high + 1):
            if candidate not in used:
                self.mappings[ident] = candidate
                return candidate
        raise PortsExhausted(f"no free port left in {self.low}-{self.high} for {ident}")

    def retain(self, live: set[str]) -> None:
        """Free the ports of service ports that no longer exist (or changed traffic type)."""
        self.mappings = {k: v for k, v in self.mappings.items() if k in live}


def load_tables(path: str | None) -> dict[str, dict[str, int]]:
    if not path or not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text())
    return {kind: {str(k): int(v) for k, v in table.items()} for kind, table in data.items()}


def save_tables(path: str | None, tables: dict[str, PortTable]) -> None:
    if not path:
        return
    data = {kind: dict(sorted(t.mappings.items())) for kind, t in tables.items()}
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
