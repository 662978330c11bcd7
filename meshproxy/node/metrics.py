"""/metrics for a node with worker processes: the supervisor sums the workers' expositions.

Each worker renders its own prometheus-client registry (meshproxy.observability.metrics) when
the supervisor asks over the control channel; this module merges the texts sample by sample
(Prometheus text format 0.0.4): counters and histograms are summed (what the node counted),
gauges of amounts (open connections, sessions, pooled connections) are summed, gauges of
state (a breaker's state, a certificate's expiry) take the largest value, a server's
`traefik_service_server_up` the smallest (UP only if UP in every worker, as the admin API's
serverStatus), `_created` takes the earliest. The configuration families come
from the supervisor alone, which fetched and applied each configuration once for the node.

Why not prometheus-client's multiprocess mode: docs/workers.md gives the scrape cost measured
at 10k series both ways (bench/node_metrics_scrape.py).
"""

from __future__ import annotations

# Families the supervisor reports for the node (it runs the providers).
SUPERVISOR_FAMILIES = frozenset(
    {
        "traefik_config_reloads",
        "traefik_config_reloads_total",
        "traefik_config_last_reload_success",
        "meshproxy_config_reload_failures",
        "meshproxy_config_reload_failures_total",
    }
)
# Families only the workers know (they serve traffic and run the health checks, outlier
# detection, breakers and retry budgets); the supervisor's copy, from a configuration it
# compiles but never serves (a breaker there is forever "standby"), is left out while any
# worker answered.
WORKER_FAMILIES = frozenset(
    {
        "traefik_service_server_up",
        "meshproxy_circuit_breaker_state",
        "meshproxy_retry_budget_remaining",
    }
)
# A server's health for the node: the smallest value over the workers, so UP only if UP in
# every worker that answered. The same rule as the admin API's serverStatus
# (admin/workers.merge_servers): a server some worker will not send to is not UP for the node.
MIN_GAUGES = frozenset({"traefik_service_server_up"})
# Gauges that count things each worker holds: the node holds their sum.
SUMMED_GAUGES = frozenset(
    {
        "traefik_open_connections",
        "meshproxy_udp_sessions",
        "meshproxy_upstream_pool_connections",
    }
)


class _Family:
    __slots__ = ("help", "kind", "samples")

    def __init__(self) -> None:
        self.help = ""
        self.kind = "untyped"
        self.samples: dict[str, float] = {}  # `name{labels}` -> value, in first-seen order


def merge(texts: list[str], supervisor: str = "") -> bytes:
    """One exposition for the node: `texts` from the workers, `supervisor` from the
    supervisor's own registry (its SUPERVISOR_FAMILIES win; its others are added as a
    worker's would be). Malformed lines are skipped (a worker never writes one)."""
    families: dict[str, _Family] = {}
    sources = [(t, False) for t in texts] + ([(supervisor, True)] if supervisor else [])
    for text, from_supervisor in sources:
        family: _Family | None = None
        name = ""
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) < 4:
                    continue
                name = parts[2]
                if not from_supervisor and name in SUPERVISOR_FAMILIES:
                    family = None
                    continue
                if from_supervisor and texts and name in WORKER_FAMILIES:
                    family = None
                    continue
                family = families.get(name)
                if family is None:
                    family = families[name] = _Family()
                if parts[1] == "HELP":
                    family.help = parts[3]
                elif parts[1] == "TYPE":
                    family.kind = parts[3]
                continue
            if family is None or not line:
                continue
            key, _, raw = line.rpartition(" ")
            try:
                value = float(raw)
            except ValueError:
                continue
            old = family.samples.get(key)
            if old is None:
                family.samples[key] = value
            elif key.split("{", 1)[0].endswith("_created") or name in MIN_GAUGES:
                family.samples[key] = min(old, value)
            elif family.kind == "gauge" and name not in SUMMED_GAUGES:
                family.samples[key] = max(old, value)
            else:
                family.samples[key] = old + value
    out: list[str] = []
    for name, family in families.items():
        if not family.samples:
            continue
        out.append(f"# HELP {name} {family.help}")
        out.append(f"# TYPE {name} {family.kind}")
        out.extend(f"{key} {_number(value)}" for key, value in family.samples.items())
    return ("\n".join(out) + "\n").encode() if out else b""


def _number(value: float) -> str:
    """As prometheus-client writes values: integers without a fraction, `+Inf`, `NaN`."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return f"{value:.1f}"
    return repr(value)
