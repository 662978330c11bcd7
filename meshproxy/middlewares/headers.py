"""headers: custom request and response headers, and the static security response headers.

An empty value deletes the header (for X-Forwarded-For it also stops the proxy from appending
the client address); a `Host` request header rewrites the host sent to the backend. CORS and
the redirect/host-checking options are refused with a config error rather than ignored.
"""

from __future__ import annotations

from meshproxy.config.dynamic import Headers
from meshproxy.http.exchange import Exchange
from meshproxy.http.forwarding import HOP_BY_HOP
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError

_UNSUPPORTED = (
    "access_control_allow_credentials",
    "access_control_allow_headers",
    "access_control_allow_methods",
    "access_control_allow_origin_list",
    "access_control_allow_origin_list_regex",
    "access_control_expose_headers",
    "access_control_max_age",
    "add_vary_header",
    "allowed_hosts",
    "hosts_proxy_headers",
    "ssl_redirect",
    "ssl_temporary_redirect",
    "ssl_host",
    "ssl_force_host",
    "ssl_proxy_headers",
    "public_key",
    "is_development",
)

Header = tuple[bytes, bytes]


def _camel(field_name: str) -> str:
    head, *rest = field_name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _encode_map(values: dict[str, str] | None, path: str) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in (values or {}).items():
        lowered = name.strip().lower()
        if not lowered or any(c in lowered for c in " \t\r\n:"):
            raise MiddlewareConfigError(f"{path}.{name}", "invalid header name")
        if any(c in value for c in "\r\n"):
            raise MiddlewareConfigError(f"{path}.{name}", "header values cannot contain CR or LF")
        if lowered.encode() in HOP_BY_HOP:
            raise MiddlewareConfigError(f"{path}.{name}", "hop-by-hop headers cannot be set")
        out.append((lowered.encode("latin-1"), value.encode("latin-1")))
    return out


def _security_headers(options: Headers) -> list[Header]:
    out: list[Header] = []
    if options.sts_seconds or options.force_sts_header:
        value = f"max-age={options.sts_seconds or 0}"
        if options.sts_include_subdomains:
            value += "; includeSubDomains"
        if options.sts_preload:
            value += "; preload"
        out.append((b"strict-transport-security", value.encode()))
    if options.custom_frame_options_value:
        out.append((b"x-frame-options", options.custom_frame_options_value.encode()))
    elif options.frame_deny:
        out.append((b"x-frame-options", b"DENY"))
    if options.content_type_nosniff:
        out.append((b"x-content-type-options", b"nosniff"))
    if options.custom_browser_xss_value:
        out.append((b"x-xss-protection", options.custom_browser_xss_value.encode()))
    elif options.browser_xss_filter:
        out.append((b"x-xss-protection", b"1; mode=block"))
    for field_name, header in (
        ("content_security_policy", b"content-security-policy"),
        ("content_security_policy_report_only", b"content-security-policy-report-only"),
        ("referrer_policy", b"referrer-policy"),
        ("permissions_policy", b"permissions-policy"),
        ("feature_policy", b"feature-policy"),
    ):
        value = getattr(options, field_name)
        if value:
            out.append((header, value.encode()))
    return out


def build_headers(options: Headers, next_handler: Handler, ctx: BuildContext) -> Handler:
    for field_name in _UNSUPPORTED:
        if getattr(options, field_name) not in (None, False, [], {}, "", 0):
            raise MiddlewareConfigError(_camel(field_name), "is not supported yet by meshproxy")
    request_set = _encode_map(options.custom_request_headers, "customRequestHeaders")
    response_edits = _security_headers(options) + _encode_map(
        options.custom_response_headers, "customResponseHeaders"
    )
    response_names = {name for name, _ in response_edits}

    def edit_response(ex: Exchange, status: int, headers: list[Header]) -> list[Header]:
        kept = [(n, v) for n, v in headers if n not in response_names]
        kept.extend((n, v) for n, v in response_edits if v)
        return kept

    def headers_middleware(ex: Exchange, finish: Finish) -> None:
        request = ex.request
        for name, value in request_set:
            if name == b"host":
                if value:
                    request.set_host_header(value)
            elif value:
                request.set_header(name, value)
            else:
                request.remove_header(name)
                if name == b"x-forwarded-for":
                    request.append_client_ip = False
        if response_edits:
            if ex.response_hooks is None:
                ex.response_hooks = []
            ex.response_hooks.append(edit_response)
        next_handler(ex, finish)

    return headers_middleware
