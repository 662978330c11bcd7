"""meshproxy.node.metrics.merge: the node's /metrics from the workers' expositions and the
supervisor's (issue 15 point 2; docs/workers.md "Node-wide numbers")."""

from __future__ import annotations

from meshproxy.node.metrics import merge

UP = "# HELP traefik_service_server_up service server is up, described by gauge value of 0 or 1.\n"
UP += "# TYPE traefik_service_server_up gauge\n"


def _up(value: int) -> str:
    return UP + f'traefik_service_server_up{{service="s@file",url="http://a"}} {value}.0\n'


def _value(text: bytes, prefix: str) -> float:
    (line,) = [ln for ln in text.decode().splitlines() if ln.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])


def test_server_up_is_up_only_if_up_in_every_worker():
    """Fresh tester F3: a server one worker holds DOWN (its health check or outlier detection)
    is 0 for the node, the same rule as the admin API's serverStatus (merge_servers: UP only
    if UP in every worker); Traefik's traefik_service_server_up is 1 only when the server
    takes traffic."""
    assert _value(merge([_up(1), _up(0)]), "traefik_service_server_up{") == 0.0
    assert _value(merge([_up(1), _up(1)]), "traefik_service_server_up{") == 1.0


def test_the_supervisors_server_up_is_left_out():
    """The supervisor compiles the configuration but probes nothing: its server_up (1, never
    probed) must not hide the workers' 0; with no worker answering it is all there is."""
    assert _value(merge([_up(0), _up(0)], _up(1)), "traefik_service_server_up{") == 0.0
    assert _value(merge([], _up(1)), "traefik_service_server_up{") == 1.0


def test_counters_sum_and_state_gauges_take_the_largest():
    """Counters are the node's sum; a state gauge (breaker state) the largest."""
    counter = "# HELP c_total x\n# TYPE c_total counter\nc_total 2.0\n"
    gauge = '# HELP g x\n# TYPE g gauge\ng{m="b"} {v}\n'
    text = merge([counter + gauge.replace("{v}", "1.0"), counter + gauge.replace("{v}", "2.0")])
    assert _value(text, "c_total ") == 4.0
    assert _value(text, "g{") == 2.0
