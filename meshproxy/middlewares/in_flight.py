"""inFlightReq: at most `amount` requests of one source being served at a time; the next one
gets 429, as in Traefik. A request counts until its response is complete."""

from __future__ import annotations

from meshproxy.config.dynamic import InFlightReq
from meshproxy.http.exchange import Exchange
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError
from meshproxy.middlewares.source import source_key_getter


def build_in_flight_req(options: InFlightReq, next_handler: Handler, ctx: BuildContext) -> Handler:
    amount = options.amount
    if amount is None or amount <= 0:
        raise MiddlewareConfigError("amount", "must be > 0")
    source_of = source_key_getter(options.source_criterion, "sourceCriterion")
    # Shared with the previous snapshot's instance while the definition is unchanged, so
    # requests still in flight there keep counting.
    in_flight: dict[str, int] = ctx.keep(dict)

    def in_flight_req(ex: Exchange, finish: Finish) -> None:
        source = source_of(ex.request)
        count = in_flight.get(source, 0)
        if count >= amount:
            ex.why = "rate_limited"  # a concurrency limit: refused for the same reason
            ex.respond(429, b"Too Many Requests")
            finish(ex, None)
            return
        in_flight[source] = count + 1

        def release(ex: Exchange, exc: BaseException | None) -> None:
            left = in_flight[source] - 1
            if left:
                in_flight[source] = left
            else:
                del in_flight[source]
            finish(ex, exc)

        next_handler(ex, release)

    return in_flight_req
