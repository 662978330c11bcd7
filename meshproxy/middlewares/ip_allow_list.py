"""ipAllowList / ipWhiteList: only clients whose IP is in `sourceRange` get through."""

from __future__ import annotations

from meshproxy.config.dynamic import IPAllowList
from meshproxy.http.exchange import Exchange
from meshproxy.http.status import reason_phrase
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError
from meshproxy.middlewares.ip_strategy import client_ip_getter, parse_ranges
from meshproxy.networks import NetworkSet


def build_ip_allow_list(options: IPAllowList, next_handler: Handler, ctx: BuildContext) -> Handler:
    # Traefik refuses an empty sourceRange; Traefik Mesh relies on that to deny everyone.
    # We build it as deny-all so the router stays visible and answers 403 itself.
    networks = NetworkSet(parse_ranges(options.source_range or [], "sourceRange"))
    get_ip = client_ip_getter(options.ip_strategy, "ipStrategy")
    status = options.reject_status_code or 403
    if not 100 <= status <= 599 or reason_phrase(status) == b"Unknown":
        raise MiddlewareConfigError("rejectStatusCode", f"unknown status code {status}")
    body = reason_phrase(status)

    def ip_allow_list(ex: Exchange, finish: Finish) -> None:
        if not networks.contains(get_ip(ex.request)):
            ex.why = "denied"
            ex.respond(status, body)
            finish(ex, None)
            return
        next_handler(ex, finish)

    return ip_allow_list
