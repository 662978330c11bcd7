"""The supervisor <-> worker control channel: frames on a Unix socketpair.

A frame is a 4-byte big-endian length, then a JSON header line (`{"t": kind, ...}\\n`), then
an optional body (a configuration's bytes, a metrics text). Written by hand because it is
twenty lines and the two ends are the same program; a frame is at most MAX_FRAME bytes.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

MAX_FRAME = 256 * 1024 * 1024  # a dynamic configuration of a large cluster fits
_LEN = struct.Struct(">I")


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode() + b"\n"
    return _LEN.pack(len(head) + len(body)) + head + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """The next frame, None at end of stream. Raises ValueError on a malformed frame."""
    try:
        prefix = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LEN.unpack(prefix)
    if size > MAX_FRAME:
        raise ValueError(f"control frame of {size} bytes")
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    head, _, body = data.partition(b"\n")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("control frame header is not an object")
    return header, body
