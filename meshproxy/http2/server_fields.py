"""A fast first look at an HTTP/2 request's field block (RFC 9113 §8.2, §8.3).

h2's validator (`h2.utilities.validate_headers`) is the authority on what is malformed, but it
walks every byte of every name and value in Python generators: about 40 µs for a typical
request on the benchmark machine, a fifth of the proxy's whole per-request budget. So this is
written by hand: `plainly_valid` accepts only blocks it can prove valid with C-speed bytes
operations (a stricter subset of h2's rules); anything else, rare in practice, goes to h2's
validator, which gives the verdict and the reason. tests/unit/test_h2_server_fields.py checks,
on generated blocks, that nothing accepted here is refused by h2.
"""

from __future__ import annotations

# RFC 9110 §5.6.2 tchar, lower case only (RFC 9113 §8.2.1: no uppercase in HTTP/2 names).
_NAME_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_SPECIAL = frozenset(
    # connection-specific fields (§8.2.2), te (only "trailers"), host (checked against
    # :authority): left to h2's validator unless plainly right
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
    }
)
_BLANKS = (32, 9)


def plainly_valid(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when `headers` (a request's decoded field block, pseudo-header fields first) is
    certainly well formed: names lower-case tokens, the four request pseudo-header fields
    once each and first (no CONNECT, no :protocol), a non-empty :path, values without NUL,
    CR, LF or surrounding blanks, no connection-specific field, `te` only `trailers`, a host
    field only if it equals :authority. False means "ask h2", not "malformed"."""
    seen: set[bytes] = set()
    regular = False
    authority: bytes | None = None
    host: bytes | None = None
    values: list[bytes] = []
    for name, value in headers:
        if name[:1] == b":":
            if regular or name not in _PSEUDO or name in seen:
                return False
            seen.add(name)
            if name == b":authority":
                authority = value
            elif name == b":method":
                if value == b"CONNECT" or not value:
                    return False
            elif name == b":path" and not value:
                return False
        else:
            regular = True
            if not name or name.translate(None, _NAME_CHARS):
                return False
            if name in _SPECIAL:
                if name == b"te":
                    if value != b"trailers":
                        return False
                elif name == b"host":
                    if host is not None:
                        return False
                    host = value
                else:
                    return False
        if value:
            if value[0] in _BLANKS or value[-1] in _BLANKS:
                return False
            values.append(value)
    if len(seen) != 4:
        return False
    if host is not None and host != authority:
        return False
    joined = b"\x01".join(values)
    return b"\r" not in joined and b"\n" not in joined and b"\x00" not in joined
