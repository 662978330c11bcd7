"""The rate limit of per-request error lines (meshproxy.observability.log_limit): one line
per (cause, target) per interval, the count of held-back lines reported by the next one, and
a bounded table however many targets fail."""

from __future__ import annotations

from meshproxy.observability import log_limit
from meshproxy.observability.log_limit import LogLimit, held_back


def test_one_line_per_cause_and_target_per_interval_with_the_count_held_back():
    """A dead backend under load: the first failure is logged, the next ones within the
    interval are held back and counted; another cause or another target is news; once the
    interval has passed (0 here) the next line carries the count."""
    limit = LogLimit(interval=3600)
    assert limit.allow("TLS handshake failed", ("10.0.0.1", 443)) == 0
    assert [limit.allow("TLS handshake failed", ("10.0.0.1", 443)) for _ in range(3)] == [None] * 3
    assert limit.allow("TLS handshake failed", ("10.0.0.2", 443)) == 0
    assert limit.allow("TLS handshake timeout", ("10.0.0.1", 443)) == 0
    limit.interval = 0
    assert limit.allow("TLS handshake failed", ("10.0.0.1", 443)) == 3
    assert limit.allow("TLS handshake failed", ("10.0.0.1", 443)) == 0
    assert held_back(3) == " (3 more like it since the last line)" and held_back(0) == ""


def test_the_table_stays_bounded_under_many_targets(monkeypatch):
    """Failures toward ever new targets (a flood) never grow the table past MAX_KEYS."""
    monkeypatch.setattr(log_limit, "MAX_KEYS", 100)
    limit = LogLimit(interval=3600)
    for port in range(1000):
        assert limit.allow("refused", ("10.0.0.1", port)) == 0
        assert len(limit.last) <= 100
