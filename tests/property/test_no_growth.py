"""Parsing never leaks: compiling the same rules, breaker expressions and configurations again
and again leaves the process's memory flat once warmed up.

RE2 programs live in C++ memory that tracemalloc cannot see, so the measure is the resident
set size (/proc/self/statm). Each round creates and drops thousands of compiled objects; a leak
of even one small object per compilation would grow the process by tens of MiB.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from meshproxy.config.decode import ConfigDecodeError
from meshproxy.config.dynamic import decode_dynamic
from meshproxy.middlewares.breaker_expression import ExpressionError, parse_expression
from meshproxy.rules.http import compile_http_rule
from meshproxy.rules.parser import RuleError
from tests.helpers import FIXTURES

STATM = Path("/proc/self/statm")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

RULES = [
    "Host(`a.test`) && PathPrefix(`/api`)",
    "HostRegexp(`^[a-z]+\\.example\\.com$`) || PathRegexp(`^/v[0-9]+/(users|orders)/\\d+$`)",
    "HeaderRegexp(`User-Agent`, `(?i)curl|wget`) && QueryRegexp(`id`, `^[0-9a-f]{8}$`)",
    "(Host(`svc.ns.traefik.mesh`) || Host(`10.0.0.1`)) && PathPrefix(`/{path:app}`)",
    "PathRegexp(`(`)",  # rejected: the error path must not leak either
    "Host(`a`, `b`)",
    "ClientIP(`10.0.0.0/8`) && !Method(`POST`)",
]
EXPRESSIONS = [
    "NetworkErrorRatio() > 0.30 || ResponseCodeRatio(500, 600, 0, 600) > 0.25",
    "LatencyAtQuantileMS(50.0) > 100 && RequestThreshold() >= 10",
    "NetworkErrorRatio( > 0.5",
]


def rss_bytes() -> int:
    return int(STATM.read_text().split()[1]) * PAGE


def growth(work: Callable[[], None], warmup: int, rounds: int) -> int:
    for _ in range(warmup):
        work()
    gc.collect()
    before = rss_bytes()
    for _ in range(rounds):
        work()
    gc.collect()
    return rss_bytes() - before


def compile_rules() -> None:
    for rule in RULES:
        for syntax in ("v3", None):
            try:
                compile_http_rule(rule, syntax)
            except RuleError:
                pass


def parse_expressions() -> None:
    for text in EXPRESSIONS:
        try:
            parse_expression(text)
        except ExpressionError:
            pass


FIXTURE_TEXTS = [p.read_text() for p in sorted(FIXTURES.glob("*-config.json"))]


def decode_configs() -> None:
    for text in [*FIXTURE_TEXTS, "http: {routers: {r: &a [*a]}}", "http: {routers: 1}"]:
        try:
            decode_dynamic(text)
        except ConfigDecodeError:
            pass


@pytest.mark.skipif(not STATM.exists(), reason="needs /proc/self/statm (Linux)")
@pytest.mark.parametrize(
    ("work", "rounds"),
    [(compile_rules, 3000), (parse_expressions, 10000), (decode_configs, 100)],
    ids=["rules", "breaker-expressions", "dynamic-config"],
)
def test_repeated_parsing_does_not_grow_the_process(work, rounds):
    """Issue 9 ("nothing may grow without bound"): after a warm-up, thousands more
    compilations (RE2 programs included, valid and invalid inputs) grow the resident set by
    less than 8 MiB."""
    assert growth(work, warmup=rounds // 10, rounds=rounds) < 8 * 1024 * 1024
