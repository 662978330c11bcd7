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
# RFC 9110 §5.6.2 tchar, both cases (a method is case-sensitive, RFC 9110 §9.1)
_TCHAR = _NAME_CHARS + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ALL = bytes(range(256))
# Bytes a :path may carry as they are: visible ASCII (RFC 3986); SP and non-ASCII are
# percent-encoded (as Go's server, behind Traefik), CTLs and DEL refused.
_PATH_VISIBLE = bytes(range(0x21, 0x7F))
_PATH_ENCODABLE = _PATH_VISIBLE + b" " + bytes(range(0x80, 0x100))
# RFC 9110 §5.5: a field value has no CTL but HTAB (obs-text allowed); SP joins the values
_VALUE_OK = _ALL.translate(None, bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f")


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
                if value == b"CONNECT" or not value or value.translate(None, _TCHAR):
                    return False
            elif name == b":path" and (not value or value.translate(None, _PATH_VISIBLE)):
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
    return not b" ".join(values).translate(None, _VALUE_OK)


def strict_request(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """What a translating intermediary must add to RFC 9113 §8.2.1's minimal checks (h2's
    validator) before a request goes out as HTTP/1.1, for a block `plainly_valid` left to it:
    None when it is malformed (a :method that is not a token, RFC 9110 §9.1; a field name
    that is not a token, §5.1; a value with a CTL other than HTAB or DEL, §5.5; a :path with
    one), else the block with a :path whose SP and non-ASCII bytes are percent-encoded (RFC
    3986 §2.1; Go's server does the same behind Traefik). Written by hand: h2 and h11 have no
    such check for HTTP/2 fields, and this runs only for blocks the fast path doubted."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if value.translate(None, _VALUE_OK):
            return None
        if name[:1] == b":":
            if name == b":method" and value.translate(None, _TCHAR):
                return None
            if name == b":path" and value.translate(None, _PATH_VISIBLE):
                if value.translate(None, _PATH_ENCODABLE):
                    return None  # HTAB (the only CTL left here)
                value = b"".join(
                    b"%%%02X" % byte if byte == 32 or byte > 126 else bytes((byte,))
                    for byte in value
                )
        elif not name or name.translate(None, _TCHAR):
            return None
        out.append((name, value))
    return out
