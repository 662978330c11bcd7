"""The request path normaliser (meshproxy.http.request) against RFC 3986 and Traefik 3.7.

The RFC's own algorithm (§5.2.4 remove_dot_segments, written here step by step from its text)
is the oracle: it is checked against the RFC's examples first, then the proxy's `clean_path` is
checked against it. Traefik's sanitizePath (Go `url.URL.JoinPath()`, i.e. `path.Clean` on the
escaped path) differs from the RFC in two documented ways: empty segments are merged (`//`) and
a final `.`/`..` leaves no trailing slash. The expected values marked "Traefik 3.7" were read
from the real binary (`.venv/bin/traefik`, file provider, a backend echoing the request line).
"""

from __future__ import annotations

import posixpath
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.http.request import Request, clean_path, is_clean_path, normalize_path


def rfc_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, rule by rule (A to E) on an input and an output buffer."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):  # A
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):  # B
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):  # C
            inp = "/" + inp[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):  # D
            inp = ""
        else:  # E: the first segment, with its leading "/" if any, moves to the output
            start = 1 if inp.startswith("/") else 0
            end = inp.find("/", start)
            end = len(inp) if end < 0 else end
            out += inp[:end]
            inp = inp[end:]
    return out


def rfc_merge(base_path: str, ref: str) -> str:
    """RFC 3986 §5.2.3 for a base with an authority and a non-empty path."""
    return ref if ref.startswith("/") else base_path[: base_path.rfind("/") + 1] + ref


def traefik_rule(path: str, rfc_result: str) -> str:
    """What Traefik's JoinPath adds to the RFC: a trailing "/" only if the input had one."""
    if rfc_result != "/" and rfc_result.endswith("/") and not path.endswith("/"):
        return rfc_result[:-1]
    return rfc_result


BASE_PATH = "/b/c/d;p"  # RFC 3986 §5.4: base URI "http://a/b/c/d;p?q"

# RFC 3986 §5.4.1 (normal) and §5.4.2 (abnormal) examples whose reference is a path only.
RFC_5_4_EXAMPLES = [
    ("g", "/b/c/g"),
    ("./g", "/b/c/g"),
    ("g/", "/b/c/g/"),
    ("/g", "/g"),
    (";x", "/b/c/;x"),
    ("g;x", "/b/c/g;x"),
    (".", "/b/c/"),
    ("./", "/b/c/"),
    ("..", "/b/"),
    ("../", "/b/"),
    ("../g", "/b/g"),
    ("../..", "/"),
    ("../../", "/"),
    ("../../g", "/g"),
    ("../../../g", "/g"),
    ("../../../../g", "/g"),
    ("/./g", "/g"),
    ("/../g", "/g"),
    ("g.", "/b/c/g."),
    (".g", "/b/c/.g"),
    ("g..", "/b/c/g.."),
    ("..g", "/b/c/..g"),
    ("./../g", "/b/g"),
    ("./g/.", "/b/c/g/"),
    ("g/./h", "/b/c/g/h"),
    ("g/../h", "/b/c/h"),
    ("g;x=1/./y", "/b/c/g;x=1/y"),
    ("g;x=1/../y", "/b/c/y"),
]


@pytest.mark.parametrize(("ref", "expected"), RFC_5_4_EXAMPLES)
def test_rfc_3986_section_5_4_examples(ref, expected):
    """RFC 3986 §5.4: the oracle gives the RFC's answer, and `clean_path` gives it too, except
    that a final `.`/`..` leaves no trailing slash, as Traefik's sanitizePath does."""
    merged = rfc_merge(BASE_PATH, ref)
    assert rfc_remove_dot_segments(merged) == expected
    assert clean_path(merged) == traefik_rule(merged, expected)
    assert normalize_path(merged) == traefik_rule(merged, expected)


def test_rfc_3986_section_5_2_4_examples():
    """RFC 3986 §5.2.4 works its algorithm through `/a/b/c/./../../g` and
    `mid/content=5/../6`."""
    assert rfc_remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert rfc_remove_dot_segments("mid/content=5/../6") == "mid/6"
    assert clean_path("/a/b/c/./../../g") == "/a/g"


def test_traefik_differs_from_the_rfc_only_on_empty_segments_and_final_dot_slashes():
    """Go's path.Clean (Traefik 3.7, checked: `/a//b` is forwarded as `/a/b`, `/api/x/..` as
    `/api`): `//` merged, a final `..`/`.` leaves no slash; a trailing `/` of the input stays."""
    assert rfc_remove_dot_segments("/a//b") == "/a//b" and clean_path("/a//b") == "/a/b"
    assert rfc_remove_dot_segments("/a/b/..") == "/a/" and clean_path("/a/b/..") == "/a"
    assert clean_path("/a/b/./") == "/a/b/"
    assert clean_path("/a/b/") == "/a/b/"
    assert clean_path("/a//") == "/a/"
    assert clean_path("/a//../b") == "/b"  # the RFC (no merging) gives /a/b
    assert clean_path("//") == "/" and clean_path("/") == "/" and clean_path("/.") == "/"


# Traefik 3.7 (`.venv/bin/traefik`), requests on an entrypoint with sanitizePath true (default)
# and false: the path the backend received. Every entry was read from the binary.
TRAEFIK_FORWARDED = [
    ("/api/../admin/secret", "/admin/secret", "/api/../admin/secret"),
    ("/api/%2e%2e/admin/secret", "/admin/secret", "/api/../admin/secret"),
    ("/api/%2E%2E/admin/secret", "/admin/secret", "/api/../admin/secret"),
    ("/api/.%2e/admin/secret", "/admin/secret", "/api/../admin/secret"),
    ("/api/./x", "/api/x", "/api/./x"),
    ("/a//b", "/a/b", "/a//b"),
    ("//api/x", "/api/x", "//api/x"),
    ("/api/..%2fadmin/secret", "/api/..%2Fadmin/secret", "/api/..%2Fadmin/secret"),
    ("/api/x/..", "/api", "/api/x/.."),
    ("/api/x/.", "/api/x", "/api/x/."),
    ("/..", "/", "/.."),
    ("/../admin/secret", "/admin/secret", "/../admin/secret"),
    ("/%2e%2e/admin", "/admin", "/../admin"),
    ("/x/a/b/../../c", "/x/c", "/x/a/b/../../c"),
    ("/x/%41%62c", "/x/Abc", "/x/Abc"),
    ("/x/%7e%7E", "/x/~~", "/x/~~"),
    ("/x/a%2fb", "/x/a%2Fb", "/x/a%2Fb"),
    ("/x/a%3ab", "/x/a%3Ab", "/x/a%3Ab"),
    ("/x/%20y", "/x/%20y", "/x/%20y"),
    ("/x/%C3%A9", "/x/%C3%A9", "/x/%C3%A9"),
    ("/x/a%20%2520", "/x/a%20%2520", "/x/a%20%2520"),
    ("/x/.hidden", "/x/.hidden", "/x/.hidden"),
    ("/x/..foo", "/x/..foo", "/x/..foo"),
    ("/x/foo..", "/x/foo..", "/x/foo.."),
    ("/x/%00", "/x/%00", "/x/%00"),
    ("/api/x/", "/api/x/", "/api/x/"),
    ("*", "*", "*"),
    ("/x/a\\b", "/x/a%5Cb", "/x/a%5Cb"),
    ("/x/a\\b/../c", "/x/c", "/x/a%5Cb/../c"),
    ("/api/..\\admin/secret", "/api/..%5Cadmin/secret", "/api/..%5Cadmin/secret"),
]


@pytest.mark.parametrize(("raw", "sanitized", "unsanitized"), TRAEFIK_FORWARDED)
def test_normalised_path_is_what_traefik_forwards(raw, sanitized, unsanitized):
    """RFC 3986 §6.2.2.1 (upper-case hex) and §6.2.2.2 (unreserved decoded) always, as
    Traefik's normalizePath; §5.2.4 dot-segments (and `//`) only with sanitizePath."""
    assert normalize_path(raw) == sanitized
    assert normalize_path(raw, sanitize=False) == unsanitized


@pytest.mark.parametrize("raw", ["/x/%zz", "/x/a%", "/x/a%4", "/%g0", "/x%2"])
def test_broken_percent_encoding_is_refused(raw):
    """RFC 3986 §2.1: `%` must start two hex digits; Traefik (Go) answers 400 for `/x/%zz` and
    `/x/a%`, and so must the server (ValueError becomes 400)."""
    with pytest.raises(ValueError):
        normalize_path(raw)
    with pytest.raises(ValueError):
        Request("GET", raw.encode(), [], b"h", "127.0.0.1", 1)


def test_percent_normalisation_keeps_every_reserved_character_encoded():
    """RFC 3986 §2.2/§6.2.2.2: only unreserved characters may be decoded; every gen-delim and
    sub-delim (and `%` itself) keeps its triplet, upper-cased."""
    for char in ":/?#[]@!$&'()*+,;=%":
        triplet = f"%{ord(char):02x}"
        assert normalize_path(f"/a{triplet}b") == f"/a{triplet.upper()}b"
    for char in "AZaz09-._~":
        assert normalize_path(f"/a%{ord(char):02x}b") == f"/a{char}b"


PATH_PIECES = st.sampled_from(["/", "/", ".", "..", "a", "b", "%2e", "%2F", "%41", "x.y"])


@settings(max_examples=400, deadline=None)
@given(st.lists(PATH_PIECES, max_size=14).map(lambda parts: "/" + "".join(parts)))
def test_clean_path_is_the_rfc_algorithm_after_merging_slashes(path):
    """RFC 3986 §5.2.4 after merging empty segments, with Traefik's trailing-slash rule; also
    Python's posixpath.normpath (POSIX path semantics) plus that rule; idempotent, clean."""
    merged = re.sub("/+", "/", path)
    cleaned = clean_path(path)
    assert cleaned == traefik_rule(merged, rfc_remove_dot_segments(merged))
    by_posix = posixpath.normpath(merged)
    if merged.endswith("/") and by_posix != "/":
        by_posix += "/"
    assert cleaned == by_posix
    assert clean_path(cleaned) == cleaned and is_clean_path(cleaned)
    assert "/./" not in cleaned + "/" and "/../" not in cleaned + "/" and "//" not in cleaned
    normalised = normalize_path(path)
    assert normalize_path(normalised) == normalised  # normalising twice changes nothing


def test_request_routes_and_forwards_the_normalised_path_with_the_query_untouched():
    """Traefik 3.7: `/api/%2e%2e/admin?q=/../%2e` reaches the backend as `/admin?q=/../%2e`
    (RFC 3986 §5.2.4 applies to the path only; the query is opaque)."""
    request = Request("GET", b"/api/%2e%2e/admin?q=/../%2e", [], b"h", "127.0.0.1", 1)
    assert request.target == b"/admin?q=/../%2e"
    assert request.path == "/admin" and request.query == "q=/../%2e"
    assert request.raw_path == "/admin"


def test_request_keeps_dot_segments_without_sanitize_path_but_normalises_percent():
    """entryPoints.X.http.sanitizePath=false (Traefik 3.7): the path is not cleaned, but still
    percent-normalised (`/x/%41/../b` -> `/x/A/../b`)."""
    request = Request("GET", b"/x/%41/../b%2fc?%41", [], b"h", "127.0.0.1", 1, sanitize_path=False)
    assert request.target == b"/x/A/../b%2Fc?%41"
    assert request.path == "/x/A/../b%2Fc"


def test_request_routing_path_decodes_what_is_not_reserved():
    """Traefik 3.4.1+ routing path: `%20` decoded for matching, `%2F` kept (after
    normalisation its hex is upper-case, so `%2f` is kept encoded too, as Traefik 3.7)."""
    request = Request("GET", b"/foo%20bar/a%2fb", [], b"h", "127.0.0.1", 1)
    assert request.path == "/foo bar/a%2Fb"
    assert request.target == b"/foo%20bar/a%2Fb"


def test_absolute_form_target_is_normalised_too():
    """RFC 9112 §3.2.2 absolute-form: its path goes through the same normalisation."""
    request = Request("GET", b"http://example.test/a/../b?x", [], b"h", "127.0.0.1", 1)
    assert request.target == b"/b?x" and request.path == "/b"
    assert request.host == "example.test"


def test_a_clean_path_is_left_as_the_same_object():
    """The common path costs nothing extra: no '%', '/.' or '//' means no rebuilding."""
    target = b"/api/v1/users/42?expand=1"
    request = Request("GET", target, [], b"h", "127.0.0.1", 1)
    assert request.target is target and request.path == "/api/v1/users/42"


def test_copy_of_an_unsanitized_request_keeps_its_path():
    """A mirrored copy carries the path the original was routed with (no second cleaning)."""
    request = Request("GET", b"/a/../b", [], b"h", "127.0.0.1", 1, sanitize_path=False)
    assert request.copy().target == b"/a/../b"


TARGET_PIECES = st.sampled_from(
    ["/", ".", "..", "a", "%", "2e", "2E", "2f", "41", "zz", "?", "#", "%2e", "%2F", ";", "~", "\\"]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(TARGET_PIECES, max_size=16).map(lambda parts: "/" + "".join(parts)))
def test_any_target_is_refused_or_routed_clean(target):
    """RFC 3986 §2.1, §5.2.4, §6.2.2 on arbitrary targets: a Request either refuses the target
    (ValueError, answered 400) or routes and forwards a clean, normalised path (normalising it
    again changes nothing) with the query exactly as received."""
    try:
        request = Request("GET", target.encode(), [], b"h", "127.0.0.1", 1)
    except ValueError:
        assert "%" in target.partition("?")[0]
        return
    path, sep, query = request.target.decode().partition("?")
    assert is_clean_path(path) and normalize_path(path) == path
    assert sep + query == target[len(target.partition("?")[0]) :]
    assert "%2e" not in path.lower()  # an encoded dot is never left to hide a dot-segment
