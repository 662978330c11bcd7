"""Reason phrases for status lines."""

from __future__ import annotations

from http import HTTPStatus

_EXTRA = {499: b"Client Closed Request"}
_PHRASES: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
_PHRASES.update(_EXTRA)


def reason_phrase(status: int) -> bytes:
    return _PHRASES.get(status, b"Unknown")
