"""HTTP provider: poll the controller's endpoint, as Traefik's `providers.http` does.

Unchanged bodies are skipped (by ETag with If-None-Match when the server sends one, else by
comparing the bytes); errors back off exponentially and leave the last good config serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random

import aiohttp

from meshproxy.runtime.manager import ConfigManager

log = logging.getLogger("meshproxy.providers.http")

BACKOFF_START = 0.5
BACKOFF_FACTOR = 1.5
BACKOFF_MAX = 30.0


class HTTPProvider:
    def __init__(
        self,
        endpoint: str,
        manager: ConfigManager,
        poll_interval: float = 5.0,
        poll_timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        max_body: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.manager = manager
        self.poll_interval = max(poll_interval, 0.01)
        self.poll_timeout = poll_timeout
        self.headers = dict(headers or {})
        self.max_body = max_body if max_body and max_body > 0 else None
        self.etag: str | None = None
        self.last_digest: bytes | None = None
        self.polls = 0
        self.errors = 0

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        """One fetch; raises on transport errors and non-200/304 answers."""
        headers = dict(self.headers)
        host = headers.pop("Host", None) or headers.pop("host", None)
        if host:
            headers["Host"] = host
        if self.etag:
            headers["If-None-Match"] = self.etag
        timeout = aiohttp.ClientTimeout(total=self.poll_timeout if self.poll_timeout > 0 else None)
        async with session.get(self.endpoint, headers=headers, timeout=timeout) as response:
            self.polls += 1
            if response.status == 304:
                return
            if response.status != 200:
                raise RuntimeError(f"unexpected status {response.status} from {self.endpoint}")
            if self.max_body is not None and (response.content_length or 0) > self.max_body:
                raise RuntimeError(f"response larger than maxResponseBodySize ({self.max_body})")
            body = await response.read()
            if self.max_body is not None and len(body) > self.max_body:
                raise RuntimeError(f"response larger than maxResponseBodySize ({self.max_body})")
            digest = hashlib.blake2b(body, digest_size=16).digest()
            etag = response.headers.get("ETag")
            if digest == self.last_digest:
                self.etag = etag
                return
            # Like Traefik, remember a bad body too: it is reported once, not on every poll.
            self.last_digest = digest
            self.etag = etag
            self.manager.apply_bytes(body, f"http provider {self.endpoint}")

    async def run(self) -> None:
        backoff = BACKOFF_START
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.poll_once(session)
                    backoff = BACKOFF_START
                    delay = self.poll_interval
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.errors += 1
                    self.manager.last_error = f"http provider {self.endpoint}: {exc}"
                    log.error(
                        "cannot fetch configuration from %s: %s; keeping the last good "
                        "configuration, retrying in %.1fs",
                        self.endpoint,
                        exc,
                        backoff,
                    )
                    delay = backoff * random.uniform(0.5, 1.5)
                    backoff = min(backoff * BACKOFF_FACTOR, BACKOFF_MAX)
                await asyncio.sleep(delay)
