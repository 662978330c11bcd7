"""Receives configurations from providers, compiles them and swaps the live snapshot.

A payload that cannot be decoded is rejected whole and the last good snapshot keeps serving;
a payload that decodes is applied, with per-object errors recorded in the new snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshproxy.config.decode import ConfigDecodeError, ConfigError
from meshproxy.config.dynamic import DynamicConfig, decode_dynamic
from meshproxy.runtime.compiler import CompileContext, compile_snapshot
from meshproxy.runtime.snapshot import RuntimeSnapshot

log = logging.getLogger("meshproxy.config")


class ConfigManager:
    def __init__(self, context_factory: Callable[[int], CompileContext]) -> None:
        self.context_factory = context_factory
        self.snapshot: RuntimeSnapshot = RuntimeSnapshot.empty()
        self.last_error: str | None = None
        self.applied = asyncio.Event()
        self.generation = 0

    def apply_bytes(self, data: bytes, source: str) -> bool:
        """Decode and apply; False (and the old snapshot kept) when the payload is invalid."""
        try:
            config = decode_dynamic(data)
        except ConfigDecodeError as exc:
            self.reject(source, exc)
            return False
        try:
            self.apply(config, source)
        except Exception as exc:  # a compiler bug must not end the provider, nor the proxy
            log.exception("configuration from %s could not be compiled", source)
            error = ConfigError("", f"internal error while compiling: {exc}")
            self.reject(source, ConfigDecodeError([error]))
            return False
        return True

    def reject(self, source: str, exc: ConfigDecodeError) -> None:
        self.last_error = f"{source}: " + "; ".join(str(e) for e in exc.errors)
        for error in exc.errors:
            log.error(
                "configuration from %s rejected, keeping the last good one: %s", source, error
            )
        ctx = self.context_factory(self.generation)
        ctx.metrics.reload_failed()

    def apply(self, config: DynamicConfig, source: str) -> RuntimeSnapshot:
        self.generation += 1
        ctx = self.context_factory(self.generation)
        snapshot = compile_snapshot(config, ctx)
        self.snapshot = snapshot  # the atomic swap: new requests see the new snapshot
        self.last_error = None
        ctx.metrics.reload_succeeded(set(snapshot.routers), set(snapshot.services))
        for line in snapshot.error_lines():
            # Traefik logs every config error at ERR once per configuration, those that
            # disable an object ("error building proxy ... servers transport not found") and
            # those that do not ("EntryPoint doesn't exist", checked with Traefik 3.7): so
            # does meshproxy, so the default level (ERROR) says why a route 404s or 503s.
            log.error("%s", line)
        log.info("configuration %d from %s applied", self.generation, source)
        self.applied.set()
        return snapshot
